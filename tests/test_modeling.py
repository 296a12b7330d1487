"""Behaviour of the bundled Qwen model inside transformers: checkpoint layout and loading, Auto* registration
without remote code, attention backends, cache, padding, packing, the chunked loss, training plumbing,
PEFT and generation. Tiny random models built in-test, CPU only."""

import json
import shutil
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, AutoTokenizer, DynamicCache

import qwen_model.chunked_loss as chunked_loss
import qwen_model.modeling_qwen as modeling_qwen
from qwen_model import QWenConfig, QWenLMHeadModel, QWenModel, QWenTokenizer

SEQ_LENGTH = 16
VOCAB = 320
REMOTE_CODE_TRAP = "raise RuntimeError('remote code from the checkpoint directory was executed')\n"


def tiny_config(**overrides) -> QWenConfig:
    fields = dict(
        vocab_size=VOCAB,
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


def random_model(seed: int = 0, **overrides) -> QWenLMHeadModel:
    """Large random weights: sharp attention and well separated logits (no greedy near-ties)."""
    torch.manual_seed(seed)
    model = QWenLMHeadModel(tiny_config(**overrides)).eval()
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if name.endswith(("ln_1.weight", "ln_2.weight", "ln_f.weight")):
                parameter.copy_(1 + 0.1 * torch.randn_like(parameter))
            else:
                parameter.normal_(0.0, 0.25 if "c_attn" in name else 0.1)
    return model


def random_ids(*shape: int, seed: int = 1) -> torch.Tensor:
    return torch.randint(1, VOCAB, shape, generator=torch.Generator().manual_seed(seed))


def left_pad(rows: list[torch.Tensor], pad_id: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(row) for row in rows)
    input_ids = torch.full((len(rows), width), pad_id)
    attention_mask = torch.zeros(len(rows), width, dtype=torch.long)
    for index, row in enumerate(rows):
        input_ids[index, width - len(row) :] = row
        attention_mask[index, width - len(row) :] = 1
    return input_ids, attention_mask


def positions_from_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """Position ids as generate() builds them: count of real tokens so far, 0 on padding."""
    return (attention_mask.cumsum(-1) - 1).clamp(min=0)


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.double() - b.double()).abs().max().item()


def official_checkpoint(model: QWenLMHeadModel, directory: Path) -> Path:
    """Save `model` sharded, then make the directory look like a released checkpoint: original config
    fields, `auto_map` to remote code, a chat generation_config.json, and remote code files that raise."""
    model.save_pretrained(directory, max_shard_size="100KB")
    config = json.loads((directory / "config.json").read_text())
    config.pop("dtype", None)
    config.update(
        architectures=["QWenLMHeadModel"],
        auto_map={
            "AutoConfig": "configuration_qwen.QWenConfig",
            "AutoModelForCausalLM": "modeling_qwen.QWenLMHeadModel",
        },
        torch_dtype="bfloat16",
        onnx_safe=None,
        tokenizer_class="QWenTokenizer",
        transformers_version="4.32.0",
    )
    (directory / "config.json").write_text(json.dumps(config, indent=2))
    generation = {
        "chat_format": "chatml",
        "eos_token_id": 151643,
        "pad_token_id": 151643,
        "max_window_size": 6144,
        "max_new_tokens": 512,
        "do_sample": True,
        "top_k": 0,
        "top_p": 0.8,
        "repetition_penalty": 1.1,
        "transformers_version": "4.31.0",
    }
    (directory / "generation_config.json").write_text(json.dumps(generation))
    for name in ("configuration_qwen.py", "modeling_qwen.py", "tokenization_qwen.py"):
        (directory / name).write_text(REMOTE_CODE_TRAP)
    return directory


# --- layout and loading -----------------------------------------------------------------------------


def test_parameter_names_and_shapes_match_released_checkpoints() -> None:
    config = tiny_config(vocab_size=151936, intermediate_size=256)
    shapes = {name: tuple(p.shape) for name, p in QWenLMHeadModel(config).named_parameters()}
    expected = {
        "transformer.wte.weight": (151936, 64),
        "transformer.ln_f.weight": (64,),
        "lm_head.weight": (151936, 64),
    }
    for layer in range(2):
        prefix = f"transformer.h.{layer}"
        expected |= {
            f"{prefix}.ln_1.weight": (64,),
            f"{prefix}.attn.c_attn.weight": (3 * 4 * 16, 64),
            f"{prefix}.attn.c_attn.bias": (3 * 4 * 16,),
            f"{prefix}.attn.c_proj.weight": (64, 4 * 16),
            f"{prefix}.ln_2.weight": (64,),
            f"{prefix}.mlp.w1.weight": (128, 64),
            f"{prefix}.mlp.w2.weight": (128, 64),
            f"{prefix}.mlp.c_proj.weight": (64, 128),
        }
    assert shapes == expected


def test_lm_head_is_not_tied_and_no_buffers_are_saved() -> None:
    model = QWenLMHeadModel(tiny_config())
    assert model.lm_head.weight.data_ptr() != model.transformer.wte.weight.data_ptr()
    assert set(model.state_dict()) == {name for name, _ in model.named_parameters()}


def test_sharded_official_checkpoint_reloads_with_auto_classes_without_remote_code(tmp_path: Path) -> None:
    model = random_model()
    input_ids = random_ids(2, 12)
    with torch.no_grad():
        expected = model(input_ids).logits
    directory = official_checkpoint(model, tmp_path / "ckpt")
    assert len(list(directory.glob("model-*-of-*.safetensors"))) > 1
    assert (directory / "model.safetensors.index.json").is_file()

    config = AutoConfig.from_pretrained(directory)
    assert type(config) is QWenConfig and config.onnx_safe is None and config.seq_length == SEQ_LENGTH
    reloaded = AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32)
    assert type(reloaded) is QWenLMHeadModel
    with torch.no_grad():
        assert torch.equal(reloaded(input_ids).logits, expected)
    assert reloaded.generation_config.chat_format == "chatml"
    assert reloaded.generation_config.eos_token_id == 151643
    assert reloaded.generation_config.max_window_size == 6144

    trusting = AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32, trust_remote_code=True)
    assert type(trusting) is QWenLMHeadModel
    low_memory = AutoModelForCausalLM.from_pretrained(
        directory, dtype=torch.float32, device_map="cpu", low_cpu_mem_usage=True
    )
    with torch.no_grad():
        assert torch.equal(low_memory(input_ids).logits, expected)
    base = AutoModel.from_pretrained(directory, dtype=torch.float32)
    assert type(base) is QWenModel
    with torch.no_grad():
        assert torch.equal(reloaded.lm_head(base(input_ids).last_hidden_state), expected)


def test_auto_tokenizer_resolves_the_registered_class_without_remote_code(
    tmp_path: Path, vocab_file: Path
) -> None:
    directory = official_checkpoint(QWenLMHeadModel(tiny_config()), tmp_path / "ckpt")
    shutil.copy(vocab_file, directory / "qwen.tiktoken")
    tokenizer_config = {
        "model_max_length": 8192,
        "tokenizer_class": "QWenTokenizer",
        "auto_map": {"AutoTokenizer": ["tokenization_qwen.QWenTokenizer", None]},
    }
    (directory / "tokenizer_config.json").write_text(json.dumps(tokenizer_config))
    tokenizer = AutoTokenizer.from_pretrained(directory)
    assert type(tokenizer) is QWenTokenizer
    assert tokenizer.eod_id == 151643


def test_default_dtype_follows_the_checkpoint_and_precision_flags_override_it(tmp_path: Path) -> None:
    directory = official_checkpoint(QWenLMHeadModel(tiny_config()), tmp_path / "ckpt")
    assert AutoModelForCausalLM.from_pretrained(directory).dtype == torch.bfloat16
    assert AutoModelForCausalLM.from_pretrained(directory, fp32=True).dtype == torch.float32
    assert AutoModelForCausalLM.from_pretrained(directory, fp16=True).dtype == torch.float16
    assert QWenLMHeadModel.from_pretrained(directory, fp32=True).dtype == torch.float32
    assert (
        AutoModelForCausalLM.from_pretrained(directory, fp32=True, dtype=torch.bfloat16).dtype
        == torch.bfloat16
    )
    with pytest.raises(ValueError, match="Only one of bf16/fp16/fp32"):
        AutoModelForCausalLM.from_pretrained(directory, bf16=True, fp32=True)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_forward_and_backward_stay_in_dtype(dtype: torch.dtype) -> None:
    model = random_model()
    input_ids = random_ids(2, 24)
    with torch.no_grad():
        reference = model(input_ids).logits
    model.to(dtype)
    with torch.no_grad():
        logits = model(input_ids).logits
    assert logits.dtype == dtype
    assert max_diff(logits, reference) < 0.1 * reference.abs().max().item()
    model.train()
    loss = model(input_ids, labels=input_ids).loss
    assert loss.dtype == torch.float32
    loss.backward()
    assert model.transformer.h[0].attn.c_attn.weight.grad.dtype == dtype


def test_legacy_bin_checkpoint_loads(tmp_path: Path) -> None:
    model = random_model()
    model.config.save_pretrained(tmp_path)
    torch.save(model.state_dict(), tmp_path / "pytorch_model.bin")
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32)
    input_ids = random_ids(1, 9)
    with torch.no_grad():
        assert torch.equal(reloaded(input_ids).logits, model(input_ids).logits)


def test_int8_kv_cache_switches_fail_with_a_fix(tmp_path: Path) -> None:
    for switch in ("use_cache_quantization", "use_cache_kernel"):
        with pytest.raises(ValueError, match=f"{switch}=True.*not supported.*use_cache_quantization=False"):
            QWenLMHeadModel(tiny_config(**{switch: True}))
    QWenLMHeadModel(tiny_config()).save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**config, "use_cache_quantization": True}))
    with pytest.raises(ValueError, match="use_cache_quantization=True"):
        AutoModelForCausalLM.from_pretrained(tmp_path)
    model = AutoModelForCausalLM.from_pretrained(tmp_path, use_cache_quantization=False)
    assert model.config.use_cache_quantization is False


# --- attention, cache, padding, packing -------------------------------------------------------------


def test_sdpa_and_eager_agree_with_padding_and_cache() -> None:
    model = random_model()
    input_ids, attention_mask = left_pad([random_ids(20, seed=2), random_ids(13, seed=3)])
    step = random_ids(2, 1, seed=4)
    step_mask = torch.cat((attention_mask, torch.ones(2, 1, dtype=torch.long)), 1)
    outputs = {}
    for implementation in ("sdpa", "eager"):
        model.set_attn_implementation(implementation)
        with torch.no_grad():
            prefill = model(input_ids, attention_mask=attention_mask, use_cache=True)
            decode = model(step, attention_mask=step_mask, past_key_values=prefill.past_key_values)
        outputs[implementation] = (prefill.logits, decode.logits)
    real = attention_mask.bool()
    assert max_diff(outputs["sdpa"][0][real], outputs["eager"][0][real]) < 1e-5
    assert max_diff(outputs["sdpa"][1], outputs["eager"][1]) < 1e-5
    assert not torch.isnan(outputs["sdpa"][0]).any()


@pytest.mark.parametrize(("prefill", "total"), [(8, 14), (36, 44)], ids=["short", "ntk-and-logn-active"])
def test_cached_decoding_equals_full_forward(prefill: int, total: int) -> None:
    """Beyond seq_length the NTK alpha is the same for prefill and full length (7 for 36..44 with 16)."""
    model = random_model()
    input_ids = random_ids(2, total)
    with torch.no_grad():
        full = model(input_ids).logits
        output = model(input_ids[:, :prefill], use_cache=True)
        assert isinstance(output.past_key_values, DynamicCache)
        steps = [output.logits]
        for position in range(prefill, total):
            output = model(input_ids[:, position : position + 1], past_key_values=output.past_key_values)
            steps.append(output.logits)
    assert max_diff(torch.cat(steps, 1), full) < 1e-4


def test_left_padding_does_not_change_a_row() -> None:
    model = random_model()
    long_row, short_row = random_ids(40, seed=5), random_ids(23, seed=6)
    input_ids, attention_mask = left_pad([long_row, short_row])
    with torch.no_grad():
        alone = model(short_row[None]).logits[0]
        with_positions = model(
            input_ids, attention_mask=attention_mask, position_ids=positions_from_mask(attention_mask)
        ).logits[1, -23:]
        within_seq_length = model(input_ids[:, -14:], attention_mask=attention_mask[:, -14:]).logits[1, -14:]
        alone_short = model(short_row[None, -14:]).logits[0]
    # With generate's position ids the row is exactly itself, NTK alpha and LogN included.
    assert max_diff(with_positions, alone) < 1e-4
    # Without position ids (positions = padded index, as the original) RoPE is relative: same result.
    assert max_diff(within_seq_length, alone_short) < 1e-4


def test_packed_row_equals_its_samples_run_separately() -> None:
    """Eval mode, and the packed row (21 tokens) is past seq_length: each sample keeps its own NTK alpha."""
    model = random_model()
    samples = [random_ids(7, seed=7), random_ids(5, seed=8), random_ids(9, seed=9)]
    labels = [sample.clone() for sample in samples]
    for label in labels:
        label[:2] = -100  # first label of each sample is masked by the data pipeline (here: a 2-token prompt)
    packed_ids = torch.cat(samples)[None]
    packed_labels = torch.cat(labels)[None]
    position_ids = torch.cat([torch.arange(len(sample)) for sample in samples])[None]

    with torch.no_grad():
        packed = model(packed_ids, position_ids=position_ids, labels=packed_labels)
        packed_with_mask = model(
            packed_ids, position_ids=position_ids, attention_mask=torch.ones_like(packed_ids)
        )
        separate = [model(sample[None], labels=label[None]) for sample, label in zip(samples, labels)]
    assert max_diff(packed.logits[0], torch.cat([out.logits[0] for out in separate])) < 1e-5
    assert max_diff(packed_with_mask.logits, packed.logits) < 1e-6

    start = 0
    for sample, label, out in zip(samples, labels, separate):
        own = torch.full_like(packed_labels, -100)
        own[0, start : start + len(sample)] = label
        with torch.no_grad():
            packed_sample_loss = model(packed_ids, position_ids=position_ids, labels=own).loss
        assert packed_sample_loss.item() == pytest.approx(out.loss.item(), abs=1e-5)
        start += len(sample)
    supervised = [int((label[1:] != -100).sum()) for label in labels]
    pooled = sum(out.loss.item() * n for out, n in zip(separate, supervised)) / sum(supervised)
    assert packed.loss.item() == pytest.approx(pooled, abs=1e-5)


def test_right_padded_packed_batch_keeps_samples_apart() -> None:
    model = random_model()
    a, b, c = random_ids(6, seed=10), random_ids(4, seed=11), random_ids(8, seed=12)
    input_ids = torch.stack((torch.cat((a, b)), torch.cat((c, torch.zeros(2, dtype=torch.long)))))
    position_ids = torch.stack((torch.cat((torch.arange(6), torch.arange(4))), torch.arange(10)))
    attention_mask = torch.tensor([[1] * 10, [1] * 8 + [0] * 2])
    with torch.no_grad():
        logits = model(input_ids, attention_mask=attention_mask, position_ids=position_ids).logits
        assert max_diff(logits[0, 6:], model(b[None]).logits[0]) < 1e-5
        assert max_diff(logits[1, :8], model(c[None]).logits[0]) < 1e-5


def test_packed_training_batch_under_sdpa_runs_per_sample_and_matches_the_masked_path(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Two packed rows as the collator makes them (no attention mask; the shorter row's padding is a
    segment of its own): sdpa runs attention per sample, with the loss, logits and gradients of the
    block-diagonal mask that eager attention gets, and each sample's logits equal to it run alone."""
    samples = [random_ids(6, seed=21), random_ids(9, seed=22), random_ids(5, seed=23), random_ids(7, seed=24)]
    rows = [torch.cat(samples[:2]), torch.cat((samples[2], samples[3], torch.zeros(3, dtype=torch.long)))]
    input_ids = torch.stack(rows)
    position_ids = torch.stack(
        (
            torch.cat((torch.arange(6), torch.arange(9))),
            torch.cat((torch.arange(5), torch.arange(7), torch.arange(3))),
        )
    )
    labels = input_ids.clone()
    labels[:, 0] = -100
    labels[0, 6] = labels[1, 5] = -100  # first label of each sample
    labels[1, 12:] = -100  # padding
    inputs = dict(input_ids=input_ids, position_ids=position_ids, labels=labels)

    calls: list[list[int]] = []
    real_segmented = modeling_qwen.segmented_causal_attention

    def spy(*args, **kwargs):
        calls.append(list(args[3]))
        return real_segmented(*args, **kwargs)

    monkeypatch.setattr(modeling_qwen, "segmented_causal_attention", spy)
    per_sample = random_model(attn_implementation="sdpa").train()
    masked = random_model(attn_implementation="eager").train()
    out_sdpa, grads_sdpa = _loss_and_grads(per_sample, **inputs, skip_logits=False)
    out_eager, grads_eager = _loss_and_grads(masked, **inputs, skip_logits=False)

    assert calls and calls[0] == [6, 9, 5, 7, 3]
    assert out_sdpa.loss.item() == pytest.approx(out_eager.loss.item(), abs=1e-5)
    assert max_diff(out_sdpa.logits, out_eager.logits) < 1e-4
    for name, grad in grads_eager.items():
        assert max_diff(grads_sdpa[name], grad) < 1e-4, name
    with torch.no_grad():
        alone = per_sample(samples[3][None]).logits[0]
    assert max_diff(out_sdpa.logits[1, 5:12].detach(), alone) < 1e-4


# --- loss and training plumbing ---------------------------------------------------------------------


def _loss_and_grads(model: QWenLMHeadModel, **inputs) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    model.zero_grad()
    output = model(**inputs)
    output.loss.backward()
    return output, {name: p.grad.clone() for name, p in model.named_parameters()}


def test_chunked_training_loss_equals_full_logits_loss(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(chunked_loss, "LOSS_CHUNK_TOKENS", 4)
    model = random_model().train()
    input_ids = random_ids(2, 12)
    labels = input_ids.clone()
    labels[:, :3] = -100
    labels[1, 9:] = -100

    calls = []
    model.lm_head.register_forward_hook(lambda *_: calls.append(1))
    chunked, chunked_grads = _loss_and_grads(model, input_ids=input_ids, labels=labels, skip_logits=True)
    assert chunked.logits is None
    supervised = int((labels[:, 1:] != -100).sum())
    chunks = -(-supervised // 4)
    assert len(calls) == 2 * chunks  # each chunk's logits are recomputed in backward, not kept

    full, full_grads = _loss_and_grads(model, input_ids=input_ids, labels=labels, skip_logits=False)
    assert full.logits.shape == (2, 12, VOCAB)
    expected = F.cross_entropy(full.logits[:, :-1].reshape(-1, VOCAB), labels[:, 1:].reshape(-1))
    assert full.loss.item() == pytest.approx(expected.item(), abs=1e-6)
    assert chunked.loss.item() == pytest.approx(full.loss.item(), abs=1e-6)
    for name, grad in full_grads.items():
        assert max_diff(chunked_grads[name], grad) < 1e-6, name


@pytest.mark.parametrize("train_lm_head", [True, False])
def test_fused_loss_of_a_plain_lm_head_equals_full_logits_loss(
    monkeypatch: pytest.MonkeyPatch, train_lm_head: bool
) -> None:
    """A plain lm_head takes the fused path (gradients formed in the forward pass, scaled in backward):
    same loss and gradients as full logits, for a trained and a frozen lm_head, under a loss scale."""
    monkeypatch.setattr(chunked_loss, "LOSS_CHUNK_TOKENS", 4)
    fused_calls = []
    real_fusable = chunked_loss.fusable_weight
    monkeypatch.setattr(
        chunked_loss, "fusable_weight", lambda project: fused_calls.append(1) or real_fusable(project)
    )
    model = random_model().train()
    model.lm_head.weight.requires_grad_(train_lm_head)
    input_ids = random_ids(2, 11)
    labels = input_ids.clone()
    labels[0, :4] = -100
    labels[1, 7:] = -100
    scale = 2.5  # as a loss scaler or gradient accumulation would multiply the incoming gradient

    def loss_and_grads(**extra):
        model.zero_grad()
        output = model(input_ids=input_ids, labels=labels, **extra)
        (output.loss * scale).backward()
        return output.loss.item(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}

    fused_loss, fused_grads = loss_and_grads(skip_logits=True)
    assert fused_calls and real_fusable(model.lm_head) is model.lm_head.weight
    full_loss, full_grads = loss_and_grads(skip_logits=False)
    assert fused_loss == pytest.approx(full_loss, abs=1e-6)
    assert ("lm_head.weight" in fused_grads) == train_lm_head
    for name, grad in full_grads.items():  # softmax - one-hot vs log-softmax backward: float32 rounding
        torch.testing.assert_close(fused_grads[name], grad, rtol=1e-5, atol=1e-5, msg=name)


@pytest.mark.parametrize("skip_logits", [True, False])
def test_num_items_in_batch_turns_the_mean_into_a_sum_over_it(skip_logits: bool) -> None:
    model = random_model().train()
    input_ids = random_ids(2, 10)
    labels = input_ids.clone()
    labels[:, :4] = -100
    supervised = int((labels[:, 1:] != -100).sum())
    with torch.no_grad():
        mean_loss = model(input_ids, labels=labels, skip_logits=skip_logits).loss
        summed = model(
            input_ids, labels=labels, num_items_in_batch=torch.tensor(40), skip_logits=skip_logits
        ).loss
    assert summed.item() == pytest.approx(mean_loss.item() * supervised / 40, rel=1e-6)


@pytest.mark.parametrize("skip_logits", [True, False])
def test_batch_without_supervised_tokens_gives_zero_loss_with_a_graph(skip_logits: bool) -> None:
    model = random_model().train()
    output = model(random_ids(1, 6), labels=torch.full((1, 6), -100), skip_logits=skip_logits)
    assert output.loss.item() == 0.0
    output.loss.backward()
    assert model.lm_head.weight.grad is not None


def test_training_mode_returns_logits_for_a_hand_written_training_step() -> None:
    """Like every transformers causal LM: a training loop may read outputs.logits (its own loss, metrics)."""
    model = random_model().train()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    input_ids = random_ids(2, 9)
    losses = []
    for _ in range(3):
        outputs = model(input_ids, labels=input_ids)
        assert outputs.logits is not None and outputs.logits.shape == (2, 9, VOCAB)
        own_loss = F.cross_entropy(outputs.logits[:, :-1].reshape(-1, VOCAB), input_ids[:, 1:].reshape(-1))
        assert own_loss.item() == pytest.approx(outputs.loss.item(), abs=1e-6)
        optimizer.zero_grad()
        own_loss.backward()
        optimizer.step()
        losses.append(own_loss.item())
    assert losses[2] < losses[1] < losses[0]


def test_skip_logits_without_labels_is_an_error() -> None:
    with pytest.raises(ValueError, match="skip_logits=True needs labels"):
        random_model()(random_ids(1, 4), skip_logits=True)


def test_gradient_checkpointing_recomputes_blocks_and_gives_the_same_grads() -> None:
    model = random_model().train()
    input_ids = random_ids(2, 10)
    inputs = dict(input_ids=input_ids, labels=input_ids)
    _, plain = _loss_and_grads(model, **inputs)

    calls = []
    model.transformer.h[0].attn.register_forward_pre_hook(lambda *_: calls.append(1))
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    _, checkpointed = _loss_and_grads(model, **inputs)
    assert len(calls) == 2
    for name, grad in plain.items():
        assert max_diff(checkpointed[name], grad) < 1e-6, name


def test_embedding_accessors_resize_and_input_require_grads() -> None:
    model = random_model()
    assert model.get_input_embeddings() is model.transformer.wte
    assert model.get_output_embeddings() is model.lm_head
    model.resize_token_embeddings(400, mean_resizing=False)
    assert model.transformer.wte.weight.shape == (400, 64)
    assert model.lm_head.weight.shape == (400, 64)
    assert model.config.vocab_size == 400
    assert model(torch.tensor([[399, 3]])).logits.shape == (1, 2, 400)

    model.requires_grad_(False)
    model.enable_input_require_grads()
    captured = []
    model.transformer.wte.register_forward_hook(lambda _module, _args, out: captured.append(out))
    model(random_ids(1, 3))
    assert captured[0].requires_grad


def test_inputs_embeds_give_the_same_result_as_input_ids() -> None:
    model = random_model()
    input_ids = random_ids(2, 7)
    with torch.no_grad():
        from_embeds = model(inputs_embeds=model.transformer.wte(input_ids)).logits
        assert torch.equal(from_embeds, model(input_ids).logits)
    with pytest.raises(ValueError, match="exactly one of input_ids or inputs_embeds"):
        model(input_ids, inputs_embeds=model.transformer.wte(input_ids))


def test_hidden_states_and_attentions_can_be_returned() -> None:
    model = random_model()
    model.set_attn_implementation("eager")
    output = model(random_ids(1, 5), output_hidden_states=True, output_attentions=True)
    assert len(output.hidden_states) == 3
    assert output.attentions[0].shape == (1, 4, 5, 5)
    assert torch.allclose(output.attentions[0].sum(-1), torch.ones(1, 4, 5))


def test_peft_lora_with_trainable_embeddings_forward_backward() -> None:
    from peft import LoraConfig, get_peft_model

    model = random_model()
    input_ids = random_ids(2, 10)
    labels = input_ids.clone()
    labels[:, :3] = -100
    with torch.no_grad():
        base_logits = model(input_ids).logits
    lora = LoraConfig(
        r=4,
        lora_alpha=8,
        target_modules=["c_attn", "c_proj", "w1", "w2"],
        modules_to_save=["wte", "lm_head"],
        task_type="CAUSAL_LM",
    )
    peft_model = get_peft_model(model, lora)
    with torch.no_grad():
        assert torch.equal(peft_model(input_ids=input_ids).logits, base_logits)  # LoRA B starts at zero

    peft_model.train()
    peft_model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": True})
    peft_model.enable_input_require_grads()
    optimizer = torch.optim.SGD([p for p in peft_model.parameters() if p.requires_grad], lr=0.5)
    losses = []
    for _ in range(3):
        optimizer.zero_grad()
        output = peft_model(input_ids=input_ids, labels=labels)
        output.loss.backward()
        optimizer.step()
        losses.append(output.loss.item())
    assert losses[-1] < losses[0]
    trainable = {name: p for name, p in peft_model.named_parameters() if p.requires_grad}
    lora_b = [name for name in trainable if "lora_B" in name]
    assert len(lora_b) == 2 * 5  # c_attn, attn.c_proj, w1, w2, mlp.c_proj in both layers
    assert all(trainable[name].grad.abs().sum() > 0 for name in trainable)
    assert {name for name in trainable if "modules_to_save" in name} == {
        "base_model.model.transformer.wte.modules_to_save.default.weight",
        "base_model.model.lm_head.modules_to_save.default.weight",
    }


# --- generation and chat ----------------------------------------------------------------------------


def test_greedy_generate_of_a_left_padded_batch_equals_unbatched() -> None:
    """Prompts of 22 and 9 tokens with seq_length 16: the long one runs with NTK alpha 3 and LogN."""
    model = random_model()
    prompts = [random_ids(22, seed=13), random_ids(9, seed=14)]
    input_ids, attention_mask = left_pad(prompts)
    settings = dict(max_new_tokens=10, do_sample=False, pad_token_id=0, output_scores=True)
    settings["return_dict_in_generate"] = True
    batched = model.generate(input_ids, attention_mask=attention_mask, **settings)
    for row, prompt in enumerate(prompts):
        alone = model.generate(prompt[None], **settings)
        assert (
            batched.sequences[row, input_ids.shape[1] :].tolist()
            == alone.sequences[0, len(prompt) :].tolist()
        )
        for batched_scores, alone_scores in zip(batched.scores, alone.scores):
            assert max_diff(batched_scores[row], alone_scores[0]) < 1e-4
    assert getattr(batched.past_key_values, modeling_qwen.NTK_ALPHAS_CACHE_ATTRIBUTE) == [3, 1]


def test_sampling_generate_is_reproducible_and_in_vocabulary() -> None:
    model = random_model()
    prompt = random_ids(1, 6)
    runs = []
    for _ in range(2):
        torch.manual_seed(123)
        runs.append(model.generate(prompt, max_new_tokens=8, do_sample=True, top_p=0.8, pad_token_id=0))
    assert torch.equal(runs[0], runs[1])
    assert runs[0].shape == (1, 14)
    assert int(runs[0].max()) < VOCAB


def test_chat_methods_delegate_to_qwen_generation_utils(monkeypatch: pytest.MonkeyPatch) -> None:
    recorded = []
    monkeypatch.setattr(
        modeling_qwen,
        "chat",
        lambda *args, **kwargs: recorded.append(("chat", args, kwargs)) or ("reply", []),
    )
    monkeypatch.setattr(
        modeling_qwen,
        "chat_stream",
        lambda *args, **kwargs: recorded.append(("chat_stream", args, kwargs)) or iter(["r"]),
    )
    model = QWenLMHeadModel(tiny_config())
    tokenizer = object()

    assert model.chat(tokenizer, "hi", history=[("a", "b")], top_p=0.5) == ("reply", [])
    assert list(model.chat_stream(tokenizer, "hi", system="be brief")) == ["r"]
    name, args, kwargs = recorded[0]
    assert (name, args) == ("chat", (model, tokenizer, "hi"))
    assert kwargs == {
        "history": [("a", "b")],
        "system": "You are a helpful assistant.",
        "generation_config": None,
        "top_p": 0.5,
    }
    name, args, kwargs = recorded[1]
    assert (name, args, kwargs["system"], kwargs["history"]) == (
        "chat_stream",
        (model, tokenizer, "hi"),
        "be brief",
        None,
    )
