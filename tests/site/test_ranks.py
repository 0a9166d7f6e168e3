"""Heterogeneous ranks: a capped site builds the job's start, trains its leading ranks, and keeps alpha/r_max."""

from __future__ import annotations

import random

import pytest
import torch

from zenfed.data.builtin import TASKS, make_example
from zenfed.engines.peft import PeftEngine
from zenfed.errors import PolicyError
from zenfed.site.ranks import RankCap
from zenfed.spec import JobSpec, LoraSpec, TrainingSpec

LORA = LoraSpec(rank=4, alpha=8.0, target_modules=("q_proj", "v_proj"))
TRAINING = TrainingSpec(batch_size=4, seq_len=96, learning_rate=2e-2, seed=11)
CAP = RankCap(rank=2, max_rank=4)


@pytest.fixture(scope="module")
def spec(tiny_model_dir) -> JobSpec:
    return JobSpec(name="ranks", model={"base": str(tiny_model_dir)}, lora=LORA, training=TRAINING)


@pytest.fixture(scope="module")
def engines(spec, tiny_model_dir) -> tuple[PeftEngine, PeftEngine]:
    capped_spec = CAP.engine_spec(spec)
    full = PeftEngine(model_dir=tiny_model_dir, lora=spec.lora, training=spec.training)
    capped = PeftEngine(model_dir=tiny_model_dir, lora=capped_spec.lora, training=capped_spec.training)
    return full, capped


@pytest.fixture(scope="module")
def examples():
    rng = random.Random(0)
    return [make_example(TASKS[i % len(TASKS)], rng) for i in range(12)]


def test_a_capped_site_builds_the_same_start_as_a_full_rank_site(engines):
    # Execute
    full, capped = engines
    rebuilt = CAP.full_initial(capped.initial_adapter(), seed=TRAINING.seed)

    # Assert
    reference = full.initial_adapter()
    assert sorted(rebuilt) == sorted(reference)
    assert all(torch.equal(rebuilt[k], reference[k]) for k in reference)


def test_the_leading_ranks_mean_the_same_at_a_capped_site(engines, examples):
    # Prepare: an r_max adapter whose ranks beyond r_k are zero in B
    full, capped = engines
    gen = torch.Generator().manual_seed(0)
    adapter = full.initial_adapter()
    for name in adapter:
        if ".lora_B." in name:
            adapter[name] = torch.zeros_like(adapter[name])
            adapter[name][:, :2] = torch.randn(adapter[name][:, :2].shape, generator=gen) * 0.5

    # Execute
    at_full = full.evaluate(adapter=adapter, examples=examples, max_new_tokens=2).loss
    at_cap = capped.evaluate(adapter=CAP.cut(adapter), examples=examples, max_new_tokens=2).loss
    base = full.evaluate(adapter=full.initial_adapter(), examples=examples, max_new_tokens=2).loss

    # Assert: the same model (alpha scaled to keep alpha/r_max), and not the base model
    assert at_cap == pytest.approx(at_full, rel=1e-5)
    assert abs(at_full - base) > 1e-3


def test_cut_and_embed_touch_only_the_leading_ranks():
    # Prepare
    into = {"m.lora_A.weight": torch.arange(12.0).reshape(4, 3), "m.lora_B.weight": torch.arange(8.0).reshape(2, 4)}
    trained = {"m.lora_A.weight": -torch.ones(2, 3), "m.lora_B.weight": -torch.ones(2, 2)}

    # Execute
    cut = CAP.cut(into)
    embedded = CAP.embed(trained, into=into)

    # Assert: the untrained ranks keep the global's values, so the update there is exactly zero
    assert cut["m.lora_A.weight"].shape == (2, 3) and cut["m.lora_B.weight"].shape == (2, 2)
    assert torch.equal(embedded["m.lora_A.weight"][2:], into["m.lora_A.weight"][2:])
    assert torch.equal(embedded["m.lora_B.weight"][:, 2:], into["m.lora_B.weight"][:, 2:])
    assert torch.equal(embedded["m.lora_A.weight"][:2], -torch.ones(2, 3))


def test_caps_that_do_not_cut_and_bad_caps(spec):
    # Execute / Assert
    assert RankCap.for_site(spec, None) is None and RankCap.for_site(spec, 4) is None
    assert RankCap.for_site(spec, 2).rank == 2
    assert CAP.engine_spec(spec).lora.alpha / CAP.engine_spec(spec).lora.rank == spec.lora.alpha / spec.lora.rank
    with pytest.raises(PolicyError, match="below the job's rank"):
        RankCap(rank=5, max_rank=4)
