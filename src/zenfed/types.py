"""The plain types every layer passes around: adapters, a round's DP-SGD setting, a loss term.

Adapters travel as ``AdapterState``: a dict of HF PEFT state-dict names
(``base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight``) to
contiguous float32 CPU tensors. Every engine speaks this format, so sites with
different engines aggregate together. This module sits below the engines, the
wire format and the privacy stages, and imports none of them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol

import torch

from zenfed.errors import AdapterError

AdapterState = dict[str, torch.Tensor]


class LossTerm(Protocol):
    """A term a strategy adds to a site's training loss (FedProx's proximal term, say).

    Engines call :meth:`add_gradient` before every optimizer step, with the trainable
    LoRA parameters under their wire (HF PEFT) names, once the loss's gradient is in
    place (under DP-SGD: after clipping and noise, so a term that does not read the
    data leaves the privacy guarantee as it is).
    """

    def add_gradient(self, params: dict[str, torch.nn.Parameter]) -> None:
        """Add the term's gradient to each parameter's ``.grad``."""
        ...

@dataclass
class RecordDP:
    """Record-level DP-SGD for one round of local training.

    Batches are Poisson-sampled at ``sample_rate``; each example's gradient is
    clipped to ``clip_norm`` and Gaussian noise of ``noise_multiplier * clip_norm``
    is added to their sum. ``accountant`` (a ``zenfed.privacy.dp.PrivacyAccountant``)
    is stepped once per optimizer step.
    """

    noise_multiplier: float
    clip_norm: float
    sample_rate: float
    accountant: Any


def check_compatible(expected: AdapterState, received: AdapterState, *, what: str) -> None:
    """Raise AdapterError unless ``received`` has exactly the names and shapes of ``expected``."""
    missing = sorted(set(expected) - set(received))
    extra = sorted(set(received) - set(expected))
    if missing or extra:
        raise AdapterError(
            f"{what} does not match this job's LoRA shape: "
            f"{len(missing)} tensors missing (e.g. {missing[:2]}), {len(extra)} unexpected "
            f"(e.g. {extra[:2]}); check that every site runs the same job spec"
        )
    for name, tensor in expected.items():
        other = received[name]
        if tuple(other.shape) != tuple(tensor.shape):
            raise AdapterError(
                f"{what}: tensor {name} has shape {tuple(other.shape)}, expected {tuple(tensor.shape)}"
            )
        if other.dtype != torch.float32:
            raise AdapterError(f"{what}: tensor {name} is {other.dtype}, expected float32")
