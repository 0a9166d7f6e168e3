"""The verifier interface: one class per TEE kind, NVFlare-style.

A ``TEEVerifier`` both produces evidence for its own participant
(``generate_evidence``) and checks a peer's evidence (``verify``). Subclasses
implement two hooks: ``_generate_body`` (read the TEE, bind the nonce) and
``_claims`` (check signatures and nonce binding, return what the evidence
proves). The checks every kind shares run here: the nonce, the age, debug mode,
the measurement allow-list and the minimum TCB versions.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar

from zenfed.attestation.policy import KindPolicy
from zenfed.attestation.records import (
    AttestationResult,
    AttestationUnavailable,
    Evidence,
    EvidenceRejected,
    Verdict,
    utc_iso,
)

CLOCK_SKEW_S = 30.0


@dataclass(frozen=True)
class Claims:
    """What verified evidence says about the attester."""

    measurement: str
    issued_at: float
    debug: bool
    tcb: Mapping[str, int] = field(default_factory=dict)


def report_data(*, kind: str, participant: str, nonce: str) -> bytes:
    """Return the 64 bytes a hardware report carries to bind the nonce and participant."""
    return hashlib.sha512(f"zenfed/1\0{kind}\0{participant}\0{nonce}".encode()).digest()


class TEEVerifier(ABC):
    """Produces and verifies evidence of one TEE kind.

    Args:
        participant: This participant's provisioned name (whose evidence it generates).
        clock: Returns the current time in seconds (injectable for tests).

    """

    kind: ClassVar[str]

    def __init__(self, *, participant: str, clock: Callable[[], float] = time.time) -> None:
        self.participant = participant
        self._clock = clock

    def generate_evidence(self, *, nonce: str) -> Evidence:
        """Return evidence of this TEE, bound to ``nonce``.

        Raises:
            AttestationUnavailable: If this machine cannot produce evidence of this kind;
                the message says what is missing.

        """
        if not nonce:
            raise AttestationUnavailable("cannot attest without a nonce; ask the verifier for one")
        issued_at = self._clock()
        body = self._generate_body(nonce=nonce, issued_at=issued_at)
        return Evidence(self.kind, self.participant, nonce, issued_at, body)

    def verify(
        self,
        *,
        evidence: Evidence,
        nonce: str,
        policy: KindPolicy,
        participant: str | None = None,
    ) -> AttestationResult:
        """Check ``evidence`` against ``nonce`` and ``policy``; never raises for bad evidence.

        Args:
            evidence: The peer's evidence of this kind.
            nonce: The nonce this verifier expects the evidence to carry.
            policy: What this verifier accepts from the peer for this kind.
            participant: The peer expected; the evidence must name it. None accepts
                the name in the evidence (still bound by the kind's own checks).

        Returns:
            A PASS record, or a FAIL record whose reason says what was wrong.

        """
        who = participant or evidence.participant
        measurement = ""
        try:
            if evidence.kind != self.kind:
                raise EvidenceRejected(f"evidence is of kind {evidence.kind!r}, not {self.kind!r}")
            if participant is not None and evidence.participant != participant:
                raise EvidenceRejected(
                    f"evidence names participant {evidence.participant!r}, expected {participant!r}"
                )
            if not hmac.compare_digest(evidence.nonce.encode(), nonce.encode()):
                raise EvidenceRejected("evidence carries another nonce than the one issued")
            if evidence.error:
                raise EvidenceRejected(
                    f"{who} could not produce {self.kind} evidence: {evidence.error}"
                )
            claims = self._claims(evidence=evidence, nonce=nonce)
            measurement = claims.measurement
            self._check_policy(claims, policy, who)
        except EvidenceRejected as err:
            return self._result(who, Verdict.FAIL, str(err), measurement, nonce)
        except Exception as err:  # noqa: BLE001 - a verifier bug must fail closed, not pass
            reason = f"{self.kind} verification failed unexpectedly: {type(err).__name__}: {err}"
            return self._result(who, Verdict.FAIL, reason, measurement, nonce)
        reason = f"{self.kind} evidence verified: measurement accepted, fresh nonce, debug off"
        if claims.debug:
            reason = f"{self.kind} evidence verified (debug mode allowed by policy)"
        return self._result(who, Verdict.PASS, reason, measurement, nonce)

    def _result(
        self, who: str, verdict: Verdict, reason: str, measurement: str, nonce: str
    ) -> AttestationResult:
        return AttestationResult(
            participant=who,
            kind=self.kind,
            verdict=verdict,
            reason=reason,
            measurement=measurement,
            nonce=nonce,
            time=utc_iso(self._clock()),
        )

    def _check_policy(self, claims: Claims, policy: KindPolicy, who: str) -> None:
        now = self._clock()
        age = now - claims.issued_at
        if age > policy.max_evidence_age_s:
            raise EvidenceRejected(
                f"evidence expired: issued {age:.1f} s ago, policy accepts at most "
                f"{policy.max_evidence_age_s:.0f} s; ask for fresh evidence"
            )
        if age < -CLOCK_SKEW_S:
            raise EvidenceRejected(
                f"evidence is dated {-age:.1f} s in the future; check the clocks of {who} and "
                "this verifier"
            )
        if claims.debug and not policy.allow_debug:
            raise EvidenceRejected(
                f"{who} runs its {self.kind} TEE in debug mode, which exposes its memory; "
                "policy requires debug off"
            )
        if not policy.allowed_measurements:
            raise EvidenceRejected(
                f"policy accepts no {self.kind} measurement for {who}; add the expected "
                "measurement to the attestation policy (re-provision)"
            )
        if claims.measurement not in policy.allowed_measurements:
            raise EvidenceRejected(
                f"measurement {claims.measurement[:16]}... of {who} is not among the "
                f"{len(policy.allowed_measurements)} accepted: its code or configuration differs "
                "from what was provisioned; reinstall the pinned zenfed and restore the kit's "
                "configuration, or re-provision to accept the new measurement"
            )
        for component, minimum in sorted(policy.min_tcb.items()):
            value = claims.tcb.get(component)
            if value is None:
                raise EvidenceRejected(f"evidence reports no TCB component {component!r}")
            if value < minimum:
                raise EvidenceRejected(
                    f"TCB component {component!r} of {who} is at version {value}, below the "
                    f"minimum {minimum}; update the platform firmware"
                )

    @abstractmethod
    def _generate_body(self, *, nonce: str, issued_at: float) -> dict[str, Any]:
        """Read the TEE and return the kind-specific evidence body bound to ``nonce``."""

    @abstractmethod
    def _claims(self, *, evidence: Evidence, nonce: str) -> Claims:
        """Verify signatures and the nonce binding; return the claims or raise EvidenceRejected."""


class HardwareReportTEE(TEEVerifier):
    """A kind whose evidence is one base64 hardware report binding :func:`report_data`.

    SEV-SNP reports and TDX quotes are checked the same way: decode the report,
    read its fields, check that it carries this nonce and participant, then have
    the vendor's tooling check its signature. Subclasses name the report and
    implement ``_parse`` and ``_verify_report``.
    """

    label: ClassVar[str]
    """The kind as people write it, e.g. "SEV-SNP"."""
    report_field: ClassVar[str]
    """The evidence body's key of the base64 report, and what the report is called."""
    report_data_field: ClassVar[str]
    """The vendor's name of the 64-byte field that carries :func:`report_data`."""

    def _claims(self, *, evidence: Evidence, nonce: str) -> Claims:
        encoded = evidence.body.get(self.report_field)
        if not isinstance(encoded, str):
            raise EvidenceRejected(f"{self.label} evidence has no base64 '{self.report_field}'")
        try:
            raw = base64.b64decode(encoded, validate=True)
        except ValueError:
            raise EvidenceRejected(
                f"{self.label} evidence '{self.report_field}' is not base64"
            ) from None
        fields = self._parse(raw)
        expected = report_data(kind=self.kind, participant=evidence.participant, nonce=nonce)
        if not hmac.compare_digest(fields["report_data"], expected):
            raise EvidenceRejected(
                f"the {self.label} {self.report_field} does not carry this nonce and participant "
                f"in {self.report_data_field} (a replayed or foreign {self.report_field})"
            )
        self._verify_report(raw, fields)
        return Claims(
            measurement=fields["measurement"],
            issued_at=evidence.issued_at,
            debug=fields["debug"],
            tcb=fields["tcb"],
        )

    @abstractmethod
    def _parse(self, raw: bytes) -> dict[str, Any]:
        """Read report_data, measurement, debug and tcb from the raw report; EvidenceRejected if malformed."""

    @abstractmethod
    def _verify_report(self, raw: bytes, fields: dict[str, Any]) -> None:
        """Check the report's signature with the vendor's tooling; EvidenceRejected if it fails."""
