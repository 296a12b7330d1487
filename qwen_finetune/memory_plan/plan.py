"""The plan of a run: memory per device and time per step, from config.json and the flags alone.

plan = plan_run(model_args, data_args, training_args, lora_args, world_size=N)
print(plan.table())          # what --plan prints
print(plan.one_line())       # printed before a run loads its weights
for suggestion in fits(plan, available_bytes): ...
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from qwen_finetune.args import LoraArguments, ModelArguments, TrainingArguments
from qwen_finetune.data.args import DataArguments
from qwen_finetune.training_mode import TrainingMode

from . import formatting
from .devices import Device, detect_device
from .memory import MemoryEstimate, estimate_memory
from .run_setup import Precision, PreferenceSetup, TrainingSetup, setup_from_mode
from .step_time import StepTime, estimate_step_time
from .suggestions import Suggestion, device_total, suggest_changes


@dataclass(frozen=True)
class RunPlan:
    setup: TrainingSetup
    device: Device
    memory: MemoryEstimate
    time: StepTime

    @property
    def peak_bytes(self) -> int:
        """Planned peak of one process on its device."""
        return self.memory.peak

    @property
    def device_total_bytes(self) -> int:
        """What the device must hold: one process on a GPU, every process of the machine on CPU."""
        return device_total(self.setup, self.memory.peak)

    @property
    def fits_device(self) -> bool:
        return self.device_total_bytes <= self.device.memory_bytes

    def table(self) -> str:
        return formatting.plan_table(self)

    def one_line(self) -> str:
        return formatting.plan_line(self)

    def to_json(self) -> dict[str, Any]:
        return formatting.plan_json(self)

    def warning(self) -> str | None:
        """None when the run fits its device; else what is short and the changes that would fit."""
        if self.fits_device:
            return None
        return formatting.misfit_warning(self, fits(self, self.device.memory_bytes))


def plan_setup(setup: TrainingSetup, device: Device) -> RunPlan:
    if setup.device_kind != device.kind:
        setup = setup.with_changes(device_kind=device.kind)
    return RunPlan(setup, device, estimate_memory(setup), estimate_step_time(setup, device))


def plan_run(
    model_args: ModelArguments,
    data_args: DataArguments,
    training_args: TrainingArguments,
    lora_args: LoraArguments,
    *,
    world_size: int,
    device: Device | None = None,
    mode: TrainingMode | None = None,
    preference: PreferenceSetup | None = None,
    estimate_time: bool = True,
) -> RunPlan:
    """Plan finetune.py's run with these flags: the device is detected when not given (on CPU a quarter
    of a second of matmuls measures its peak, skipped with estimate_time=False), the training mode
    decided when not given (`choose_training_mode`)."""
    if mode is None:
        from qwen_finetune.training_mode import choose_training_mode

        mode = choose_training_mode(model_args, lora_args, training_args)
    precision: Precision = "bf16" if training_args.bf16 else "fp16" if training_args.fp16 else "fp32"
    if device is None:
        device = detect_device(
            training_args.use_cpu, precision, training_args.local_rank, measure=estimate_time
        )
    setup = setup_from_mode(
        mode,
        data_args,
        training_args,
        lora_args,
        world_size=world_size,
        device_kind=device.kind,
        preference=preference,
    )
    return plan_setup(setup, device)


def fits(plan: RunPlan, available_bytes: int) -> list[Suggestion]:
    """Changes after which the run fits in `available_bytes` (empty when it already fits)."""
    if plan.device_total_bytes <= available_bytes:
        return []
    return suggest_changes(plan.setup, available_bytes)
