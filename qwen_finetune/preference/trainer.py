"""The trainer of `--stage dpo`: QwenTrainer (token meter, checkpoint layout, logs, saving) with the
preference loss on batches of pairs.

Per micro-batch: the reference log-probabilities (reference.py), then one forward pass of the policy
over the chosen and rejected sequences together (logps.py), then the loss (loss.py). The loss is a
mean over pairs, so the Trainer divides it by the accumulation steps and never passes a token count.
The metrics (rewards, reward accuracy and margin, policy log-probabilities) are averaged over the
pairs of every micro-batch since the last log and over processes, and go into the same logs as the
loss: the console, trainer_state.json's log history, TensorBoard and the run report.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import datasets
import torch

from qwen_finetune.args import RunArguments
from qwen_finetune.data.pairs import PAIR_ROW
from qwen_finetune.errors import ArgumentError
from qwen_finetune.model_loading import load_model
from qwen_finetune.train import QwenTrainer
from qwen_finetune.training_mode import TrainingMode

from .args import PreferenceArguments
from .logps import pair_logps
from .loss import PairLogps, metric_names, preference_loss
from .reference import (
    PAIR_COLUMNS,
    ReferenceCache,
    ReferenceKind,
    ReferenceTable,
    compute_reference_table,
    reference_engine,
    starting_model_fingerprint,
)

TRAIN, EVAL = "train", "eval"


class PairMetrics:
    """Pair-weighted sums of the batch metrics since the last log, per split (train, eval)."""

    def __init__(self, names: tuple[str, ...]) -> None:
        self.names = names
        self.totals: dict[str, torch.Tensor] = {}

    def add(self, split: str, metrics: dict[str, torch.Tensor], pairs: int) -> None:
        values = torch.stack([metrics[name].float().reshape(()) for name in self.names]) * pairs
        values = torch.cat([values, values.new_tensor([pairs])])
        previous = self.totals.get(split)
        self.totals[split] = values if previous is None else previous + values

    def means(self, split: str, trainer: QwenTrainer) -> dict[str, float]:
        """The means over processes since the last call, then restart. Collective: every process logs
        at the same steps."""
        local = self.totals.pop(split, None)
        if local is None:
            local = torch.zeros(len(self.names) + 1)
        total = trainer.accelerator.reduce(local.to(trainer.args.device), reduction="sum").cpu()
        pairs = float(total[-1])
        if pairs == 0:
            return {}
        return {name: float(value) / pairs for name, value in zip(self.names, total[:-1])}


@contextlib.contextmanager
def evaluating(model: torch.nn.Module) -> Iterator[None]:
    """Eval mode (no dropout, no NEFTune noise) for a reference pass, then the mode it was in."""
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)


class PreferenceTrainer(QwenTrainer):
    """Trains on PairCollator batches. `reference_model` is the frozen copy (kind frozen_copy) and
    `reference_cache` where precomputed log-probabilities live (kind precomputed)."""

    loss_is_scaled_for_ga = False

    def __init__(
        self,
        *args: Any,
        preference: PreferenceArguments,
        reference_kind: ReferenceKind,
        reference_model: torch.nn.Module | None = None,
        reference_cache: ReferenceCache | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(*args, **kwargs)
        self.model_accepts_loss_kwargs = False  # the Trainer counts no tokens for the loss
        self.preference = preference
        self.reference_kind = reference_kind
        self.reference_model = reference_model
        self.reference_cache = reference_cache
        self.pair_metrics = PairMetrics(metric_names(preference))
        self._reference_ready = False
        self._reference_engine: Any = None
        self._reference_tables: dict[str, ReferenceTable] = {}

    def _set_signature_columns_if_needed(self) -> None:
        # the columns the pair collator reads (the model's forward signature names none of them)
        if self._signature_columns is None:
            columns = [*PAIR_COLUMNS, PAIR_ROW, self.args.length_column_name]
            self._signature_columns = columns  # type: ignore[assignment]  # the Trainer declares it as None

    # ------------------------------------------------------------------------------------ reference

    def _prepare_reference(self, model: torch.nn.Module) -> None:
        """Once, at the first batch (all processes): start the frozen copy's engine, or get the
        precomputed log-probabilities (from the cache, or computed now with the starting model)."""
        self._reference_ready = True
        if self.reference_kind == "frozen_copy":
            assert self.reference_model is not None, "the frozen copy is loaded with the policy"
            self._reference_engine = reference_engine(self.reference_model, self)
        elif self.reference_kind == "precomputed":
            splits = {TRAIN: self.train_dataset, EVAL: self.eval_dataset}
            for split, pairs in splits.items():
                if pairs is not None:
                    self._reference_tables[split] = self._precomputed_table(model, pairs)

    def _precomputed_table(self, model: torch.nn.Module, pairs: Any) -> ReferenceTable:
        cache = self.reference_cache
        assert cache is not None and isinstance(pairs, datasets.Dataset), "precomputed: cached pair datasets"
        key = cache.key(pairs)
        table = cache.load(key)
        found = torch.tensor([float(table is not None)], device=self.args.device)
        if int(self.accelerator.reduce(found, reduction="sum").item()) == self.accelerator.num_processes:
            assert table is not None
            return table
        if self.state.global_step > 0:
            raise ArgumentError(
                f"--precompute_ref_logps: resuming at step {self.state.global_step}, but the reference "
                f"log-probabilities computed before the first step are not in {cache.path(key)} on every node, and "
                "they cannot be computed again from trained weights. Resume with the --data_cache_dir of the first "
                "run, or start the run again"
            )
        with torch.no_grad(), evaluating(model), self.accelerator.autocast():
            table = compute_reference_table(self, model, pairs)
        if self.args.local_process_index == 0:
            cache.save(key, table)
        return table

    def _live_reference(self, model: torch.nn.Module, inputs: dict[str, Any]) -> PairLogps | None:
        if self.reference_kind == "adapter_disabled":
            peft_model = self.accelerator.unwrap_model(model)
            with torch.no_grad(), evaluating(model), peft_model.disable_adapter():
                return pair_logps(model, inputs)
        if self.reference_kind == "frozen_copy":
            with torch.no_grad():
                return pair_logps(self._reference_engine, inputs)
        return None

    # ----------------------------------------------------------------------------------------- loss

    def compute_loss(
        self,
        model: torch.nn.Module,
        inputs: dict[str, Any],
        return_outputs: bool = False,
        num_items_in_batch: torch.Tensor | int | None = None,
    ) -> Any:
        if not self._reference_ready:
            self._prepare_reference(model)
        split = TRAIN if model.training else EVAL
        if model.training:
            self.meter.count(inputs)
        with self.accelerator.autocast():
            reference = self._live_reference(model, inputs)  # first: its activations are freed at once
            policy = pair_logps(model, inputs, chosen_prompt_nll=self.preference.pref_loss == "orpo")
        if self.reference_kind == "precomputed":
            reference = self._reference_tables[split].logps(policy, inputs[PAIR_ROW])
        loss, metrics = preference_loss(policy, reference, self.preference)
        self.pair_metrics.add(split, metrics, pairs=len(policy.chosen))
        return (loss, metrics) if return_outputs else loss

    def prediction_step(
        self,
        model: torch.nn.Module,
        inputs: dict[str, Any],
        prediction_loss_only: bool,
        ignore_keys: list[str] | None = None,
    ) -> tuple[torch.Tensor | None, Any, Any]:
        inputs = self._prepare_inputs(inputs)
        with torch.no_grad(), self.compute_loss_context_manager():
            loss = self.compute_loss(model, inputs)
        return loss.detach(), None, None

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        if "loss" in logs:
            logs.update(self.pair_metrics.means(TRAIN, self))
        elif "eval_loss" in logs:
            logs.update(
                {f"eval_{name}": value for name, value in self.pair_metrics.means(EVAL, self).items()}
            )
        super().log(logs, start_time)


def make_preference_trainer(
    arguments: RunArguments, reference_kind: ReferenceKind, *, mode: TrainingMode, **trainer_arguments: Any
) -> PreferenceTrainer:
    """The trainer of a `--stage dpo` run, with what its reference needs: a frozen copy of the starting
    weights, loaded like the policy (under ZeRO-3 partitioned while loading), or the reference cache."""
    reference_model = None
    if reference_kind == "frozen_copy":
        reference_model = load_model(mode, arguments.lora, arguments.training).eval()
    reference_cache = None
    if reference_kind == "precomputed":
        fingerprint = starting_model_fingerprint(mode, arguments.lora, arguments.training)
        reference_cache = ReferenceCache(arguments.data.resolved_cache_dir, fingerprint)
    return PreferenceTrainer(
        **trainer_arguments,
        mode=mode,
        preference=arguments.preference,
        reference_kind=reference_kind,
        reference_model=reference_model,
        reference_cache=reference_cache,
    )
