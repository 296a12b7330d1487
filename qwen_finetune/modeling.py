"""Decide how to train (full, LoRA, LoRA + embeddings, Q-LoRA) and load model and tokenizer for it.

`plan_training` reads only small files of the checkpoint (config, generation config, safetensors
headers, two embedding slices), so every combination that cannot work fails before any weight is
loaded, with the reason and the fix. `load_model` then builds exactly what the plan says.
"""

from __future__ import annotations

import importlib.util
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch

import qwen_model  # noqa: F401  (registers the Qwen classes with transformers' Auto factories)
from qwen_finetune.args import LoraArguments, ModelArguments, TrainingArguments
from qwen_finetune.errors import ArgumentError
from qwen_model.tokenization_qwen import IM_END_ID, IM_START_ID

logger = logging.getLogger(__name__)

FIRST_UNUSED_ID = 151851  # len(tokenizer): embedding rows from here on have no token and are never trained
EMBEDDING_MODULES = ["wte", "lm_head"]
WTE_WEIGHT = "transformer.wte.weight"
TRAINED_ROWS_SAMPLE = range(0, 4096)  # ordinary, frequent BPE tokens

Method = Literal["full", "lora", "qlora"]
Quantization = Literal["gptq", "nf4"]


@dataclass(frozen=True)
class Checkpoint:
    """What a checkpoint directory says about itself, read without loading weights."""

    path: Path
    config: dict[str, Any]
    generation_config: dict[str, Any]
    tensor_files: dict[str, Path] = field(repr=False)  # tensor name -> safetensors file (empty for .bin)

    @property
    def quant_method(self) -> str | None:
        quantization = self.config.get("quantization_config") or {}
        method = quantization.get("quant_method")
        if method is None and (self.path / "quantize_config.json").is_file():
            method = "gptq"
        return method

    @property
    def module_names(self) -> set[str]:
        return {name.rsplit(".", 1)[0] for name in self.tensor_files}


@dataclass(frozen=True)
class TrainingPlan:
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


# ----------------------------------------------------------------------------------- the checkpoint


def read_checkpoint(model_name_or_path: str | None) -> Checkpoint:
    if not model_name_or_path:
        raise ArgumentError("--model_name_or_path is required: a local Qwen checkpoint directory")
    path = Path(model_name_or_path).expanduser().resolve()
    if not (path / "config.json").is_file():
        raise ArgumentError(
            f"--model_name_or_path {model_name_or_path}: no config.json there. Give a local checkpoint directory; "
            "nothing is downloaded (fetch hub models first, e.g. `huggingface-cli download Qwen/Qwen-7B-Chat "
            "--local-dir DIR`)"
        )
    config = _read_json(path / "config.json")
    if config.get("model_type") != "qwen":
        raise ArgumentError(
            f"{path}/config.json has model_type {config.get('model_type')!r}; this toolkit trains Qwen (v1) "
            "checkpoints (model_type 'qwen')"
        )
    generation = path / "generation_config.json"
    return Checkpoint(
        path=path,
        config=config,
        generation_config=_read_json(generation) if generation.is_file() else {},
        tensor_files=_tensor_files(path),
    )


def _read_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as error:
        raise ArgumentError(f"cannot read {path}: {error}") from error


def _tensor_files(path: Path) -> dict[str, Path]:
    """Tensor name -> safetensors file, from the shard index or the single file's header."""
    from safetensors import safe_open

    index = path / "model.safetensors.index.json"
    if index.is_file():
        weight_map = _read_json(index).get("weight_map", {})
        return {name: path / file for name, file in weight_map.items()}
    single = path / "model.safetensors"
    if single.is_file():
        with safe_open(single, framework="pt") as handle:
            return dict.fromkeys(handle.keys(), single)
    return {}


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


# ------------------------------------------------------------------------------------------- the plan


def plan_training(
    model_args: ModelArguments, lora_args: LoraArguments, training_args: TrainingArguments
) -> TrainingPlan:
    """Check the flags against the checkpoint and decide what to load; raises ArgumentError."""
    checkpoint = read_checkpoint(model_args.model_name_or_path)
    method: Method = "qlora" if lora_args.q_lora else "lora" if lora_args.use_lora else "full"
    quantization = _choose_quantization(checkpoint, method, lora_args)
    _check_deepspeed(training_args, method, quantization)
    adapter = _adapter_to_continue(lora_args, method)
    train_embeddings, reason = _choose_embeddings(checkpoint, method, model_args.train_embeddings, adapter)
    if adapter is None and method != "full":
        _check_target_modules(checkpoint, lora_args.lora_target_modules, train_embeddings)
    return TrainingPlan(
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
    _require_packages(backend)
    return backend


def _require_packages(backend: str) -> None:
    needed = {"gptq": ["gptqmodel", "optimum"], "nf4": ["bitsandbytes"]}[backend]
    missing = [name for name in needed if importlib.util.find_spec(name) is None]
    if missing:
        raise ArgumentError(
            f"Q-LoRA with {backend} needs {', '.join(missing)}: pip install 'qwen-finetune[{backend}]' "
            "(keep torch pinned, e.g. -c constraints.txt)"
        )


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
    zero = training_args.deepspeed_config["zero_optimization"]
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
    if not (path / "adapter_config.json").is_file():
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
        saved = set(_read_json(adapter / "adapter_config.json").get("modules_to_save") or [])
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


# ------------------------------------------------------------------------------------------- loading


def load_tokenizer(checkpoint_path: str | Path, model_max_length: int) -> Any:
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(str(checkpoint_path), model_max_length=model_max_length)
    except (OSError, ValueError) as error:
        raise ArgumentError(
            f"cannot load the tokenizer of {checkpoint_path}: {error}. The directory needs qwen.tiktoken and "
            "tokenizer_config.json as in the released checkpoints"
        ) from error
    tokenizer.padding_side = "right"
    return tokenizer


def load_model(
    plan: TrainingPlan, lora_args: LoraArguments, training_args: TrainingArguments
) -> torch.nn.Module:
    """The model to hand to the Trainer: a PreTrainedModel (full) or a PeftModel (LoRA, Q-LoRA)."""
    from transformers import AutoModelForCausalLM

    kwargs: dict[str, Any] = {
        "dtype": plan.dtype,
        "attn_implementation": attention_backend(plan, training_args),
    }
    if plan.quantization is not None:
        kwargs["device_map"] = {"": str(training_args.device)}
    if plan.quantization == "nf4":
        kwargs["quantization_config"] = _nf4_config(plan.dtype)
    model = AutoModelForCausalLM.from_pretrained(str(plan.checkpoint.path), **kwargs)
    model.config.use_cache = False
    if plan.method == "full":
        return model
    if plan.quantization is not None:
        from peft import prepare_model_for_kbit_training

        # The Trainer turns on activation checkpointing itself (--gradient_checkpointing).
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    model = _attach_adapter(model, plan, lora_args)
    if plan.quantization == "nf4":
        disable_bnb_cpu_repacking(model)
    if plan.quantization == "gptq":
        keep_gptq_cpu_kernels_differentiable(model)
    return model


def attention_backend(plan: TrainingPlan, training_args: TrainingArguments) -> str:
    """flash_attention_2 where it can run (CUDA, half precision, flash-attn installed): its varlen kernel
    gives packed rows the cost of separate samples; sdpa (block-diagonal mask for packed rows) otherwise."""
    half_precision = plan.dtype in (torch.bfloat16, torch.float16)
    on_cuda = training_args.device.type == "cuda"
    if on_cuda and half_precision and importlib.util.find_spec("flash_attn") is not None:
        logger.info("attention: flash_attention_2 (flash-attn installed)")
        return "flash_attention_2"
    return "sdpa"


def _nf4_config(compute_dtype: torch.dtype) -> Any:
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_compute_dtype=compute_dtype,
        bnb_4bit_use_double_quant=True,
    )


def _attach_adapter(model: torch.nn.Module, plan: TrainingPlan, lora_args: LoraArguments) -> torch.nn.Module:
    from peft import LoraConfig, PeftModel, get_peft_model

    if plan.adapter_to_continue is not None:
        logger.info("continuing the adapter %s (its own LoRA settings apply)", plan.adapter_to_continue)
        return PeftModel.from_pretrained(model, str(plan.adapter_to_continue), is_trainable=True)
    config = LoraConfig(
        r=lora_args.lora_r,
        lora_alpha=lora_args.lora_alpha,
        lora_dropout=lora_args.lora_dropout,
        target_modules=lora_args.lora_target_modules,
        bias=lora_args.lora_bias,
        modules_to_save=list(EMBEDDING_MODULES) if plan.train_embeddings else None,
        task_type="CAUSAL_LM",
    )
    return get_peft_model(model, config)


def disable_bnb_cpu_repacking(model: torch.nn.Module) -> None:
    """On CPUs with AVX512-BF16, bitsandbytes repacks 4-bit weights at the first eval-mode forward,
    which later breaks backward ("a view of a leaf Variable ... in-place operation")."""
    import bitsandbytes as bnb

    for module in model.modules():
        if isinstance(module, bnb.nn.Linear4bit):
            module.support_avx512bf16_for_cpu = False


def keep_gptq_cpu_kernels_differentiable(model: torch.nn.Module) -> int:
    """Pin gptqmodel's CPU int4 kernels (TorchAtenLinear) to their differentiable path.

    At its first eval-mode forward without grad (an evaluation during training) the kernel
    switches itself for good to a bf16 packed matmul that runs under no_grad: later training
    steps would silently get no gradient through the quantized layers, and evaluations would
    see different numbers than training. Returns the number of layers pinned.
    """
    pinned = 0
    for module in model.modules():
        if type(module).__module__.startswith("gptqmodel.") and getattr(module, "linear_mode", "") is None:
            module.linear_mode = "train"
            pinned += 1
    return pinned


def count_parameters(model: torch.nn.Module) -> tuple[int, int]:
    """(trainable, total) parameters, ZeRO-3 partitions counted at full size (peft's count for adapters)."""
    if hasattr(model, "get_nb_trainable_parameters"):
        return model.get_nb_trainable_parameters()
    trainable = total = 0
    for parameter in model.parameters():
        count = getattr(parameter, "ds_numel", None) or parameter.numel()
        total += count
        if parameter.requires_grad:
            trainable += count
    return trainable, total
