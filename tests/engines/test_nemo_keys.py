"""NeMo <-> HF PEFT adapter names: the mapping is exact, reversible and strict."""

import pytest
import torch

from zenfed.engines.nemo_keys import (
    nemo_to_peft_name,
    nemo_to_peft_state,
    peft_to_nemo_name,
    peft_to_nemo_state,
)
from zenfed.errors import AdapterError

NEMO = "model.model.layers.3.self_attn.q_proj.lora_a.weight"
PEFT = "base_model.model.model.layers.3.self_attn.q_proj.lora_A.weight"


def test_known_name_maps_both_ways():
    # Prepare / Execute
    forward = nemo_to_peft_name(NEMO)
    backward = peft_to_nemo_name(PEFT)

    # Assert
    assert forward == PEFT
    assert backward == NEMO


def test_state_round_trip_keeps_values_and_drops_base_weights():
    # Prepare: a NeMo state dict with base weights and bf16 LoRA tensors.
    names = [f"model.model.layers.{i}.self_attn.{m}.lora_{ab}.weight"
             for i in range(2) for m in ("q_proj", "o_proj") for ab in ("a", "b")]
    nemo_state = {n: torch.randn(4, 8, dtype=torch.bfloat16) for n in names}
    nemo_state["model.model.layers.0.self_attn.q_proj.weight"] = torch.randn(8, 8)
    nemo_state["model.lm_head.weight"] = torch.randn(8, 8)

    # Execute
    peft_state = nemo_to_peft_state(nemo_state)
    back = peft_to_nemo_state(peft_state)

    # Assert: only LoRA tensors, PEFT names, float32 contiguous, values preserved.
    assert len(peft_state) == len(names)
    assert all(k.startswith("base_model.model.model.layers.") for k in peft_state)
    assert all(".lora_A." in k or ".lora_B." in k for k in peft_state)
    assert all(v.dtype == torch.float32 and v.is_contiguous() for v in peft_state.values())
    assert sorted(back) == sorted(names)
    for name in names:
        assert torch.equal(back[name], nemo_state[name].float())


@pytest.mark.parametrize(
    "bad",
    [
        "base_model.model.model.layers.0.self_attn.q_proj.weight",  # not LoRA
        "model.layers.0.self_attn.q_proj.lora_A.weight",  # missing PEFT prefix
        "base_model.model.model.layers.0.q_proj.lora_A.lora_B.weight",  # ambiguous
    ],
)
def test_bad_peft_names_are_refused(bad):
    with pytest.raises(AdapterError, match="adapter tensor"):
        peft_to_nemo_name(bad)


def test_bad_nemo_names_are_refused():
    with pytest.raises(AdapterError, match="does not start with"):
        nemo_to_peft_name("layers.0.q_proj.lora_a.weight")
    with pytest.raises(AdapterError, match="not a LoRA weight"):
        nemo_to_peft_name("model.model.layers.0.self_attn.q_proj.weight")
