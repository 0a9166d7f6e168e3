"""Server-side aggregation of site updates, one running sum at a time.

Results are folded in as they arrive, so the server holds one adapter-sized
sum however many sites answer. ``Aggregation`` is what the controller needs
from a strategy; ``PlainFedAvg`` here and ``EncryptedFedAvg`` in
``encrypted.py`` implement it.
"""

from __future__ import annotations

from typing import Any, Protocol

import torch

from zenfed import protocol as P
from zenfed.errors import ZenfedError
from zenfed.types import AdapterState, check_compatible
from zenfed.wire import decode_adapter, encode_adapter, sha256_hex


class Aggregation(Protocol):
    """One way of combining site updates into the next global adapter."""

    method: str
    encrypted: bool

    def task_payload(self, global_state: Any) -> tuple[dict[str, Any], bytes | None]:
        """Header fields and payload bytes that carry ``global_state`` to the sites."""
        ...

    def begin(self, *, round_index: int) -> None:
        """Start a new, empty sum for a round."""
        ...

    def add(self, *, site: str, header: dict[str, Any], payload: bytes, weighting: str) -> float:
        """Validate and fold in one site's update; return the weight it counted with."""
        ...

    @property
    def count(self) -> int:
        """Updates folded in this round."""
        ...

    @property
    def total_weight(self) -> float:
        """Sum of their weights."""
        ...

    @property
    def contributors(self) -> list[str]:
        """Sites folded in this round."""
        ...

    def result(self) -> Any:
        """The new global state."""
        ...

    def digest(self, global_state: Any) -> str:
        """SHA-256 of a global state's wire form."""
        ...

    def to_checkpoint(self, global_state: Any) -> tuple[bytes, dict[str, Any]]:
        """Bytes and metadata to checkpoint a global state."""
        ...

    def from_checkpoint(self, payload: bytes, meta: dict[str, Any]) -> Any:
        """The global state back from a checkpoint."""
        ...


class WeightedMean:
    """Running weighted mean of adapters (FedAvg), in float64."""

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


def sample_weight(header: dict[str, Any], weighting: str) -> float:
    """A site's FedAvg weight: its training examples, or 1 for uniform weighting."""
    return float(int(header[P.H_NUM_EXAMPLES])) if weighting == "samples" else 1.0


class PlainFedAvg:
    """FedAvg in the clear: the server decodes each adapter and averages."""

    method = "fedavg"
    encrypted = False

    def __init__(self) -> None:
        self._mean = WeightedMean()

    def task_payload(self, global_state: Any) -> tuple[dict[str, Any], bytes | None]:
        """Send the global adapter as safetensors bytes."""
        if global_state is None:
            return {P.H_ENCRYPTED: False}, None
        return {P.H_ENCRYPTED: False}, encode_adapter(global_state)

    def begin(self, *, round_index: int) -> None:
        """Start an empty sum."""
        self._mean = WeightedMean()

    def add(self, *, site: str, header: dict[str, Any], payload: bytes, weighting: str) -> float:
        """Decode and fold in one adapter."""
        weight = sample_weight(header, weighting)
        self._mean.add(site, decode_adapter(payload), weight=weight)
        return weight

    @property
    def count(self) -> int:
        """Adapters folded in."""
        return self._mean.count

    @property
    def total_weight(self) -> float:
        """Their total weight."""
        return self._mean.total_weight

    @property
    def contributors(self) -> list[str]:
        """Sites folded in."""
        return list(self._mean.contributors)

    def result(self) -> AdapterState:
        """The weighted mean adapter."""
        return self._mean.result()

    def digest(self, global_state: Any) -> str:
        """SHA-256 of the adapter's safetensors encoding."""
        return sha256_hex(encode_adapter(global_state))

    def to_checkpoint(self, global_state: Any) -> tuple[bytes, dict[str, Any]]:
        """The adapter as safetensors bytes."""
        return encode_adapter(global_state), {"kind": "adapter"}

    def from_checkpoint(self, payload: bytes, meta: dict[str, Any]) -> AdapterState:
        """Decode a checkpointed adapter."""
        if meta.get("kind") != "adapter":
            raise ZenfedError("the checkpoint holds an encrypted global; this job runs in the clear")
        return decode_adapter(payload)
