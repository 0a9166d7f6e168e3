"""DP-SGD on a tiny random PEFT Llama: exact per-example grads, bounded contributions, noise."""

import math

import pytest
import torch
from peft import LoraConfig, get_peft_model
from transformers import LlamaConfig, LlamaForCausalLM

from zenfed.privacy.dp import DPSGD, PoissonSampler, PrivacyAccountant, PrivacyError
from zenfed.privacy.dp.sgd import label_positions


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    config = LlamaConfig(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=256,
    )
    peft_model = get_peft_model(
        LlamaForCausalLM(config), LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"])
    )
    with torch.no_grad():  # LoRA B starts at 0; give it values so every LoRA grad is non-zero
        for name, param in peft_model.named_parameters():
            if "lora_B" in name:
                param.normal_(std=0.05)
    peft_model.train()
    return peft_model


def _batch(size=4, length=12, seed=1):
    gen = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(0, 256, (size, length), generator=gen)
    attention_mask = torch.ones(size, length, dtype=torch.long)
    attention_mask[1, 7:] = 0  # right padding
    if size > 3:
        attention_mask[3, 4:] = 0
    labels = input_ids.masked_fill(attention_mask == 0, -100)
    labels[0, :5] = -100  # a prompt without loss
    return input_ids, attention_mask, labels


def _trainable(model):
    return {n: p for n, p in model.named_parameters() if p.requires_grad}


def _flat_grad(model):
    return torch.cat([p.grad.flatten().double() for p in _trainable(model).values()])


def test_per_example_grads_equal_individually_computed_grads(model):
    # Prepare
    input_ids, attention_mask, labels = _batch()
    dp = DPSGD(model, clip_norm=1.0, noise_multiplier=0.0, sample_rate=1.0, num_records=4)

    # Execute
    grads, losses = dp.per_example_grads(
        input_ids=input_ids, attention_mask=attention_mask, labels=labels
    )

    # Assert: each row equals a plain HF forward/backward on that example alone.
    for i in range(4):
        model.zero_grad()
        out = model(
            input_ids=input_ids[i : i + 1],
            attention_mask=attention_mask[i : i + 1],
            labels=labels[i : i + 1],
        )
        out.loss.backward()
        assert losses[i].item() == pytest.approx(out.loss.item(), rel=1e-5)
        for name, param in _trainable(model).items():
            torch.testing.assert_close(grads[name][i], param.grad, rtol=1e-4, atol=1e-6)
    model.zero_grad()


def test_each_example_contributes_at_most_clip_norm(model):
    # Prepare: a clip norm below every example's gradient norm, and no noise.
    input_ids, attention_mask, labels = _batch()
    clip = 1e-3
    dp = DPSGD(model, clip_norm=clip, noise_multiplier=0.0, sample_rate=1.0, num_records=4)

    # Execute: the batch with and without example 2.
    stats = dp.privatize_grads(input_ids=input_ids, attention_mask=attention_mask, labels=labels)
    with_all = _flat_grad(model) * dp.expected_batch_size
    keep = torch.tensor([0, 1, 3])
    dp.privatize_grads(
        input_ids=input_ids[keep], attention_mask=attention_mask[keep], labels=labels[keep]
    )
    without_one = _flat_grad(model) * dp.expected_batch_size

    # Assert: one record moves the summed gradient by at most C (the sensitivity).
    assert stats.batch_size == 4 and stats.clipped_fraction == 1.0
    assert stats.mean_grad_norm > clip
    assert (with_all - without_one).norm().item() <= clip
    assert with_all.norm().item() <= 4 * clip


def test_small_gradients_are_not_scaled(model):
    input_ids, attention_mask, labels = _batch()
    dp = DPSGD(model, clip_norm=1e6, noise_multiplier=0.0, sample_rate=1.0, num_records=4)

    stats = dp.privatize_grads(input_ids=input_ids, attention_mask=attention_mask, labels=labels)
    grads, _ = dp.per_example_grads(
        input_ids=input_ids, attention_mask=attention_mask, labels=labels
    )

    assert stats.clipped_fraction == 0.0
    for name, param in _trainable(model).items():
        torch.testing.assert_close(param.grad, grads[name].sum(0) / 4, rtol=1e-5, atol=1e-8)


def test_noise_std_is_sigma_c_over_expected_batch_size(model):
    # Prepare: empty batches, so .grad is pure noise; expected batch size q*n = 0.5*8 = 4.
    sigma, clip = 1.5, 0.2
    gen = torch.Generator().manual_seed(7)
    dp = DPSGD(
        model,
        clip_norm=clip,
        noise_multiplier=sigma,
        sample_rate=0.5,
        num_records=8,
        generator=gen,
    )
    empty = torch.zeros(0, 12, dtype=torch.long)

    # Execute
    draws = []
    for _ in range(40):
        stats = dp.privatize_grads(input_ids=empty, attention_mask=empty, labels=empty)
        draws.append(_flat_grad(model))
    noise = torch.cat(draws)

    # Assert
    assert stats.batch_size == 0
    expected = sigma * clip / 4
    assert noise.mean().item() == pytest.approx(0.0, abs=4 * expected / math.sqrt(noise.numel()))
    assert noise.std().item() == pytest.approx(expected, rel=0.02)


def test_every_call_is_one_accounted_step_and_optimizer_moves_only_lora(model):
    input_ids, attention_mask, labels = _batch()
    acct = PrivacyAccountant()
    dp = DPSGD(
        model,
        clip_norm=1.0,
        noise_multiplier=1.0,
        sample_rate=0.1,
        num_records=40,
        accountant=acct,
        generator=torch.Generator().manual_seed(0),
    )
    frozen_before = model.base_model.model.model.layers[
        0
    ].self_attn.q_proj.base_layer.weight.clone()
    lora_before = {n: p.detach().clone() for n, p in _trainable(model).items()}
    optimizer = torch.optim.SGD(list(_trainable(model).values()), lr=0.1)

    for _ in range(3):
        dp.privatize_grads(input_ids=input_ids, attention_mask=attention_mask, labels=labels)
        optimizer.step()

    assert acct.history == [{"noise_multiplier": 1.0, "sample_rate": 0.1, "num_steps": 3}]
    frozen_after = model.base_model.model.model.layers[0].self_attn.q_proj.base_layer.weight
    assert torch.equal(frozen_before, frozen_after)
    assert all(not torch.equal(lora_before[n], p) for n, p in _trainable(model).items())
    with torch.no_grad():  # restore, the model is shared by the module's tests
        for n, p in _trainable(model).items():
            p.copy_(lora_before[n])


def test_poisson_sampler_draws_each_record_at_the_true_rate():
    sampler = PoissonSampler(
        num_records=200, sample_rate=0.05, num_steps=400, generator=torch.Generator().manual_seed(3)
    )

    batches = list(sampler)

    sizes = torch.tensor([len(b) for b in batches], dtype=torch.float64)
    counts = torch.zeros(200)
    for b in batches:
        counts[b] += 1
    assert len(batches) == len(sampler) == 400
    assert sizes.mean().item() == pytest.approx(10.0, rel=0.05)  # q * n
    assert sizes.var().item() == pytest.approx(200 * 0.05 * 0.95, rel=0.2)  # binomial, not fixed
    assert counts.mean().item() == pytest.approx(20.0, rel=0.05)
    assert all(len(set(b)) == len(b) and all(0 <= i < 200 for i in b) for b in batches)


def test_bad_inputs_raise_privacy_error(model):
    with pytest.raises(PrivacyError):
        DPSGD(model, clip_norm=0.0, noise_multiplier=1.0, sample_rate=0.1, num_records=10)
    with pytest.raises(PrivacyError):
        PoissonSampler(num_records=10, sample_rate=0.0, num_steps=1)
    dp = DPSGD(model, clip_norm=1.0, noise_multiplier=1.0, sample_rate=0.1, num_records=10)
    ids = torch.zeros(2, 5, dtype=torch.long)
    with pytest.raises(PrivacyError):
        dp.privatize_grads(input_ids=ids, attention_mask=ids[:, :4], labels=ids)


@pytest.mark.slow  # importing NeMo takes about 20 s here
def test_per_example_grads_through_nemo_lora_adapters():
    lora = pytest.importorskip("nemo.collections.llm.peft.lora")
    # Prepare: the HF module NeMo's HFAutoModelForCausalLM wraps, with NeMo's own LoRA layers.
    torch.manual_seed(0)
    config = LlamaConfig(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=256,
    )
    hf = LlamaForCausalLM(config)
    hf.requires_grad_(False)
    for layer in hf.model.layers:
        for name in ("q_proj", "v_proj"):
            adapter = lora.LinearAdapter(getattr(layer.self_attn, name), dim=4, alpha=8)
            torch.nn.init.normal_(adapter.lora_b.weight, std=0.05)
            setattr(layer.self_attn, name, adapter)
    input_ids, attention_mask, labels = _batch()
    dp = DPSGD(hf, clip_norm=1.0, noise_multiplier=0.0, sample_rate=1.0, num_records=4)

    # Execute
    grads, _ = dp.per_example_grads(
        input_ids=input_ids, attention_mask=attention_mask, labels=labels
    )

    # Assert
    assert sorted(grads) == sorted(n for n, p in hf.named_parameters() if p.requires_grad)
    for i in range(4):
        hf.zero_grad()
        hf(
            input_ids=input_ids[i : i + 1],
            attention_mask=attention_mask[i : i + 1],
            labels=labels[i : i + 1],
        ).loss.backward()
        for name, param in hf.named_parameters():
            if param.requires_grad:
                torch.testing.assert_close(grads[name][i], param.grad, rtol=1e-4, atol=1e-6)


def test_label_positions_pick_the_token_before_each_label():
    # Prepare: row 0 has labels at 3 and 4, row 1 one label at 2, row 2 none
    labels = torch.full((3, 6), -100)
    labels[0, 3], labels[0, 4] = 11, 12
    labels[1, 2] = 21

    # Execute
    positions, targets = label_positions(labels)

    # Verify: logits at position t predict the label at t + 1; missing entries are ignored
    assert positions.tolist() == [[2, 3], [1, 0], [0, 0]]
    assert targets.tolist() == [[11, 12], [21, -100], [-100, -100]]


def test_per_example_hooks_are_removed_after_each_call(model):
    # Prepare
    input_ids, attention_mask, labels = _batch()
    dp = DPSGD(model, clip_norm=1.0, noise_multiplier=0.0, sample_rate=1.0, num_records=4, chunk_size=3)

    # Execute: two calls in a row (attaching twice would raise), then a plain backward.
    for _ in range(2):
        grads, _ = dp.per_example_grads(input_ids=input_ids, attention_mask=attention_mask, labels=labels)
    model.zero_grad()
    model(input_ids=input_ids, attention_mask=attention_mask, labels=labels).loss.backward()

    # Assert: micro-batches of 3 and 1 still give one row per example, and nothing of the
    # hooks is left on the model.
    assert all(g.shape[0] == 4 for g in grads.values())
    assert not any(hasattr(p, "grad_sample") for p in model.parameters())
    assert not any(m._forward_hooks or m._backward_hooks for m in model.modules())
    model.zero_grad()


def test_an_empty_batch_has_no_per_example_gradients(model):
    dp = DPSGD(model, clip_norm=1.0, noise_multiplier=0.0, sample_rate=0.5, num_records=4)
    empty = torch.zeros(0, 12, dtype=torch.long)

    grads, losses = dp.per_example_grads(input_ids=empty, attention_mask=empty, labels=empty)

    assert losses.shape == (0,)
    assert {n: tuple(g.shape) for n, g in grads.items()} == {
        n: (0, *p.shape) for n, p in _trainable(model).items()
    }
