"""The per-job attestation exchange, as plain JSON messages (no FLARE, no pickle).

One exchange, server S and sites A, B::

    S -> all:  Challenge {round, nonces: {A: nA, B: nB}}          (task data)
    A -> S:    Answer {site: A, evidence: E_A(nA), server_nonce: mA}   (task result)
    S -> all:  {A: E_S(mA), B: E_S(mB)}                             (next task's data)

Every nonce is issued by the verifier and accepted once, so evidence cannot be
replayed; a site's evidence proves the site to the server, the server's evidence
for the site's own nonce proves the server to that site (mutual attestation).
Evidence travels as the UTF-8 JSON text of an ``EvidenceBundle``.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from zenfed.attestation.records import (
    MAX_EVIDENCE_BYTES,
    AttestationResult,
    EvidenceRejected,
)

CHALLENGE_FORMAT = "zenfed-attest-challenge/1"
ANSWER_FORMAT = "zenfed-attest-answer/1"


def nonce_sha256(nonce: str) -> str:
    """Return the SHA-256 hex of a nonce (what the audit log records)."""
    return hashlib.sha256(nonce.encode()).hexdigest()


@dataclass(frozen=True)
class Challenge:
    """The server's request for evidence: one fresh nonce per site.

    Attributes:
        round: The round this attestation gates (1 before the first round).
        nonces: Site name -> the nonce the server issued for it.

    """

    round: int
    nonces: Mapping[str, str] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """Return the JSON-able task data."""
        return {"format": CHALLENGE_FORMAT, "round": self.round, "nonces": dict(self.nonces)}

    @classmethod
    def from_dict(cls, data: Any) -> Challenge:
        """Parse task data, raising EvidenceRejected with the reason if malformed."""
        if not isinstance(data, Mapping) or data.get("format") != CHALLENGE_FORMAT:
            raise EvidenceRejected(
                f"the attestation challenge is not in format {CHALLENGE_FORMAT!r}; "
                "the server and this site run different zenfed versions"
            )
        rnd, nonces = data.get("round"), data.get("nonces")
        if isinstance(rnd, bool) or not isinstance(rnd, int) or not isinstance(nonces, Mapping):
            raise EvidenceRejected("the attestation challenge lacks an integer round or its nonces")
        for site, nonce in nonces.items():
            if not isinstance(site, str) or not isinstance(nonce, str) or not nonce:
                raise EvidenceRejected("the attestation challenge holds a malformed nonce")
        return cls(round=rnd, nonces=dict(nonces))


@dataclass(frozen=True)
class Answer:
    """A site's answer to a challenge: its evidence, and a nonce for the server to answer.

    Attributes:
        site: The answering site.
        evidence: The site's evidence bundle (UTF-8 JSON bytes) for its nonce.
        server_nonce: A fresh nonce the site issued for the server ("" if none).

    """

    site: str
    evidence: bytes
    server_nonce: str = ""

    def to_dict(self) -> dict[str, Any]:
        """Return the JSON-able task result."""
        return {
            "format": ANSWER_FORMAT,
            "site": self.site,
            "evidence": self.evidence.decode("utf-8"),
            "server_nonce": self.server_nonce,
        }

    @classmethod
    def from_dict(cls, data: Any) -> Answer:
        """Parse a task result, raising EvidenceRejected with the reason if malformed."""
        if not isinstance(data, Mapping) or data.get("format") != ANSWER_FORMAT:
            raise EvidenceRejected(f"the attestation answer is not in format {ANSWER_FORMAT!r}")
        site, evidence, server_nonce = (
            data.get("site"),
            data.get("evidence"),
            data.get("server_nonce", ""),
        )
        if not isinstance(site, str) or not site:
            raise EvidenceRejected("the attestation answer names no site")
        if not isinstance(evidence, str) or not evidence:
            raise EvidenceRejected(f"the attestation answer of {site} carries no evidence text")
        if len(evidence) > MAX_EVIDENCE_BYTES:
            raise EvidenceRejected(f"the evidence of {site} is over {MAX_EVIDENCE_BYTES} bytes")
        if not isinstance(server_nonce, str):
            raise EvidenceRejected(f"the attestation answer of {site} has a malformed server_nonce")
        return cls(site=site, evidence=evidence.encode("utf-8"), server_nonce=server_nonce)


def evidence_nonce(evidence: bytes) -> str:
    """Return the nonce an evidence bundle claims to answer, without verifying anything.

    Raises:
        EvidenceRejected: If the bytes are not an evidence bundle with a nonce.

    """
    try:
        data = json.loads(evidence.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise EvidenceRejected("evidence is not UTF-8 JSON") from None
    nonce = data.get("nonce") if isinstance(data, dict) else None
    if not isinstance(nonce, str) or not nonce:
        raise EvidenceRejected("evidence names no nonce")
    return nonce


def audit_fields(result: AttestationResult, **extra: Any) -> dict[str, Any]:
    """Return the fields of an ``attestation`` audit record for ``result``.

    The nonce is recorded by its SHA-256 (``nonce_sha256``); ``extra`` adds context
    such as the round and the decision taken.
    """
    fields: dict[str, Any] = {
        "peer": result.participant,
        "tee_kind": result.kind,
        "verdict": result.verdict.value,
        "nonce_sha256": nonce_sha256(result.nonce) if result.nonce else "",
        "reason": result.reason[:1000],
        "measurement": result.measurement,
        "verifier": result.verifier,
        "checked_at": result.time,
    }
    fields.update(extra)
    return fields


__all__ = [
    "ANSWER_FORMAT",
    "CHALLENGE_FORMAT",
    "Answer",
    "Challenge",
    "audit_fields",
    "evidence_nonce",
    "nonce_sha256",
]
