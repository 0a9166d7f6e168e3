"""What crosses the network: adapters as safetensors bytes, never pickle.

An adapter (HF PEFT names -> float32 tensors) is encoded as one safetensors
blob. The blob's SHA-256 and size are what the audit log records for every
update that leaves a site, so both ends can prove they saw the same bytes.
"""

from __future__ import annotations

import torch
from safetensors import SafetensorError
from safetensors.torch import load, save

from zenfed.digest import sha256_hex
from zenfed.errors import AdapterError
from zenfed.types import AdapterState

_MAX_TENSORS = 100_000


def encode_adapter(state: AdapterState) -> bytes:
    """Encode an adapter as safetensors bytes (float32, sorted names)."""
    for name, tensor in state.items():
        if tensor.dtype != torch.float32:
            raise AdapterError(f"tensor {name} is {tensor.dtype}; adapters travel as float32")
    return bytes(save({k: state[k].contiguous() for k in sorted(state)}))


def decode_adapter(payload: bytes) -> AdapterState:
    """Decode safetensors bytes into an adapter.

    Raises:
        AdapterError: If the bytes are not a safetensors blob of float32 tensors.
    """
    if not isinstance(payload, (bytes, bytearray)):
        raise AdapterError(f"adapter payload must be bytes, got {type(payload).__name__}")
    try:
        state = load(bytes(payload))
    except (SafetensorError, ValueError, RuntimeError) as err:
        raise AdapterError(f"adapter payload is not a valid safetensors blob: {err}") from None
    if len(state) > _MAX_TENSORS:
        raise AdapterError(f"adapter payload holds {len(state)} tensors; refusing more than {_MAX_TENSORS}")
    for name, tensor in state.items():
        if tensor.dtype != torch.float32:
            raise AdapterError(f"adapter tensor {name} is {tensor.dtype}, expected float32")
    return state


def adapter_sha256(state: AdapterState) -> str:
    """Return the SHA-256 of an adapter's canonical wire encoding."""
    return sha256_hex(encode_adapter(state))
