"""FedProx (Li et al., MLSys 2020): FedAvg plus a proximal term that keeps each site near the global.

Every site adds ``mu/2 * ||w - w_global||^2`` over its LoRA parameters to its
training loss, which bounds how far a site with skewed (non-IID) data drifts
in its local steps. The server side is FedAvg's, so FedProx works unchanged
under encryption. Under DP-SGD the term's gradient ``mu * (w - w_global)`` is
added after clipping and noise: it reads no data, so it is post-processing and
the privacy guarantee is the same.
"""

from __future__ import annotations

from typing import ClassVar

import torch

from zenfed.errors import ZenfedError
from zenfed.strategies.fedavg import FedAvg
from zenfed.types import AdapterState, LossTerm


class ProximalTerm:
    """``mu/2 * ||w - w_global||^2`` over the trainable LoRA tensors.

    Args:
        global_adapter: The adapter the site starts from (wire names).
        mu: The proximal weight.
    """

    def __init__(self, *, global_adapter: AdapterState, mu: float) -> None:
        self.mu = mu
        self.anchor = {name: tensor.detach().clone() for name, tensor in global_adapter.items()}

    def add_gradient(self, params: dict[str, torch.nn.Parameter]) -> None:
        """Add ``mu * (w - w_global)`` to each parameter's gradient.

        Raises:
            ZenfedError: If a trainable parameter has no anchor (the adapter and the model disagree).
        """
        for name, param in params.items():
            anchor = self.anchor.get(name)
            if anchor is None:
                raise ZenfedError(f"FedProx: trainable parameter {name!r} is not in the global adapter")
            term = self.mu * (param.detach() - anchor.to(device=param.device, dtype=param.dtype))
            if param.grad is None:
                param.grad = term.clone()
            else:
                param.grad.add_(term)

    def value(self, params: dict[str, torch.Tensor]) -> float:
        """Return the term's value for ``params`` (for tests and logs)."""
        return 0.5 * self.mu * sum(float((params[n].detach().double() - a.double()).pow(2).sum())
                                   for n, a in self.anchor.items() if n in params)


class FedProx(FedAvg):
    """FedAvg with a proximal term at every site (``federation.proximal_mu``)."""

    name: ClassVar[str] = "fedprox"

    def loss_term(self, *, global_adapter: AdapterState) -> LossTerm | None:
        """Return the proximal term anchored at the global the site starts from."""
        return ProximalTerm(global_adapter=global_adapter, mu=self.spec.federation.proximal_mu)
