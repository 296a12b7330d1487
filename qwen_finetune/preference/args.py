"""The flags of preference training, as one dataclass for `transformers.HfArgumentParser`; the loss
reads them directly."""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Literal, get_args

from qwen_finetune.errors import ArgumentError

PreferenceLossType = Literal["sigmoid", "robust", "ipo", "simpo", "orpo"]
PREFERENCE_LOSSES: tuple[str, ...] = get_args(PreferenceLossType)
# Losses that compare the policy with a reference model; simpo and orpo use the policy alone.
REFERENCE_LOSSES = ("sigmoid", "robust", "ipo")
# Losses that take label smoothing (the probability that a pair's preference is flipped).
SMOOTHED_LOSSES = ("sigmoid", "robust", "simpo")


@dataclass(frozen=True)
class PreferenceArguments:
    _argument_group_name = "preference optimisation"

    stage: Literal["sft", "dpo"] = field(
        default="sft",
        metadata={
            "help": "What to train on: sft, conversations; dpo, chosen / rejected pairs (--pref_* flags)."
        },
    )
    pref_loss: PreferenceLossType = field(
        default="sigmoid",
        metadata={"help": "DPO-stage loss: sigmoid (DPO), robust, ipo, or simpo, orpo (no reference model)."},
    )
    pref_beta: float = field(
        default=0.1,
        metadata={
            "help": "Beta: how far the policy may move from the reference (for ipo: its tau; orpo: lambda)."
        },
    )
    simpo_gamma: float = field(default=0.5, metadata={"help": "SimPO's target reward margin gamma."})
    pref_label_smoothing: float = field(
        default=0.0,
        metadata={
            "help": "Chance a preference is flipped, [0, 0.5): conservative DPO (sigmoid, simpo), robust DPO."
        },
    )
    pref_ftx: float = field(
        default=0.0,
        metadata={
            "help": "Weight of an extra SFT term: the chosen answers' mean token NLL, added to the loss."
        },
    )
    precompute_ref_logps: bool = field(
        default=False,
        metadata={
            "help": "Compute the reference log-probs once before training (cached): no reference model in memory."
        },
    )

    def __post_init__(self) -> None:
        if self.stage not in ("sft", "dpo"):
            raise ArgumentError(f"--stage {self.stage!r} is not one of sft, dpo")
        if self.stage == "sft":
            changed = [
                f"--{item.name}"
                for item in fields(self)
                if item.name != "stage" and getattr(self, item.name) != item.default
            ]
            if changed:
                raise ArgumentError(
                    f"{', '.join(changed)} set for supervised training, where preference flags have no effect; "
                    "add --stage dpo to train on preference pairs, or drop them"
                )
        if self.pref_loss not in PREFERENCE_LOSSES:
            raise ArgumentError(
                f"--pref_loss {self.pref_loss!r} is not one of {', '.join(PREFERENCE_LOSSES)}"
            )
        if self.pref_beta <= 0:
            raise ArgumentError(f"--pref_beta {self.pref_beta} must be positive")
        if not 0.0 <= self.pref_label_smoothing < 0.5:
            raise ArgumentError(f"--pref_label_smoothing {self.pref_label_smoothing} must be in [0, 0.5)")
        if self.pref_label_smoothing and self.pref_loss not in SMOOTHED_LOSSES:
            raise ArgumentError(
                f"--pref_label_smoothing has no meaning for --pref_loss {self.pref_loss}; use it with "
                f"{', '.join(SMOOTHED_LOSSES)}, or drop it"
            )
        if self.pref_ftx < 0:
            raise ArgumentError(f"--pref_ftx {self.pref_ftx} must be >= 0")
        if self.precompute_ref_logps and not self.needs_reference:
            raise ArgumentError(
                f"--precompute_ref_logps: --pref_loss {self.pref_loss} uses no reference model; drop the flag"
            )

    @property
    def needs_reference(self) -> bool:
        return self.pref_loss in REFERENCE_LOSSES
