"""One participant's attestation: its own evidence, and its checks of its peers.

A controller or executor uses it in three calls::

    nonce = service.issue_nonce(peer)            # send to the peer
    evidence = peer_service.evidence_for(nonce)  # on the peer: JSON bytes back
    record = service.verify_peer(peer, evidence) # AttestationResult; record.to_dict() to audit
"""

from __future__ import annotations

import secrets
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import replace
from functools import partial
from pathlib import Path

from zenfed.attestation.base import TEEVerifier
from zenfed.attestation.emulated import EmulatedTEE
from zenfed.attestation.identity import ROOT_CERT_FILE, load_cert, load_identity
from zenfed.attestation.measure import measure
from zenfed.attestation.nonces import NonceRegistry, SeenNonces
from zenfed.attestation.nvidia_gpu import NvidiaGpuTEE
from zenfed.attestation.policy import POLICY_FILE, PeerPolicy, load_policy
from zenfed.attestation.records import (
    AttestationError,
    AttestationResult,
    Evidence,
    EvidenceBundle,
    EvidenceRejected,
    Verdict,
    utc_iso,
)
from zenfed.attestation.sev_snp import SevSnpTEE
from zenfed.attestation.tdx import TdxTEE

HARDWARE_KINDS: dict[str, type[TEEVerifier]] = {
    "sev-snp": SevSnpTEE,
    "tdx": TdxTEE,
    "nvidia-gpu": NvidiaGpuTEE,
}


class AttestationService:
    """Generates this participant's evidence and verifies peers' evidence against policy.

    Args:
        participant: This participant's name.
        attesters: Verifiers that produce this participant's evidence, one per kind.
        verifiers: Kind -> verifier used to check peers' evidence.
        peers: Peer name -> what this participant requires of it.
        nonce_ttl_s: Seconds an issued nonce stays valid.
        clock: Returns the current time in seconds.

    """

    def __init__(
        self,
        *,
        participant: str,
        attesters: Sequence[TEEVerifier],
        verifiers: Mapping[str, TEEVerifier],
        peers: Mapping[str, PeerPolicy],
        nonce_ttl_s: float = 120.0,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.participant = participant
        self._attesters = list(attesters)
        self._verifiers = dict(verifiers)
        self._peers = dict(peers)
        self._clock = clock
        self._nonces = NonceRegistry(ttl_s=nonce_ttl_s, clock=clock)
        self._seen = SeenNonces(window_s=nonce_ttl_s, clock=clock)
        self._ttl = nonce_ttl_s
        self._lock = threading.Lock()

    @classmethod
    def from_workspace(
        cls,
        workspace_dir: str | Path,
        *,
        clock: Callable[[], float] = time.time,
        package_dir: Path | None = None,
    ) -> AttestationService:
        """Build the service from a provisioned kit (``startup/attestation.json`` and keys).

        Args:
            workspace_dir: The participant's workspace (holding ``startup/`` and ``local/``).
            clock: Returns the current time in seconds.
            package_dir: Package folder to measure; the installed zenfed if None.

        Raises:
            AttestationError: If the policy, key or root certificate is missing or unreadable.

        """
        workspace = Path(workspace_dir)
        startup = workspace / "startup"
        policy = load_policy(startup / POLICY_FILE)
        root_path = startup / ROOT_CERT_FILE
        if not root_path.is_file():
            raise AttestationError(f"{root_path} is missing; re-provision with AttestationBuilder")
        root = load_cert(root_path.read_bytes(), source=str(root_path))
        name = policy.participant
        kinds = set(policy.kinds) | {k for p in policy.peers.values() for k in p.kinds}
        built: dict[str, TEEVerifier] = {}
        for kind in sorted(kinds):
            settings = dict(policy.kind_settings.get(kind, {}))
            if kind == "emulated":
                identity = None
                if "emulated" in policy.kinds:
                    identity = load_identity(startup_dir=startup, participant=name)
                built[kind] = EmulatedTEE(
                    participant=name,
                    root=root,
                    identity=identity,
                    measure=partial(
                        measure,
                        workspace_dir=workspace,
                        measured_files=policy.measured_files,
                        package_dir=package_dir,
                    ),
                    debug=bool(settings.pop("debug", False)),
                    clock=clock,
                )
            else:
                try:
                    built[kind] = HARDWARE_KINDS[kind](participant=name, clock=clock, **settings)
                except TypeError as err:
                    raise AttestationError(
                        f"kind_settings.{kind} in {startup / POLICY_FILE} is invalid: {err}"
                    ) from None
        return cls(
            participant=name,
            attesters=[built[k] for k in policy.kinds],
            verifiers=built,
            peers=policy.peers,
            nonce_ttl_s=policy.nonce_ttl_s,
            clock=clock,
        )

    @property
    def nonce_ttl_s(self) -> float:
        """Seconds a nonce issued by this participant stays valid."""
        return self._ttl

    def requires(self, peer: str) -> bool:
        """Return True if this participant's policy requires ``peer`` to attest."""
        return peer in self._peers

    def required_kinds(self, peer: str) -> tuple[str, ...]:
        """Return the kinds ``peer`` must prove (empty if not required)."""
        policy = self._peers.get(peer)
        return policy.kinds if policy else ()

    def issue_nonce(self, peer: str) -> str:
        """Return a fresh nonce for ``peer``; it is accepted once, within the nonce TTL."""
        return self._nonces.issue(peer=peer)

    def evidence_for(self, nonce: str) -> bytes:
        """Return this participant's evidence for ``nonce`` as JSON bytes.

        A kind this machine cannot attest is sent as an error item whose reason the
        verifier records; it never becomes a pass.

        Raises:
            AttestationError: If this participant is provisioned with no TEE kind.

        """
        if not self._attesters:
            raise AttestationError(
                f"{self.participant} is provisioned with no TEE kind; set its kinds in "
                "AttestationBuilder and re-provision"
            )
        items = []
        for attester in self._attesters:
            try:
                items.append(attester.generate_evidence(nonce=nonce))
            except AttestationError as err:
                items.append(
                    Evidence(attester.kind, self.participant, nonce, self._clock(), error=str(err))
                )
        return EvidenceBundle(self.participant, nonce, tuple(items)).to_bytes()

    def verify_peer(self, peer: str, evidence: bytes) -> AttestationResult:
        """Verify ``peer``'s evidence answering a nonce from ``issue_nonce``.

        Returns:
            One record: PASS only if every kind the policy requires of ``peer`` passed.
            Never raises for bad evidence: the reason is in the record.

        """
        try:
            bundle = EvidenceBundle.from_bytes(evidence)
        except EvidenceRejected as err:
            return self._fail(peer, "", str(err))
        try:
            self._nonces.consume(nonce=bundle.nonce, peer=peer)
        except EvidenceRejected as err:
            return self._fail(peer, bundle.nonce, str(err))
        return self._check(peer, bundle)

    def unsolicited_evidence(self) -> bytes:
        """Return evidence under a nonce this participant picks (FLARE's CC flow has no nonce)."""
        return self.evidence_for(secrets.token_hex(32))

    def verify_unsolicited(self, evidence: bytes) -> AttestationResult:
        """Verify evidence whose nonce the attester picked (for FLARE's CCAuthorizer seam).

        Weaker than ``verify_peer``: freshness rests on the evidence's age (at most the
        nonce TTL) and a replay window, not on a nonce this verifier issued, and the
        peer is the one the evidence names.
        """
        try:
            bundle = EvidenceBundle.from_bytes(evidence)
            age = self._clock() - min(item.issued_at for item in bundle.items)
            if age > self._ttl:
                raise EvidenceRejected(
                    f"evidence expired: issued {age:.1f} s ago, at most {self._ttl:.0f} s accepted"
                )
            self._seen.check_and_add(nonce=bundle.nonce)
        except EvidenceRejected as err:
            return self._fail("", "", str(err))
        return self._check(bundle.participant, bundle)

    def _check(self, peer: str, bundle: EvidenceBundle) -> AttestationResult:
        if bundle.participant != peer:
            return self._fail(peer, bundle.nonce, f"evidence is from {bundle.participant!r}")
        policy = self._peers.get(peer)
        if policy is None:
            return self._fail(
                peer,
                bundle.nonce,
                f"no attestation policy for {peer!r} here; "
                "re-provision so this participant's policy covers it",
            )
        parts = tuple(self._check_kind(peer, bundle, kind, policy) for kind in policy.kinds)
        parts = tuple(replace(p, verifier=self.participant) for p in parts)
        if len(parts) == 1:
            return parts[0]
        failed = [p for p in parts if not p.passed]
        return AttestationResult(
            participant=peer,
            kind="+".join(policy.kinds),
            verdict=Verdict.FAIL if failed else Verdict.PASS,
            reason="; ".join(f"{p.kind}: {p.reason}" for p in (failed or parts)),
            measurement=",".join(f"{p.kind}={p.measurement}" for p in parts),
            nonce=bundle.nonce,
            time=utc_iso(self._clock()),
            verifier=self.participant,
            parts=parts,
        )

    def _check_kind(
        self, peer: str, bundle: EvidenceBundle, kind: str, policy: PeerPolicy
    ) -> AttestationResult:
        item = bundle.item(kind)
        verifier = self._verifiers.get(kind)
        if item is None:
            reason = f"{peer} sent no {kind} evidence, which policy requires"
        elif verifier is None:
            reason = f"this participant has no {kind} verifier configured"
        else:
            return verifier.verify(
                evidence=item, nonce=bundle.nonce, policy=policy.for_kind(kind), participant=peer
            )
        return AttestationResult.failed(
            participant=peer, kinds=(kind,), reason=reason, nonce=bundle.nonce, at=self._clock()
        )

    def _fail(self, peer: str, nonce: str, reason: str) -> AttestationResult:
        return AttestationResult.failed(
            participant=peer or "unknown",
            kinds=self.required_kinds(peer),
            reason=reason,
            nonce=nonce,
            at=self._clock(),
            verifier=self.participant,
        )


__all__ = ["HARDWARE_KINDS", "AttestationService"]
