"""Verification of one participant's log: chain, signatures, certificate, and the kind of damage.

How the kinds of damage are told apart, walking the lines in order with the
expected ``seq`` and the hash of the last good line (see docs/audit.md):

* a partial last line (no newline at the end of the file): ``truncated``;
* a line whose signature does not verify, or that is not a record at all, while
  the *next* line chains to the line before it: ``inserted`` (an extra line);
* a signature that fails because a *different key* made it (another project
  certificate verifies it, the record names another certificate, or for RSA the
  signature does not even decode under this certificate's key): ``wrong key``;
* any other failing signature, or a line not in canonical form: ``edited``;
* a genuine record whose ``seq`` is ahead of the expected one: ``reordered`` if the
  skipped numbers appear later in the file, otherwise ``deleted``;
* a genuine record whose ``seq`` was already used: ``inserted`` (a replayed copy);
* the signing certificate not issued by the project's root CA: ``foreign certificate``.

Records cut from the *end* of a log leave no gap in it; ``verify_result`` catches
them with the server's ``log_anchored`` records and the update cross-check.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import Any, cast

from cryptography import x509

from zenfed.audit import crypto, events
from zenfed.audit.errors import AuditError
from zenfed.digest import sha256_hex

_RECORD_KEYS = frozenset(
    {"v", "seq", "time", "participant", "event", "fields", "prev", "cert_sha256", "sig_alg", "sig"}
)


class Damage(StrEnum):
    """Kinds of damage the verifier names."""

    EDITED = "edited"
    DELETED = "deleted"
    INSERTED = "inserted"
    REORDERED = "reordered"
    TRUNCATED = "truncated"
    WRONG_KEY = "wrong key"
    FOREIGN_CERTIFICATE = "foreign certificate"


@dataclass(frozen=True)
class BadRecord:
    """The first record that fails verification."""

    line: int
    """1-based line number in the file."""
    seq: int | None
    """The sequence number the line claims, if it could be read."""
    kind: Damage
    detail: str


@dataclass(frozen=True)
class LogVerdict:
    """What verifying one log found."""

    path: Path
    participant: str | None
    lines: int
    """Lines in the file (a partial last line counts)."""
    intact: int
    """Records verified before the first bad one."""
    cert_sha256: str | None
    cert_subject: str | None
    cert_issuer: str | None
    role: str | None
    first_bad: BadRecord | None
    seq_hashes: tuple[str, ...] = field(default=(), repr=False)
    """SHA-256 of each intact record's line, indexed by seq."""

    @property
    def ok(self) -> bool:
        """True if every record verified."""
        return self.first_bad is None

    def describe(self) -> str:
        """One human sentence about this log."""
        who = f"{self.participant or '?'} (cert {(self.cert_sha256 or '?')[:16]}...)"
        if self.first_bad is None:
            return f"INTACT: {self.intact} records signed by {who}, issued by {self.cert_issuer}"
        bad = self.first_bad
        seq = "" if bad.seq is None else f" (seq {bad.seq})"
        return (
            f"DAMAGED: first bad record at line {bad.line}{seq}: {bad.kind.value}: {bad.detail}. "
            f"{self.intact} records before it verified, signed by {who}"
        )


def embedded_cert(path: Path) -> x509.Certificate | None:
    """Return the certificate embedded in a log's ``kit_identity`` record, if any."""
    try:
        with open(path, "rb") as fh:
            for raw in fh:
                record = _parse(raw.rstrip(b"\n"))
                if record is not None and record["event"] == events.KIT_IDENTITY:
                    pem = record["fields"].get("certificate_pem")
                    return crypto.cert_from_pem(pem) if isinstance(pem, str) else None
    except (OSError, AuditError):
        return None
    return None


def verify_log(
    path: Path,
    *,
    root_ca_path: Path,
    cert_path: Path | None = None,
    other_certs: Mapping[str, x509.Certificate] | None = None,
) -> LogVerdict:
    """Verify one participant's log and name its first bad record.

    Args:
        path: the JSON-lines log.
        root_ca_path: the project's ``rootCA.pem``; the signing certificate must be
            issued by it.
        cert_path: the participant's certificate from its kit; by default the one
            embedded in the log's first (``kit_identity``) record.
        other_certs: certificates of the other participants, by name, to say whose
            key signed a record that this participant's key did not.

    Raises:
        AuditError: the log or the root CA cannot be read.

    """
    path = Path(path)
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise AuditError(f"cannot read audit log {path} ({exc}); check the path") from exc
    root = crypto.load_cert(root_ca_path)
    lines = raw.split(b"\n")
    partial = lines.pop() if lines else b""  # text after the last newline
    if partial:
        lines.append(partial)
    return _Walk(path, lines, bool(partial), root, cert_path, dict(other_certs or {})).run()


class _Walk:
    """One pass over a log's lines; state of the chain so far."""

    def __init__(
        self,
        path: Path,
        lines: list[bytes],
        partial_tail: bool,
        root: x509.Certificate,
        cert_path: Path | None,
        others: dict[str, x509.Certificate],
    ) -> None:
        self.path = path
        self.lines = lines
        self.partial_tail = partial_tail
        self.root = root
        self.cert_path = cert_path
        self.others = others
        self.records = [_parse(line) for line in lines]
        self.status: dict[int, tuple[str, str]] = {}
        self.cert: x509.Certificate | None = None
        self.hashes: list[str] = []
        self.identity: dict[str, Any] = {}

    # ------------------------------------------------------------------ result
    def verdict(self, bad: BadRecord | None) -> LogVerdict:
        first = self.records[0] if self.records else None
        cert = self.cert
        return LogVerdict(
            path=self.path,
            participant=first["participant"] if first else None,
            lines=len(self.lines),
            intact=len(self.hashes),
            cert_sha256=crypto.cert_fingerprint(cert) if cert else None,
            cert_subject=crypto.common_name(cert.subject) if cert else None,
            cert_issuer=crypto.common_name(cert.issuer) if cert else None,
            role=self.identity.get("role"),
            first_bad=bad,
            seq_hashes=tuple(self.hashes),
        )

    def bad(self, index: int, kind: Damage, detail: str) -> LogVerdict:
        record = self.records[index] if index < len(self.records) else None
        seq = record["seq"] if record else None
        return self.verdict(BadRecord(line=index + 1, seq=seq, kind=kind, detail=detail))

    # ------------------------------------------------------------------ walk
    def run(self) -> LogVerdict:
        if not self.lines:
            return self.bad(0, Damage.DELETED, "the log is empty: every record is missing")
        problem = self.load_cert()
        if problem is not None:
            return problem
        prev, expected = crypto.GENESIS, 0
        seen: dict[int, int] = {}
        for i, line in enumerate(self.lines):
            if self.partial_tail and i == len(self.lines) - 1:
                return self.bad(i, Damage.TRUNCATED, (
                    f"the last line is partial ({len(line)} bytes, no newline): a crash during "
                    "a write or a cut; the records before it verify"))
            state, why = self.sig_state(i)
            if state != "valid":
                if self.links(i + 1, prev, expected):
                    return self.bad(i, Damage.INSERTED, (
                        f"this line is not part of the chain ({why}); the next record "
                        "chains to the one before it"))
                kind = Damage.WRONG_KEY if state == "wrong_key" else Damage.EDITED
                return self.bad(i, kind, why)
            record = cast(dict[str, Any], self.records[i])  # 'valid' implies it parsed
            seq = record["seq"]
            if seq == expected and record["prev"] == prev:
                prev = sha256_hex(line)
                self.hashes.append(prev)
                seen[seq] = i
                expected += 1
                continue
            if seq < expected:
                twin = seen.get(seq)
                same = twin is not None and self.lines[twin] == line
                return self.bad(i, Damage.INSERTED, (
                    f"seq {seq} was already used at line {(twin or 0) + 1}"
                    + ("; this is a replayed copy" if same else
                       "; this is a second genuine record with that number, from another log")))
            if seq > expected:
                later = {r["seq"] for r in self.records[i + 1:] if r is not None}
                missing = range(expected, seq)
                span = f"{expected}" if seq - expected == 1 else f"{expected}..{seq - 1}"
                if any(m in later for m in missing):
                    return self.bad(i, Damage.REORDERED, (
                        f"seq {seq} comes where seq {expected} belongs; seq {span} appear later"))
                return self.bad(i, Damage.DELETED, f"seq {span} missing before this record")
            return self.bad(max(i - 1, 0), Damage.INSERTED, (
                "a genuine record of this participant that the next record does not chain to "
                "(spliced in from another log signed with the same key)"))
        return self.verdict(None)

    def load_cert(self) -> LogVerdict | None:
        first = self.records[0]
        if first is not None and first["event"] == events.KIT_IDENTITY:
            self.identity = dict(first["fields"])
        if self.cert_path is not None:
            self.cert = crypto.load_cert(self.cert_path)
        else:
            pem = self.identity.get("certificate_pem")
            if not isinstance(pem, str) or first is None or first["seq"] != 0:
                seq = first["seq"] if first is not None else None
                if isinstance(seq, int) and seq > 0:
                    return self.bad(0, Damage.DELETED, (
                        f"the log starts at seq {seq}: seq 0..{seq - 1}, with the kit identity "
                        "record that holds the certificate, are missing"))
                return self.bad(0, Damage.EDITED, (
                    "the first line is not the kit_identity record holding the signer's "
                    "certificate; pass the participant's certificate to check the rest"))
            try:
                self.cert = crypto.cert_from_pem(pem)
            except AuditError as exc:
                return self.bad(0, Damage.EDITED, str(exc))
        chain = crypto.check_issued_by(self.cert, self.root)
        if not chain.ok:
            return self.bad(0, Damage.FOREIGN_CERTIFICATE, (
                f"certificate '{crypto.common_name(self.cert.subject)}' "
                f"({crypto.cert_fingerprint(self.cert)[:16]}...) is {chain.reason}"))
        return None

    def links(self, index: int, prev: str, expected: int) -> bool:
        """Tell whether the record at ``index`` is genuine and continues the chain at ``prev``."""
        if index >= len(self.records) or (self.partial_tail and index == len(self.lines) - 1):
            return False
        record = self.records[index]
        return (self.sig_state(index)[0] == "valid" and record is not None
                and record["seq"] == expected and record["prev"] == prev)

    def sig_state(self, index: int) -> tuple[str, str]:
        """``('valid'|'malformed'|'edited'|'wrong_key', why)`` for the line at ``index``."""
        if index not in self.status:
            self.status[index] = self._sig_state(index)
        return self.status[index]

    def _sig_state(self, index: int) -> tuple[str, str]:
        record, line = self.records[index], self.lines[index]
        if record is None or self.cert is None:
            return "malformed", "the line is not a well-formed audit record"
        body = {k: v for k, v in record.items() if k != "sig"}
        if crypto.canonical(record) != line:
            return "edited", "the line is not in the canonical form it was written in"
        mine = crypto.cert_fingerprint(self.cert)
        public = self.cert.public_key()
        if crypto.verify_signature(public, record["sig_alg"], crypto.canonical(body),
                                   record["sig"]):
            if record["cert_sha256"] != mine:
                return "edited", "the record names another certificate than the one signing it"
            return "valid", ""
        for name, other in self.others.items():
            if crypto.verify_signature(other.public_key(), record["sig_alg"],
                                       crypto.canonical(body), record["sig"]):
                return "wrong_key", (
                    f"signed with the key of '{name}' "
                    f"(cert {crypto.cert_fingerprint(other)[:16]}...), not this participant's")
        if record["cert_sha256"] != mine:
            return "wrong_key", (
                f"names certificate {str(record['cert_sha256'])[:16]}..., not this "
                "participant's, and its signature does not verify with this participant's key")
        if crypto.made_by_key(public, record["sig_alg"], record["sig"]) is False:
            return "wrong_key", "signed with a key that is not this participant's"
        return "edited", "the signature does not match the content: changed after signing"


def _parse(line: bytes) -> dict[str, Any] | None:
    """Parse a line into a record with the expected keys and types, or None."""
    try:
        record = json.loads(line)
    except ValueError:
        return None
    if not isinstance(record, dict) or set(record) != _RECORD_KEYS:
        return None
    types = {"seq": int, "participant": str, "event": str, "fields": dict, "prev": str,
             "cert_sha256": str, "sig_alg": str, "sig": str, "time": str}
    if any(not isinstance(record[k], t) for k, t in types.items()) or isinstance(
        record["seq"], bool
    ):
        return None
    return record
