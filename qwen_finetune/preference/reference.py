"""The reference model of preference training: the model the policy is compared with, which is the
model training starts from, and never changes.

Where its log-probabilities come from (`ReferenceKind`, decided before any weight is loaded):

    none              simpo and orpo use the policy alone
    adapter_disabled  adapters that start as the identity: the policy itself with its adapter switched
                      off (PEFT's disable_adapter also puts the original wte / lm_head back in place of
                      their trainable copies); no second model in memory
    frozen_copy       full fine-tuning: a second, frozen copy of the starting weights; under DeepSpeed it
                      runs in an inference engine of the policy's ZeRO stage (ZeRO-3: partitioned too)
    precomputed       --precompute_ref_logps: the starting model's log-probabilities of every pair,
                      computed once before the first step and cached with the data (`ReferenceCache`);
                      no reference model at all while training

An adapter that does not start as the identity (one being continued, a random or PiSSA/OLoRA
initialisation, trained biases) needs --precompute_ref_logps: switched off, it would leave a model
other than the starting one.
"""

from __future__ import annotations

import copy
import hashlib
import json
import logging
import os
import tempfile
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import datasets
import numpy as np
import pyarrow.compute as pc
import torch

from qwen_finetune.args import LoraArguments, TrainingArguments
from qwen_finetune.data.pairs import PAIR_ROW
from qwen_finetune.errors import ArgumentError
from qwen_finetune.training_mode import TrainingMode, mutates_base_weights

from .args import PreferenceArguments
from .logps import pair_logps
from .loss import PairLogps

if TYPE_CHECKING:
    from transformers import Trainer

logger = logging.getLogger(__name__)

ReferenceKind = Literal["none", "adapter_disabled", "frozen_copy", "precomputed"]
CACHE_VERSION = "qwen_finetune.reference_logps/1"
CACHE_SUBDIR = "reference_logps"
CACHE_FILE = "logps.safetensors"
PAIR_COLUMNS = ("prompt_ids", "chosen_ids", "chosen_labels", "rejected_ids", "rejected_labels")
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth")


def adapter_start_differs(mode: TrainingMode, lora_args: LoraArguments) -> str | None:
    """Why the policy with its adapter switched off would not be the starting model, or None."""
    if mode.adapter_to_continue is not None:
        return f"the adapter {mode.adapter_to_continue} is continued (its changes are part of the starting model)"
    if lora_args.init_lora_weights == "false":
        return "--init_lora_weights false starts the adapter at random values"
    if mutates_base_weights(lora_args.init_lora_weights):
        return f"--init_lora_weights {lora_args.init_lora_weights} moves part of each weight into the adapter"
    if lora_args.lora_bias != "none":
        return f"--lora_bias {lora_args.lora_bias} trains biases of the base layers, which stay on"
    return None


def choose_reference(
    preference: PreferenceArguments, mode: TrainingMode, lora_args: LoraArguments
) -> ReferenceKind:
    """Where the reference log-probabilities come from (module docstring); raises ArgumentError for a
    setup without a correct reference."""
    if not preference.needs_reference:
        return "none"
    if preference.precompute_ref_logps:
        return "precomputed"
    if mode.method == "full":
        return "frozen_copy"
    reason = adapter_start_differs(mode, lora_args)
    if reason is not None:
        raise ArgumentError(
            f"--pref_loss {preference.pref_loss} compares the policy with the model training starts from, but "
            f"{reason}: switching the adapter off would not give that model. Add --precompute_ref_logps "
            "(the starting model's log-probabilities are computed once, before the first step)"
        )
    return "adapter_disabled"


def describe_reference(kind: ReferenceKind) -> str:
    return {
        "none": "none (the loss uses the policy alone)",
        "adapter_disabled": "the policy with its adapter switched off (no second copy)",
        "frozen_copy": "a frozen copy of the starting weights",
        "precomputed": "log-probabilities of the starting model, computed before the first step",
    }[kind]


# --------------------------------------------------------------------------------------------- live


def reference_engine(model: torch.nn.Module, trainer: Trainer) -> Any:
    """The frozen copy made ready to run beside the policy: under DeepSpeed an inference engine with
    the policy's precision and, for ZeRO-3, its partitioning (the copy was partitioned while loading);
    otherwise the model on the trainer's device with its mixed precision."""
    model.requires_grad_(False)
    if not trainer.is_deepspeed_enabled:
        return trainer.accelerator.prepare_model(model, evaluation_mode=True)
    import deepspeed

    plugin = trainer.accelerator.state.deepspeed_plugin
    assert plugin is not None, "DeepSpeed is enabled"
    config = copy.deepcopy(plugin.deepspeed_config)  # complete: the policy's engine filled in its "auto"s
    for key in ("optimizer", "scheduler"):
        config.pop(key, None)
    if config.get("zero_optimization", {}).get("stage", 0) != 3:
        config["zero_optimization"] = {"stage": 0}
    engine, *_ = deepspeed.initialize(model=model, config=config)
    engine.eval()
    return engine


# ---------------------------------------------------------------------------------------- precomputed


def _file_states(directory: Path) -> list[tuple[str, int, int]]:
    """(name, size, modification time) of the weight and config files: a rewritten file changes them."""
    return sorted(
        (path.name, path.stat().st_size, path.stat().st_mtime_ns)
        for path in directory.iterdir()
        if path.is_file() and (path.suffix in WEIGHT_SUFFIXES or path.suffix == ".json")
    )


def starting_model_fingerprint(
    mode: TrainingMode, lora_args: LoraArguments, training_args: TrainingArguments
) -> dict[str, Any]:
    """What decides the starting model's log-probabilities: the checkpoint's files, the adapter it
    starts with (when that is not the identity), how the weights are loaded and the precision."""
    checkpoint = Path(mode.checkpoint.path).resolve()
    fingerprint: dict[str, Any] = {
        "checkpoint": str(checkpoint),
        "files": _file_states(checkpoint),
        "quantization": mode.quantization,
        "dtype": str(mode.dtype),
        "bf16": bool(training_args.bf16),
        "fp16": bool(training_args.fp16),
    }
    if mode.method != "full" and adapter_start_differs(mode, lora_args) is not None:
        fingerprint["adapter"] = asdict(lora_args)
        fingerprint["seed"] = training_args.seed
        if mode.adapter_to_continue is not None:
            fingerprint["adapter_files"] = _file_states(mode.adapter_to_continue)
    return fingerprint


def pairs_fingerprint(pairs: datasets.Dataset) -> str:
    """Hash of the pairs' tokens, labels and row numbers, in order."""
    digest = hashlib.sha256()
    for batch in pairs.select_columns([*PAIR_COLUMNS, PAIR_ROW]).with_format("arrow").iter(batch_size=4096):
        digest.update(batch.column(PAIR_ROW).to_numpy().astype(np.int64).tobytes())
        for name in PAIR_COLUMNS:
            column = batch.column(name)
            digest.update(pc.list_value_length(column).to_numpy().astype(np.int64).tobytes())
            digest.update(pc.list_flatten(column).to_numpy().astype(np.int64).tobytes())
    return digest.hexdigest()


class ReferenceTable:
    """Reference log-probabilities of the chosen and the rejected answer, looked up by PAIR_ROW."""

    def __init__(self, rows: torch.Tensor, chosen: torch.Tensor, rejected: torch.Tensor) -> None:
        self.rows, self.chosen, self.rejected = rows.long(), chosen.float(), rejected.float()
        size = int(self.rows.max()) + 1 if len(self.rows) else 0
        self.dense = torch.full((size, 2), float("nan"))
        self.dense[self.rows] = torch.stack([self.chosen, self.rejected], dim=1)
        self._on_device: dict[torch.device, torch.Tensor] = {}

    def logps(self, policy: PairLogps, rows: torch.Tensor) -> PairLogps:
        dense = self._on_device.setdefault(rows.device, self.dense.to(rows.device))
        values = dense[rows]
        if bool(values.isnan().any()):
            raise ValueError(f"no reference log-probabilities for the pairs of rows {rows.tolist()}")
        return PairLogps(values[:, 0], values[:, 1], policy.chosen_tokens, policy.rejected_tokens)


class ReferenceCache:
    """Precomputed reference log-probabilities on disk, one entry per (pairs, starting model), beside
    the tokenised data in --data_cache_dir. Entries are written to a temporary file and renamed."""

    def __init__(self, cache_dir: Path, model_fingerprint: dict[str, Any]) -> None:
        self.directory = cache_dir / CACHE_SUBDIR
        self.model_fingerprint = model_fingerprint

    def key(self, pairs: datasets.Dataset) -> str:
        parts = {"version": CACHE_VERSION, "pairs": pairs_fingerprint(pairs), "model": self.model_fingerprint}
        return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:32]

    def path(self, key: str) -> Path:
        return self.directory / key / CACHE_FILE

    def load(self, key: str) -> ReferenceTable | None:
        path = self.path(key)
        if not path.is_file():
            return None
        from safetensors.torch import load_file

        tensors = load_file(str(path))
        return ReferenceTable(tensors["rows"], tensors["chosen"], tensors["rejected"])

    def save(self, key: str, table: ReferenceTable) -> Path | None:
        from safetensors.torch import save_file

        path = self.path(key)
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            handle, temporary = tempfile.mkstemp(prefix=f".{path.name}-", dir=path.parent)
            os.close(handle)
            tensors = {"rows": table.rows, "chosen": table.chosen, "rejected": table.rejected}
            save_file(tensors, temporary, metadata={"version": CACHE_VERSION})
            os.replace(temporary, path)
        except OSError as error:
            logger.warning("could not cache the reference log-probabilities in %s: %s", path, error)
            return None
        return path


@torch.no_grad()
def compute_reference_table(trainer: Trainer, model: Any, pairs: datasets.Dataset) -> ReferenceTable:
    """The log-probabilities `model` gives every pair, computed by all processes together (each a share
    of the pairs; every process gets the whole table). Collective."""
    loader = torch.utils.data.DataLoader(
        pairs.select_columns([*PAIR_COLUMNS, PAIR_ROW]),
        batch_size=trainer.args.per_device_eval_batch_size,
        collate_fn=trainer.data_collator,
        shuffle=False,
    )
    loader = trainer.accelerator.prepare(loader)
    rows, chosen, rejected = [], [], []
    for batch in loader:
        logps = pair_logps(model, batch)
        gathered = trainer.accelerator.gather_for_metrics((batch[PAIR_ROW], logps.chosen, logps.rejected))
        rows.append(gathered[0].cpu())
        chosen.append(gathered[1].float().cpu())
        rejected.append(gathered[2].float().cpu())
    return ReferenceTable(torch.cat(rows), torch.cat(chosen), torch.cat(rejected))
