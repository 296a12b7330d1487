"""Tools people use next work on a toolkit checkpoint with nothing but the checkpoint: TRL's SFTTrainer
trains it from a messages dataset, transformers' text-generation pipeline answers a messages list."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

import qwen_model  # noqa: F401  (registers the Qwen classes with the Auto factories)

ROLES = {"user": "user", "assistant": "assistant", "system": "system"}


def example_conversations(repo_root: Path, count: int) -> list[dict[str, list[dict[str, str]]]]:
    """data/example.json (the original Qwen format) as rows of a `messages` dataset."""
    samples = json.loads((repo_root / "data" / "example.json").read_text(encoding="utf-8"))
    return [
        {
            "messages": [
                {"role": ROLES[turn["from"]], "content": turn["value"]} for turn in sample["conversations"]
            ]
        }
        for sample in samples[:count]
    ]


@pytest.mark.slow
def test_trl_sft_trainer_trains_the_checkpoint_on_messages(
    tiny_chat_checkpoint: Path, repo_root: Path, tmp_path: Path
) -> None:
    """The trainer reads the chat template (assistant masks included) and the logits of training mode."""
    from datasets import Dataset
    from trl import SFTConfig, SFTTrainer

    rows = example_conversations(repo_root, count=4)
    config = SFTConfig(
        output_dir=str(tmp_path / "sft"),
        max_steps=3,
        per_device_train_batch_size=len(rows),  # the same batch every step: its loss must fall
        learning_rate=3e-3,
        logging_steps=1,
        assistant_only_loss=True,
        max_length=256,
        use_cpu=True,
        save_strategy="no",
        report_to=[],
        disable_tqdm=True,
        seed=0,
    )
    trainer = SFTTrainer(model=str(tiny_chat_checkpoint), args=config, train_dataset=Dataset.from_list(rows))
    trainer.train()
    history = [entry for entry in trainer.state.log_history if "loss" in entry]
    losses = [entry["loss"] for entry in history]
    assert len(losses) == 3 and losses[-1] < losses[0], losses
    assert all(0 <= entry["mean_token_accuracy"] <= 1 for entry in history)  # computed from outputs.logits


def test_text_generation_pipeline_answers_a_messages_list(tiny_chat_checkpoint: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer, pipeline

    question = "What is the capital of France?"
    generator = pipeline("text-generation", model=str(tiny_chat_checkpoint))
    [output] = generator([{"role": "user", "content": question}], max_new_tokens=8, do_sample=False)
    conversation = output["generated_text"]
    assert [message["role"] for message in conversation] == ["user", "assistant"]

    model = AutoModelForCausalLM.from_pretrained(tiny_chat_checkpoint).eval()
    tokenizer = AutoTokenizer.from_pretrained(tiny_chat_checkpoint)
    response, _ = model.chat(tokenizer, question, do_sample=False, max_new_tokens=8)
    assert conversation[-1]["content"] == response and response
