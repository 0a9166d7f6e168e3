"""Plain records of attestation: evidence as it travels, results as they are audited.

Everything here is JSON: evidence crosses the network as UTF-8 JSON bytes (never
pickle), and an ``AttestationResult`` is a frozen record whose ``to_dict`` is what
the audit log stores.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from enum import StrEnum
from typing import Any

from zenfed.errors import ZenfedError

EVIDENCE_FORMAT = "zenfed-evidence/1"
MAX_EVIDENCE_BYTES = 4 * 1024 * 1024


class AttestationError(ZenfedError):
    """Attestation cannot be set up or run (missing key, policy or configuration)."""


class AttestationUnavailable(AttestationError):
    """The local machine cannot produce evidence of a TEE kind (no hardware, tool or SDK)."""


class EvidenceRejected(ZenfedError):
    """Evidence failed a check; the message is the reason recorded in the result."""


class Verdict(StrEnum):
    """Outcome of one verification."""

    PASS = "pass"
    FAIL = "fail"


def utc_iso(timestamp: float) -> str:
    """Return ``timestamp`` (seconds since the epoch) as an ISO-8601 UTC string."""
    return datetime.fromtimestamp(timestamp, tz=UTC).isoformat(timespec="milliseconds")


@dataclass(frozen=True)
class AttestationResult:
    """What one verification decided, for the audit log.

    Attributes:
        participant: Who was attested (the peer whose evidence was checked).
        kind: TEE kind, e.g. "emulated"; several kinds are joined with "+".
        verdict: PASS or FAIL.
        reason: Why; for a failure, what was wrong and what to do.
        measurement: The measurement the evidence reported, "" if none was read.
        nonce: The nonce the evidence had to carry, "" if none could be read.
        time: When the verification ran, ISO-8601 UTC.
        verifier: Who verified (this participant's name), "" if unknown.
        parts: Per-kind results when several kinds were required.

    """

    participant: str
    kind: str
    verdict: Verdict
    reason: str
    measurement: str = ""
    nonce: str = ""
    time: str = ""
    verifier: str = ""
    parts: tuple[AttestationResult, ...] = field(default=())

    @property
    def passed(self) -> bool:
        """True if the verdict is PASS."""
        return self.verdict is Verdict.PASS

    def to_dict(self) -> dict[str, Any]:
        """Return the record as a JSON-able dict (the audit-log form)."""
        out: dict[str, Any] = {
            "participant": self.participant,
            "kind": self.kind,
            "verdict": self.verdict.value,
            "reason": self.reason,
            "measurement": self.measurement,
            "nonce": self.nonce,
            "time": self.time,
            "verifier": self.verifier,
        }
        if self.parts:
            out["parts"] = [p.to_dict() for p in self.parts]
        return out

    @classmethod
    def failed(
        cls,
        *,
        participant: str,
        kinds: Sequence[str],
        reason: str,
        nonce: str,
        at: float,
        verifier: str = "",
    ) -> AttestationResult:
        """Return a FAIL record for a check that failed before any evidence was verified.

        Args:
            participant: Who was to be attested.
            kinds: The TEE kinds required of it; none gives the kind "unknown".
            reason: What was wrong and what to do.
            nonce: The nonce the evidence had to carry, "" if none.
            at: When, in seconds since the epoch.
            verifier: Who verified, "" if unknown.

        """
        return cls(
            participant=participant,
            kind="+".join(kinds) or "unknown",
            verdict=Verdict.FAIL,
            reason=reason,
            nonce=nonce,
            time=utc_iso(at),
            verifier=verifier,
        )

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> AttestationResult:
        """Rebuild a record from ``to_dict`` output."""
        return cls(
            participant=str(data["participant"]),
            kind=str(data["kind"]),
            verdict=Verdict(data["verdict"]),
            reason=str(data["reason"]),
            measurement=str(data.get("measurement", "")),
            nonce=str(data.get("nonce", "")),
            time=str(data.get("time", "")),
            verifier=str(data.get("verifier", "")),
            parts=tuple(cls.from_dict(p) for p in data.get("parts", ())),
        )

    def to_json(self) -> str:
        """Return the record as canonical JSON text."""
        return json.dumps(self.to_dict(), sort_keys=True, separators=(",", ":"))


@dataclass(frozen=True)
class Evidence:
    """Evidence of one TEE kind, bound to a nonce.

    ``body`` is kind-specific JSON (a signed payload, a base64 report, a token).
    ``error`` is set instead of ``body`` when the attester could not produce this
    kind; the verifier records that reason as a failure.
    """

    kind: str
    participant: str
    nonce: str
    issued_at: float
    body: Mapping[str, Any] = field(default_factory=dict)
    error: str = ""

    def to_dict(self) -> dict[str, Any]:
        """Return the JSON-able form."""
        out: dict[str, Any] = {
            "kind": self.kind,
            "participant": self.participant,
            "nonce": self.nonce,
            "issued_at": self.issued_at,
        }
        if self.error:
            out["error"] = self.error
        else:
            out["body"] = dict(self.body)
        return out

    @classmethod
    def from_dict(cls, data: Any) -> Evidence:
        """Parse one evidence item, raising EvidenceRejected if it is malformed."""
        if not isinstance(data, dict):
            raise EvidenceRejected("an evidence item is not a JSON object")
        kind = _str_field(data, "kind")
        participant = _str_field(data, "participant")
        nonce = _str_field(data, "nonce")
        issued_at = data.get("issued_at")
        if isinstance(issued_at, bool) or not isinstance(issued_at, int | float):
            raise EvidenceRejected(f"evidence of kind {kind!r} has no numeric 'issued_at'")
        error = data.get("error", "")
        body = data.get("body", {})
        if not isinstance(error, str) or not isinstance(body, dict):
            raise EvidenceRejected(f"evidence of kind {kind!r} has a malformed 'body' or 'error'")
        if not error and not body:
            raise EvidenceRejected(f"evidence of kind {kind!r} has neither 'body' nor 'error'")
        return cls(kind, participant, nonce, float(issued_at), body, error)


@dataclass(frozen=True)
class EvidenceBundle:
    """All evidence one participant sends for one nonce: the bytes on the wire."""

    participant: str
    nonce: str
    items: tuple[Evidence, ...]

    def item(self, kind: str) -> Evidence | None:
        """Return the evidence of ``kind``, or None if the bundle has none."""
        return next((e for e in self.items if e.kind == kind), None)

    def to_bytes(self) -> bytes:
        """Serialise as UTF-8 JSON."""
        data = {
            "format": EVIDENCE_FORMAT,
            "participant": self.participant,
            "nonce": self.nonce,
            "evidence": [e.to_dict() for e in self.items],
        }
        return json.dumps(data, sort_keys=True, separators=(",", ":")).encode()

    @classmethod
    def from_bytes(cls, raw: bytes) -> EvidenceBundle:
        """Parse wire bytes, raising EvidenceRejected with the reason if malformed."""
        if not isinstance(raw, bytes | bytearray):
            raise EvidenceRejected(f"evidence must be bytes, got {type(raw).__name__}")
        if len(raw) > MAX_EVIDENCE_BYTES:
            raise EvidenceRejected(f"evidence is {len(raw)} bytes, over {MAX_EVIDENCE_BYTES}")
        try:
            data = json.loads(bytes(raw).decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as err:
            raise EvidenceRejected(f"evidence is not UTF-8 JSON: {err}") from None
        if not isinstance(data, dict) or data.get("format") != EVIDENCE_FORMAT:
            raise EvidenceRejected(f"evidence is not in format {EVIDENCE_FORMAT!r}")
        participant = _str_field(data, "participant")
        nonce = _str_field(data, "nonce")
        items = data.get("evidence")
        if not isinstance(items, list) or not items:
            raise EvidenceRejected("evidence bundle holds no evidence items")
        parsed = tuple(Evidence.from_dict(i) for i in items)
        for item in parsed:
            if item.participant != participant or item.nonce != nonce:
                raise EvidenceRejected(
                    f"evidence item of kind {item.kind!r} names another participant or nonce "
                    "than its bundle"
                )
        return cls(participant, nonce, parsed)


def _str_field(data: Mapping[str, Any], key: str) -> str:
    value = data.get(key)
    if not isinstance(value, str) or not value:
        raise EvidenceRejected(f"evidence has no string field {key!r}")
    return value
