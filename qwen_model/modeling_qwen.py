"""The Qwen (v1) architecture on transformers 5: same parameters and numbers as the released checkpoints.

What is Qwen-specific lives here (fused qkv projection, RMSNorm/MLP layout, RoPE with inference-time
dynamic NTK and LogN query scaling; the training loss is in chunked_loss.py); attention kernels, masks, caches and
generation come from transformers (``ALL_ATTENTION_FUNCTIONS``, ``create_causal_mask``, ``DynamicCache``,
``GenerationMixin``).
"""

import math
from collections.abc import Callable
from typing import Any, cast

import torch
import torch.nn.functional as F
from torch import nn
from transformers import GenerationConfig, GenerationMixin, LogitsProcessorList, PreTrainedModel
from transformers import initialization as init
from transformers.cache_utils import Cache, DynamicCache
from transformers.masking_utils import create_causal_mask, packed_sequence_mask_function
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_outputs import BaseModelOutputWithPast, CausalLMOutputWithPast
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS, slice_logits_to_keep
from transformers.utils.generic import can_return_tuple
from transformers.utils.output_capturing import capture_outputs

from .chat_format import DEFAULT_SYSTEM_PROMPT
from .chunked_loss import causal_lm_loss
from .configuration_qwen import PRECISION_FLAG_DTYPES, QWenConfig
from .qwen_generation_utils import StopWordsLogitsProcessor, chat, chat_stream

# Attribute under which the per-row dynamic-NTK alphas chosen at prefill travel with the KV cache (a list).
NTK_ALPHAS_CACHE_ATTRIBUTE = "qwen_ntk_alphas"
# Marks the `c_proj` layers that write into the residual stream (initialised with a depth-scaled std).
RESIDUAL_PROJECTION_MARK = "qwen_residual_projection"


def ntk_alpha(true_length: int, seq_length: int) -> int:
    """Dynamic-NTK alpha for a sequence of `true_length` tokens: 1 up to `seq_length`, then 3, 7, 15, ...

    Computed with Python floats exactly as the released code does (`math.log(x, 2)` rather than `log2`) so
    that lengths at exact powers of two pick the same alpha.
    """
    context_value = math.log(true_length / seq_length, 2) + 1
    return max(2 ** math.ceil(context_value) - 1, 1)


def logn_query_scale(position_ids: torch.Tensor, seq_length: int) -> torch.Tensor | None:
    """LogN factors `log_{seq_length}(position + 1)` past `seq_length` (1 before), shaped [b, 1, q, 1].

    Returns None when no position is past `seq_length`, so the common case costs nothing. The log is taken
    in float64 and rounded to float32 like the released table.
    """
    one_based = position_ids + 1
    if int(one_based.max()) <= seq_length:
        return None
    log_scale = torch.log(one_based.to(torch.float64)) / math.log(seq_length)
    scale = torch.where(one_based > seq_length, log_scale, torch.ones_like(log_scale))
    return scale.to(torch.float32)[:, None, :, None]


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    """(x1, x2) -> (-x2, x1) over the two halves of the last dimension."""
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rotary_pos_emb(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate the first `cos.shape[-1]` channels of each head of `x` ([b, heads, q, head_dim]).

    The rotation runs in float32 and is cast back, as in the released code (a no-op copy for fp32).
    """
    rotary_dim = cos.shape[-1]
    rotated = x[..., :rotary_dim].float()
    rotated = rotated * cos + rotate_half(rotated) * sin
    if rotary_dim < x.shape[-1]:
        rotated = torch.cat((rotated, x[..., rotary_dim:].float()), dim=-1)
    return rotated.to(x.dtype)


class QWenRMSNorm(nn.Module):
    """RMSNorm computed in float32, cast back to the input dtype, then scaled by the weight."""

    def __init__(self, hidden_size: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(hidden_size))

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        x = hidden_states.float()
        normed = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return normed.type_as(hidden_states) * self.weight


class QWenRotaryEmbedding(nn.Module):
    """Float32 cos/sin tables of RoPE, one per dynamic-NTK alpha, cached and grown on demand.

    No buffers: the tables are derived from the config, so nothing is saved, loaded or put on the meta device.
    """

    def __init__(self, rotary_dim: int, base: float) -> None:
        super().__init__()
        self.rotary_dim = rotary_dim
        self.base = base
        self._tables: dict[tuple[float, torch.device], tuple[torch.Tensor, torch.Tensor]] = {}

    def inv_freq(self, alpha: float, device: torch.device) -> torch.Tensor:
        """1 / base'^(2i/dim) with the NTK-stretched base' = base * alpha^(dim / (dim - 2))."""
        base = self.base * alpha ** (self.rotary_dim / (self.rotary_dim - 2))
        exponents = torch.arange(0, self.rotary_dim, 2, device=device).float() / self.rotary_dim
        return 1.0 / (base**exponents)

    def tables(self, alpha: float, length: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """cos and sin of `cat(freqs, freqs)` for positions 0..length-1 (or more), each [positions, dim]."""
        cached = self._tables.get((alpha, device))
        if cached is None or cached[0].shape[0] < length:
            positions = torch.arange(max(2 * length, 16), device=device, dtype=torch.float32)
            freqs = torch.outer(positions, self.inv_freq(alpha, device))
            angles = torch.cat((freqs, freqs), dim=-1)
            cached = (angles.cos(), angles.sin())
            self._tables[(alpha, device)] = cached
        return cached

    def forward(
        self, position_ids: torch.Tensor, alphas: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """cos/sin for `position_ids` ([b, q]) as [b, 1, q, dim]; `alphas` ([b, q]) is each token's NTK alpha."""
        length = int(position_ids.max()) + 1
        device = position_ids.device
        distinct = alphas.unique().tolist() if alphas is not None else [1.0]
        if alphas is None or len(distinct) == 1:
            cos, sin = self.tables(distinct[0], length, device)
            return cos[position_ids].unsqueeze(1), sin[position_ids].unsqueeze(1)
        position_ids = position_ids.expand_as(alphas)
        cos = torch.empty(*position_ids.shape, self.rotary_dim, dtype=torch.float32, device=device)
        sin = torch.empty_like(cos)
        for alpha in distinct:
            selected = alphas == alpha
            cos_table, sin_table = self.tables(alpha, length, device)
            cos[selected] = cos_table[position_ids[selected]]
            sin[selected] = sin_table[position_ids[selected]]
        return cos.unsqueeze(1), sin.unsqueeze(1)


def eager_attention_forward(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float,
    dropout: float = 0.0,
    **kwargs: Any,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Plain softmax attention (float32 softmax) on [b, heads, q|kv, head_dim]; returns [b, q, heads, head_dim]."""
    weights = torch.matmul(query, key.transpose(2, 3)) * scaling
    if attention_mask is not None:
        weights = weights + attention_mask
    weights = F.softmax(weights, dim=-1, dtype=torch.float32).to(query.dtype)
    weights = F.dropout(weights, p=dropout, training=module.training)
    output = torch.matmul(weights, value).transpose(1, 2).contiguous()
    return output, weights


def segmented_causal_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    segment_lengths: list[int],
    dropout: float,
    scaling: float,
) -> torch.Tensor:
    """Causal SDPA run separately on each packed sample: [b, heads, L, d] in, [b * L, heads, d] out.

    `segment_lengths` split the rows laid end to end (b*L tokens) into samples; a sample never spans two
    rows. Compared with one masked (b, L, L) attention this costs the samples' sum of L_i^2 instead of L^2
    per row and needs no mask: on CPU, where there is no varlen kernel, it is what makes packed rows as
    cheap as separate samples.
    """
    heads, head_dim = query.shape[1], query.shape[3]
    query, key, value = (
        states.transpose(1, 2).reshape(-1, heads, head_dim) for states in (query, key, value)
    )
    outputs = [
        F.scaled_dot_product_attention(
            q.transpose(0, 1)[None],
            k.transpose(0, 1)[None],
            v.transpose(0, 1)[None],
            dropout_p=dropout,
            is_causal=True,
            scale=scaling,
        )[0].transpose(0, 1)
        for q, k, v in zip(
            query.split(segment_lengths), key.split(segment_lengths), value.split(segment_lengths)
        )
    ]
    return torch.cat(outputs)


class QWenAttention(nn.Module):
    """Causal self-attention with the fused `c_attn` (q, k, v in that order, with bias) and `c_proj`."""

    def __init__(self, config: QWenConfig, layer_idx: int) -> None:
        super().__init__()
        self.config = config
        self.layer_idx = layer_idx
        self.num_heads = config.num_attention_heads
        self.head_dim = config.kv_channels
        self.scaling = self.head_dim**-0.5
        self.attention_dropout = config.attn_dropout_prob
        self.is_causal = True
        projection_size = self.num_heads * self.head_dim
        self.c_attn = nn.Linear(config.hidden_size, 3 * projection_size, bias=True)
        self.c_proj = nn.Linear(projection_size, config.hidden_size, bias=not config.no_bias)
        setattr(self.c_proj, RESIDUAL_PROJECTION_MARK, True)

    def forward(
        self,
        hidden_states: torch.Tensor,
        position_embeddings: tuple[torch.Tensor, torch.Tensor],
        attention_mask: torch.Tensor | None,
        logn_scale: torch.Tensor | None = None,
        past_key_values: Cache | None = None,
        segment_lengths: list[int] | None = None,
        **kwargs: Any,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """`segment_lengths` (packed rows under sdpa, see `QWenModel._packed_segment_lengths`) replaces the
        mask: each sample then runs its own causal attention."""
        batch, length, _ = hidden_states.shape
        qkv = self.c_attn(hidden_states).view(batch, length, 3, self.num_heads, self.head_dim)
        query, key, value = (states.transpose(1, 2) for states in qkv.unbind(2))
        cos, sin = position_embeddings
        query = apply_rotary_pos_emb(query, cos, sin)
        key = apply_rotary_pos_emb(key, cos, sin)
        if past_key_values is not None:
            key, value = past_key_values.update(key, value, self.layer_idx)
        if logn_scale is not None:
            query = query * logn_scale.to(query.dtype)
        dropout = self.attention_dropout if self.training else 0.0
        if segment_lengths is not None:
            output = segmented_causal_attention(query, key, value, segment_lengths, dropout, self.scaling)
            return self.c_proj(output.reshape(batch, length, -1)), None

        attention_interface: Callable = ALL_ATTENTION_FUNCTIONS.get_interface(
            self.config._attn_implementation, eager_attention_forward
        )
        output, weights = attention_interface(
            self,
            query,
            key,
            value,
            attention_mask,
            dropout=dropout,
            scaling=self.scaling,
            **kwargs,
        )
        return self.c_proj(output.reshape(batch, length, -1)), weights


class QWenMLP(nn.Module):
    """`c_proj(w1(x) * silu(w2(x)))`: w2 is the gate, w1 the up projection, width intermediate_size // 2."""

    def __init__(self, config: QWenConfig) -> None:
        super().__init__()
        width = config.intermediate_size // 2
        bias = not config.no_bias
        self.w1 = nn.Linear(config.hidden_size, width, bias=bias)
        self.w2 = nn.Linear(config.hidden_size, width, bias=bias)
        self.c_proj = nn.Linear(width, config.hidden_size, bias=bias)
        setattr(self.c_proj, RESIDUAL_PROJECTION_MARK, True)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return self.c_proj(self.w1(hidden_states) * F.silu(self.w2(hidden_states)))


class QWenBlock(GradientCheckpointingLayer):
    """Pre-norm transformer block: `h + attn(ln_1(h))`, then `h + mlp(ln_2(h))`."""

    def __init__(self, config: QWenConfig, layer_idx: int) -> None:
        super().__init__()
        self.ln_1 = QWenRMSNorm(config.hidden_size, eps=config.layer_norm_epsilon)
        self.attn = QWenAttention(config, layer_idx)
        self.ln_2 = QWenRMSNorm(config.hidden_size, eps=config.layer_norm_epsilon)
        self.mlp = QWenMLP(config)

    def forward(
        self,
        hidden_states: torch.Tensor,
        position_embeddings: tuple[torch.Tensor, torch.Tensor],
        attention_mask: torch.Tensor | None = None,
        logn_scale: torch.Tensor | None = None,
        past_key_values: Cache | None = None,
        **kwargs: Any,
    ) -> torch.Tensor:
        attn_output, _ = self.attn(
            self.ln_1(hidden_states),
            position_embeddings=position_embeddings,
            attention_mask=attention_mask,
            logn_scale=logn_scale,
            past_key_values=past_key_values,
            **kwargs,
        )
        hidden_states = hidden_states + attn_output
        return hidden_states + self.mlp(self.ln_2(hidden_states))


def _reject_unsupported_features(config: QWenConfig) -> None:
    """Fail at model construction for config switches this implementation does not provide."""
    enabled = [
        name for name in ("use_cache_quantization", "use_cache_kernel") if getattr(config, name, False)
    ]
    if enabled:
        raise ValueError(
            f"QWenConfig has {', '.join(f'{name}=True' for name in enabled)}: the int8 KV-cache quantization of "
            "the original code (CUDA kernels) is not supported by this implementation. Set "
            '"use_cache_quantization": false and "use_cache_kernel": false in config.json, or pass '
            "use_cache_quantization=False, use_cache_kernel=False to from_pretrained()."
        )


class QWenPreTrainedModel(PreTrainedModel):
    """Shared transformers plumbing: weight init, attention backends, checkpointing, device maps."""

    config: QWenConfig
    base_model_prefix = "transformer"
    supports_gradient_checkpointing = True
    _no_split_modules = ["QWenBlock"]
    _skip_keys_device_placement = ["past_key_values"]
    _supports_sdpa = True
    _supports_flash_attn = True
    _can_record_outputs = {"hidden_states": QWenBlock, "attentions": QWenAttention}

    @torch.no_grad()
    def _init_weights(self, module: nn.Module) -> None:
        """Default init, plus the released scheme's smaller std for residual output projections."""
        super()._init_weights(module)
        if isinstance(module, nn.Linear) and getattr(module, RESIDUAL_PROJECTION_MARK, False):
            std = self.config.initializer_range / math.sqrt(2 * self.config.num_hidden_layers)
            init.normal_(module.weight, mean=0.0, std=std)

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: Any, *model_args: Any, **kwargs: Any) -> Any:
        """Load as transformers does; without an explicit `dtype`, honour the original `bf16/fp16/fp32=True`.

        The flags may be passed as keyword arguments (as with the original code) or come on a `config`.
        """
        if kwargs.get("dtype") is None and kwargs.get("torch_dtype") is None:
            flagged = _dtype_from_precision_flags(kwargs, kwargs.get("config"))
            if flagged is not None:
                kwargs["dtype"] = flagged
        return super().from_pretrained(pretrained_model_name_or_path, *model_args, **kwargs)


def _dtype_from_precision_flags(kwargs: dict[str, Any], config: Any) -> torch.dtype | None:
    """The dtype selected by the original precision switches, keyword arguments taking precedence."""
    selected = []
    for flag, dtype in PRECISION_FLAG_DTYPES.items():
        value = (
            kwargs[flag] if flag in kwargs else getattr(config, flag, False) if config is not None else False
        )
        if value is True:
            selected.append((flag, dtype))
    if len(selected) > 1:
        raise ValueError(
            f"Only one of bf16/fp16/fp32 may be True, got {[flag for flag, _ in selected]}; pass a single one "
            "(or dtype=...) to from_pretrained()."
        )
    return selected[0][1] if selected else None


def _segment_ids(positions: torch.Tensor, real: torch.Tensor) -> torch.Tensor:
    """Per token, the index of its sequence in the row: a new one starts where position ids do not continue
    (+1) between two real tokens. Padding joins the neighbouring sequence."""
    restarts = (positions[:, 1:] != positions[:, :-1] + 1) & real[:, 1:] & real[:, :-1]
    return F.pad(restarts.cumsum(-1), (1, 0))


def _packed_segments(
    position_ids: torch.Tensor, attention_mask: torch.Tensor, batch: int
) -> torch.Tensor | None:
    """Segment ids when some row holds several sequences (packing), else None."""
    segments = _segment_ids(position_ids.expand(batch, -1), attention_mask.bool())
    return segments if bool(segments[:, -1].any()) else None


def sequence_lengths(
    position_ids: torch.Tensor, attention_mask: torch.Tensor | None, batch: int
) -> torch.Tensor:
    """Per token ([batch, q]), the number of real tokens of its sequence: the row's unpadded length, or its
    segment's when position ids restart inside the row (packing)."""
    positions = position_ids.expand(batch, -1)
    real = (
        attention_mask.bool() if attention_mask is not None else torch.ones_like(positions, dtype=torch.bool)
    )
    segments = _segment_ids(positions, real)
    counts = torch.zeros_like(positions).scatter_add_(1, segments, real.long())
    return counts.gather(1, segments)


class QWenModel(QWenPreTrainedModel):
    """Embeddings, blocks and final norm (`transformer.*` in checkpoints)."""

    def __init__(self, config: QWenConfig) -> None:
        _reject_unsupported_features(config)
        super().__init__(config)
        self.wte: nn.Module = nn.Embedding(config.vocab_size, config.hidden_size)
        self.drop = nn.Dropout(config.emb_dropout_prob)
        self.h = nn.ModuleList(
            [QWenBlock(config, layer_idx) for layer_idx in range(config.num_hidden_layers)]
        )
        self.ln_f = QWenRMSNorm(config.hidden_size, eps=config.layer_norm_epsilon)
        self.rotary_emb = QWenRotaryEmbedding(config.rotary_dim, config.rotary_emb_base)
        self.gradient_checkpointing = False
        self.post_init()

    def get_input_embeddings(self) -> nn.Module:
        return self.wte

    def set_input_embeddings(self, value: nn.Module) -> None:
        self.wte = value

    @capture_outputs
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        past_key_values: Cache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        use_cache: bool | None = None,
        **kwargs: Any,
    ) -> BaseModelOutputWithPast:
        """Hidden states of the last layer.

        Without `position_ids`, positions are the index within the (padded) sequence, as in the released code.
        Position ids that restart inside a row (packing) make each segment attend only to itself.
        `use_cache` defaults to `config.use_cache` in eval mode and to False in training mode.
        """
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("QWenModel.forward needs exactly one of input_ids or inputs_embeds.")
        if inputs_embeds is None:
            inputs_embeds = self.wte(input_ids)
        batch, length = inputs_embeds.shape[:2]
        if use_cache is None:
            use_cache = self.config.use_cache and not self.training
        if use_cache and past_key_values is None:
            past_key_values = DynamicCache(config=self.config)
        past_length = past_key_values.get_seq_length() if past_key_values is not None else 0
        positions = (
            position_ids
            if position_ids is not None
            else torch.arange(past_length, past_length + length, device=inputs_embeds.device)
        )
        if positions.dim() == 1:
            positions = positions.unsqueeze(0)

        alphas = self._ntk_alphas(attention_mask, positions, past_key_values, past_length, batch, length)
        position_embeddings = self.rotary_emb(positions, alphas)
        logn_scale = None
        if self.config.use_logn_attn and not self.training:
            logn_scale = logn_query_scale(positions, self.config.seq_length)
        segment_lengths = self._packed_segment_lengths(attention_mask, positions, past_length, batch)
        causal_mask = None
        if segment_lengths is None:
            causal_mask = self._causal_mask(
                inputs_embeds, attention_mask, past_key_values, past_length, positions
            )
        else:
            kwargs["segment_lengths"] = segment_lengths

        hidden_states = self.drop(inputs_embeds)
        for block in self.h:
            hidden_states = block(
                hidden_states,
                position_embeddings=position_embeddings,
                attention_mask=causal_mask,
                logn_scale=logn_scale,
                past_key_values=past_key_values,
                position_ids=positions,
                **kwargs,
            )
        return BaseModelOutputWithPast(
            last_hidden_state=self.ln_f(hidden_states),
            past_key_values=past_key_values if use_cache else None,
        )

    def _ntk_alphas(
        self,
        attention_mask: torch.Tensor | None,
        position_ids: torch.Tensor,
        past_key_values: Cache | None,
        past_length: int,
        batch: int,
        length: int,
    ) -> torch.Tensor | None:
        """Dynamic-NTK alpha of every token ([batch, q]), or None (alpha 1) in training or when disabled.

        At prefill a token's alpha comes from the true length of its sequence: the row's unpadded length
        under a 2D attention mask (else the row length), or its packed segment's. The alpha of each row's
        last sequence is stored on the cache, and cached decoding keeps rotating with it.
        """
        if self.training or not self.config.use_dynamic_ntk:
            return None
        stored = getattr(past_key_values, NTK_ALPHAS_CACHE_ATTRIBUTE, None) if past_length > 0 else None
        if stored is not None:
            return torch.tensor(stored, device=position_ids.device)[:, None].expand(batch, length)
        padding_mask = attention_mask if attention_mask is not None and attention_mask.dim() == 2 else None
        if past_length == 0:
            lengths = sequence_lengths(position_ids, padding_mask, batch)
        else:  # a cache filled elsewhere: count what it holds, like the released code
            row_lengths = (
                padding_mask.sum(-1)
                if padding_mask is not None
                else torch.full((batch,), past_length + length, device=position_ids.device)
            )
            lengths = row_lengths[:, None].expand(batch, length)
        distinct, inverse = lengths.unique(return_inverse=True)
        values = [float(ntk_alpha(max(int(n), 1), self.config.seq_length)) for n in distinct.tolist()]
        alphas = torch.tensor(values, device=lengths.device)[inverse]
        if past_key_values is not None:
            setattr(past_key_values, NTK_ALPHAS_CACHE_ATTRIBUTE, alphas[:, -1].tolist())
        return alphas

    def _packed_segment_lengths(
        self,
        attention_mask: torch.Tensor | None,
        position_ids: torch.Tensor,
        past_length: int,
        batch: int,
    ) -> list[int] | None:
        """Sample lengths of packed rows laid end to end, when attention can run per sample instead of
        through a block-diagonal mask: sdpa, no cached tokens, no padding mask, and position ids that
        restart inside a row. Else None (the mask path)."""
        if (
            self.config._attn_implementation != "sdpa"
            or past_length > 0
            or position_ids.shape[-1] < 2
            or (attention_mask is not None and (attention_mask.dim() != 2 or not bool(attention_mask.all())))
        ):
            return None
        all_real = torch.ones(batch, position_ids.shape[-1], dtype=torch.bool, device=position_ids.device)
        segments = _packed_segments(position_ids, all_real, batch)
        if segments is None:
            return None
        row_offsets = torch.arange(batch, device=segments.device)[:, None] * segments.shape[-1]
        return torch.unique_consecutive(segments + row_offsets, return_counts=True)[1].tolist()

    def _causal_mask(
        self,
        inputs_embeds: torch.Tensor,
        attention_mask: torch.Tensor | None,
        past_key_values: Cache | None,
        past_length: int,
        position_ids: torch.Tensor,
    ) -> Any:
        """The backend's causal mask (a tensor, a flex-attention BlockMask, or None) with padding and
        packed-segment (block-diagonal) structure.

        transformers detects packed rows from position ids only without a 2D mask; a mask of ones is dropped
        for that, and packed rows that also carry padding get the segment structure as an extra mask term.
        """
        if past_length == 0 and isinstance(past_key_values, DynamicCache):
            # An empty dynamic cache sizes the mask like no cache; dropping it lets packed rows be detected.
            past_key_values = None
        segment_mask = None
        if past_key_values is None and attention_mask is not None and attention_mask.dim() == 2:
            segments = _packed_segments(position_ids, attention_mask, inputs_embeds.shape[0])
            if segments is not None and bool(attention_mask.all()):
                attention_mask = None
            elif segments is not None:
                segment_mask = packed_sequence_mask_function(segments)
        return create_causal_mask(
            config=self.config,
            inputs_embeds=inputs_embeds,
            attention_mask=attention_mask,
            past_key_values=past_key_values,
            position_ids=position_ids,
            and_mask_function=segment_mask,
        )


class QWenLMHeadModel(QWenPreTrainedModel, GenerationMixin):
    """Qwen causal LM: `transformer` + untied `lm_head`, with generate(), chat() and chat_stream()."""

    _tied_weights_keys: dict[str, str] = {}

    def __init__(self, config: QWenConfig) -> None:
        super().__init__(config)
        self.transformer = QWenModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        # Tells the HF Trainer that labels are shifted inside, so it counts `num_items_in_batch` on labels[:, 1:].
        self.loss_type = "ForCausalLM"
        self.post_init()

    def get_input_embeddings(self) -> nn.Module:
        return self.transformer.wte

    def set_input_embeddings(self, value: nn.Module) -> None:
        self.transformer.wte = value

    def get_output_embeddings(self) -> nn.Module:
        return self.lm_head

    def set_output_embeddings(self, new_embeddings: nn.Module) -> None:
        self.lm_head = new_embeddings

    @can_return_tuple
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        past_key_values: Cache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        skip_logits: bool | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        **kwargs: Any,
    ) -> CausalLMOutputWithPast:
        """Logits and, with `labels` (not shifted by the caller, -100 ignored), the next-token loss.

        `skip_logits=True` (with labels) skips the logits: the loss is then computed in chunks from the hidden
        states, the [tokens x vocabulary] logits never exist, and `logits` is None. This is what the toolkit's
        trainer asks for; by default (None or False) the logits are returned, in training mode too.
        `logits_to_keep` (set by generate) limits the logits to the last positions.
        Packed rows (position ids restarting inside a row) are shifted as one sequence: this relies on the
        data pipeline's -100 on each sample's first label, which drops the cross-sample prediction.
        """
        num_items_in_batch = kwargs.pop("num_items_in_batch", None)
        if skip_logits and labels is None:
            raise ValueError("skip_logits=True needs labels: without them there is nothing to compute.")
        outputs: BaseModelOutputWithPast = self.transformer(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            past_key_values=past_key_values,
            inputs_embeds=inputs_embeds,
            use_cache=use_cache,
            **kwargs,
        )
        hidden_states = cast(torch.Tensor, outputs.last_hidden_state)
        logits = None if skip_logits else self.lm_head(slice_logits_to_keep(hidden_states, logits_to_keep))

        loss = None
        if labels is not None:
            if logits is not None and logits.shape[:2] == hidden_states.shape[:2]:
                loss = causal_lm_loss(logits, labels, num_items_in_batch=num_items_in_batch)
            else:
                loss = causal_lm_loss(hidden_states, labels, self.lm_head, num_items_in_batch)
        return CausalLMOutputWithPast(
            loss=loss,
            logits=logits,
            past_key_values=outputs.past_key_values,
            hidden_states=outputs.hidden_states,
            attentions=outputs.attentions,
        )

    def generate(  # type: ignore[override]  # stop_words_ids added, the rest passed through
        self,
        inputs: torch.Tensor | None = None,
        generation_config: GenerationConfig | None = None,
        logits_processor: LogitsProcessorList | None = None,
        stop_words_ids: list[list[int]] | None = None,
        **kwargs: Any,
    ) -> Any:
        """transformers' generate, honouring `stop_words_ids` as the original Qwen code did.

        `stop_words_ids` (this argument, else the generation config's field) are token-id sequences of any
        length: a row that generates one gets the end-of-text token (`eos_token_id`) right after it and is
        finished there (see `qwen_generation_utils.StopWordsLogitsProcessor`).
        """
        config = generation_config if generation_config is not None else self.generation_config
        if stop_words_ids is None:
            stop_words_ids = getattr(config, "stop_words_ids", None)
        if stop_words_ids:
            eos_token_id = kwargs.get("eos_token_id", config.eos_token_id)
            logits_processor = LogitsProcessorList(
                [*(logits_processor or []), StopWordsLogitsProcessor(stop_words_ids, eos_token_id)]
            )
        return super().generate(  # type: ignore[misc]  # GenerationMixin types its self as a protocol
            inputs, generation_config=generation_config, logits_processor=logits_processor, **kwargs
        )

    def chat(
        self,
        tokenizer: Any,
        query: str,
        history: list[tuple[str, str]] | None = None,
        system: str = DEFAULT_SYSTEM_PROMPT,
        generation_config: Any = None,
        **kwargs: Any,
    ) -> Any:
        """One ChatML turn; see `qwen_generation_utils.chat` (returns the response and the new history)."""
        return chat(
            self,
            tokenizer,
            query,
            history=history,
            system=system,
            generation_config=generation_config,
            **kwargs,
        )

    def chat_stream(
        self,
        tokenizer: Any,
        query: str,
        history: list[tuple[str, str]] | None = None,
        system: str = DEFAULT_SYSTEM_PROMPT,
        generation_config: Any = None,
        **kwargs: Any,
    ) -> Any:
        """Streaming variant of `chat`; see `qwen_generation_utils.chat_stream`."""
        return chat_stream(
            self,
            tokenizer,
            query,
            history=history,
            system=system,
            generation_config=generation_config,
            **kwargs,
        )


__all__ = ["QWenLMHeadModel", "QWenModel", "QWenPreTrainedModel"]
