"""The preference losses equal TRL's on the same model, weights and pairs (float32, to 1e-5): loss,
chosen and rejected rewards and the other logged metrics, and the gradients of the loss.

TRL's own code computes the reference side: DPOTrainer's collator and loss for sigmoid, ipo, robust
(label smoothing) and the sft term (--pref_ftx); the CPO trainer's loss for simpo and for conservative
DPO (its sigmoid loss with label smoothing is conservative DPO without a reference model: given zero
reference log-probabilities ours must equal it); the ORPO trainer's loss for orpo, whose NLL term
covers the whole chosen sequence, prompt included, by design.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch

from qwen_finetune.data import DataArguments
from qwen_finetune.preference import (
    PairLogps,
    PreferenceArguments,
    make_pair_collator,
    make_preference_data,
    pair_logps,
    preference_loss,
)
from qwen_finetune.preference.collate import pair_sequences

trl = pytest.importorskip("trl", reason="trl is the reference implementation (a dev dependency)")

MAX_LENGTH = 256
TOLERANCE = {"atol": 1e-5, "rtol": 0.0}
REWARDS = ("rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins")
# Summed log-probabilities (hundreds in size) agree to float32 rounding: compared relatively.
LOGPS = ("logps/chosen", "logps/rejected")


@pytest.fixture(scope="module")
def tokenizer(tiny_chat_checkpoint: Path):
    from qwen_model.tokenization_qwen import QWenTokenizer

    return QWenTokenizer.from_pretrained(tiny_chat_checkpoint)


@pytest.fixture(scope="module")
def reference(tiny_chat_checkpoint: Path):
    from qwen_model import QWenLMHeadModel

    return QWenLMHeadModel.from_pretrained(tiny_chat_checkpoint, dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def trained_policy(reference):
    """The reference with every weight moved by noise, so policy and reference disagree."""
    policy = copy.deepcopy(reference)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for parameter in policy.parameters():
            parameter.add_(torch.randn(parameter.shape, generator=generator) * 0.05)
    return policy


@pytest.fixture
def policy(trained_policy):
    """A fresh copy per test: TRL's trainers patch the forward of the model they are given."""
    return copy.deepcopy(trained_policy).train()


@pytest.fixture(scope="module")
def features(tokenizer, shared_data_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> list[dict]:
    """Short pairs (LLaMA-Factory's English and Chinese demo data, and a multi-turn one with a system
    prompt): float32 sums of a few dozen log-probabilities, whose rounding stays well below 1e-5."""
    english = json.loads((shared_data_dir / "llamafactory_dpo_en_demo.json").read_text())
    chinese = json.loads((shared_data_dir / "llamafactory_dpo_zh_demo.json").read_text())
    multi_turn = {
        "conversations": [
            {"from": "system", "value": "Be terse."},
            {"from": "human", "value": "Hi"},
            {"from": "gpt", "value": "Hello!"},
            {"from": "human", "value": "Capital of France?"},
        ],
        "chosen": {"from": "gpt", "value": "Paris."},
        "rejected": {"from": "gpt", "value": "Lyon is the capital."},
    }
    records = [english[134], chinese[50], chinese[72], multi_turn]
    directory = tmp_path_factory.mktemp("pairs")
    (directory / "pairs.json").write_text(json.dumps(records, ensure_ascii=False))
    args = DataArguments(data_path=str(directory / "pairs.json"), data_cache_dir=str(directory / "cache"))
    data = make_preference_data(args, tokenizer, MAX_LENGTH)
    assert len(data.train_dataset) == len(records)
    return [data.train_dataset[index] for index in range(len(data.train_dataset))]


def text_dataset():
    """TRL's trainers need a training set to start; the compared batch is built from our ids."""
    from datasets import Dataset

    return Dataset.from_dict({"prompt": ["Hi."], "chosen": [" Hello."], "rejected": [" Bye."]})


def common_args(tmp_path: Path, features: list[dict]) -> dict:
    return {
        "output_dir": str(tmp_path / "trl"),
        "report_to": [],
        "use_cpu": True,
        "bf16": False,
        "per_device_train_batch_size": len(features),
    }


def ours(policy, reference, features, tokenizer, args: PreferenceArguments, **options) -> tuple:
    """Our log-probabilities of the policy (and of the reference where the loss needs it), one pass each."""
    batch = make_pair_collator(DataArguments(), tokenizer, MAX_LENGTH)(features)
    logps = pair_logps(policy, batch, **options)
    reference_logps = None
    if args.needs_reference:
        with torch.no_grad():
            reference_logps = pair_logps(reference, batch)
    return logps, reference_logps


def assert_same(loss, metrics, trl_loss, trl_metrics, names=REWARDS, parameters=None) -> None:
    """Loss and the named metrics to 1e-5 (logps relatively), and with `parameters` the gradients."""
    torch.testing.assert_close(loss, trl_loss, **TOLERANCE)
    for name in names:
        tolerance = {"atol": 0.0, "rtol": 1e-6} if name in LOGPS else TOLERANCE
        torch.testing.assert_close(metrics[name].item(), float(trl_metrics[name]), **tolerance, msg=name)
    if parameters is not None:
        ours_grad = torch.autograd.grad(loss, parameters, retain_graph=True)
        trl_grad = torch.autograd.grad(trl_loss, parameters)
        for got, want in zip(ours_grad, trl_grad):
            torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-4)


def parameters_of(model) -> list[torch.Tensor]:
    return [model.lm_head.weight, model.transformer.h[1].mlp.c_proj.weight]


@pytest.mark.parametrize(
    ("loss_type", "smoothing", "ftx"),
    [("sigmoid", 0.0, 0.0), ("ipo", 0.0, 0.0), ("robust", 0.1, 0.0), ("sigmoid", 0.0, 0.5)],
    ids=["sigmoid", "ipo", "robust", "sigmoid+ftx"],
)
def test_dpo_trainer(policy, reference, tokenizer, features, tmp_path, loss_type, smoothing, ftx) -> None:
    from trl import DPOConfig, DPOTrainer

    args = PreferenceArguments(
        stage="dpo", pref_loss=loss_type, pref_beta=0.3, pref_label_smoothing=smoothing, pref_ftx=ftx
    )
    config = DPOConfig(
        beta=0.3,
        loss_type=[loss_type, "sft"] if ftx else [loss_type],
        loss_weights=[1.0, ftx] if ftx else None,
        label_smoothing=smoothing,
        max_length=None,
        **common_args(tmp_path, features),
    )
    trainer = DPOTrainer(
        model=policy,
        ref_model=reference,
        args=config,
        train_dataset=text_dataset(),
        processing_class=tokenizer,
    )
    trl_batch = trainer.data_collator(
        [{key: feature[key] for key in ("prompt_ids", "chosen_ids", "rejected_ids")} for feature in features]
    )
    trl_loss = trainer.compute_loss(trainer.model, trl_batch)
    trl_metrics = {name: values[-1] for name, values in trainer._metrics["train"].items()}
    loss, metrics = preference_loss(*ours(policy, reference, features, tokenizer, args), args)
    assert loss.item() != pytest.approx(0.6931, abs=1e-2)  # policy and reference differ
    gradients = parameters_of(policy) if (loss_type, ftx) == ("sigmoid", 0.0) else None  # one costly check
    assert_same(loss, metrics, trl_loss, trl_metrics, (*REWARDS, *LOGPS), gradients)


def trl_pair_batch(features: list[dict], pad_token_id: int) -> dict[str, torch.Tensor]:
    """The CPO / ORPO trainers' batch layout (chosen_* and rejected_* tensors) of the same sequences."""
    sequences = pair_sequences(features)
    batch = {}
    for answer, part in (("chosen", sequences[: len(features)]), ("rejected", sequences[len(features) :])):
        width = max(len(ids) for ids, _ in part)
        ids = torch.full((len(part), width), pad_token_id)
        labels = torch.full((len(part), width), -100)
        mask = torch.zeros((len(part), width), dtype=torch.long)
        for row, (sequence_ids, sequence_labels) in enumerate(part):
            ids[row, : len(sequence_ids)] = torch.tensor(sequence_ids)
            labels[row, : len(sequence_labels)] = torch.tensor(sequence_labels)
            mask[row, : len(sequence_ids)] = 1
        batch.update(
            {f"{answer}_input_ids": ids, f"{answer}_labels": labels, f"{answer}_attention_mask": mask}
        )
    return batch


@pytest.mark.parametrize("smoothing", [0.0, 0.2])
def test_cpo_trainer_simpo(policy, reference, tokenizer, features, tmp_path, smoothing) -> None:
    from trl.experimental.cpo import CPOConfig, CPOTrainer

    args = PreferenceArguments(
        stage="dpo", pref_loss="simpo", pref_beta=2.0, simpo_gamma=0.7, pref_label_smoothing=smoothing
    )
    config = CPOConfig(
        loss_type="simpo",
        beta=2.0,
        simpo_gamma=0.7,
        cpo_alpha=0.0,
        label_smoothing=smoothing,
        max_length=MAX_LENGTH,
        **common_args(tmp_path, features),
    )
    trainer = CPOTrainer(model=policy, args=config, train_dataset=text_dataset(), processing_class=tokenizer)
    trl_loss, trl_metrics = trainer.get_batch_loss_metrics(
        trainer.model, trl_pair_batch(features, tokenizer.eod_id)
    )
    loss, metrics = preference_loss(*ours(policy, reference, features, tokenizer, args), args)
    assert_same(loss, metrics, trl_loss, trl_metrics, (*REWARDS, *LOGPS))


def test_cpo_trainer_conservative_dpo(policy, reference, tokenizer, features, tmp_path) -> None:
    from trl.experimental.cpo import CPOConfig, CPOTrainer

    args = PreferenceArguments(stage="dpo", pref_loss="sigmoid", pref_beta=0.3, pref_label_smoothing=0.2)
    config = CPOConfig(
        loss_type="sigmoid", beta=0.3, cpo_alpha=0.0, label_smoothing=0.2, max_length=MAX_LENGTH,
        **common_args(tmp_path, features),
    )  # fmt: skip
    trainer = CPOTrainer(model=policy, args=config, train_dataset=text_dataset(), processing_class=tokenizer)
    trl_loss, trl_metrics = trainer.get_batch_loss_metrics(
        trainer.model, trl_pair_batch(features, tokenizer.eod_id)
    )
    logps, _ = ours(policy, reference, features, tokenizer, args)
    zero = torch.zeros_like(logps.chosen)
    loss, metrics = preference_loss(
        logps, PairLogps(zero, zero, logps.chosen_tokens, logps.rejected_tokens), args
    )
    assert_same(loss, metrics, trl_loss, trl_metrics, REWARDS)


def test_orpo_trainer(policy, reference, tokenizer, features, tmp_path) -> None:
    from trl.experimental.orpo import ORPOConfig, ORPOTrainer

    args = PreferenceArguments(stage="dpo", pref_loss="orpo", pref_beta=0.25)
    config = ORPOConfig(beta=0.25, max_length=MAX_LENGTH, **common_args(tmp_path, features))
    trainer = ORPOTrainer(model=policy, args=config, train_dataset=text_dataset(), processing_class=tokenizer)
    trl_loss, trl_metrics = trainer.get_batch_loss_metrics(
        trainer.model, trl_pair_batch(features, tokenizer.eod_id)
    )
    logps, _ = ours(policy, reference, features, tokenizer, args, chosen_prompt_nll=True)
    loss, metrics = preference_loss(logps, None, args)
    names = (*REWARDS, *LOGPS, "nll_loss", "log_odds_ratio", "log_odds_chosen")
    assert_same(loss, metrics, trl_loss, trl_metrics, names, parameters_of(policy))
