"""Verify audit logs: one log, or a whole job result with its cross-checks.

A job result (``RESULT_DIR``) holds ``audit/PARTICIPANT.jsonl`` per participant and
``audit/rootCA.pem``. Beyond each log's own chain, :func:`verify_result` checks that
every update a site says it sent, the server says it received (same round, hash
and size) and the other way round; that every site the server or the result names
has a log; that no two logs share a certificate; and that the server's
``log_anchored`` records match the site logs (records cut from a log's end).
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

from cryptography import x509

from zenfed.audit import crypto, events
from zenfed.audit.chain import BadRecord, Damage, LogVerdict, embedded_cert, verify_log
from zenfed.audit.crosscheck import (
    check_anchors,
    check_closing,
    check_globals,
    check_metrics,
    check_previous,
    cross_check,
    explains,
    sites_failed,
)
from zenfed.audit.errors import AuditError
from zenfed.audit.log import read_records

__all__ = [
    "BadRecord",
    "Damage",
    "LogVerdict",
    "ResultVerdict",
    "main_verify",
    "verify_log",
    "verify_result",
]

EXIT_INTACT, EXIT_DAMAGED, EXIT_UNVERIFIABLE = 0, 1, 2


@dataclass(frozen=True)
class ResultVerdict:
    """What verifying a job result's logs found."""

    result_dir: Path
    logs: dict[str, LogVerdict]
    """By participant name (the file stem)."""
    server: str | None
    missing_logs: list[str] = field(default_factory=list)
    """Participants named by the server log or the result that have no log file."""
    mismatches: list[str] = field(default_factory=list)
    """Updates sent but not received, or received but not sent, or with other hash/size."""
    problems: list[str] = field(default_factory=list)
    """Other findings: anchors not matched, a log under the wrong name, a shared cert."""
    matched_updates: int = 0
    explained: list[str] = field(default_factory=list)
    """Gaps the server's own log explains (a site it recorded as failed or silent): not damage."""

    @property
    def ok(self) -> bool:
        """True if every log verified and every cross-check passed."""
        return (all(v.ok for v in self.logs.values()) and not self.missing_logs
                and not self.mismatches and not self.problems)

    def describe(self) -> list[str]:
        """Human lines, one per finding."""
        out = [f"{name}: {v.describe()}" for name, v in sorted(self.logs.items())]
        out += [f"MISSING LOG: {m}" for m in self.missing_logs]
        out += [f"MISMATCH: {m}" for m in self.mismatches]
        out += [f"PROBLEM: {p}" for p in self.problems]
        out += [f"EXPLAINED: {e}" for e in self.explained]
        out.append(f"cross-check: {self.matched_updates} updates sent and received with the "
                   "same round, hash and size")
        return out


def verify_result(result_dir: Path, *, root_ca_path: Path | None = None) -> ResultVerdict:
    """Verify every log of a job result and cross-check them.

    Args:
        result_dir: the downloaded job result, holding ``audit/``.
        root_ca_path: the project's root CA; by default ``audit/rootCA.pem``.

    Raises:
        AuditError: there is no ``audit/`` folder or no root CA.

    """
    result_dir = Path(result_dir)
    audit = result_dir / "audit"
    if not audit.is_dir():
        raise AuditError(f"{result_dir} has no audit/ folder; pass a downloaded job result")
    root = Path(root_ca_path) if root_ca_path else audit / "rootCA.pem"
    if not root.is_file():
        raise AuditError(f"no root CA at {root}; copy the project's rootCA.pem there or pass it")
    paths = {p.stem: p for p in sorted(audit.glob("*.jsonl"))}
    certs = _project_certs(paths, crypto.load_cert(root))
    logs = {
        name: verify_log(p, root_ca_path=root,
                         other_certs={n: c for n, c in certs.items() if n != name})
        for name, p in paths.items()
    }
    records = {name: read_records(p) for name, p in paths.items()}
    server = _find_server(logs, records)
    problems = _identity_problems(logs, certs)
    missing: list[str] = []
    mismatches: list[str] = []
    matched = 0
    if server is None:
        problems.append("no server log in audit/ (no log with role 'server' or any "
                        "update_received record)")
    else:
        named = _sites_named(records[server]) | _sites_in_result(result_dir)
        failed = sites_failed(records[server])
        anchored = {str((r.get("fields") or {}).get("participant")) for r in records[server]
                    if r.get("event") == events.LOG_ANCHORED}
        # A site that failed before it ever sent its log: the server's failure record explains the gap.
        # A log the server anchored and then lost is never explained.
        failed_sites = {site: reason for (site, _), reason in sorted(failed.items(), key=str)}
        gone = [n for n in sorted(named) if n not in paths]
        missing = [n for n in gone if n not in failed_sites or n in anchored]
        explained = [f"no log of {n}: the server recorded its failure ({failed_sites[n]})"
                     for n in gone if n not in missing]
        sites = {n: r for n, r in records.items() if n != server and logs[n].role != "admin"}
        matched, found = cross_check(records[server], sites)
        mismatches = []
        for mismatch in found:
            reason = explains(mismatch, failed, sites.get(mismatch.site, []))
            if reason is None:
                mismatches.append(mismatch.text)
            else:
                explained.append(f"{mismatch.text} ({reason})")
        problems += check_anchors(records[server], logs)
        problems += check_closing(records[server], logs[server], result_dir)
        earlier = [rec for path in sorted((audit / "previous").glob(f"*/{server}.jsonl")) for rec in read_records(path)]
        problems += check_globals([*earlier, *records[server]], sites)
        problems += check_metrics(result_dir, sites)
        problems += check_previous(records[server], audit, root)
        return ResultVerdict(result_dir=result_dir, logs=logs, server=server, missing_logs=missing,
                             mismatches=mismatches, problems=problems, matched_updates=matched,
                             explained=explained)
    return ResultVerdict(result_dir=result_dir, logs=logs, server=server, missing_logs=missing,
                         mismatches=mismatches, problems=problems, matched_updates=matched)


def _project_certs(paths: dict[str, Path], root: x509.Certificate) -> dict[str, x509.Certificate]:
    """Certificates embedded in the logs that this project's root CA issued, by log name."""
    out = {}
    for name, path in paths.items():
        cert = embedded_cert(path)
        if cert is not None and crypto.check_issued_by(cert, root).ok:
            out[name] = cert
    return out


def _find_server(
    logs: dict[str, LogVerdict], records: dict[str, list[dict[str, Any]]]
) -> str | None:
    for name, verdict in logs.items():
        if verdict.role == "server":
            return name
    for name, recs in records.items():
        if any(r.get("event") == events.UPDATE_RECEIVED for r in recs):
            return name
    return None


def _identity_problems(
    logs: dict[str, LogVerdict], certs: dict[str, x509.Certificate]
) -> list[str]:
    problems = []
    for name, verdict in logs.items():
        if verdict.participant is not None and verdict.participant != name:
            problems.append(f"audit/{name}.jsonl holds the log of '{verdict.participant}'")
    owners: dict[str, list[str]] = {}
    for name, cert in certs.items():
        owners.setdefault(crypto.cert_fingerprint(cert), []).append(name)
    for fp, names in owners.items():
        if len(names) > 1:
            problems.append(f"logs {', '.join(sorted(names))} share certificate {fp[:16]}...; "
                            "each participant signs with its own kit")
    return problems


def _sites_named(server_records: list[dict[str, Any]]) -> set[str]:
    names: set[str] = set()
    for record in server_records:
        fields = record.get("fields") or {}
        if isinstance(fields.get("site"), str):
            names.add(fields["site"])
        if isinstance(fields.get("sites"), list):
            names.update(s for s in fields["sites"] if isinstance(s, str))
        if record.get("event") == events.LOG_ANCHORED and isinstance(fields.get("participant"),
                                                                      str):
            names.add(fields["participant"])
    return names


def _sites_in_result(result_dir: Path) -> set[str]:
    path = result_dir / "zenfed_result.json"
    try:
        result = json.loads(path.read_text())
    except (OSError, ValueError):
        return set()
    names: set[str] = set()
    for rnd in result.get("rounds") or []:
        if isinstance(rnd, dict) and isinstance(rnd.get("sites"), dict):
            names.update(rnd["sites"])
    return names


def _find_root_ca(log: Path) -> Path | None:
    for candidate in (log.parent / "rootCA.pem", log.parent / "startup" / "rootCA.pem",
                      log.parent.parent / "startup" / "rootCA.pem"):
        if candidate.is_file():
            return candidate
    return None


def main_verify(path: Path, *, root_ca: Path | None = None, out: TextIO | None = None) -> int:
    """Verify a log or a job result, print a human verdict, and return the exit code.

    Args:
        path: one ``.jsonl`` log, a job result folder (holding ``audit/``), or its
            ``audit/`` folder.
        root_ca: the project's ``rootCA.pem``; by default found beside the log(s).
        out: where to print; standard output by default.

    Returns:
        0 if everything verified, 1 if damage or a cross-check failure was found, 2 if
        the input could not be verified at all (missing root CA, unreadable path).

    """
    stream = out or sys.stdout
    path = Path(path)
    try:
        if path.is_dir():
            result_dir = path.parent if path.name == "audit" and not (path / "audit").is_dir() \
                else path
            verdict = verify_result(result_dir, root_ca_path=root_ca)
            for line in verdict.describe():
                print(line, file=stream)
            ok = verdict.ok
        else:
            root = root_ca or _find_root_ca(path)
            if root is None:
                raise AuditError(
                    f"no rootCA.pem beside {path}; pass the project's root CA (from any "
                    "startup kit) to check that the signer belongs to this project")
            siblings = _project_certs(
                {p.stem: p for p in path.parent.glob("*.jsonl") if p != path},
                crypto.load_cert(root))
            single = verify_log(path, root_ca_path=root, other_certs=siblings)
            print(f"{path.name}: {single.describe()}", file=stream)
            ok = single.ok
    except AuditError as exc:
        print(f"cannot verify: {exc}", file=stream)
        return EXIT_UNVERIFIABLE
    print("verdict: INTACT" if ok else "verdict: DAMAGED", file=stream)
    return EXIT_INTACT if ok else EXIT_DAMAGED
