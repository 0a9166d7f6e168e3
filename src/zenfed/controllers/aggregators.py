"""Server-side aggregation of site updates, one running sum at a time.

Results are folded in as they arrive, so the server holds one adapter-sized
sum however many sites answer.
"""

from __future__ import annotations

import torch

from zenfed.engines.base import AdapterState, check_compatible


class WeightedMean:
    """Running weighted mean of adapters (FedAvg)."""

    def __init__(self) -> None:
        self._sum: AdapterState | None = None
        self._total = 0.0
        self.contributors: list[str] = []

    def add(self, site: str, adapter: AdapterState, *, weight: float) -> None:
        """Fold one site's adapter into the sum.

        Raises:
            AdapterError: If its names or shapes differ from the first adapter's.
            ValueError: If the weight is not positive.
        """
        if not weight > 0:
            raise ValueError(f"site {site}: weight must be positive, got {weight}")
        if self._sum is None:
            self._sum = {k: torch.zeros_like(v, dtype=torch.float64) for k, v in adapter.items()}
        else:
            check_compatible({k: v.float() for k, v in self._sum.items()}, adapter, what=f"update from {site}")
        for name, tensor in adapter.items():
            self._sum[name].add_(tensor.double(), alpha=weight)
        self._total += weight
        self.contributors.append(site)

    @property
    def count(self) -> int:
        """Number of adapters folded in."""
        return len(self.contributors)

    @property
    def total_weight(self) -> float:
        """Sum of the weights folded in."""
        return self._total

    def result(self) -> AdapterState:
        """Return the weighted mean as float32 tensors.

        Raises:
            ValueError: If nothing was added.
        """
        if self._sum is None:
            raise ValueError("no site update was accepted this round")
        return {k: (v / self._total).float().contiguous() for k, v in sorted(self._sum.items())}
