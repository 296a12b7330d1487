"""How a run trains: full, LoRA, LoRA with trainable embeddings, or Q-LoRA (GPTQ or NF4 base).

`choose_training_mode` reads only small files of the checkpoint (config, generation config,
safetensors headers, two embedding slices), so every combination of flags that cannot work fails
before any weight is loaded, with the reason and the fix. model_loading.py then builds exactly what
the mode says.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch

from qwen_finetune.args import LoraArguments, ModelArguments, TrainingArguments
from qwen_finetune.checkpoint_info import ADAPTER_CONFIG_FILE, Checkpoint, read_checkpoint
from qwen_finetune.errors import ArgumentError
from qwen_finetune.json_files import read_json
from qwen_finetune.quant_backends import Quantization, require_packages
from qwen_model.tokenization_qwen import IM_END_ID, IM_START_ID

logger = logging.getLogger(__name__)

FIRST_UNUSED_ID = 151851  # len(tokenizer): embedding rows from here on have no token and are never trained
EMBEDDING_MODULES = ["wte", "lm_head"]
WTE_WEIGHT = "transformer.wte.weight"
TRAINED_ROWS_SAMPLE = range(0, 4096)  # ordinary, frequent BPE tokens

Method = Literal["full", "lora", "qlora"]


@dataclass(frozen=True)
class TrainingMode:
    checkpoint: Checkpoint
    method: Method
    quantization: Quantization | None
    train_embeddings: bool
    embeddings_reason: str
    dtype: torch.dtype
    adapter_to_continue: Path | None

    def describe(self) -> str:
        quantized = f" on a {self.quantization} base" if self.quantization else ""
        embeddings = ""
        if self.method != "full":
            embeddings = ", embeddings trained" if self.train_embeddings else ", embeddings frozen"
        return f"{self.method}{quantized}{embeddings}, weights loaded as {self.dtype}"


# ------------------------------------------------------------------------------ trainable embeddings


def decide_train_embeddings(checkpoint: Checkpoint) -> tuple[bool, str]:
    """Does this checkpoint still need to learn the ChatML tokens? Decided from the checkpoint itself.

    1. generation_config.json `chat_format`: the released chat models say "chatml", the base models
       "raw" (and checkpoints written by this toolkit after training the embeddings say "chatml").
    2. Without that field, the <|im_start|>/<|im_end|> rows of the input embedding are compared with
       rows that no token uses (ids 151851.., never trained, still at their initial values) and with
       ordinary token rows: rows that look like the unused ones were never trained.
    3. When neither is conclusive, the embeddings are trained: that costs memory but always works,
       while a base model with frozen, untrained ChatML rows cannot learn the chat format.
    """
    chat_format = checkpoint.generation_config.get("chat_format")
    if chat_format == "chatml":
        return (
            False,
            "generation_config.json says chat_format 'chatml': the ChatML tokens are already trained",
        )
    if chat_format is not None:
        return (
            True,
            f"generation_config.json says chat_format {chat_format!r} (a base model): ChatML tokens untrained",
        )
    verdict = _chatml_rows_trained(checkpoint)
    if verdict is True:
        return False, "no chat_format in generation_config.json; the ChatML embedding rows look trained"
    if verdict is False:
        return True, "no chat_format in generation_config.json; the ChatML embedding rows look untrained"
    return (
        True,
        "no chat_format in generation_config.json and the embedding rows are inconclusive: training them",
    )


def _chatml_rows_trained(checkpoint: Checkpoint) -> bool | None:
    """True/False when the ChatML rows' norms clearly side with trained/unused rows, None otherwise."""
    file = checkpoint.tensor_files.get(WTE_WEIGHT)
    vocab_size = int(checkpoint.config.get("vocab_size", 0))
    if file is None or vocab_size - FIRST_UNUSED_ID < 8:
        return None
    from safetensors import safe_open

    with safe_open(file, framework="pt") as handle:
        rows = handle.get_slice(WTE_WEIGHT)
        unused = rows[FIRST_UNUSED_ID:vocab_size].float().norm(dim=-1)
        trained = rows[TRAINED_ROWS_SAMPLE.start : TRAINED_ROWS_SAMPLE.stop].float().norm(dim=-1)
        chatml = rows[IM_START_ID : IM_END_ID + 1].float().norm(dim=-1)
    spread = unused.std() + trained.std() + 1e-12
    if (trained.mean() - unused.mean()).abs() < 3 * spread:
        return None  # ordinary rows are indistinguishable from unused ones (e.g. a random-init model)
    distance_to_unused = ((chatml - unused.mean()) / (unused.std() + 1e-12)).abs()
    distance_to_trained = ((chatml - trained.mean()) / (trained.std() + 1e-12)).abs()
    if bool((distance_to_trained < distance_to_unused).all()):
        return True
    if bool((distance_to_unused < distance_to_trained).all()):
        return False
    return None


# ------------------------------------------------------------------------------------------- the mode


def choose_training_mode(
    model_args: ModelArguments, lora_args: LoraArguments, training_args: TrainingArguments
) -> TrainingMode:
    """Check the flags against the checkpoint and decide what to load; raises ArgumentError."""
    checkpoint = read_checkpoint(model_args.model_name_or_path)
    method: Method = "qlora" if lora_args.q_lora else "lora" if lora_args.use_lora else "full"
    quantization = _choose_quantization(checkpoint, method, lora_args)
    _check_deepspeed(training_args, method, quantization)
    adapter = _adapter_to_continue(lora_args, method)
    train_embeddings, reason = _choose_embeddings(checkpoint, method, model_args.train_embeddings, adapter)
    if adapter is None and method != "full":
        _check_target_modules(checkpoint, lora_args.lora_target_modules, train_embeddings)
        _check_lora_variant(lora_args, quantization, training_args)
    return TrainingMode(
        checkpoint=checkpoint,
        method=method,
        quantization=quantization,
        train_embeddings=train_embeddings,
        embeddings_reason=reason,
        dtype=_load_dtype(method, training_args),
        adapter_to_continue=adapter,
    )


def _choose_quantization(
    checkpoint: Checkpoint, method: Method, lora_args: LoraArguments
) -> Quantization | None:
    quant_method = checkpoint.quant_method
    if quant_method is not None and quant_method != "gptq":
        raise ArgumentError(
            f"{checkpoint.path} is quantized with {quant_method!r}; only GPTQ checkpoints (and NF4 on load) are "
            "supported for Q-LoRA. Use the full-precision checkpoint"
        )
    if method != "qlora":
        if quant_method == "gptq":
            raise ArgumentError(
                f"{checkpoint.path} is a GPTQ-quantized checkpoint: its weights cannot be trained directly. "
                "Train an adapter on it with --use_lora --q_lora, or use the full-precision checkpoint"
            )
        return None
    backend = lora_args.q_lora_backend
    if backend == "auto":
        if quant_method != "gptq":
            raise ArgumentError(
                f"--q_lora needs a quantized base, but {checkpoint.path} has no GPTQ quantization_config. Either "
                "give a GPTQ Int4/Int8 checkpoint (e.g. Qwen-7B-Chat-Int4 or the output of run_gptq.py), or add "
                "--q_lora_backend nf4 to quantize this checkpoint to 4-bit NF4 while loading (bitsandbytes)"
            )
        backend = "gptq"
    if backend == "gptq" and quant_method != "gptq":
        raise ArgumentError(
            f"--q_lora_backend gptq: {checkpoint.path} is not GPTQ-quantized (no quantization_config in "
            "config.json). Quantize it with run_gptq.py, or use --q_lora_backend nf4"
        )
    if backend == "nf4" and quant_method == "gptq":
        raise ArgumentError(
            f"--q_lora_backend nf4 quantizes a full-precision checkpoint, but {checkpoint.path} is already GPTQ. "
            "Drop --q_lora_backend (GPTQ is used as is) or give the full-precision checkpoint"
        )
    require_packages(backend)
    return backend


def _check_deepspeed(
    training_args: TrainingArguments, method: Method, quantization: Quantization | None
) -> None:
    stage = training_args.zero_stage
    if stage != 3:
        return
    if quantization is not None:
        raise ArgumentError(
            "Q-LoRA cannot run under DeepSpeed ZeRO-3: quantized weights cannot be partitioned. "
            "Use ZeRO-2 (--deepspeed finetune/ds_config_zero2.json) or no DeepSpeed"
        )
    zero = (training_args.deepspeed_config or {}).get("zero_optimization", {})
    if not zero.get("stage3_gather_16bit_weights_on_model_save", False):
        raise ArgumentError(
            "under ZeRO-3 the trained weights are partitioned across processes; set "
            '"stage3_gather_16bit_weights_on_model_save": true in the DeepSpeed config so that the model is '
            "saved consolidated (finetune/ds_config_zero3.json does)"
        )


def _adapter_to_continue(lora_args: LoraArguments, method: Method) -> Path | None:
    if not lora_args.lora_weight_path:
        return None
    if method == "full":
        raise ArgumentError("--lora_weight_path continues a LoRA adapter; add --use_lora (or drop the flag)")
    path = Path(lora_args.lora_weight_path).expanduser().resolve()
    if not (path / ADAPTER_CONFIG_FILE).is_file():
        raise ArgumentError(
            f"--lora_weight_path {lora_args.lora_weight_path}: no adapter_config.json there; give a directory "
            "written by a LoRA run (its output dir or a checkpoint-N inside it)"
        )
    return path


def _choose_embeddings(
    checkpoint: Checkpoint, method: Method, requested: str, adapter: Path | None
) -> tuple[bool, str]:
    if method == "full":
        if requested == "no":
            raise ArgumentError(
                "--train_embeddings no: full fine-tuning trains every weight; the flag applies to LoRA. "
                "Add --use_lora or drop the flag"
            )
        return True, "full fine-tuning trains every weight"
    if adapter is not None:
        saved = set(read_json(adapter / ADAPTER_CONFIG_FILE).get("modules_to_save") or [])
        has_embeddings = bool(saved & set(EMBEDDING_MODULES))
        if requested != "auto" and (requested == "yes") != has_embeddings:
            raise ArgumentError(
                f"--train_embeddings {requested} contradicts the adapter being continued ({adapter}), which "
                f"{'trains' if has_embeddings else 'does not train'} them; drop --train_embeddings"
            )
        return has_embeddings, f"as in the adapter being continued ({adapter})"
    if requested == "yes":
        return True, "--train_embeddings yes"
    if requested == "no":
        return False, "--train_embeddings no"
    return decide_train_embeddings(checkpoint)


def _check_target_modules(checkpoint: Checkpoint, targets: list[str], train_embeddings: bool) -> None:
    modules = checkpoint.module_names
    if not modules:
        return  # .bin checkpoint: peft reports unknown targets itself
    leaves = {name.rsplit(".", 1)[-1] for name in modules}
    missing = [target for target in targets if target not in leaves and target not in modules]
    if missing:
        raise ArgumentError(
            f"--lora_target_modules {' '.join(missing)}: no such module in {checkpoint.path}. "
            f"Qwen modules are c_attn c_proj w1 w2 (the default); found: {' '.join(sorted(leaves))}"
        )
    overlap = set(targets) & set(EMBEDDING_MODULES)
    if train_embeddings and overlap:
        raise ArgumentError(
            f"--lora_target_modules {' '.join(sorted(overlap))} are trained whole with trainable embeddings; "
            "drop them from --lora_target_modules or pass --train_embeddings no"
        )


def mutates_base_weights(init_lora_weights: str) -> bool:
    """PiSSA and OLoRA start the adapter from a decomposition of each weight and subtract it from the base,
    so the base in memory is no longer the checkpoint's (see model_dir.save_trained_model)."""
    return init_lora_weights.startswith(("pissa", "olora"))


def _check_lora_variant(
    lora_args: LoraArguments, quantization: Quantization | None, training_args: TrainingArguments
) -> None:
    """Refuse the variant/base combinations PEFT cannot build, before anything is loaded."""
    init = lora_args.init_lora_weights
    if lora_args.use_dora and quantization == "gptq":
        raise ArgumentError(
            "--use_dora is not available on a GPTQ base (PEFT has no DoRA for GPTQ layers); drop --use_dora, "
            "or use --q_lora_backend nf4 on the full-precision checkpoint"
        )
    if mutates_base_weights(init) and quantization == "gptq":
        raise ArgumentError(
            f"--init_lora_weights {init} decomposes the base weights, which a GPTQ checkpoint stores as "
            "integers; use the default initialisation, or the full-precision checkpoint"
        )
    if init.startswith("pissa") and quantization == "nf4":
        raise ArgumentError(
            f"--init_lora_weights {init} needs the weights in floating point, not NF4; use olora or the "
            "default initialisation with --q_lora_backend nf4"
        )
    if mutates_base_weights(init) and training_args.zero_stage == 3:
        raise ArgumentError(
            f"--init_lora_weights {init} decomposes whole weights, which ZeRO-3 partitions across processes; "
            "use ZeRO-2 (finetune/ds_config_zero2.json) or the default initialisation"
        )


def _load_dtype(method: Method, training_args: TrainingArguments) -> torch.dtype:
    """Full fine-tuning keeps float32 master weights (mixed precision computes in bf16/fp16); frozen
    LoRA bases are loaded directly in the compute precision."""
    if method == "full":
        return torch.float32
    if training_args.bf16:
        return torch.bfloat16
    if training_args.fp16:
        return torch.float16
    return torch.float32
