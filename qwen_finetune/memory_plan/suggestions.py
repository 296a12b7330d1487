"""Changes that make a run fit its device, each with the peak it would have.

Each change is planned again from scratch (never scaled), tried alone first; when none fits alone,
they are added up one by one in the order below until the run fits.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

from .memory import estimate_memory
from .run_setup import TrainingSetup, ZeroSetup
from .shapes import AdapterShape

MIN_SUGGESTED_LENGTH = 256
DEFAULT_LORA = AdapterShape(rank=64, targets=("c_attn", "c_proj", "w1", "w2"))


@dataclass(frozen=True)
class Suggestion:
    change: str  # what to do, in words
    flags: tuple[str, ...]  # the finetune.py flags that do it
    setup: TrainingSetup
    peak_bytes: int  # planned peak per device with the change
    device_total_bytes: int  # what the device must hold (CPU: every process of the machine)


def device_total(setup: TrainingSetup, peak: int) -> int:
    """On CPU the processes of one machine share its memory; a GPU holds one process."""
    return peak * setup.processes_per_node if setup.device_kind == "cpu" else peak


Change = tuple[str, tuple[str, ...], TrainingSetup]


def _candidate_changes(setup: TrainingSetup) -> Iterator[Change]:
    if not setup.gradient_checkpointing:
        yield (
            "turn on gradient checkpointing",
            ("--gradient_checkpointing",),
            setup.with_changes(gradient_checkpointing=True),
        )
    if setup.keeps_freed_memory and setup.device_kind == "cpu":
        yield (
            "let glibc unmap freed tensors again (slower: their pages are faulted in anew)",
            ("--keep_freed_memory", "no"),
            setup.with_changes(keeps_freed_memory=False),
        )
    if setup.world_size > 1 and setup.zero_stage != 3 and setup.quantization is None:
        zero = setup.zero or ZeroSetup(stage=3)
        yield (
            f"partition weights, gradients and optimizer states over the {setup.world_size} processes",
            ("--deepspeed", "finetune/ds_config_zero3.json"),
            setup.with_changes(zero=ZeroSetup(stage=3, overlap_comm=zero.overlap_comm)),
        )
    if setup.zero is None or not setup.zero.offload_optimizer:
        stage = 3 if setup.zero_stage == 3 else 2
        offloaded = ZeroSetup(stage=stage, offload_optimizer=True, offload_params=stage == 3)
        yield (
            "offload the optimizer states to CPU memory (DeepSpeed)",
            ("--deepspeed", f"finetune/ds_config_zero{stage}_offload.json"),
            setup.with_changes(zero=offloaded),
        )
    if setup.method == "full":
        yield (
            "train a LoRA adapter instead of every weight",
            ("--use_lora",),
            setup.with_changes(
                method="lora",
                adapter=DEFAULT_LORA,
                train_embeddings=False,
                weight_precision=setup.compute_precision,
            ),
        )
    if setup.quantization is None and setup.zero_stage != 3:
        adapter = setup.adapter or DEFAULT_LORA
        yield (
            "Q-LoRA: quantize the frozen base to NF4 while loading",
            ("--use_lora", "--q_lora", "--q_lora_backend", "nf4"),
            setup.with_changes(
                method="qlora",
                quantization="nf4",
                adapter=adapter,
                train_embeddings=setup.train_embeddings and setup.method != "full",
                weight_precision=setup.compute_precision,
            ),
        )
    length = setup.max_length // 2
    while length >= MIN_SUGGESTED_LENGTH:
        yield (
            f"shorter rows: {length} tokens",
            ("--model_max_length", str(length)),
            setup.with_changes(max_length=length),
        )
        length //= 2
    batch = setup.micro_batch // 2
    while batch >= 1:
        accumulation = setup.accumulation * setup.micro_batch // batch
        yield (
            f"smaller micro-batches ({batch}), same effective batch",
            ("--per_device_train_batch_size", str(batch), "--gradient_accumulation_steps", str(accumulation)),
            setup.with_changes(micro_batch=batch, accumulation=accumulation),
        )
        batch //= 2


def _planned(change: str, flags: tuple[str, ...], setup: TrainingSetup) -> Suggestion:
    peak = estimate_memory(setup).peak
    return Suggestion(change, flags, setup, peak, device_total(setup, peak))


def suggest_changes(setup: TrainingSetup, available_bytes: int) -> list[Suggestion]:
    """The single changes that fit, smallest peak first; if none does, one combination that fits
    (or none at all when even every change together does not)."""
    singles = [_planned(*change) for change in _candidate_changes(setup)]
    fitting = sorted(
        (s for s in singles if s.device_total_bytes <= available_bytes), key=lambda s: s.peak_bytes
    )
    if fitting:
        return fitting
    return _combined(setup, available_bytes)


def _combined(setup: TrainingSetup, available_bytes: int) -> list[Suggestion]:
    """Add one kind of change after the other (in the order of `_candidate_changes`): the mildest
    variant of a kind that makes the run fit ends the search, else its strongest variant is kept.
    Changes the fitting combination turns out not to need are dropped again."""
    chosen: list[str] = []
    current = setup
    used: set[str] = set()
    while True:
        kind = _next_kind(current, used)
        if kind is None:
            return []
        used.add(kind[0][1][0])
        for change, _, changed in kind:  # mildest first
            if _planned("", (), changed).device_total_bytes <= available_bytes:
                return [_prune([*chosen, change], setup, available_bytes)]
        chosen.append(kind[-1][0])
        current = kind[-1][2]


def _apply(setup: TrainingSetup, changes: list[str]) -> Suggestion | None:
    """These changes (by their words), one after the other, planned; None if one no longer applies."""
    flags: tuple[str, ...] = ()
    for words in changes:
        match = next((change for change in _candidate_changes(setup) if change[0] == words), None)
        if match is None:
            return None
        flags = _merge_flags(flags, match[1])
        setup = match[2]
    return _planned("; ".join(changes), flags, setup)


def _prune(changes: list[str], setup: TrainingSetup, available_bytes: int) -> Suggestion:
    kept = list(changes)
    for words in changes[:-1]:
        trial = [other for other in kept if other != words]
        planned = _apply(setup, trial)
        if planned is not None and planned.device_total_bytes <= available_bytes:
            kept = trial
    result = _apply(setup, kept)
    assert result is not None  # `changes` applied in this order when they were found
    return result


def _next_kind(setup: TrainingSetup, used: set[str]) -> list[Change] | None:
    """The variants of the first kind of change not used yet (a kind: the changes sharing a flag)."""
    variants: list[Change] = []
    for change in _candidate_changes(setup):
        flag = change[1][0]
        if flag in used or (variants and variants[0][1][0] != flag):
            if variants:
                break
            continue
        variants.append(change)
    return variants or None


def _merge_flags(flags: tuple[str, ...], new: tuple[str, ...]) -> tuple[str, ...]:
    """Add flags, a later value of the same option replacing the earlier one."""
    pairs: dict[str, tuple[str, ...]] = {}
    order: list[str] = []
    for group in (flags, new):
        index = 0
        while index < len(group):
            name = group[index]
            values = []
            index += 1
            while index < len(group) and not group[index].startswith("--"):
                values.append(group[index])
                index += 1
            if name not in pairs:
                order.append(name)
            pairs[name] = tuple(values)
    return tuple(part for name in order for part in (name, *pairs[name]))
