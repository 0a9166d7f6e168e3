"""FedAvg under CKKS: the server adds ciphertexts it cannot read.

Each site weights its adapter, packs and encrypts it, and wraps it in an
envelope naming job, round, site and HE parameters. The server checks the
envelope, adds the ciphertext into one running sum, and sends that sum back
with the plain total weight; sites decrypt and divide. The server only ever
loads a public context: ``load_context(..., require_secret=False)`` refuses a
secret key.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from zenfed import protocol as P
from zenfed.errors import ZenfedError
from zenfed.privacy.he.ckks import EncryptedSum, expected_ciphertext_bytes, fingerprint
from zenfed.privacy.he.context import SERVER_CONTEXT_FILE, HEContext, load_context
from zenfed.privacy.he.envelope import open_envelope, read_envelope
from zenfed.privacy.he.params import packing_for
from zenfed.spec import EncryptionSpec
from zenfed.wire import sha256_hex


@dataclass(frozen=True)
class EncryptedGlobal:
    """The global adapter as the server holds it: a ciphertext sum and its plain total weight."""

    ciphertext: bytes
    total_weight: float


def find_server_context(startup_dir: str | None, local_dir: str | None) -> Path:
    """The server's public context: in its kit's startup/, or local/ in the simulator.

    Raises:
        ZenfedError: If there is none (the project was provisioned without encryption).
    """
    for folder in (startup_dir, local_dir):
        if folder and (Path(folder) / SERVER_CONTEXT_FILE).is_file():
            return Path(folder) / SERVER_CONTEXT_FILE
    raise ZenfedError(
        f"encryption is on but the server has no {SERVER_CONTEXT_FILE}; provision the project "
        f"with encryption (ProjectSpec.encryption: true)"
    )


class EncryptedFedAvg:
    """FedAvg of encrypted, site-weighted adapters."""

    method = "fedavg-ckks"
    encrypted = True

    def __init__(self, *, context_path: Path, encryption: EncryptionSpec, job_id: str):
        self.context: HEContext = load_context(context_path, require_secret=False)
        self.packing = packing_for(encryption)
        self.fingerprint = fingerprint(self.context, self.packing)
        self.job_id = job_id
        self.n_values: int | None = None
        self._round = 0
        self._sum = EncryptedSum(context=self.context)
        self._total = 0.0
        self._contributors: list[str] = []

    def task_payload(self, global_state: Any) -> tuple[dict[str, Any], bytes | None]:
        """Send the encrypted sum and its plain total weight (nothing in round 1)."""
        header: dict[str, Any] = {P.H_ENCRYPTED: True}
        if global_state is None:
            return header, None
        header[P.H_TOTAL_WEIGHT] = global_state.total_weight
        return header, global_state.ciphertext

    def begin(self, *, round_index: int) -> None:
        """Start an empty encrypted sum."""
        self._round = round_index
        self._sum = EncryptedSum(context=self.context)
        self._total = 0.0
        self._contributors = []

    def add(self, *, site: str, header: dict[str, Any], payload: bytes, weighting: str) -> float:
        """Check the envelope (job, round, site, parameters, length, hash) and add its ciphertext."""
        weight = float(header.get(P.H_WEIGHT, 0.0))
        if not 0.0 < weight <= 1.0:
            raise ZenfedError(f"encrypted update from {site} claims weight {weight}; it must be in (0, 1]")
        if self._total + weight > self.packing.max_sites:
            raise ZenfedError(f"the sum would exceed encryption.max_sites={self.packing.max_sites} units of weight")
        n_values = self.n_values
        if n_values is None:
            # The first envelope fixes the update length for the job; every later one must match.
            n_values = read_envelope(payload)[0].n_values
        _, ciphertext = open_envelope(
            payload, job=self.job_id, round=self._round, site=site, fingerprint=self.fingerprint,
            n_values=n_values,
            ciphertext_bytes=expected_ciphertext_bytes(n_values=n_values, context=self.context, packing=self.packing),
        )
        self._sum.add(ciphertext)
        self.n_values = n_values
        self._total += weight
        self._contributors.append(site)
        return weight

    @property
    def count(self) -> int:
        """Updates added this round."""
        return len(self._contributors)

    @property
    def total_weight(self) -> float:
        """Their total (plain) weight."""
        return self._total

    @property
    def contributors(self) -> list[str]:
        """Sites added this round."""
        return list(self._contributors)

    def result(self) -> EncryptedGlobal:
        """The encrypted sum and its total weight."""
        if not self._contributors:
            raise ZenfedError("no site update was accepted this round")
        return EncryptedGlobal(ciphertext=self._sum.to_bytes(), total_weight=self._total)

    def digest(self, global_state: Any) -> str:
        """SHA-256 of the summed ciphertext."""
        return sha256_hex(global_state.ciphertext)

    def to_checkpoint(self, global_state: Any) -> tuple[bytes, dict[str, Any]]:
        """The ciphertext sum; never a plaintext adapter."""
        return global_state.ciphertext, {
            "kind": "ckks_sum", "total_weight": global_state.total_weight, "n_values": self.n_values,
            "fingerprint": self.fingerprint,
        }

    def from_checkpoint(self, payload: bytes, meta: dict[str, Any]) -> EncryptedGlobal:
        """Restore the ciphertext sum."""
        if meta.get("kind") != "ckks_sum" or meta.get("fingerprint") != self.fingerprint:
            raise ZenfedError("the checkpoint does not hold a ciphertext sum under this job's HE parameters")
        self.n_values = meta.get("n_values")
        return EncryptedGlobal(ciphertext=payload, total_weight=float(meta["total_weight"]))
