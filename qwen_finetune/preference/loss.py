"""Preference losses on per-sequence log-probabilities, with the rewards and metrics TRL logs.

Each pair gives the policy's (and, for sigmoid / robust / ipo, the reference model's) summed
log-probability of the chosen and the rejected answer, and the answers' token counts:

    sigmoid  -(1-e) log s(b d) - e log s(-b d)            d = (pc - rc) - (pr - rr); e > 0: conservative DPO
    robust   (-(1-e) log s(b d) + e log s(-b d)) / (1-2e)  robust DPO (label noise e)
    ipo      ((pc - rc)/nc - (pr - rr)/nr - 1/(2b))^2      log ratios averaged per token, as TRL does
    simpo    -(1-e) log s(b m) - e log s(-b m)            m = pc/nc - pr/nr - gamma/b
    orpo     NLL - b log s(log odds(pc/nc) - log odds(pr/nr))    odds(x) = e^x / (1 - e^x)

(s is the logistic function, b beta, e label smoothing.) Each is averaged over the pairs. ORPO's NLL
is, as in TRL's ORPO trainer, the mean token NLL of the whole chosen sequences, prompt included, over
the batch (sum over all their tokens / their count). `pref_ftx` adds, with that weight and to any
loss, the chosen answers' mean token NLL over the batch (answers only, as TRL's "sft" DPO loss). Rewards are b times the log ratio (pc - rc) for the reference losses and b times the
per-token mean log-probability for simpo and orpo; `logps/*` is the per-sequence log-probability the
loss uses (the sum, or for simpo and orpo the per-token mean), as TRL logs them.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .args import PreferenceArguments


@dataclass
class PairLogps:
    """Per pair ([pairs] tensors): summed log-probabilities of the answer tokens and their counts; for
    orpo also of the whole chosen sequences, prompt included (`pair_logps(..., chosen_prompt_nll=True)`)."""

    chosen: torch.Tensor
    rejected: torch.Tensor
    chosen_tokens: torch.Tensor
    rejected_tokens: torch.Tensor
    chosen_sequence: torch.Tensor | None = None
    chosen_sequence_tokens: torch.Tensor | None = None

    def mean_per_token(self) -> tuple[torch.Tensor, torch.Tensor]:
        return (
            self.chosen / self.chosen_tokens.clamp(min=1),
            self.rejected / self.rejected_tokens.clamp(min=1),
        )

    def chosen_nll(self) -> torch.Tensor:
        """Mean token NLL of the chosen answers, over all their tokens in the batch."""
        return -self.chosen.sum() / self.chosen_tokens.sum().clamp(min=1)

    def chosen_sequence_nll(self) -> torch.Tensor:
        """Mean token NLL of the whole chosen sequences (prompt and answer), over the batch."""
        if self.chosen_sequence is None or self.chosen_sequence_tokens is None:
            raise ValueError("orpo needs pair_logps(..., chosen_prompt_nll=True)")
        return -self.chosen_sequence.sum() / self.chosen_sequence_tokens.sum().clamp(min=1)


REWARD_METRICS = (
    "rewards/chosen",
    "rewards/rejected",
    "rewards/accuracies",
    "rewards/margins",
    "logps/chosen",
    "logps/rejected",
)
ORPO_METRICS = ("nll_loss", "log_odds_ratio", "log_odds_chosen")
FTX_METRIC = "sft_loss"


def metric_names(config: PreferenceArguments) -> tuple[str, ...]:
    """The names of the metrics `preference_loss` returns for this configuration, in a fixed order."""
    names: tuple[str, ...] = REWARD_METRICS
    if config.pref_loss == "orpo":
        names += ORPO_METRICS
    if config.pref_ftx:
        names += (FTX_METRIC,)
    return names


def _log1mexp(x: torch.Tensor) -> torch.Tensor:
    """log(1 - e^x) for x < 0, accurate on both sides of -log 2."""
    return torch.where(x < -0.6931471805599453, torch.log1p(-torch.exp(x)), torch.log(-torch.expm1(x)))


def _smoothed_sigmoid_loss(logits: torch.Tensor, smoothing: float) -> torch.Tensor:
    return -(1 - smoothing) * F.logsigmoid(logits) - smoothing * F.logsigmoid(-logits)


def preference_loss(
    policy: PairLogps, reference: PairLogps | None, config: PreferenceArguments
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The loss (a scalar to minimise) and detached metrics, each a batch mean, named as TRL logs
    them: rewards/chosen, rewards/rejected, rewards/accuracies, rewards/margins, logps/chosen,
    logps/rejected, and nll_loss, log_odds_ratio, log_odds_chosen where they apply."""
    beta, smoothing = config.pref_beta, config.pref_label_smoothing
    metrics: dict[str, torch.Tensor] = {}
    if config.needs_reference:
        if reference is None:
            raise ValueError(f"the {config.pref_loss} loss needs the reference model's log-probabilities")
        chosen_ratio = policy.chosen - reference.chosen
        rejected_ratio = policy.rejected - reference.rejected
        delta = beta * (chosen_ratio - rejected_ratio)
        if config.pref_loss == "sigmoid":
            losses = _smoothed_sigmoid_loss(delta, smoothing)
        elif config.pref_loss == "robust":
            losses = (-(1 - smoothing) * F.logsigmoid(delta) + smoothing * F.logsigmoid(-delta)) / (
                1 - 2 * smoothing
            )
        else:
            per_token = chosen_ratio / policy.chosen_tokens.clamp(
                min=1
            ) - rejected_ratio / policy.rejected_tokens.clamp(min=1)
            losses = (per_token - 1 / (2 * beta)) ** 2
        chosen_rewards, rejected_rewards = beta * chosen_ratio, beta * rejected_ratio
        chosen_logps, rejected_logps = policy.chosen, policy.rejected
    else:
        chosen_logps, rejected_logps = policy.mean_per_token()
        if config.pref_loss == "simpo":
            margin = chosen_logps - rejected_logps - config.simpo_gamma / beta
            losses = _smoothed_sigmoid_loss(beta * margin, smoothing)
        else:
            log_odds = (chosen_logps - rejected_logps) - (_log1mexp(chosen_logps) - _log1mexp(rejected_logps))
            log_odds_ratio = F.logsigmoid(log_odds)
            sequence_nll = policy.chosen_sequence_nll()
            losses = sequence_nll - beta * log_odds_ratio
            metrics.update(
                nll_loss=sequence_nll.detach(),
                log_odds_ratio=log_odds_ratio.mean().detach(),
                log_odds_chosen=log_odds.mean().detach(),
            )
        chosen_rewards, rejected_rewards = beta * chosen_logps, beta * rejected_logps
    loss = losses.mean()
    if config.pref_ftx:
        answer_nll = policy.chosen_nll()
        loss = loss + config.pref_ftx * answer_nll
        metrics[FTX_METRIC] = answer_nll.detach()
    chosen_rewards, rejected_rewards = chosen_rewards.detach(), rejected_rewards.detach()
    metrics.update(
        {
            "rewards/chosen": chosen_rewards.mean(),
            "rewards/rejected": rejected_rewards.mean(),
            "rewards/accuracies": (chosen_rewards > rejected_rewards).float().mean(),
            "rewards/margins": (chosen_rewards - rejected_rewards).mean(),
            "logps/chosen": chosen_logps.detach().mean(),
            "logps/rejected": rejected_logps.detach().mean(),
        }
    )
    return loss, metrics
