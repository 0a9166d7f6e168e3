"""DPO on the tiny model: the loss, per-pair DP gradients, the frozen reference and held-out preference accuracy."""

from __future__ import annotations

import math
import random

import pytest
import torch

from zenfed.data.builtin import TASKS
from zenfed.data.builtin_preferences import make_preference_pair
from zenfed.engines.dpo import base_adapter, collate_pairs, dpo_losses, tokenize_pairs
from zenfed.engines.peft import PeftEngine
from zenfed.errors import DataError
from zenfed.privacy.dp import DPSGD, PrivacyAccountant, UnitLoss
from zenfed.spec import LoraSpec, TrainingSpec
from zenfed.types import RecordDP

LORA = LoraSpec(rank=4, alpha=8.0, target_modules=("q_proj", "v_proj"))
TRAINING = TrainingSpec(batch_size=8, seq_len=96, learning_rate=2e-2, seed=0)


@pytest.fixture(scope="module")
def pairs():
    rng = random.Random(5)
    return [make_preference_pair(TASKS[i % 3], rng) for i in range(48)]


@pytest.fixture(scope="module")
def held_out():
    rng = random.Random(6)
    return [make_preference_pair(TASKS[i % 3], rng) for i in range(24)]


@pytest.fixture(scope="module")
def engine(tiny_model_dir):
    return PeftEngine(model_dir=tiny_model_dir, lora=LORA, training=TRAINING, threads=1)


def test_the_dpo_loss_is_log_2_at_the_reference_and_falls_as_the_margin_grows():
    # Prepare: (chosen, rejected) log-probabilities of two pairs.
    reference = torch.tensor([[-5.0, -6.0], [-3.0, -3.0]])
    policy = torch.tensor([[-5.0, -6.0], [-2.0, -4.0]])

    # Execute
    losses, margins = dpo_losses(policy, reference, beta=0.5)

    # Assert: pair 0 has not moved (margin 0, loss log 2); pair 1 gained 1 nat on chosen, lost 1 on rejected.
    assert margins.tolist() == [0.0, 1.0]
    assert losses[0].item() == pytest.approx(math.log(2))
    assert losses[1].item() == pytest.approx(-math.log(1 / (1 + math.exp(-1.0))))


def test_each_pairs_dp_gradient_is_the_sum_of_its_two_rows_and_is_clipped_as_one(engine, pairs):
    # Prepare: three pairs against a reference of fixed log-probabilities.
    model = engine.model
    engine.load_adapter(engine.initial_adapter())
    data = tokenize_pairs(engine.tokenizer, pairs[:3], max_len=TRAINING.seq_len)
    batch = collate_pairs(data, pad_id=engine.tokenizer.pad_token_id)
    reference = torch.tensor([[-40.0, -41.0], [-35.0, -30.0], [-50.0, -52.0]])
    units = UnitLoss(rows_per_unit=2,
                     loss=lambda lp, cnt, first: dpo_losses(lp, reference[first:first + lp.shape[0]], beta=0.5)[0])
    private = DPSGD(model, clip_norm=1e-3, noise_multiplier=0.0, sample_rate=0.5, num_records=6, chunk_size=2)

    # Execute: per-pair gradients from one batched pass, and each pair's gradient on its own.
    per_pair, _ = private.per_example_grads(**batch, units=units)
    expected = []
    for i in range(3):
        one = collate_pairs(data[i:i + 1], pad_id=engine.tokenizer.pad_token_id)
        model.zero_grad(set_to_none=True)
        logits = model(input_ids=one["input_ids"], attention_mask=one["attention_mask"]).logits
        logps = -torch.nn.functional.cross_entropy(logits[:, :-1].transpose(1, 2), one["labels"][:, 1:],
                                                   reduction="none").sum(dim=1)
        dpo_losses(logps.view(1, 2), reference[i:i + 1], beta=0.5)[0].sum().backward()
        expected.append({n: p.grad.clone() for n, p in private.params.items()})
    private.privatize_grads(**batch, units=units)

    # Assert: the batched per-pair gradient is each pair's own gradient (both rows), and the
    # privatized gradient is the sum of the three pairs' gradients, each clipped to C as one.
    for name in private.params:
        for i in range(3):
            torch.testing.assert_close(per_pair[name][i], expected[i][name], atol=1e-6, rtol=1e-4)
    norms = [torch.sqrt(sum((g[name] ** 2).sum() for name in g)) for g in expected]
    assert min(norms) > 1e-3  # every pair really is clipped
    for name, param in private.params.items():
        clipped = sum(g[name] * (1e-3 / norm) for g, norm in zip(expected, norms, strict=True))
        torch.testing.assert_close(param.grad, clipped / 3.0, atol=1e-9, rtol=1e-3)


def test_a_batch_that_splits_a_pair_is_refused(engine, pairs):
    # Prepare
    data = tokenize_pairs(engine.tokenizer, pairs[:2], max_len=TRAINING.seq_len)
    batch = collate_pairs(data, pad_id=engine.tokenizer.pad_token_id)
    odd = {k: v[:3] for k, v in batch.items()}
    private = DPSGD(engine.model, clip_norm=1.0, noise_multiplier=1.0, sample_rate=0.5, num_records=4)

    # Execute / Assert
    with pytest.raises(Exception, match="does not split into units of 2 rows"):
        private.privatize_grads(**odd, units=UnitLoss(rows_per_unit=2, loss=lambda lp, c, f: lp.sum(dim=1)))


def test_dpo_starts_at_log_2_raises_held_out_preference_accuracy_and_keeps_one_model(engine, pairs, held_out):
    # Prepare
    start = engine.initial_adapter()
    parameters = sum(p.numel() for p in engine.model.parameters())

    # Execute
    before = engine.evaluate_preferences(adapter=start, pairs=held_out, beta=0.1)
    first = engine.train_preferences(adapter=start, reference=start, pairs=pairs, steps=1, seed=0, beta=0.1)
    trained = engine.train_preferences(adapter=start, reference=start, pairs=pairs, steps=60, seed=0, beta=0.1)
    after = engine.evaluate_preferences(adapter=trained.adapter, pairs=held_out, beta=0.1)
    seen = engine.evaluate_preferences(adapter=trained.adapter, pairs=pairs, beta=0.1)

    # Assert: the base model ties on every pair; the first step's policy is the reference (loss log 2);
    # DPO fits the training pairs and moves held-out ones towards the chosen answer (a random tiny model
    # cannot know which code is right, only which style is careful); the reference pass added no model copy.
    assert (before.accuracy, before.reward_margin, before.num_pairs) == (0.5, 0.0, 24)
    assert first.train_loss == pytest.approx(math.log(2), abs=1e-5)
    assert trained.train_loss < math.log(2)
    assert seen.accuracy >= 0.9 and seen.reward_margin > 0
    assert after.accuracy > 0.5 and after.reward_margin > 0
    assert sum(p.numel() for p in engine.model.parameters()) == parameters


def test_the_reference_is_frozen_and_a_frozen_tensor_keeps_its_value(engine, pairs):
    # Prepare: a reference other than the start (a trained adapter), and FFA-LoRA's frozen A.
    start = engine.initial_adapter()
    reference = engine.train(adapter=start, examples=[p.chosen_example() for p in pairs], steps=3, seed=1).adapter
    frozen = {name for name in start if ".lora_A." in name}

    # Execute
    trained = engine.train_preferences(adapter=reference, reference=reference, pairs=pairs, steps=3, seed=0,
                                       beta=0.1, frozen=frozen)
    again = engine.train_preferences(adapter=reference, reference=reference, pairs=pairs, steps=3, seed=0,
                                     beta=0.1, frozen=frozen)

    # Assert: A stayed, B moved; the same start, reference and seed give the same adapter.
    assert all(torch.equal(trained.adapter[name], reference[name]) for name in frozen)
    assert any(not torch.equal(trained.adapter[n], reference[n]) for n in reference if n not in frozen)
    assert all(torch.equal(trained.adapter[n], again.adapter[n]) for n in reference)
    assert all(torch.count_nonzero(v) == 0 for n, v in base_adapter(reference).items() if ".lora_B." in n)


def test_pair_level_dp_steps_the_accountant_once_per_step(engine, pairs):
    # Prepare
    accountant = PrivacyAccountant()
    dp = RecordDP(noise_multiplier=1.0, clip_norm=1.0, sample_rate=0.25, accountant=accountant)
    start = engine.initial_adapter()

    # Execute
    result = engine.train_preferences(adapter=start, reference=start, pairs=pairs, steps=3, seed=0, beta=0.1, dp=dp)

    # Assert
    assert accountant.total_steps == 3
    assert result.metrics["dp_steps"] == 3 and math.isfinite(result.train_loss)
    assert any(not torch.equal(result.adapter[n], start[n]) for n in start)


def test_no_pairs_is_a_data_error(engine):
    start = engine.initial_adapter()
    with pytest.raises(DataError, match="no preference pairs"):
        engine.train_preferences(adapter=start, reference=start, pairs=[], steps=1, seed=0, beta=0.1)
    with pytest.raises(DataError, match="no held-out preference pairs"):
        engine.evaluate_preferences(adapter=start, pairs=[], beta=0.1)


def test_both_answers_of_a_pair_follow_the_same_prompt_when_it_is_cut(engine):
    # Prepare: a long prompt and answers of very different lengths, in a short sequence length.
    from zenfed.data.jsonl import Message
    from zenfed.data.preference import PreferencePair

    pair = PreferencePair(prompt=(Message("user", "note " * 60),), chosen="P1: " + "careful reason " * 8,
                          rejected="P3.")

    # Execute
    (tokenized,) = tokenize_pairs(engine.tokenizer, [pair], max_len=48)

    # Assert: both rows fit, and their prompts are the same tokens.
    chosen, rejected = tokenized.chosen, tokenized.rejected
    assert len(chosen.input_ids) <= 48 and len(rejected.input_ids) <= 48
    assert chosen.prompt_len == rejected.prompt_len
    assert chosen.input_ids[:chosen.prompt_len] == rejected.input_ids[:rejected.prompt_len]
    assert len(rejected.input_ids) < 48  # the short answer's row gave up the prompt tokens the long one needed
