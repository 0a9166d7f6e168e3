"""The wire format: adapters as safetensors bytes, float32 only, never pickle."""

from __future__ import annotations

import pickle

import pytest
import torch

from zenfed.errors import AdapterError
from zenfed.wire import adapter_sha256, decode_adapter, encode_adapter, sha256_hex


def adapter(seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    return {
        "base_model.model.model.layers.1.self_attn.q_proj.lora_B.weight": torch.randn(64, 4, generator=gen),
        "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight": torch.randn(4, 64, generator=gen),
    }


def test_encode_decode_round_trips_exactly():
    # Prepare
    state = adapter()

    # Execute
    decoded = decode_adapter(encode_adapter(state))

    # Assert
    assert set(decoded) == set(state)
    for name, tensor in state.items():
        assert decoded[name].dtype == torch.float32
        assert torch.equal(decoded[name], tensor)


def test_encoding_is_canonical_whatever_the_dict_order_or_layout():
    # Prepare
    state = adapter()
    reordered = {k: state[k] for k in reversed(list(state))}
    strided = {k: v.t().contiguous().t() for k, v in state.items()}  # same values, non-contiguous

    # Execute / Assert
    assert encode_adapter(state) == encode_adapter(reordered) == encode_adapter(strided)
    assert adapter_sha256(state) == sha256_hex(encode_adapter(state))
    assert adapter_sha256(state) != adapter_sha256(adapter(seed=1))


def test_non_float32_tensors_are_refused_both_ways():
    # Prepare
    from safetensors.torch import save

    half = {"x.lora_A.weight": torch.zeros(2, 2, dtype=torch.float16)}

    # Execute / Assert
    with pytest.raises(AdapterError, match="float32"):
        encode_adapter(half)
    with pytest.raises(AdapterError, match="expected float32"):
        decode_adapter(save(half))


@pytest.mark.parametrize(
    "payload",
    [
        b"",
        b"garbage bytes that are not safetensors",
        b"\xff" * 64,
        pickle.dumps({"a": torch.zeros(2)}),
        encode_adapter(adapter())[:-10],
    ],
    ids=["empty", "text", "ff", "pickle", "truncated"],
)
def test_garbage_bytes_are_an_adapter_error(payload):
    # Execute / Assert
    with pytest.raises(AdapterError, match="not a valid safetensors blob"):
        decode_adapter(payload)


def test_a_non_bytes_payload_is_refused():
    # Execute / Assert
    with pytest.raises(AdapterError, match="must be bytes"):
        decode_adapter("not bytes")  # type: ignore[arg-type]
