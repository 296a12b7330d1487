"""What the model says while it trains: at each evaluation it answers a few prompts, greedily.

API for the trainer:

    SampleArguments                                 # --sample_prompts, --eval_samples, --sample_max_new_tokens
    build_sample_prompts(sample_args, tokenizer, options, eval_samples, evaluates=...) -> list[SamplePrompt]
        # before loading weights: reads and encodes the prompts, or raises ArgumentError / DataError
    SampleAnswersCallback(prompts, tokenizer, max_new_tokens=..., tensorboard=find_tensorboard(trainer))
    generate_answers(model, tokenizer, prompt_ids, max_new_tokens=..., batch_size=..., device=...)

Module map: args (flags) -> prompts (files and eval samples -> ChatML prompt ids) -> generation
(greedy, batched, left-padded) -> callback (log, sample_answers.jsonl, TensorBoard). The records'
file format is qwen_finetune.report.sample_records, which the run report reads.
"""

from .args import SampleArguments
from .callback import SampleAnswersCallback, find_tensorboard
from .generation import GeneratedAnswer, generate_answers
from .prompts import SamplePrompt, build_sample_prompts

__all__ = [
    "GeneratedAnswer",
    "SampleAnswersCallback",
    "SampleArguments",
    "SamplePrompt",
    "build_sample_prompts",
    "find_tensorboard",
    "generate_answers",
]
