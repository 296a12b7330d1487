"""Numerics of the bundled Qwen model against independent, straightforward float64 re-implementations
of the released checkpoints' computation (QWEN_FORMAT.md), piece by piece and end to end."""

import math

import pytest
import torch
import torch.nn.functional as F

from qwen_model import QWenConfig, QWenLMHeadModel
from qwen_model.modeling_qwen import (
    QWenMLP,
    QWenRMSNorm,
    QWenRotaryEmbedding,
    apply_rotary_pos_emb,
    logn_query_scale,
    ntk_alpha,
)

SEQ_LENGTH = 16


def tiny_config(**overrides) -> QWenConfig:
    fields = dict(
        vocab_size=320,
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        kv_channels=16,
        intermediate_size=192,
        seq_length=SEQ_LENGTH,
        max_position_embeddings=512,
    )
    fields.update(overrides)
    return QWenConfig(**fields)


def random_model(config: QWenConfig, seed: int = 0) -> QWenLMHeadModel:
    """A model with large random weights so attention is sharp and positional effects show in the logits."""
    torch.manual_seed(seed)
    model = QWenLMHeadModel(config).eval()
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if name.endswith(("ln_1.weight", "ln_2.weight", "ln_f.weight")):
                parameter.copy_(1 + 0.1 * torch.randn_like(parameter))
            else:
                parameter.normal_(0.0, 0.25 if "c_attn" in name else 0.1)
    return model


def reference_alpha(true_length: int, seq_length: int) -> int:
    """Dynamic-NTK alpha by integer arithmetic: 2^(k+1) - 1 for the smallest k with seq_length * 2^k >= L."""
    if true_length <= seq_length:
        return 1
    k = 0
    while seq_length * 2**k < true_length:
        k += 1
    return 2 ** (k + 1) - 1


def reference_rotate(x: torch.Tensor, angles: torch.Tensor) -> torch.Tensor:
    """Rotate channel i with channel i + d/2 (d = 2 * angles.shape[-1]) by `angles`, leaving the rest."""
    half = angles.shape[-1]
    first, second, rest = x[..., :half], x[..., half : 2 * half], x[..., 2 * half :]
    cos, sin = angles.cos(), angles.sin()
    return torch.cat((first * cos - second * sin, second * cos + first * sin, rest), dim=-1)


def reference_logits(
    model: QWenLMHeadModel,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    alphas: list[int] | None = None,
    training: bool = False,
) -> torch.Tensor:
    """The released computation in float64: positions are indices in the (padded) row, dynamic NTK picks a
    per-row alpha from the row's true length (unless `alphas` forces them), LogN scales queries past
    seq_length; both only at inference."""
    config = model.config
    weights = {name: tensor.detach().double() for name, tensor in model.state_dict().items()}
    batch, length = input_ids.shape
    heads, head_dim = config.num_attention_heads, config.kv_channels
    rotary_dim = int(head_dim * config.rotary_pct)

    def linear(x: torch.Tensor, name: str) -> torch.Tensor:
        out = x @ weights[f"{name}.weight"].T
        return out + weights[f"{name}.bias"] if f"{name}.bias" in weights else out

    def rms_norm(x: torch.Tensor, name: str) -> torch.Tensor:
        return x / torch.sqrt((x * x).mean(-1, keepdim=True) + config.layer_norm_epsilon) * weights[name]

    if alphas is None:
        if training or not config.use_dynamic_ntk:
            alphas = [1] * batch
        elif attention_mask is not None:
            alphas = [reference_alpha(int(n), config.seq_length) for n in attention_mask.sum(-1)]
        else:
            alphas = [reference_alpha(length, config.seq_length)] * batch
    positions = torch.arange(length, dtype=torch.float64)
    exponents = torch.arange(0, rotary_dim, 2, dtype=torch.float64) / rotary_dim
    angles = torch.stack(
        [
            torch.outer(
                positions, (config.rotary_emb_base * a ** (rotary_dim / (rotary_dim - 2))) ** -exponents
            )
            for a in alphas
        ]
    )[:, :, None, :]  # [batch, length, 1, rotary_dim / 2]
    logn = torch.tensor(
        [
            math.log(p) / math.log(config.seq_length)
            if p > config.seq_length and config.use_logn_attn and not training
            else 1.0
            for p in range(1, length + 1)
        ],
        dtype=torch.float64,
    )[None, :, None, None]
    allowed = torch.ones(length, length, dtype=torch.bool).tril()[None].expand(batch, -1, -1)
    if attention_mask is not None:
        allowed = allowed & attention_mask.bool()[:, None, :]

    x = weights["transformer.wte.weight"][input_ids]
    for layer in range(config.num_hidden_layers):
        prefix = f"transformer.h.{layer}"
        qkv = linear(rms_norm(x, f"{prefix}.ln_1.weight"), f"{prefix}.attn.c_attn")
        q, k, v = (part.reshape(batch, length, heads, head_dim) for part in qkv.split(heads * head_dim, -1))
        q = reference_rotate(q, angles) * logn
        k = reference_rotate(k, angles)
        scores = torch.einsum("bihd,bjhd->bhij", q, k) / math.sqrt(head_dim)
        scores = scores.masked_fill(~allowed[:, None], -1e9)
        context = torch.einsum("bhij,bjhd->bihd", scores.softmax(-1), v).reshape(batch, length, -1)
        x = x + linear(context, f"{prefix}.attn.c_proj")
        h = rms_norm(x, f"{prefix}.ln_2.weight")
        gate = linear(h, f"{prefix}.mlp.w2")
        x = x + linear(linear(h, f"{prefix}.mlp.w1") * gate * torch.sigmoid(gate), f"{prefix}.mlp.c_proj")
    return linear(rms_norm(x, "transformer.ln_f.weight"), "lm_head")


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.double() - b.double()).abs().max().item()


# --- pieces -----------------------------------------------------------------------------------------


def test_rms_norm_is_float32_then_cast_then_weight() -> None:
    torch.manual_seed(0)
    norm = QWenRMSNorm(64, eps=1e-6)
    with torch.no_grad():
        norm.weight.copy_(1 + torch.randn(64))
    x = torch.randn(3, 5, 64) * 3
    expected = x.double() / torch.sqrt(x.double().pow(2).mean(-1, keepdim=True) + 1e-6) * norm.weight.double()
    assert max_diff(norm(x), expected) < 1e-5

    norm_bf16, x_bf16 = norm.to(torch.bfloat16), x.to(torch.bfloat16)
    normed = x_bf16.double() / torch.sqrt(x_bf16.double().pow(2).mean(-1, keepdim=True) + 1e-6)
    cast_then_weight = normed.to(torch.bfloat16) * norm_bf16.weight
    weight_then_cast = (normed * norm_bf16.weight.double()).to(torch.bfloat16)
    out = norm_bf16(x_bf16)
    assert out.dtype == torch.bfloat16
    assert torch.equal(out, cast_then_weight)
    assert not torch.equal(
        out, weight_then_cast
    )  # the order is observable, so the check above means something


def test_mlp_gates_with_w2_and_has_half_width() -> None:
    torch.manual_seed(0)
    config = tiny_config()
    mlp = QWenMLP(config)
    assert mlp.w1.out_features == mlp.w2.out_features == config.intermediate_size // 2
    x = torch.randn(2, 3, config.hidden_size)
    w1, w2, c_proj = (layer.weight.double() for layer in (mlp.w1, mlp.w2, mlp.c_proj))
    gate = x.double() @ w2.T
    expected = ((x.double() @ w1.T) * gate / (1 + torch.exp(-gate))) @ c_proj.T
    assert max_diff(mlp(x), expected) < 1e-6


@pytest.mark.parametrize("rotary_dim", [16, 8])
def test_rotary_rotates_channel_i_with_i_plus_half(rotary_dim: int) -> None:
    torch.manual_seed(0)
    head_dim, base = 16, 10000.0
    rotary = QWenRotaryEmbedding(rotary_dim, base)
    positions = torch.tensor([[0, 1, 5, 40], [3, 3, 2, 100]])
    cos, sin = rotary(positions, alphas=None)
    x = torch.randn(2, 3, 4, head_dim)  # [batch, heads, positions, head_dim]
    inv_freq = base ** -(torch.arange(0, rotary_dim, 2, dtype=torch.float64) / rotary_dim)
    angles = positions.double()[:, None, :, None] * inv_freq
    assert max_diff(apply_rotary_pos_emb(x, cos, sin), reference_rotate(x.double(), angles)) < 1e-5


def test_rotary_float32_tables_and_cast_back() -> None:
    rotary = QWenRotaryEmbedding(16, 10000)
    cos, sin = rotary(torch.arange(8)[None], alphas=torch.ones(1, 8))
    assert cos.dtype == sin.dtype == torch.float32
    x = torch.randn(1, 2, 8, 16, dtype=torch.bfloat16)
    rotated = apply_rotary_pos_emb(x, cos, sin)
    assert rotated.dtype == torch.bfloat16
    assert torch.equal(
        rotated, (x.float() * cos + torch.cat((-x[..., 8:], x[..., :8]), -1).float() * sin).bfloat16()
    )


def test_rotary_tables_are_cached_per_alpha_and_grown_on_demand() -> None:
    rotary = QWenRotaryEmbedding(16, 10000)
    cpu = torch.device("cpu")
    first = rotary.tables(1.0, 100, cpu)
    assert first[0].shape[0] >= 100
    assert rotary.tables(1.0, 50, cpu) is first
    assert rotary.tables(3.0, 50, cpu) is not first
    grown = rotary.tables(1.0, 1000, cpu)
    assert grown[0].shape[0] >= 1000
    assert torch.equal(grown[0][:100], first[0][:100])
    assert rotary.tables(1.0, 10, cpu) is grown


def test_rotary_scores_depend_only_on_relative_position() -> None:
    torch.manual_seed(0)
    rotary = QWenRotaryEmbedding(16, 10000)
    q, k = torch.randn(16), torch.randn(16)

    def score(query_position: int, key_position: int) -> float:
        cos, sin = rotary(torch.tensor([[query_position, key_position]]), alphas=None)
        rotated = apply_rotary_pos_emb(torch.stack((q, k))[None, None], cos, sin)[0, 0]
        return float(rotated[0] @ rotated[1])

    assert score(7, 3) == pytest.approx(score(107, 103), abs=1e-4)
    assert score(7, 3) != pytest.approx(score(30, 3), abs=1e-2)


@pytest.mark.parametrize("seq_length", [16, 2048, 8192])
def test_ntk_alpha_formula(seq_length: int) -> None:
    lengths = list(range(1, 5 * seq_length, max(seq_length // 64, 1))) + [2 * seq_length, 4 * seq_length + 1]
    assert [ntk_alpha(n, seq_length) for n in lengths] == [reference_alpha(n, seq_length) for n in lengths]
    assert ntk_alpha(seq_length, seq_length) == 1
    assert ntk_alpha(seq_length + 1, seq_length) == 3
    assert ntk_alpha(2 * seq_length + 1, seq_length) == 7


@pytest.mark.parametrize("alpha", [1, 3, 7])
def test_ntk_stretches_the_rotary_base(alpha: int) -> None:
    dim, base = 16, 10000
    stretched = base * alpha ** (dim / (dim - 2))
    expected = stretched ** -(torch.arange(0, dim, 2, dtype=torch.float64) / dim)
    inv_freq = QWenRotaryEmbedding(dim, base).inv_freq(alpha, torch.device("cpu"))
    assert inv_freq.dtype == torch.float32
    assert torch.allclose(inv_freq.double(), expected, rtol=1e-6, atol=0)


def test_logn_factor_past_seq_length() -> None:
    positions = torch.arange(40)[None]
    scale = logn_query_scale(positions, 16)
    expected = [math.log(p + 1, 16) if p + 1 > 16 else 1.0 for p in range(40)]
    assert scale.shape == (1, 1, 40, 1)
    assert scale.flatten().tolist() == pytest.approx(expected, abs=1e-7)
    assert logn_query_scale(torch.arange(16)[None], 16) is None


# --- whole model ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("overrides", "length"),
    [
        ({}, 12),
        ({}, 40),
        ({"use_logn_attn": False}, 40),
        ({"use_dynamic_ntk": False}, 40),
        ({"rotary_pct": 0.5, "no_bias": False, "rotary_emb_base": 1000000}, 40),
    ],
    ids=["within-seq-length", "ntk+logn", "ntk-only", "logn-only", "partial-rotary+biases"],
)
def test_forward_matches_reference(overrides: dict, length: int) -> None:
    model = random_model(tiny_config(**overrides))
    input_ids = torch.randint(0, model.config.vocab_size, (2, length))
    with torch.no_grad():
        logits = model(input_ids).logits
    assert max_diff(logits, reference_logits(model, input_ids)) < 1e-4


def test_long_context_features_change_the_logits() -> None:
    """Guards the reference tests: NTK and LogN are visible at this scale, so ignoring them would fail."""
    model = random_model(tiny_config())
    input_ids = torch.randint(0, model.config.vocab_size, (1, 40))
    reference = reference_logits(model, input_ids)
    assert max_diff(reference, reference_logits(model, input_ids, alphas=[1])) > 1e-2
    model.config.use_logn_attn = False
    assert max_diff(reference, reference_logits(model, input_ids)) > 1e-2


def test_left_padded_rows_use_their_own_ntk_alpha() -> None:
    """Rows of true length 12, 30 and 40 in one padded batch: alphas 1, 7 and 7 (the padded length is 40)."""
    model = random_model(tiny_config())
    lengths = [12, 30, 40]
    input_ids = torch.randint(1, model.config.vocab_size, (3, 40))
    attention_mask = torch.zeros(3, 40, dtype=torch.long)
    for row, true_length in enumerate(lengths):
        attention_mask[row, 40 - true_length :] = 1
    with torch.no_grad():
        logits = model(input_ids, attention_mask=attention_mask).logits
    reference = reference_logits(model, input_ids, attention_mask)
    for row, true_length in enumerate(lengths):
        real = slice(40 - true_length, 40)
        assert max_diff(logits[row, real], reference[row, real]) < 1e-4
    from_padded_length = reference_logits(model, input_ids, attention_mask, alphas=[7, 7, 7])
    assert max_diff(reference[0, 28:], from_padded_length[0, 28:]) > 1e-2


def test_cached_decoding_keeps_the_prefill_alpha() -> None:
    """Prefill 16 tokens (alpha 1), then decode up to 24 tokens: the alpha stays 1 as in the original."""
    model = random_model(tiny_config())
    input_ids = torch.randint(0, model.config.vocab_size, (1, 24))
    with torch.no_grad():
        output = model(input_ids[:, :16], use_cache=True)
        steps = [output.logits[:, -1]]
        for position in range(16, 23):
            output = model(input_ids[:, position : position + 1], past_key_values=output.past_key_values)
            steps.append(output.logits[:, -1])
    reference = reference_logits(model, input_ids, alphas=[1])[:, 15:23]
    assert max_diff(torch.stack(steps, 1), reference) < 1e-4
    assert max_diff(reference, reference_logits(model, input_ids)[:, 15:23]) > 1e-2


def test_training_mode_disables_ntk_and_logn() -> None:
    model = random_model(tiny_config()).train()
    input_ids = torch.randint(0, model.config.vocab_size, (1, 40))
    with torch.no_grad():
        logits = model(input_ids, skip_logits=False).logits
    assert max_diff(logits, reference_logits(model, input_ids, training=True)) < 1e-4


def test_loss_is_mean_next_token_cross_entropy() -> None:
    model = random_model(tiny_config())
    input_ids = torch.randint(0, model.config.vocab_size, (2, 10))
    labels = input_ids.clone()
    labels[0, :4] = -100
    labels[1, 7:] = -100
    with torch.no_grad():
        loss = model(input_ids, labels=labels).loss
    log_probs = F.log_softmax(reference_logits(model, input_ids), -1)
    picked = [
        -log_probs[row, t, labels[row, t + 1]]
        for row in range(2)
        for t in range(9)
        if labels[row, t + 1] != -100
    ]
    assert loss.item() == pytest.approx(torch.stack(picked).mean().item(), abs=1e-5)
