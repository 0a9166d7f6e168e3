"""The append-only, hash-chained, signed audit log of one participant.

One JSON-lines file per participant. Each line is the canonical JSON of a record:

    {"v": 1, "seq": 0, "time": "...Z", "participant": "site-1", "event": "kit_identity",
     "fields": {...}, "prev": "<sha256 of the previous line>", "cert_sha256": "...",
     "sig_alg": "rsa-pss-sha256", "sig": "<base64>"}

``sig`` signs the canonical JSON of every other key, with the participant's
provisioned private key. ``prev`` chains each record to the exact bytes of the line
before it (the first record uses a fixed genesis value), so an edit, deletion,
insertion or reordering breaks the chain or a signature. A new log starts with a
``kit_identity`` record that embeds the signer's certificate, so the log can be
verified on its own against the project's root CA.
"""

from __future__ import annotations

import fcntl
import json
import os
import re
import threading
from collections.abc import Mapping
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import zenfed
from zenfed import signing
from zenfed.atomic import fsync_dir
from zenfed.audit import crypto, events
from zenfed.audit.errors import AuditError
from zenfed.audit.fields import clean_fields
from zenfed.digest import sha256_hex

RECORD_VERSION = 1
_PARTICIPANT = re.compile(r"^[A-Za-z0-9][A-Za-z0-9@._-]{0,127}$")
_TAIL_WINDOW = 1 << 18  # bytes read from the end to find the last record


class AuditLog:
    """Append-only, hash-chained, signed JSON-lines log of one participant.

    Create with :meth:`open` or :meth:`for_kit`. Safe to share between threads, and
    between processes on one machine (appends take an exclusive ``flock``).
    """

    def __init__(
        self,
        *,
        path: Path,
        participant: str,
        private_key: Any,
        cert: Any,
        scheme: str,
        role: str | None,
    ) -> None:
        self._path = path
        self._participant = participant
        self._key = private_key
        self._cert = cert
        self._cert_sha256 = crypto.cert_fingerprint(cert)
        self._scheme = scheme
        self._role = role
        self._lock = threading.Lock()
        self._fd: int | None = None
        self._size = 0
        self._next_seq = 0
        self._prev = crypto.GENESIS

    # ------------------------------------------------------------------ opening
    @classmethod
    def open(
        cls,
        path: Path,
        *,
        participant: str,
        key_path: Path,
        cert_path: Path,
        scheme: str | None = None,
        role: str | None = None,
    ) -> AuditLog:
        """Open (or create) the log at ``path`` for appending.

        A new log gets a ``kit_identity`` record first. An existing log resumes its
        chain; a partial last line left by a crash is moved to
        ``PATH.corrupt-TIMESTAMP`` (never deleted) and a ``log_recovered`` record says so.

        Args:
            path: the JSON-lines file; parent folders are created.
            participant: the participant's name as provisioned (e.g. ``site-1``).
            key_path: the participant's PEM private key (``startup/client.key``).
            cert_path: the matching certificate (``startup/client.crt``).
            scheme: signature scheme; by default RSA-PSS for RSA keys, ECDSA for EC keys.
                ``crypto.RSA_PKCS1V15`` is also accepted for RSA.
            role: ``server``, ``client`` or ``admin``, written into ``kit_identity``.

        Raises:
            AuditError: the key and certificate do not match, the file belongs to another
                participant or certificate, or its last record is damaged.

        """
        if not isinstance(participant, str) or not _PARTICIPANT.match(participant):
            raise AuditError(
                f"participant {participant!r} is not a provisioned name; use letters, digits, "
                "and . _ - @ (e.g. 'site-1')"
            )
        key = crypto.load_private_key(key_path)
        cert = crypto.load_cert(cert_path)
        if not signing.keys_match(key, cert):
            raise AuditError(
                f"private key {key_path} does not belong to certificate {cert_path}; use the "
                "pair from the same startup kit"
            )
        scheme = scheme or crypto.default_scheme(key)
        crypto.check_scheme(key, scheme)
        log = cls(path=Path(path), participant=participant, private_key=key, cert=cert,
                  scheme=scheme, role=role)
        log._open_file()
        return log

    @classmethod
    def for_kit(
        cls,
        startup_dir: Path,
        *,
        log_path: Path,
        participant: str | None = None,
        scheme: str | None = None,
    ) -> AuditLog:
        """Open a log signed with the key and certificate of a provisioned FLARE kit.

        Args:
            startup_dir: the kit's ``startup`` folder (or the kit folder holding it).
            log_path: where the log lives.
            participant: the participant's name; by default the certificate's common name.
            scheme: see :meth:`open`.

        """
        startup = Path(startup_dir)
        if (startup / "startup").is_dir():
            startup = startup / "startup"
        for stem in ("server", "client"):
            key_path, cert_path = startup / f"{stem}.key", startup / f"{stem}.crt"
            if key_path.is_file() and cert_path.is_file():
                break
        else:
            raise AuditError(
                f"no server.key/server.crt or client.key/client.crt in {startup}; pass the "
                "'startup' folder of a provisioned kit"
            )
        # Client and admin kits both hold client.key; only a client kit has fed_client.json.
        if stem == "server":
            role = "server"
        else:
            role = "client" if (startup / "fed_client.json").is_file() else "admin"
        if participant is None:
            participant = crypto.common_name(crypto.load_cert(cert_path).subject)
        return cls.open(log_path, participant=participant, key_path=key_path,
                        cert_path=cert_path, scheme=scheme, role=role)

    def _open_file(self) -> None:
        self._path.parent.mkdir(parents=True, exist_ok=True)
        new = not self._path.exists()
        self._fd = os.open(self._path, os.O_RDWR | os.O_CREAT | os.O_APPEND, 0o640)
        if new:
            fsync_dir(self._path.parent)
        with self._lock, _Flock(self._fd):
            self._sync_head()

    # ------------------------------------------------------------------ properties
    @property
    def path(self) -> Path:
        """The log file."""
        return self._path

    @property
    def participant(self) -> str:
        """The participant whose key signs this log."""
        return self._participant

    @property
    def cert_sha256(self) -> str:
        """SHA-256 fingerprint of the signing certificate."""
        return self._cert_sha256

    @property
    def head(self) -> tuple[int, str]:
        """``(seq, sha256)`` of the last record written, for anchoring in another log."""
        with self._lock:
            return self._next_seq - 1, self._prev

    # ------------------------------------------------------------------ writing
    def append(self, event: str, **fields: Any) -> dict[str, Any]:
        """Append one signed record and return it.

        The record is on disk (flushed and fsync'd) when this returns.

        Args:
            event: one of the names in :mod:`zenfed.audit.events`.
            **fields: small plain-JSON facts (hashes, sizes, names, metrics).

        Raises:
            AuditError: unknown event, a field that looks like a secret or bulk data, or
                the log is closed.

        """
        if event not in events.ALL_EVENTS:
            raise AuditError(
                f"unknown audit event {event!r}; use a constant from zenfed.audit.events (add "
                "new kinds there)"
            )
        clean = clean_fields(fields)
        if len(crypto.canonical(clean)) > 65536:
            raise AuditError(
                f"fields of event {event!r} exceed 64 KiB; record hashes and sizes, not content"
            )
        with self._lock:
            fd = self._require_fd()
            with _Flock(fd):
                if os.fstat(fd).st_size != self._size:
                    self._sync_head()  # another process appended since
                return self._write(event, clean)

    def _write(self, event: str, fields: dict[str, Any]) -> dict[str, Any]:
        fd = self._require_fd()
        record: dict[str, Any] = {
            "v": RECORD_VERSION,
            "seq": self._next_seq,
            "time": crypto.utc_now(),
            "participant": self._participant,
            "event": event,
            "fields": fields,
            "prev": self._prev,
            "cert_sha256": self._cert_sha256,
            "sig_alg": self._scheme,
        }
        record["sig"] = crypto.sign(self._key, self._scheme, crypto.canonical(record))
        line = crypto.canonical(record)
        _write_all(fd, line + b"\n")
        os.fsync(fd)
        self._size += len(line) + 1
        self._next_seq += 1
        self._prev = sha256_hex(line)
        return dict(record)

    def _identity_fields(self) -> dict[str, Any]:
        cert = self._cert
        return {
            "certificate_pem": crypto.cert_pem(cert),
            "cert_sha256": self._cert_sha256,
            "subject": crypto.common_name(cert.subject),
            "issuer": crypto.common_name(cert.issuer),
            "not_valid_before": cert.not_valid_before_utc.isoformat(),
            "not_valid_after": cert.not_valid_after_utc.isoformat(),
            "role": self._role,
            "sig_alg": self._scheme,
            "zenfed_version": zenfed.__version__,
        }

    # ------------------------------------------------------------------ resuming
    def _sync_head(self) -> None:
        """Read the last record to resume the chain; move a partial tail aside first."""
        fd = self._require_fd()
        size = os.fstat(fd).st_size
        start = max(0, size - _TAIL_WINDOW)
        data = os.pread(fd, size - start, start)
        if start and data.count(b"\n") < 2:  # the window may not hold one whole line
            start, data = 0, os.pread(fd, size, 0)
        recovered = None
        if data and not data.endswith(b"\n"):
            cut = data.rfind(b"\n") + 1
            recovered = self._move_aside(data[cut:], start + cut)
            data, size = data[:cut], start + cut
        self._size = size
        body = data[:-1]
        last = body[body.rfind(b"\n") + 1:]
        if last:
            self._resume_from(last)
        elif size:
            raise AuditError(
                f"{self._path} ends with an empty line, which this writer never produces; run "
                f"'zenfed audit verify {self._path}', keep the file as evidence, start a new one"
            )
        else:
            self._next_seq, self._prev = 0, crypto.GENESIS
            self._write(events.KIT_IDENTITY, self._identity_fields())
        if recovered is not None:
            self._write(events.LOG_RECOVERED, recovered)

    def _resume_from(self, line: bytes) -> None:
        try:
            record = json.loads(line)
            seq = int(record["seq"])
            participant, cert_sha = record["participant"], record["cert_sha256"]
        except (ValueError, KeyError, TypeError) as exc:
            raise AuditError(
                f"the last record of {self._path} is damaged ({exc}); run 'zenfed audit verify "
                f"{self._path}' and keep that file as evidence; start a new log file"
            ) from exc
        if participant != self._participant:
            raise AuditError(
                f"{self._path} is the log of {participant!r}, not {self._participant!r}; use "
                "one log file per participant"
            )
        if cert_sha != self._cert_sha256:
            raise AuditError(
                f"{self._path} was signed with certificate {cert_sha[:16]}..., not with "
                f"{self._cert_sha256[:16]}...; a new kit starts a new log file"
            )
        self._next_seq, self._prev = seq + 1, sha256_hex(line)

    def _move_aside(self, tail: bytes, keep: int) -> dict[str, Any]:
        fd = self._require_fd()
        stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%S%fZ")
        target = self._path.with_name(f"{self._path.name}.corrupt-{stamp}")
        with open(target, "xb") as out:
            out.write(tail)
            out.flush()
            os.fsync(out.fileno())
        fsync_dir(target.parent)
        os.ftruncate(fd, keep)
        os.fsync(fd)
        return {"moved_to": target.name, "bytes": len(tail), "sha256": sha256_hex(tail),
                "reason": "partial last line (a crash during a write)"}

    def _require_fd(self) -> int:
        if self._fd is None:
            raise AuditError(f"audit log {self._path} is closed; open it again to append")
        return self._fd

    # ------------------------------------------------------------------ closing
    def close(self) -> None:
        """Close the file; further appends raise AuditError."""
        with self._lock:
            if self._fd is not None:
                os.close(self._fd)
                self._fd = None

    def __enter__(self) -> AuditLog:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class _Flock:
    """Exclusive advisory lock on an open file, so processes do not interleave appends."""

    def __init__(self, fd: int) -> None:
        self._fd = fd

    def __enter__(self) -> None:
        fcntl.flock(self._fd, fcntl.LOCK_EX)

    def __exit__(self, *exc: object) -> None:
        fcntl.flock(self._fd, fcntl.LOCK_UN)


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        written = os.write(fd, view)
        view = view[written:]


def read_records(path: Path) -> list[dict[str, Any]]:
    """Return the records of a log that parse as JSON, in file order, without verifying them.

    Use :func:`zenfed.audit.verify.verify_log` to know whether they can be trusted.
    """
    out = []
    for line in Path(path).read_bytes().split(b"\n"):
        if line.strip():
            try:
                record = json.loads(line)
            except ValueError:
                continue
            if isinstance(record, Mapping):
                out.append(dict(record))
    return out
