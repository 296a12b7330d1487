"""Preference training on chosen / rejected pairs: data, one-pass log-probabilities, losses.

API for a preference trainer:

    PreferenceArguments                          # --pref_loss, --pref_beta, --simpo_gamma,
                                                 # --pref_label_smoothing, --pref_ftx
    make_preference_data(data_args, tokenizer, model_max_length, *, per_device_batch_size=1,
                         main_process_first=None, output_dir=None) -> PreferenceData
        .train_dataset / .eval_dataset / .data_collator / .report   # as for supervised data
    pair_logps(model, batch) -> PairLogps        # one forward pass over chosen + rejected; per pair the
                                                 # answers' summed log-probabilities and token counts
    preference_loss(policy_logps, reference_logps, args) -> (loss, metrics)
                                                 # reference_logps: None for simpo / orpo
                                                 # metrics: TRL's names (rewards/chosen, ...)

The pair formats are read by qwen_finetune.data (pair_formats, pairs); `run_check_data(...,
kind="preference")` checks and dumps pairs. Module map: args (flags) -> data (datasets) -> collate
(batches) -> logps (chunked per-sequence log-probabilities) -> loss.
"""

from .args import PREFERENCE_LOSSES, PreferenceArguments
from .collate import SEQUENCE_INDEX, PairCollator
from .data import PreferenceData, make_pair_collator, make_preference_data
from .logps import pair_logps
from .loss import PairLogps, preference_loss

__all__ = [
    "PREFERENCE_LOSSES",
    "SEQUENCE_INDEX",
    "PairCollator",
    "PairLogps",
    "PreferenceArguments",
    "PreferenceData",
    "make_pair_collator",
    "make_preference_data",
    "pair_logps",
    "preference_loss",
]
