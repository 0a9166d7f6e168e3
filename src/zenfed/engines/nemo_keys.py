"""Mapping between NeMo's LoRA parameter names and HF PEFT state-dict names.

NeMo 2.x wraps a Hugging Face causal LM in ``HFAutoModelForCausalLM`` (the
Lightning module holds the HF model as ``.model``) and adds LoRA to a linear
layer as two sub-layers ``lora_a`` and ``lora_b``::

    NeMo:  model.model.layers.0.self_attn.q_proj.lora_a.weight
    PEFT:  base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight

The PEFT name is ``base_model.model.`` + the NeMo name without its first
``model.`` (the Lightning wrapper's attribute), with ``lora_a``/``lora_b``
spelt ``lora_A``/``lora_B``. Both layouts store ``A`` as ``(rank, in)`` and
``B`` as ``(out, rank)``, so tensors need no transpose.

This module imports neither NeMo nor PEFT, so it is cheap to use anywhere.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from zenfed.engines.base import to_wire
from zenfed.errors import AdapterError
from zenfed.types import AdapterState

NEMO_PREFIX = "model."
PEFT_PREFIX = "base_model.model."
_NEMO_PARTS = {".lora_a.": ".lora_A.", ".lora_b.": ".lora_B."}
_PEFT_PARTS = {v: k for k, v in _NEMO_PARTS.items()}


def is_nemo_lora_name(name: str) -> bool:
    """Return True if ``name`` is a NeMo LoRA parameter of the wrapped HF model."""
    return name.startswith(NEMO_PREFIX) and any(part in name for part in _NEMO_PARTS)


def _swap_one(name: str, parts: Mapping[str, str], *, what: str) -> str:
    found = [part for part in parts if part in name]
    if len(found) != 1 or name.count(found[0]) != 1:
        raise AdapterError(
            f"{what} {name!r} is not a LoRA weight name (expected exactly one of "
            f"{sorted(parts)}); check that the adapter was made for this LoRA shape"
        )
    return name.replace(found[0], parts[found[0]])


def nemo_to_peft_name(name: str) -> str:
    """Return the HF PEFT state-dict name of a NeMo LoRA parameter name.

    Raises:
        AdapterError: If ``name`` is not a NeMo LoRA parameter name.

    """
    if not name.startswith(NEMO_PREFIX):
        raise AdapterError(
            f"NeMo parameter {name!r} does not start with {NEMO_PREFIX!r}; "
            f"expected a name from HFAutoModelForCausalLM.state_dict()"
        )
    swapped = _swap_one(name, _NEMO_PARTS, what="NeMo parameter")
    return PEFT_PREFIX + swapped[len(NEMO_PREFIX):]


def peft_to_nemo_name(name: str) -> str:
    """Return the NeMo parameter name of an HF PEFT LoRA state-dict name.

    Raises:
        AdapterError: If ``name`` is not an HF PEFT LoRA state-dict name.

    """
    if not name.startswith(PEFT_PREFIX):
        raise AdapterError(
            f"adapter tensor {name!r} does not start with {PEFT_PREFIX!r}; "
            f"adapters travel in HF PEFT naming (see zenfed.engines.base)"
        )
    swapped = _swap_one(name, _PEFT_PARTS, what="adapter tensor")
    return NEMO_PREFIX + swapped[len(PEFT_PREFIX):]


def nemo_to_peft_state(state: Mapping[str, torch.Tensor]) -> AdapterState:
    """Return the LoRA tensors of a NeMo state dict as a wire ``AdapterState``.

    Non-LoRA entries (the frozen base weights) are skipped. Sharded tensors
    (DTensor, from FSDP2) are gathered first.
    """
    out: dict[str, torch.Tensor] = {}
    for name, tensor in state.items():
        if not is_nemo_lora_name(name):
            continue
        full = tensor.full_tensor() if hasattr(tensor, "full_tensor") else tensor
        out[nemo_to_peft_name(name)] = full
    return to_wire(out)


def peft_to_nemo_state(adapter: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Return ``adapter`` (HF PEFT names) keyed by NeMo parameter names."""
    return {peft_to_nemo_name(name): tensor for name, tensor in adapter.items()}
