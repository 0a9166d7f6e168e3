"""Engine-independent LoRA set-up: the initial adapter, and which layers get LoRA.

Every site must start round 1 from the same adapter.

Engines differ in how they initialise LoRA; a federation must not. The initial
adapter is a function of the tensor names, shapes and the job's seed only:
``lora_A`` is Kaiming-uniform (bound 1/sqrt(fan_in), as PEFT's default), and
``lora_B`` is zero, so the adapted model starts equal to the base model.
``lora.layers`` is checked against the model and turned into each engine's targets here.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import torch

from zenfed.errors import ModelError
from zenfed.spec import LoraSpec
from zenfed.types import AdapterState


def deterministic_init(template: AdapterState, *, seed: int) -> AdapterState:
    """Return an initial adapter with the names and shapes of ``template``.

    Args:
        template: Any adapter of the right shape (only names and shapes are read).
        seed: The job's seed.
    """
    generator = torch.Generator().manual_seed(seed)
    state: AdapterState = {}
    for name in sorted(template):
        shape = tuple(template[name].shape)
        if ".lora_A." in name:
            bound = 1.0 / math.sqrt(shape[1])
            values = torch.rand(shape, generator=generator, dtype=torch.float32)
            state[name] = (values * 2.0 - 1.0) * bound
        else:
            state[name] = torch.zeros(shape, dtype=torch.float32)
    return state


def check_layers(lora: LoraSpec, model_config: Any, *, model_dir: Path) -> None:
    """Refuse ``lora.layers`` naming a decoder layer the model does not have.

    Raises:
        ModelError: If an index is at or past the model's ``num_hidden_layers``.
    """
    count = getattr(model_config, "num_hidden_layers", None)
    if not lora.layers or count is None:
        return
    missing = [index for index in lora.layers if index >= count]
    if missing:
        raise ModelError(
            f"lora.layers names layer(s) {missing}, but the model in {model_dir} has {count} "
            f"decoder layers (0 to {count - 1}); pick indices below {count}"
        )


def nemo_target_patterns(lora: LoraSpec, targets: tuple[str, ...]) -> list[str]:
    """Return NeMo LoRA ``target_modules`` for resolved ``targets`` (per-layer wildcards for ``lora.layers``)."""
    if not lora.layers:
        return list(targets)
    return [f"*.layers.{index}.*.{module}" for index in lora.layers for module in targets]
