"""FedAvg (McMahan et al., 2017): the weighted mean of the sites' adapters.

In the clear the server decodes each adapter and weights it by the site's
training examples (``federation.weighting: samples``) or equally
(``uniform``). Under encryption the server cannot weight what it cannot
read, so each site multiplies its adapter by ``min(n / weight_unit, 1)``
before encrypting and sends that weight in the clear; the server adds
ciphertexts and weights, and every site divides the decrypted sum by the
total weight. Both give ``sum_k w_k a_k / sum_k w_k``.
"""

from __future__ import annotations

from typing import ClassVar

from zenfed.strategies.base import Strategy


class FedAvg(Strategy):
    """The weighted mean of the sites' adapters."""

    name: ClassVar[str] = "fedavg"

    def site_weight(self, *, num_examples: int) -> float:
        """Return 1 (uniform), else the site's examples in units of ``encryption.weight_unit``, capped at 1."""
        if self.spec.federation.weighting == "uniform":
            return 1.0
        return min(num_examples / self.spec.encryption.weight_unit, 1.0)

    def server_weight(self, *, num_examples: int) -> float:
        """Return the site's training examples (``samples``) or 1 (``uniform``)."""
        return float(num_examples) if self.spec.federation.weighting == "samples" else 1.0
