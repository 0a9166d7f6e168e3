"""Shared fixtures of the strategy tests: a PEFT engine on the tiny model and a mixed set of examples."""

from __future__ import annotations

import random

import pytest

from zenfed.data.builtin import TASKS, make_example
from zenfed.engines.peft import PeftEngine
from zenfed.spec import LoraSpec, TrainingSpec

LORA = LoraSpec(rank=4, alpha=8.0, target_modules=("q_proj", "v_proj"))
TRAINING = TrainingSpec(batch_size=4, seq_len=96, learning_rate=2e-2, seed=11)


@pytest.fixture(scope="module")
def engine(tiny_model_dir) -> PeftEngine:
    return PeftEngine(model_dir=tiny_model_dir, lora=LORA, training=TRAINING)


@pytest.fixture(scope="module")
def examples():
    rng = random.Random(0)
    return [make_example(TASKS[i % len(TASKS)], rng) for i in range(24)]
