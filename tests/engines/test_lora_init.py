"""Engine-independent LoRA initialisation: a function of names, shapes and seed only."""

from __future__ import annotations

import math

import torch

from zenfed.engines.lora_init import deterministic_init

TEMPLATE = {
    "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight": torch.empty(4, 64),
    "base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight": torch.empty(64, 4),
    "base_model.model.model.layers.1.self_attn.v_proj.lora_A.weight": torch.empty(4, 32),
    "base_model.model.model.layers.1.self_attn.v_proj.lora_B.weight": torch.empty(32, 4),
}


def test_same_seed_same_adapter_whatever_the_template_values_or_order():
    # Prepare: a template with other values and names in reverse order.
    shuffled = {k: torch.randn(v.shape) for k, v in reversed(TEMPLATE.items())}

    # Execute
    a = deterministic_init(TEMPLATE, seed=3)
    b = deterministic_init(shuffled, seed=3)

    # Assert
    assert list(a) == sorted(TEMPLATE)
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_other_seed_other_lora_a():
    # Execute
    a = deterministic_init(TEMPLATE, seed=3)
    b = deterministic_init(TEMPLATE, seed=4)

    # Assert
    name = "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"
    assert not torch.equal(a[name], b[name])


def test_lora_a_is_kaiming_uniform_bounded_and_lora_b_zero():
    # Execute
    state = deterministic_init(TEMPLATE, seed=0)

    # Assert
    for name, tensor in state.items():
        assert tensor.dtype == torch.float32 and tensor.shape == TEMPLATE[name].shape
        if ".lora_A." in name:
            bound = 1.0 / math.sqrt(tensor.shape[1])
            assert tensor.abs().max() <= bound
            assert tensor.abs().max() > 0.8 * bound  # spread over the whole range
            assert abs(float(tensor.mean())) < 0.3 * bound
        else:
            assert torch.count_nonzero(tensor) == 0
