"""DP-SGD in the PEFT engine: Poisson steps, one accountant step each, noise, it learns."""

from __future__ import annotations

import math
import random

import pytest
import torch

from zenfed.data.builtin import TASKS, make_example
from zenfed.engines.peft import PeftEngine
from zenfed.privacy.dp import PrivacyAccountant
from zenfed.spec import LoraSpec, TrainingSpec
from zenfed.types import RecordDP

LORA = LoraSpec(rank=4, alpha=8.0, target_modules=("q_proj", "v_proj"))
TRAINING = TrainingSpec(batch_size=4, seq_len=96, learning_rate=1e-2, seed=11)


@pytest.fixture(scope="module")
def engine(tiny_model_dir) -> PeftEngine:
    return PeftEngine(model_dir=tiny_model_dir, lora=LORA, training=TRAINING, threads=1)


@pytest.fixture(scope="module")
def examples():
    rng = random.Random(0)
    return [make_example(TASKS[i % len(TASKS)], rng) for i in range(24)]


def _dp(*, sigma=1.0, rate=4 / 24, clip=1.0):
    return RecordDP(noise_multiplier=sigma, clip_norm=clip, sample_rate=rate,
                    accountant=PrivacyAccountant())


def _distance(a, b):
    return math.sqrt(sum(float((a[k] - b[k]).double().pow(2).sum()) for k in a))


def test_without_dp_training_is_unchanged_and_reproducible(engine, examples):
    # Prepare
    start = engine.initial_adapter()

    # Execute
    default = engine.train(adapter=start, examples=examples, steps=3, seed=5)
    explicit = engine.train(adapter=start, examples=examples, steps=3, seed=5, dp=None)

    # Assert: the same seed gives bit-identical adapters, with or without dp=None.
    assert all(torch.equal(default.adapter[k], explicit.adapter[k]) for k in default.adapter)
    assert default.train_loss == explicit.train_loss and "dp_steps" not in default.metrics


def test_every_dp_step_steps_the_accountant_at_the_true_rate(engine, examples):
    # Prepare
    dp = _dp(sigma=1.3, rate=4 / 24)

    # Execute
    result = engine.train(adapter=engine.initial_adapter(), examples=examples, steps=6, seed=0,
                          dp=dp)

    # Assert
    assert dp.accountant.history == [
        {"noise_multiplier": 1.3, "sample_rate": 4 / 24, "num_steps": 6}
    ]
    assert result.steps == 6 and result.metrics["dp_steps"] == 6
    assert 0.0 <= result.metrics["dp_clipped_fraction"] <= 1.0


def test_empty_poisson_batches_are_still_noisy_accounted_steps(engine, examples):
    # Prepare: a rate so small that every batch is empty.
    dp = _dp(sigma=1.0, rate=1e-9)
    start = engine.initial_adapter()

    # Execute
    result = engine.train(adapter=start, examples=examples, steps=3, seed=0, dp=dp)

    # Assert: no example was seen, yet three noisy steps moved the adapter and were counted.
    assert dp.accountant.total_steps == 3
    assert result.metrics["dp_mean_batch_size"] == 0.0 and math.isnan(result.train_loss)
    assert _distance(result.adapter, start) > 0


def test_dp_noise_is_not_reproducible_from_the_seed(engine, examples):
    # Prepare
    start = engine.initial_adapter()

    # Execute: the same seed twice; batches and noise come from the OS random source.
    first = engine.train(adapter=start, examples=examples, steps=2, seed=3, dp=_dp())
    second = engine.train(adapter=start, examples=examples, steps=2, seed=3, dp=_dp())

    # Assert
    assert _distance(first.adapter, second.adapter) > 0


def test_dp_sgd_with_little_noise_still_learns(engine, examples):
    # Prepare
    start = engine.initial_adapter()
    before = engine.evaluate(adapter=start, examples=examples, max_new_tokens=1).loss

    # Execute: sigma 0.3, half the records in each step (plain training drops about 0.46).
    trained = engine.train(adapter=start, examples=examples, steps=15, seed=0,
                           dp=_dp(sigma=0.3, rate=0.5, clip=1.0))
    after = engine.evaluate(adapter=trained.adapter, examples=examples, max_new_tokens=1).loss

    # Assert
    assert after < before - 0.25
