"""The server's running sums of site updates: in the clear, or as ciphertexts it cannot read.

Results are folded in as they arrive, so the server holds one adapter-sized
sum however many sites answer. :class:`Aggregation` is what the round logic
needs from a sum; :class:`PlainAggregation` and :class:`EncryptedAggregation`
implement it side by side. Which weights go in is the strategy's decision
(``zenfed.strategies``); these classes only add. :func:`make_aggregation`
picks the sum a job needs.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import torch

from zenfed import protocol as P
from zenfed.digest import sha256_hex
from zenfed.errors import ZenfedError
from zenfed.privacy.he import (
    EncryptedSum,
    HEContext,
    fingerprint,
    load_context,
    open_update,
    packing_for,
)
from zenfed.spec import EncryptionSpec
from zenfed.strategies import Strategy
from zenfed.types import AdapterState, check_compatible
from zenfed.wire import decode_adapter, encode_adapter


class Aggregation(Protocol):
    """One running sum of site updates, and how its result travels and is checkpointed."""

    method: str
    encrypted: bool

    def task_payload(self, global_state: Any) -> tuple[dict[str, Any], bytes | None]:
        """Header fields and payload bytes that carry ``global_state`` to the sites."""
        ...

    def begin(self, *, round_index: int) -> None:
        """Start a new, empty sum for a round."""
        ...

    def add(self, *, site: str, header: dict[str, Any], payload: bytes) -> float | None:
        """Validate and fold in one site's update; return the weight it counted with (None: hidden)."""
        ...

    @property
    def count(self) -> int:
        """Updates folded in this round."""
        ...

    @property
    def total_weight(self) -> float | None:
        """Sum of their weights (None where the weights travel inside a masked sum)."""
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
    """Running weighted mean of adapters, in float64."""

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


class PlainAggregation:
    """Aggregation in the clear: the server decodes each adapter and keeps a weighted mean.

    Args:
        method: The name the job result and audit log give this aggregation.
        weight_of: The strategy's weight for an update of ``num_examples`` training examples.
    """

    encrypted = False

    def __init__(self, *, method: str, weight_of: Callable[..., float]) -> None:
        self.method = method
        self._weight_of = weight_of
        self._mean = WeightedMean()

    def task_payload(self, global_state: Any) -> tuple[dict[str, Any], bytes | None]:
        """Send the global adapter as safetensors bytes."""
        if global_state is None:
            return {P.H_ENCRYPTED: False}, None
        return {P.H_ENCRYPTED: False}, encode_adapter(global_state)

    def begin(self, *, round_index: int) -> None:
        """Start an empty sum."""
        self._mean = WeightedMean()

    def add(self, *, site: str, header: dict[str, Any], payload: bytes) -> float:
        """Decode and fold in one adapter."""
        weight = self._weight_of(num_examples=int(header[P.H_NUM_EXAMPLES]))
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


@dataclass(frozen=True)
class EncryptedGlobal:
    """The global adapter as the server holds it: a ciphertext sum, its count and plain total weight.

    Attributes:
        ciphertext: The summed ciphertexts.
        total_weight: The plain total weight; None under pairwise masks (the sum carries it).
        contributors: How many updates the sum holds (a masked sum's own count must match).
    """

    ciphertext: bytes
    total_weight: float | None
    contributors: int = 0


class EncryptedAggregation:
    """Aggregation under CKKS: the server adds site-weighted ciphertexts it cannot read.

    Each site weights its adapter, packs and encrypts it, and wraps it in an
    envelope naming job, round, site and HE parameters. The server checks the
    envelope, adds the ciphertext into one running sum, and sends that sum back
    with the plain total weight; sites decrypt and divide. Under pairwise masks
    the weights travel inside the sum, and survivors' mask corrections are added
    to it like updates (``add_correction``). The server only ever
    loads a public context: ``load_context(..., require_secret=False)`` refuses a
    secret key.

    Args:
        method: The name the job result and audit log give this aggregation.
        context_path: The server's public context file.
        encryption: The job's ``encryption`` section.
        job_id: The job's id; envelopes of other jobs are refused.
    """

    encrypted = True

    def __init__(self, *, method: str, context_path: Path, encryption: EncryptionSpec, job_id: str):
        self.method = method
        self.context: HEContext = load_context(context_path, require_secret=False)
        self.packing = packing_for(encryption)
        self.fingerprint = fingerprint(self.context, self.packing)
        self.job_id = job_id
        self.n_values: int | None = None
        self._round = 0
        self._sum = EncryptedSum(context=self.context)
        self._total = 0.0
        self._contributors: list[str] = []
        self._corrections: list[str] = []

    @property
    def masked(self) -> bool:
        """True where sites mask their updates pairwise (weights inside the sum)."""
        return self.packing.masked

    def task_payload(self, global_state: Any) -> tuple[dict[str, Any], bytes | None]:
        """Send the encrypted sum, its count and plain total weight (nothing in round 1)."""
        header: dict[str, Any] = {P.H_ENCRYPTED: True}
        if global_state is None:
            return header, None
        header[P.H_CONTRIBUTORS] = global_state.contributors
        if global_state.total_weight is not None:
            header[P.H_TOTAL_WEIGHT] = global_state.total_weight
        return header, global_state.ciphertext

    def begin(self, *, round_index: int) -> None:
        """Start an empty encrypted sum."""
        self._round = round_index
        self._sum = EncryptedSum(context=self.context)
        self._total = 0.0
        self._contributors = []
        self._corrections = []

    def add(self, *, site: str, header: dict[str, Any], payload: bytes) -> float | None:
        """Check the envelope (job, round, site, parameters, length, hash) and add its ciphertext."""
        weight: float | None = None
        if self.masked:
            if len(self._contributors) + 1 > self.packing.max_sites:
                raise ZenfedError(f"the sum would exceed encryption.max_sites={self.packing.max_sites} updates")
        else:
            weight = float(header.get(P.H_WEIGHT, 0.0))
            if not 0.0 < weight <= 1.0:
                raise ZenfedError(f"encrypted update from {site} claims weight {weight}; it must be in (0, 1]")
            if self._total + weight > self.packing.max_sites:
                raise ZenfedError(f"the sum would exceed encryption.max_sites={self.packing.max_sites} units of "
                                  "weight")
        # The first envelope fixes the update length for the job; every later one must match.
        n_values, ciphertext = open_update(payload, context=self.context, packing=self.packing, job=self.job_id,
                                           round=self._round, site=site, n_values=self.n_values)
        self._sum.add(ciphertext)
        self.n_values = n_values
        self._total += weight or 0.0
        self._contributors.append(site)
        return weight

    def add_correction(self, *, site: str, payload: bytes) -> None:
        """Add a survivor's mask correction (checked like an update: its envelope names job, round, site).

        Raises:
            ZenfedError: If the job has no pairwise masks, the site did not contribute this round, or
                already corrected.
        """
        if not self.masked:
            raise ZenfedError("a mask correction arrived, but this job has no pairwise masks")
        if site not in self._contributors or site in self._corrections:
            raise ZenfedError(f"a mask correction from {site}, which sent no update this round or already "
                              "corrected; refused")
        _, ciphertext = open_update(payload, context=self.context, packing=self.packing, job=self.job_id,
                                    round=self._round, site=site, n_values=self.n_values)
        self._sum.add(ciphertext)
        self._corrections.append(site)

    @property
    def corrections(self) -> list[str]:
        """Sites whose mask corrections were added this round."""
        return list(self._corrections)

    @property
    def count(self) -> int:
        """Updates added this round."""
        return len(self._contributors)

    @property
    def total_weight(self) -> float | None:
        """Their total (plain) weight; None under pairwise masks."""
        return None if self.masked else self._total

    @property
    def contributors(self) -> list[str]:
        """Sites added this round."""
        return list(self._contributors)

    def result(self) -> EncryptedGlobal:
        """The encrypted sum and its total weight."""
        if not self._contributors:
            raise ZenfedError("no site update was accepted this round")
        return EncryptedGlobal(ciphertext=self._sum.to_bytes(), total_weight=self.total_weight,
                               contributors=len(self._contributors))

    def digest(self, global_state: Any) -> str:
        """SHA-256 of the summed ciphertext."""
        return sha256_hex(global_state.ciphertext)

    def to_checkpoint(self, global_state: Any) -> tuple[bytes, dict[str, Any]]:
        """The ciphertext sum; never a plaintext adapter."""
        return global_state.ciphertext, {
            "kind": "ckks_sum", "total_weight": global_state.total_weight, "n_values": self.n_values,
            "fingerprint": self.fingerprint, "contributors": global_state.contributors,
        }

    def from_checkpoint(self, payload: bytes, meta: dict[str, Any]) -> EncryptedGlobal:
        """Restore the ciphertext sum."""
        if meta.get("kind") != "ckks_sum" or meta.get("fingerprint") != self.fingerprint:
            raise ZenfedError("the checkpoint does not hold a ciphertext sum under this job's HE parameters")
        self.n_values = meta.get("n_values")
        total = meta.get("total_weight")
        return EncryptedGlobal(ciphertext=payload, total_weight=None if total is None else float(total),
                               contributors=int(meta.get("contributors", 0)))


def make_aggregation(strategy: Strategy, *, job_id: str, server_context: Path | None) -> Aggregation:
    """Return the running sum the server folds a job's updates into.

    Args:
        strategy: The job's algorithm (its name and its weights).
        job_id: The job's id (encrypted updates are bound to it).
        server_context: The server's public CKKS context file; None for a job in the clear.

    Raises:
        ZenfedError: If the job is encrypted and there is no server context.
    """
    if strategy.spec.encryption.enabled:
        if server_context is None:
            raise ZenfedError("an encrypted job needs the server's public CKKS context")
        return EncryptedAggregation(method=f"{strategy.name}-ckks", context_path=server_context,
                                    encryption=strategy.spec.encryption, job_id=job_id)
    return PlainAggregation(method=strategy.name, weight_of=strategy.server_weight)
