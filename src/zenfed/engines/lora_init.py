"""Engine-independent LoRA initialisation, so every site starts round 1 from the same adapter.

Engines differ in how they initialise LoRA; a federation must not. The initial
adapter is a function of the tensor names, shapes and the job's seed only:
``lora_A`` is Kaiming-uniform (bound 1/sqrt(fan_in), as PEFT's default), and
``lora_B`` is zero, so the adapted model starts equal to the base model.
"""

from __future__ import annotations

import math

import torch

from zenfed.engines.base import AdapterState


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
