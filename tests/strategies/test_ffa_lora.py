"""FFA-LoRA: A stays at the shared initialisation, only B is trained and sent, and sites rebuild the adapter."""

from __future__ import annotations

import pytest
import torch

from zenfed.errors import ModelError, PolicyError
from zenfed.spec import JobSpec
from zenfed.strategies import FFALoRA, make_strategy


def ffa() -> FFALoRA:
    strategy = make_strategy(JobSpec(name="ffa", federation={"strategy": "ffa_lora"}))
    assert isinstance(strategy, FFALoRA)
    return strategy


@pytest.mark.parametrize("dp", [False, True])
def test_training_keeps_a_and_moves_b(engine, examples, dp):
    # Prepare
    from zenfed.types import RecordDP

    start = engine.initial_adapter()
    frozen = ffa().frozen_names(start)
    record = RecordDP(noise_multiplier=0.0, clip_norm=0.05, sample_rate=1.0, accountant=None) if dp else None

    # Execute
    trained = engine.train(adapter=start, examples=examples, steps=4, seed=1, dp=record, frozen=frozen)

    # Assert
    assert frozen and all(".lora_A." in name for name in frozen)
    assert all(torch.equal(trained.adapter[name], start[name]) for name in frozen)
    assert any(not torch.equal(trained.adapter[name], start[name]) for name in start if name not in frozen)
    assert all(p.requires_grad for p in engine._lora_params().values())  # unfrozen again afterwards


def test_only_b_is_sent_and_the_global_gets_the_shared_a_back(engine):
    # Prepare
    strategy = ffa()
    initial = engine.initial_adapter()
    strategy.begin(initial)
    local = {k: v + 1.0 for k, v in initial.items()}

    # Execute
    sent = strategy.update_to_send(global_adapter=initial, local_adapter=local)
    rebuilt = strategy.after_decrypt(sent, global_round=1)

    # Assert: half the tensors travel; the rebuilt global is the shared A with the mean B
    assert sorted(sent) == sorted(k for k in initial if ".lora_B." in k) and len(sent) * 2 == len(initial)
    assert all(torch.equal(rebuilt[k], initial[k]) for k in initial if ".lora_A." in k)
    assert all(torch.equal(rebuilt[k], local[k]) for k in sent)


def test_freezing_an_unknown_tensor_is_an_error(engine, examples):
    # Execute / Assert
    with pytest.raises(ModelError, match="not LoRA tensors"):
        engine.train(adapter=engine.initial_adapter(), examples=examples, steps=1, seed=1, frozen={"nope"})


def test_ffa_needs_an_initial_adapter_with_a_and_b():
    # Execute / Assert
    with pytest.raises(PolicyError, match="A and B"):
        ffa().begin({"x.lora_B.weight": torch.zeros(2)})
    with pytest.raises(PolicyError, match="initial adapter"):
        ffa().after_decrypt({"x.lora_B.weight": torch.zeros(2)}, global_round=1)
