"""The memory plan next to the original Qwen README's A100 profiling table, for the original recipe.

    python bench/memory_model.py              # print the Markdown table
    python bench/memory_model.py --update docs/memory_plan.md   # rewrite the table inside that page

Every figure of the README's "Profiling of Memory and Speed" table (Qwen-1.8B/7B/14B/72B; LoRA,
LoRA (emb), Q-LoRA, full-parameter; 256 to 8192 tokens; one A100-SXM4-80G unless stated) is planned
with the toolkit's own plan (`qwen_finetune.memory_plan.plan_run`) from the original launch scripts'
settings: the released config.json of each size (written without weights by qwen_model.tiny's
shapes), the script's flags with the profiling's batch size 1 and gradient accumulation 8, rows as
long as the sequence length (the original pads every sample to model_max_length), and the original
loss over full logits. The README gives one figure for all GPUs of a multi-GPU run; the plan's
per-GPU peak is multiplied by the GPU count to compare.

    LoRA, LoRA (emb)   finetune_lora_single_gpu.sh: --bf16, --gradient_checkpointing, no DeepSpeed;
                       (emb): a base model, so wte and lm_head train (modules_to_save)
    Q-LoRA             finetune_qlora_single_gpu.sh: --fp16, --gradient_checkpointing, ZeRO-2, on the
                       GPTQ Int4 chat model (group size 128)
    full-parameter     finetune_ds.sh: --bf16, --gradient_checkpointing, ZeRO-3 (1.8B on 1 GPU, 7B on 2)
    72B LoRA           finetune_lora_ds.sh with ds_config_zero3.json on 4 GPUs
    7B LoRA multinode  finetune_lora_ds.sh (ZeRO-2) on 2 nodes x 2 GPUs
"""

from __future__ import annotations

import argparse
import re
import tempfile
from dataclasses import dataclass
from pathlib import Path

from configs import ORIGINAL_OPTIMIZER, REPO_ROOT

from qwen_finetune.console import quiet_third_party

quiet_third_party()  # as finetune.py does: TrainingArguments imports peft, which loads bitsandbytes

from qwen_finetune.args import parse_args  # noqa: E402
from qwen_finetune.memory_plan import RunPlan, device_by_name, plan_run, plan_setup  # noqa: E402
from qwen_model.tiny import tiny_config, tiny_generation_config  # noqa: E402

DEEPSPEED = REPO_ROOT / "finetune"
LENGTHS = (256, 512, 1024, 2048, 4096, 8192)
A100 = device_by_name("cuda", "NVIDIA A100-SXM4-80GB", 80 * 10**9, "bf16")
A100_FP16 = device_by_name("cuda", "NVIDIA A100-SXM4-80GB", 80 * 10**9, "fp16")
TABLE_START = "<!-- memory_model.py: table start -->"
TABLE_END = "<!-- memory_model.py: table end -->"
WITHIN = 0.20


@dataclass(frozen=True)
class Profile:
    """One row of the README's table: the run, and its published (GB, s/it) per sequence length."""

    size: str
    method: str  # README's label
    kind: str  # "lora", "lora_emb", "qlora", "full"
    gpus: int
    nodes: int
    published: dict[int, tuple[float, float]]


def _row(*pairs: tuple[float, float] | None) -> dict[int, tuple[float, float]]:
    return {length: pair for length, pair in zip(LENGTHS, pairs) if pair is not None}


# The README's figures (memory in GB summed over the run's GPUs, seconds per iteration of 8 sequences).
PROFILES = [
    Profile(
        "1.8B",
        "LoRA",
        "lora",
        1,
        1,
        _row((6.7, 1.0), (7.4, 1.0), (8.4, 1.1), (11.0, 1.7), (16.2, 3.3), (21.8, 6.8)),
    ),
    Profile(
        "1.8B",
        "LoRA (emb)",
        "lora_emb",
        1,
        1,
        _row((13.7, 1.0), (14.0, 1.0), (14.0, 1.1), (15.1, 1.8), (19.7, 3.4), (27.7, 7.0)),
    ),
    Profile(
        "1.8B",
        "Q-LoRA",
        "qlora",
        1,
        1,
        _row((5.8, 1.4), (6.0, 1.4), (6.6, 1.4), (7.8, 2.0), (10.2, 3.4), (15.8, 6.5)),
    ),
    Profile(
        "1.8B",
        "Full-parameter",
        "full",
        1,
        1,
        _row((43.5, 2.1), (43.5, 2.2), (43.5, 2.2), (43.5, 2.3), (47.1, 2.8), (48.3, 5.6)),
    ),
    Profile(
        "7B",
        "LoRA",
        "lora",
        1,
        1,
        _row((20.1, 1.2), (20.4, 1.5), (21.5, 2.8), (23.8, 5.2), (29.7, 10.1), (36.6, 21.3)),
    ),
    Profile(
        "7B",
        "LoRA (emb)",
        "lora_emb",
        1,
        1,
        _row((33.7, 1.4), (34.1, 1.6), (35.2, 2.9), (35.1, 5.3), (39.2, 10.3), (48.5, 21.7)),
    ),
    Profile(
        "7B",
        "Q-LoRA",
        "qlora",
        1,
        1,
        _row((11.5, 3.0), (11.5, 3.0), (12.3, 3.5), (13.9, 7.0), (16.9, 11.6), (23.5, 22.3)),
    ),
    Profile("7B", "Full-parameter", "full", 2, 1, _row((139.2, 4.0), (148.0, 4.0), (162.0, 4.5))),
    Profile(
        "7B",
        "LoRA (multinode)",
        "lora",
        2,
        2,
        _row((74.7, 2.09), (77.6, 3.16), (84.9, 5.17), (95.1, 9.25), (121.1, 18.1), (155.5, 37.4)),
    ),
    Profile(
        "14B",
        "LoRA",
        "lora",
        1,
        1,
        _row((34.6, 1.6), (35.1, 2.4), (35.3, 4.4), (37.4, 8.4), (42.5, 17.0), (55.2, 36.0)),
    ),
    Profile(
        "14B",
        "LoRA (emb)",
        "lora_emb",
        1,
        1,
        _row((51.2, 1.7), (51.1, 2.6), (51.5, 4.6), (54.1, 8.6), (56.8, 17.2), (67.7, 36.3)),
    ),
    Profile(
        "14B",
        "Q-LoRA",
        "qlora",
        1,
        1,
        _row((18.7, 5.3), (18.4, 6.3), (18.9, 8.2), (19.9, 11.8), (23.0, 20.1), (27.9, 38.3)),
    ),
    Profile(
        "72B",
        "LoRA + Deepspeed Zero3",
        "lora",
        4,
        1,
        _row((215.4, 17.6), (217.7, 20.5), (222.6, 29.4), (228.8, 45.7), (249.0, 83.4), (289.2, 161.5)),
    ),
    Profile(
        "72B",
        "Q-LoRA",
        "qlora",
        1,
        1,
        _row((61.4, 27.4), (61.4, 31.5), (62.9, 41.4), (64.1, 59.5), (68.0, 97.7), (75.6, 179.8)),
    ),
]
SIZE_NAMES = {"1.8B": "qwen-1.8b", "7B": "qwen-7b", "14B": "qwen-14b", "72B": "qwen-72b"}


def write_config_only_checkpoint(directory: Path, size: str, base: bool, gptq: bool) -> Path:
    """config.json and generation_config.json of a released size, no weights (the plan reads no more)."""
    config = tiny_config(SIZE_NAMES[size])
    if gptq:
        config.quantization_config = {"quant_method": "gptq", "bits": 4, "group_size": 128}
        config.bf16, config.fp16 = False, True
    config.save_pretrained(directory)
    tiny_generation_config(base).save_pretrained(directory)
    return directory


def recipe_flags(profile: Profile, checkpoint: Path, length: int, output: Path) -> list[str]:
    flags = [
        "--model_name_or_path",
        str(checkpoint),
        "--output_dir",
        str(output),
        "--model_max_length",
        str(length),
        "--pad_to_max_length",
        "--per_device_train_batch_size",
        "1",
        "--gradient_accumulation_steps",
        "8",
        "--gradient_checkpointing",
        "--optim",
        ORIGINAL_OPTIMIZER,
    ]
    world = profile.gpus * profile.nodes
    if profile.kind == "qlora":
        return flags + [
            "--fp16",
            "true",
            "--use_lora",
            "--q_lora",
            "--deepspeed",
            str(DEEPSPEED / "ds_config_zero2.json"),
        ]
    flags += ["--bf16", "true"]
    if profile.kind == "full":
        return flags + ["--deepspeed", str(DEEPSPEED / "ds_config_zero3.json")]
    flags += ["--use_lora", "--train_embeddings", "yes" if profile.kind == "lora_emb" else "no"]
    if world > 1:
        zero = "ds_config_zero3.json" if profile.size == "72B" else "ds_config_zero2.json"
        flags += ["--deepspeed", str(DEEPSPEED / zero)]
    return flags


def plan_profile(profile: Profile, length: int, work: Path) -> RunPlan:
    gptq = profile.kind == "qlora"
    name = f"{profile.size}-{'base' if profile.kind == 'lora_emb' else 'chat'}{'-int4' if gptq else ''}"
    checkpoint = work / name
    if not (checkpoint / "config.json").is_file():
        write_config_only_checkpoint(checkpoint, profile.size, base=profile.kind == "lora_emb", gptq=gptq)
    args = parse_args(recipe_flags(profile, checkpoint, length, work / "output"))
    device = A100_FP16 if gptq else A100
    plan = plan_run(*args, world_size=profile.gpus * profile.nodes, device=device)
    processes = profile.gpus  # per node
    original = plan.setup.with_changes(loss="full_logits", processes_per_node=processes)
    return plan_setup(original, device)


def comparison_table(work: Path) -> tuple[str, list[float]]:
    lines = [
        "| size | method | GPUs | tokens | published GB | plan GB | plan / published | peak phase | "
        "published s/it | plan s/it (at 40% of peak) |",
        "|---|---|---:|---:|---:|---:|---:|---|---:|---:|",
    ]
    ratios = []
    for profile in PROFILES:
        gpus = profile.gpus * profile.nodes
        for length, (published, seconds) in profile.published.items():
            plan = plan_profile(profile, length, work)
            planned = plan.peak_bytes * gpus / 1e9
            ratio = planned / published
            ratios.append(ratio)
            mark = "" if abs(ratio - 1) <= WITHIN else " **"
            lines.append(
                f"| {profile.size} | {profile.method} | {gpus} | {length} | {published:.1f} | {planned:.1f} | "
                f"{ratio:.2f}{mark} | {plan.memory.peak_phase} | {seconds:g} | {plan.time.expected_seconds:.2g} |"
            )
    within = sum(abs(ratio - 1) <= WITHIN for ratio in ratios)
    lines += ["", f"{within} of {len(ratios)} figures within {WITHIN:.0%} (** marks the others)."]
    return "\n".join(lines), ratios


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--update", type=Path, help="replace the table between the markers in this file")
    cli = parser.parse_args()
    with tempfile.TemporaryDirectory() as work:
        table, _ = comparison_table(Path(work))
    if cli.update is None:
        print(table)
        return
    text = cli.update.read_text(encoding="utf-8")
    pattern = re.compile(re.escape(TABLE_START) + ".*?" + re.escape(TABLE_END), re.DOTALL)
    if not pattern.search(text):
        raise SystemExit(f"{cli.update}: no {TABLE_START} ... {TABLE_END} markers")
    cli.update.write_text(
        pattern.sub(lambda _: f"{TABLE_START}\n{table}\n{TABLE_END}", text), encoding="utf-8"
    )


if __name__ == "__main__":
    main()
