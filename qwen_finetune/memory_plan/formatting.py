"""The plan as people read it: the --plan table, the line before a run, and memory_plan.json."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .plan import RunPlan
    from .run_setup import TrainingSetup
    from .suggestions import Suggestion

GB = 1e9


def gigabytes(value: float) -> str:
    return f"{value / GB:.2f} GB"


def describe_setup(setup: TrainingSetup) -> str:
    """One phrase for the run: mode, precision, rows, DeepSpeed."""
    if setup.method == "full":
        mode = "full fine-tuning"
    else:
        assert setup.adapter is not None
        mode = "Q-LoRA" if setup.quantization else "LoRA"
        if setup.quantization == "gptq":
            mode += f" (GPTQ {setup.quant_bits}-bit)"
        elif setup.quantization == "nf4":
            mode += " (NF4)"
        mode += f" r={setup.adapter.rank}"
        if setup.embeddings_trained:
            mode += " + embeddings"
    if setup.preference is not None:
        mode += f", preference pairs (reference: {setup.preference.reference})"
    rows = "packed rows" if setup.packing else "rows"
    parts = [
        mode,
        setup.compute_precision,
        f"{setup.micro_batch} x {setup.max_length}-token {rows} x {setup.accumulation} accumulation",
    ]
    if setup.gradient_checkpointing:
        every = f" (every {setup.checkpoint_every} blocks)" if setup.checkpoint_every > 1 else ""
        parts.append(f"gradient checkpointing{every}")
    if setup.zero is not None:
        offload = " + offload" if setup.zero.offload_optimizer else ""
        parts.append(f"ZeRO-{setup.zero.stage}{offload}")
    parts.append(f"{setup.world_size} process{'es' if setup.world_size > 1 else ''}")
    return ", ".join(parts)


def plan_table(plan: RunPlan) -> str:
    memory, device = plan.memory, plan.device
    lines = [
        f"Memory and time plan: {describe_setup(plan.setup)}",
        f"device: {device.name} ({device.kind}), {gigabytes(device.memory_bytes)} "
        f"{'available' if device.kind == 'cpu' else 'total'}",
        "",
        f"{'per process':28s} {'GB':>9s}   note",
    ]
    for part in memory.components:
        lines.append(f"  {part.label:26s} {part.bytes / GB:9.2f}   {part.note}")
    lines.append(
        "  peak by phase:  " + " | ".join(f"{name} {value / GB:.2f}" for name, value in memory.phases.items())
    )
    lines.append(f"  {'total (peak: ' + memory.peak_phase + ')':26s} {memory.peak / GB:9.2f}")
    if plan.setup.device_kind == "cpu" and plan.setup.processes_per_node > 1:
        lines.append(
            f"  {plan.setup.processes_per_node} processes on this machine: {gigabytes(plan.device_total_bytes)}"
        )
    for part in memory.host:
        lines.append(f"  host: {part.label:20s} {part.bytes / GB:9.2f}   {part.note}")
    lines += ["", time_line(plan)]
    warning = plan.warning()
    if warning is None:
        lines.append(f"fits: {gigabytes(plan.device_total_bytes)} of {gigabytes(device.memory_bytes)}")
    else:
        lines.append(warning)
    lines.append("(GB = 10^9 bytes; estimates from config.json and the flags, no weights loaded)")
    return "\n".join(lines)


def time_line(plan: RunPlan) -> str:
    time = plan.time
    flops = f"{time.executed_flops:.3g} FLOPs per optimizer step ({time.tokens} positions)"
    if time.seconds_at_peak is None or time.peak_flops is None:
        return f"time: {flops}; {time.peak_source}"
    return (
        f"time: {flops}: {time.seconds_at_peak:.3g} s at the peak ({time.peak_flops / 1e12:.3g} TFLOP/s, "
        f"{time.peak_source}), about {time.expected_seconds:.3g} s at {time.utilisation:.0%} of it"
    )


def suggestion_lines(suggestions: list[Suggestion]) -> list[str]:
    if not suggestions:
        return ["no single change or combination of the usual ones makes it fit"]
    lines = ["changes that would fit:"]
    for suggestion in suggestions:
        lines.append(
            f"  {suggestion.change}: {gigabytes(suggestion.device_total_bytes)}  ({' '.join(suggestion.flags)})"
        )
    return lines


def misfit_warning(plan: RunPlan, suggestions: list[Suggestion]) -> str:
    short = plan.device_total_bytes - plan.device.memory_bytes
    lines = [
        f"the plan needs {gigabytes(plan.device_total_bytes)} but {plan.device.name} has "
        f"{gigabytes(plan.device.memory_bytes)} ({gigabytes(short)} short); the run will likely run out of memory",
        *suggestion_lines(suggestions),
    ]
    return "\n".join(lines)


def plan_line(plan: RunPlan) -> str:
    """The line every run prints before loading weights."""
    memory = plan.memory
    largest = sorted(memory.components, key=lambda part: -part.bytes)[:3]
    parts = ", ".join(f"{part.label} {part.bytes / GB:.2f}" for part in largest)
    line = f"plan: peak {gigabytes(memory.peak)} per process ({parts}) on {plan.device.name}"
    if plan.time.expected_seconds is not None:
        line += f"; about {plan.time.expected_seconds:.3g} s per optimizer step"
    return line


def plan_json(plan: RunPlan) -> dict[str, Any]:
    """memory_plan.json: the total and its components in bytes, the phases, device and time."""
    components: dict[str, int] = {}
    for part in plan.memory.components:
        components[part.label] = components.get(part.label, 0) + part.bytes
    return {
        "total_bytes": plan.memory.peak,
        "peak_phase": plan.memory.peak_phase,
        "components": components,
        "phases": dict(plan.memory.phases),
        "host": {part.label: part.bytes for part in plan.memory.host},
        "device": {
            "kind": plan.device.kind,
            "name": plan.device.name,
            "memory_bytes": plan.device.memory_bytes,
        },
        "setup": describe_setup(plan.setup),
        "step_seconds_expected": plan.time.expected_seconds,
        "step_flops": plan.time.executed_flops,
    }
