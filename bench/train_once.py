"""Child process of the benchmark: train one configuration for a fixed number of steps and time it.

    python bench/train_once.py CONFIG_JSON MODEL_DIR GPTQ_DIR WORK_DIR [--profile PATH]

It goes through the toolkit's own path, in the order `qwen_finetune.train.train` uses: finetune.py's
flags (`parse_run_arguments`), `choose_training_mode`, `load_tokenizer`, `make_supervised_data`,
`load_model` and the toolkit's `QwenTrainer` (for `--stage dpo`: `make_preference_data` and the
`PreferenceTrainer`). What measure.py adds for measuring: a collator wrapper that records what each
micro-batch holds (real, supervised and padded tokens, sample lengths), and timestamps at the start of
every micro-batch and the end of every optimizer step. Nothing is saved. The baseline (batching
"padded") computes its loss as the original Qwen modeling did (`original_recipe_loss`): full float32
logits for every position, a contiguous shifted copy of them, and cross entropy over all of it, and
keeps PEFT's own LoRA dropout (`restore_peft_dropout`).

Prints one result line (see memory.emit_result); the parent reads this process's peak RSS itself.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from configs import BenchConfig, finetune_flags

from qwen_finetune.unused_backends import hide_unused_backends


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("config", help="BenchConfig as JSON")
    parser.add_argument("model_dir", type=Path)
    parser.add_argument("gptq_dir", type=Path)
    parser.add_argument("work_dir", type=Path)
    parser.add_argument("--data_cache_dir", type=Path, required=True)
    parser.add_argument("--profile", type=Path, help="write a torch.profiler table of the last step here")
    cli = parser.parse_args()
    config = BenchConfig(**json.loads(cli.config))
    flags = finetune_flags(config, cli.model_dir, cli.gptq_dir, cli.work_dir)
    flags += ["--data_cache_dir", str(cli.data_cache_dir), "--preprocessing_num_workers", "2"]
    # As finetune.py does before torch, transformers and peft are imported: the run's peak RSS then holds
    # exactly the libraries a user's run would import.
    hide_unused_backends(flags)
    from toolkit_run import train

    train(config, flags, cli.profile)


if __name__ == "__main__":
    main()
