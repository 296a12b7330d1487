"""The GGUF key-value metadata: hyper-parameters, tokenizer, chat template and sampling defaults.

Everything llama.cpp needs to rebuild the model and its tokenizer is written explicitly (no key is
left to a reader's default), named with the gguf package's own writers.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from qwen_model.tokenization_qwen import ENDOFTEXT_ID, IM_END_ID

from .tensors import OutType, storage_type
from .vocab import PRE_TOKENIZER, TOKENIZER_MODEL, GGUFVocabulary

if TYPE_CHECKING:
    from gguf import GGUFWriter

# transformers' defaults for the generation_config fields a checkpoint may leave out.
HF_SAMPLING_DEFAULTS = {"temperature": 1.0, "top_k": 50, "top_p": 1.0, "repetition_penalty": 1.0}


@dataclass(frozen=True)
class SamplingDefaults:
    """The checkpoint's generation_config.json sampling settings, in llama.cpp's terms.

    `top_k` 0 means no top-k limit, as in transformers and llama.cpp. transformers applies the
    repetition penalty to every token of the context, hence `penalty_last_n` -1 (the whole context).
    Greedy decoding (do_sample false) is top-k 1 at temperature 0.
    """

    temperature: float
    top_k: int
    top_p: float
    repeat_penalty: float
    penalty_last_n: int = -1


def sampling_defaults(generation_config: dict[str, Any]) -> SamplingDefaults:
    settings = {
        **HF_SAMPLING_DEFAULTS,
        **{key: value for key, value in generation_config.items() if value is not None},
    }
    if not generation_config.get("do_sample", False):
        return SamplingDefaults(
            temperature=0.0, top_k=1, top_p=1.0, repeat_penalty=float(settings["repetition_penalty"])
        )
    return SamplingDefaults(
        temperature=float(settings["temperature"]),
        top_k=int(settings["top_k"]),
        top_p=float(settings["top_p"]),
        repeat_penalty=float(settings["repetition_penalty"]),
    )


def add_model_parameters(writer: GGUFWriter, config: Any, name: str, outtype: OutType) -> None:
    """Shapes and numerics of the `qwen` graph. The context length is `seq_length`, the length the
    model was trained for: past it the PyTorch model stretches RoPE (dynamic NTK) and scales queries
    (LogN), which llama.cpp's qwen graph does not do."""
    from gguf import GGML_QUANT_VERSION

    writer.add_name(name)
    writer.add_file_type(storage_type(outtype).file_type)
    if outtype == "q8_0":
        writer.add_quantization_version(GGML_QUANT_VERSION)
    writer.add_context_length(config.seq_length)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(config.intermediate_size)  # llama.cpp halves it, as the config means
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_attention_heads)
    writer.add_rope_dimension_count(config.rotary_dim)
    writer.add_rope_freq_base(float(config.rotary_emb_base))
    writer.add_layer_norm_rms_eps(config.layer_norm_epsilon)
    writer.add_vocab_size(config.vocab_size)


def add_tokenizer(writer: GGUFWriter, vocabulary: GGUFVocabulary, chat_template: str) -> None:
    """The BPE vocabulary, the special ids and the chat template.

    Qwen prompts start without a BOS token; <|endoftext|> ends a document (EOS, also used for
    padding) and <|im_end|> a chat turn (EOT), so llama.cpp stops generating at either.
    """
    writer.add_tokenizer_model(TOKENIZER_MODEL)
    writer.add_tokenizer_pre(PRE_TOKENIZER)
    writer.add_token_list(vocabulary.tokens)
    writer.add_token_types(vocabulary.token_types)
    writer.add_token_merges(vocabulary.merges)
    writer.add_bos_token_id(ENDOFTEXT_ID)
    writer.add_add_bos_token(False)
    writer.add_eos_token_id(ENDOFTEXT_ID)
    writer.add_eot_token_id(IM_END_ID)
    writer.add_pad_token_id(ENDOFTEXT_ID)
    writer.add_chat_template(chat_template)


def add_sampling_defaults(writer: GGUFWriter, defaults: SamplingDefaults) -> None:
    writer.add_sampling_temp(defaults.temperature)
    writer.add_sampling_top_k(defaults.top_k)
    writer.add_sampling_top_p(defaults.top_p)
    writer.add_sampling_penalty_repeat(defaults.repeat_penalty)
    writer.add_sampling_penalty_last_n(defaults.penalty_last_n)
