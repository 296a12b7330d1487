"""What one benchmark configuration is, and the finetune.py flags that train it.

A configuration is (mode, batching, model_max_length), plus the model (the `small` one, or a released
architecture with random weights), the trainer (the toolkit, or TRL as a peer with the same data,
adapters, optimizer and token budget) and the stage (supervised fine-tuning, or DPO on preference pairs:
`--stage dpo` against TRL's DPOTrainer, 2 pairs per micro-batch x 4, batching "pairs", or "packed_pairs" at 2048). Modes are the
toolkit's training methods; batching is how samples become rows:

    padded   the original recipe: every sample padded to model_max_length, no grouping, and the loss
             computed as the original modeling did: full float32 logits, a shifted contiguous copy,
             cross entropy over every position (train_once.original_recipe_loss). This is the baseline.
    grouped  dynamic padding (to the longest sample of the micro-batch) with length grouping, chunked loss.
    packed   --packing: samples concatenated into rows of model_max_length, chunked loss.

Effective batch: the same number of samples per optimizer step in every configuration, about 8
(~2k non-padding tokens of this data). padded: 1 sample per micro-batch x 8 accumulation steps (the
original README's profiling setting, batch 1 x accumulation 8); grouped: 2 samples x 4; packed: one row
of model_max_length per micro-batch x `TOKENS_PER_STEP // model_max_length` steps (4 x 512 or 1 x 2048 =
2048 token slots, which packing fills with ~8 samples). Baseline and packed micro-batches thus hold the
same number of positions (model_max_length), so their peak memory compares like for like. The real
tokens of every step are counted and reported, so the figures do not depend on this being exact.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

BENCH_DIR = Path(__file__).resolve().parent
REPO_ROOT = BENCH_DIR.parent
DATA_DIR = REPO_ROOT.parent / "shared" / "data"
DATA_FILES = (
    DATA_DIR / "llamafactory_alpaca_en_demo.json",
    DATA_DIR / "llamafactory_glaive_toolcall_en_demo.json",
)
ALPACA_FILE = DATA_FILES[0]

MODES = ("full", "lora", "lora_emb", "qlora_int4", "nf4")
BATCHINGS = ("padded", "grouped", "packed", "pairs", "packed_pairs")
PAIR_BATCHINGS = ("pairs", "packed_pairs")
# What trains: supervised fine-tuning on conversations, or DPO (the sigmoid preference loss, beta 0.1)
# on chosen / rejected pairs, with a reference that is the policy with its adapter switched off.
STAGES = ("sft", "dpo")
DPO_DATA_FILES = (DATA_DIR / "llamafactory_dpo_en_demo.json",)
DPO_MAX_LENGTH = 1024  # TRL's default for DPO; the longest pair of the demo data fits
# At 2048 the toolkit packs each micro-batch's sequences into rows of 2048 (--packing); TRL's DPOTrainer
# has no padding-free mode, so it pads them to the longest as at 1024.
DPO_PACKED_LENGTH = 2048
DPO_PAIRS_PER_MICRO_BATCH = 2  # each pair is two sequences, chosen and rejected, padded together
DPO_ACCUMULATION_STEPS = 4
DPO_BETA = 0.1
# Who trains: the toolkit (finetune.py's path, bench/train_once.py) or a peer a user could pick instead
# (bench/trl_once.py).
TRAINERS = ("toolkit", "trl")
TRAINER_LABELS = {"toolkit": "toolkit", "trl": "TRL SFTTrainer"}
SMALL_MODEL = "small"
# The original recipe's optimizer (a per-tensor AdamW loop); the toolkit defaults to the fused one.
ORIGINAL_OPTIMIZER = "adamw_torch"
# Released architectures with random weights (`python -m qwen_model.tiny --size ...`), run for a few
# micro-batches each: (model, mode, model_max_length).
REAL_SHAPE_RUNS = (
    ("qwen-1.8b", "lora", 512),
    ("qwen-1.8b", "lora", 2048),
    ("qwen-1.8b", "nf4", 512),
    ("qwen-1.8b", "nf4", 2048),
    ("qwen-1.8b", "full", 512),
    ("qwen-7b", "nf4", 512),
)
REAL_SHAPE_MICRO_BATCHES = 3  # one warm-up, two measured
BASELINE_ACCUMULATION_STEPS = 8
GROUPED_SAMPLES_PER_MICRO_BATCH = 2
GROUPED_ACCUMULATION_STEPS = 4
TOKENS_PER_STEP = 2048
SEED = 42
LEARNING_RATE = {"full": 1e-5}  # LoRA-style modes use DEFAULT_LEARNING_RATE
DEFAULT_LEARNING_RATE = 1e-4
WEIGHT_DECAY = 0.1
ADAM_BETA2 = 0.95  # the original recipe's; every trainer of the benchmark uses the same AdamW settings
MODE_LABELS = {
    "full": "full",
    "lora": "LoRA",
    "lora_emb": "LoRA+emb",
    "qlora_int4": "Q-LoRA GPTQ int4",
    "nf4": "Q-LoRA nf4",
}
BATCHING_LABELS = {
    "padded": "baseline (pad to max, full logits)",
    "grouped": "dynamic padding + length grouping",
    "packed": "packing",
    "pairs": "preference pairs, dynamic padding",
    "packed_pairs": "preference pairs, packed",
}


@dataclass(frozen=True)
class BenchConfig:
    mode: str
    batching: str
    max_length: int
    steps: int  # optimizer steps run; the first micro-batch is the warm-up, the rest is measured
    model: str = SMALL_MODEL  # `python -m qwen_model.tiny --size` of the checkpoint trained
    trainer: str = "toolkit"
    # --gradient_checkpointing: only for released shapes that the memory plan says do not fit without it
    checkpointing: bool = False
    stage: str = "sft"

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"unknown mode {self.mode!r}: choose from {', '.join(MODES)}")
        if self.batching not in BATCHINGS:
            raise ValueError(f"unknown batching {self.batching!r}: choose from {', '.join(BATCHINGS)}")
        if self.trainer not in TRAINERS:
            raise ValueError(f"unknown trainer {self.trainer!r}: choose from {', '.join(TRAINERS)}")
        if self.batching == "packed" and TOKENS_PER_STEP % self.max_length:
            raise ValueError(f"packed rows of {self.max_length} tokens do not divide {TOKENS_PER_STEP}")
        if self.stage not in STAGES:
            raise ValueError(f"unknown stage {self.stage!r}: choose from {', '.join(STAGES)}")
        if (self.stage == "dpo") != (self.batching in PAIR_BATCHINGS):
            raise ValueError("preference pairs are the batching of DPO, and only of DPO")
        if self.trainer == "trl" and self.batching == "packed_pairs":
            raise ValueError("TRL's DPOTrainer cannot pack pairs: it runs batching 'pairs'")
        if self.stage == "dpo" and self.mode != "lora":
            raise ValueError("DPO runs LoRA (its reference is the policy with the adapter switched off)")
        if self.trainer == "trl" and self.stage == "sft" and (self.mode, self.batching) != ("lora", "packed"):
            raise ValueError("the TRL peer runs LoRA on packed rows (its best CPU setting)")

    @property
    def name(self) -> str:
        prefix = [
            part
            for part, default in ((self.trainer, "toolkit"), (self.stage, "sft"), (self.model, SMALL_MODEL))
            if part != default
        ]
        suffix = ["gc"] if self.checkpointing else []
        return "-".join([*prefix, self.mode, self.batching, str(self.max_length), *suffix])

    @property
    def is_baseline(self) -> bool:
        return self.batching == "padded"

    @property
    def micro_batch_and_accumulation(self) -> tuple[int, int]:
        if self.batching == "packed":
            return 1, TOKENS_PER_STEP // self.max_length
        if self.batching == "grouped":
            return GROUPED_SAMPLES_PER_MICRO_BATCH, GROUPED_ACCUMULATION_STEPS
        if self.batching in PAIR_BATCHINGS:
            return DPO_PAIRS_PER_MICRO_BATCH, DPO_ACCUMULATION_STEPS
        return 1, BASELINE_ACCUMULATION_STEPS

    def to_dict(self) -> dict[str, object]:
        return asdict(self)


def default_matrix(
    modes: list[str], lengths: list[int], steps: int, baseline_steps: int, baseline: bool, peers: bool
) -> list[BenchConfig]:
    """Per length, on the small model: the baseline, TRL's SFTTrainer and grouped LoRA runs (the targets
    compare them), then every mode packed.

    The baseline gets its own (smaller) step count: its micro-batches all have the same shape, so their
    time does not depend on the samples in them, and at 2048 one step costs minutes on 2 cores.
    """
    configs = []
    for length in lengths:
        if baseline and "lora" in modes:
            configs.append(BenchConfig("lora", "padded", length, baseline_steps))
        if peers and "lora" in modes:
            configs.append(BenchConfig("lora", "packed", length, steps, trainer="trl"))
        if "lora" in modes:
            configs.append(BenchConfig("lora", "grouped", length, steps))
        configs += [BenchConfig(mode, "packed", length, steps) for mode in modes]
    return configs


def dpo_matrix(steps: int, peers: bool) -> list[BenchConfig]:
    """DPO with LoRA on the small model: the toolkit's `--stage dpo` and, as its peer, TRL's DPOTrainer, at
    1024 (both padding each micro-batch) and 2048 (the toolkit packing, TRL padding)."""
    configs = [BenchConfig("lora", "pairs", DPO_MAX_LENGTH, steps, stage="dpo")]
    if peers:
        configs.append(BenchConfig("lora", "pairs", DPO_MAX_LENGTH, steps, trainer="trl", stage="dpo"))
    configs.append(BenchConfig("lora", "packed_pairs", DPO_PACKED_LENGTH, steps, stage="dpo"))
    if peers:
        configs.append(BenchConfig("lora", "pairs", DPO_PACKED_LENGTH, steps, trainer="trl", stage="dpo"))
    return configs


def real_shape_matrix(micro_batches: int = REAL_SHAPE_MICRO_BATCHES) -> list[BenchConfig]:
    """The released architectures, packed, for about `micro_batches` micro-batches each (whole steps)."""
    configs = []
    for model, mode, length in REAL_SHAPE_RUNS:
        accumulation = TOKENS_PER_STEP // length
        steps = max(1, -(-micro_batches // accumulation))
        configs.append(BenchConfig(mode, "packed", length, steps, model=model))
    return configs


def learning_rate(config: BenchConfig) -> float:
    return LEARNING_RATE.get(config.mode, DEFAULT_LEARNING_RATE)


def finetune_flags(config: BenchConfig, model_dir: Path, gptq_dir: Path, output_dir: Path) -> list[str]:
    """The finetune.py command line of this configuration (what a user would type), minus timing hooks.

    The baseline's loss (the original modeling's, over full float32 logits) is not a finetune.py flag:
    train_once computes it.
    """
    micro_batch, accumulation = config.micro_batch_and_accumulation
    checkpoint = gptq_dir if config.mode == "qlora_int4" else model_dir
    flags = [
        "--model_name_or_path",
        str(checkpoint),
        "--data_path",
        ",".join(str(path) for path in (DPO_DATA_FILES if config.stage == "dpo" else DATA_FILES)),
        "--model_max_length",
        str(config.max_length),
        "--output_dir",
        str(output_dir),
        "--overwrite_output_dir",
        "--per_device_train_batch_size",
        str(micro_batch),
        "--gradient_accumulation_steps",
        str(accumulation),
        "--max_steps",
        str(config.steps),
        "--learning_rate",
        str(learning_rate(config)),
        "--lr_scheduler_type",
        "constant",
        "--weight_decay",
        str(WEIGHT_DECAY),
        "--adam_beta2",
        str(ADAM_BETA2),
        "--logging_steps",
        "1000000",
        "--save_strategy",
        "no",
        "--report_to",
        "none",
        "--disable_tqdm",
        "true",
        "--dataloader_num_workers",
        "0",
        "--seed",
        str(SEED),
        "--use_cpu",
    ]
    if config.batching == "padded":  # the original recipe: every row padded, its AdamW loop
        flags += ["--pad_to_max_length", "--optim", ORIGINAL_OPTIMIZER]
    elif config.batching == "grouped":
        flags += ["--train_sampling_strategy", "group_by_length"]
    elif config.batching in ("packed", "packed_pairs"):
        flags += ["--packing"]
    if config.stage == "dpo":
        flags += ["--stage", "dpo", "--pref_loss", "sigmoid", "--pref_beta", str(DPO_BETA)]
    if config.mode != "full":
        flags += ["--use_lora", "--train_embeddings", "yes" if config.mode == "lora_emb" else "no"]
    if config.mode == "qlora_int4":
        flags += ["--q_lora"]
    if config.mode == "nf4":
        flags += ["--q_lora", "--q_lora_backend", "nf4"]
    if config.checkpointing:
        flags += ["--gradient_checkpointing"]
    return flags
