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
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

from cryptography import x509

from zenfed.audit import crypto, events
from zenfed.audit.chain import BadRecord, Damage, LogVerdict, embedded_cert, verify_log
from zenfed.audit.errors import AuditError
from zenfed.audit.log import read_records
from zenfed.digest import sha256_hex

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
# The server's error kinds that say a site failed in a round (its later log copies may be missing).
FAILURE_KINDS = frozenset({"no_answer", "result_rejected"})


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
        failed = _sites_failed(records[server])
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
        matched, found = _cross_check(records[server], sites)
        mismatches = []
        for mismatch in found:
            reason = _explains(mismatch, failed, sites.get(mismatch.site, []))
            if reason is None:
                mismatches.append(mismatch.text)
            else:
                explained.append(f"{mismatch.text} ({reason})")
        problems += _check_anchors(records[server], logs)
        problems += _check_closing(records[server], logs[server], result_dir)
        earlier = [rec for path in sorted((audit / "previous").glob(f"*/{server}.jsonl")) for rec in read_records(path)]
        problems += _check_globals([*earlier, *records[server]], sites)
        problems += _check_previous(records[server], audit, root)
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


def _sites_failed(server_records: list[dict[str, Any]]) -> dict[tuple[str, Any], str]:
    """(site, round) the server recorded a site failing or staying silent in, with the reason it gave."""
    failed: dict[tuple[str, Any], str] = {}
    for record in server_records:
        fields = record.get("fields") or {}
        if record.get("event") == events.ERROR and fields.get("kind") in FAILURE_KINDS and fields.get("site"):
            failed.setdefault((str(fields["site"]), fields.get("round")),
                              f"{fields.get('kind')}: {str(fields.get('message', ''))[:120]}")
    return failed


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


def _update_key(site: str, fields: dict[str, Any]) -> tuple[str, Any, Any, Any]:
    return site, fields.get("round"), fields.get("sha256"), fields.get("size")


@dataclass(frozen=True)
class _Mismatch:
    """One update the two sides disagree on: ``kind`` is ``unreceived``, ``substituted`` or ``unsent``."""

    kind: str
    site: str
    round: Any
    text: str


def _cross_check(
    server_records: list[dict[str, Any]], sites: dict[str, list[dict[str, Any]]]
) -> tuple[int, list[_Mismatch]]:
    sent = Counter(
        _update_key(name, r.get("fields") or {})
        for name, recs in sites.items() for r in recs if r.get("event") == events.UPDATE_SENT
    )
    received = Counter(
        _update_key(str((r.get("fields") or {}).get("site")), r.get("fields") or {})
        for r in server_records if r.get("event") == events.UPDATE_RECEIVED
    )
    out = []
    for key in sorted((sent - received).elements(), key=str):
        site, rnd, sha, size = key
        if site not in sites:
            continue  # the missing log is reported on its own
        other = [k for k in received if k[:2] == (site, rnd) and k != key]
        what = (f"the server received {other[0][3]} bytes with sha256 {str(other[0][2])[:16]}..."
                if other else "the server log has no matching update_received")
        out.append(_Mismatch("substituted" if other else "unreceived", site, rnd,
                             f"{site} sent round {rnd} update sha256 {str(sha)[:16]}... ({size} bytes); {what}"))
    for key in sorted((received - sent).elements(), key=str):
        site, rnd, sha, size = key
        if site not in sites:
            continue
        if any(k[:2] == (site, rnd) for k in sent):
            continue  # already described from the sender's side
        out.append(_Mismatch("unsent", site, rnd,
                             f"the server received round {rnd} update sha256 {str(sha)[:16]}... "
                             f"({size} bytes) from {site}; {site}'s log has no matching update_sent"))
    return sum((sent & received).values()), out


def _explains(mismatch: _Mismatch, failed: dict[tuple[str, Any], str],
              site_records: list[dict[str, Any]]) -> str | None:
    """The server's reason that accounts for a mismatch, or None: a substitution is never accounted for.

    An update the server did not receive is explained by a failure it recorded for that site and
    round (a rejected result); one it received that the site's log lacks, by the site's log copy
    ending before that round after the server recorded the site failing (no later copy came).
    """
    if mismatch.kind == "unreceived":
        return failed.get((mismatch.site, mismatch.round))
    if mismatch.kind == "unsent" and isinstance(mismatch.round, int):
        rounds = [f.get("round") for r in site_records if isinstance(f := r.get("fields") or {}, dict)]
        last = max((x for x in rounds if isinstance(x, int)), default=0)
        later = [reason for (site, rnd), reason in failed.items()
                 if site == mismatch.site and isinstance(rnd, int) and rnd >= mismatch.round]
        if last < mismatch.round and later:
            return later[0]
    return None


def _check_globals(server_records: list[dict[str, Any]], sites: dict[str, list[dict[str, Any]]]) -> list[str]:
    """Every global a site received is a sum the server recorded: no site was sent another one."""
    outputs = {(r.get("fields") or {}).get("round"): (r.get("fields") or {}).get("output")
               for r in server_records if r.get("event") == events.AGGREGATED}
    out = []
    for site, records in sorted(sites.items()):
        for record in records:
            if record.get("event") != events.GLOBAL_RECEIVED:
                continue
            fields = record.get("fields") or {}
            expected = outputs.get(fields.get("global_round"))
            if fields.get("sha256") != expected:
                out.append(f"{site} received a global in round {fields.get('round')} (sha256 "
                           f"{str(fields.get('sha256'))[:16]}...) that is not the sum of round "
                           f"{fields.get('global_round')} the server recorded: the server sent it something else")
    return out


def _check_closing(server_records: list[dict[str, Any]], server_log: LogVerdict, result_dir: Path) -> list[str]:
    """A finished job's server log ends with ``job_finished``, which pins ``zenfed_result.json``."""
    path = result_dir / "zenfed_result.json"
    try:
        finished = path.is_file() and isinstance(json.loads(path.read_text()).get("final"), dict)
    except (OSError, ValueError, AttributeError):
        finished = False
    if not finished or not server_log.ok:
        return []  # no finished job to close, or the log's own damage is already reported
    last = server_records[-1] if server_records else {}
    if last.get("event") != events.JOB_FINISHED:
        return [f"the server's log of this finished job ends at seq {server_log.intact - 1} with "
                f"'{last.get('event')}', not its closing job_finished record: records were cut from its end"]
    expected = (last.get("fields") or {}).get("result_sha256")
    if expected != sha256_hex(path.read_bytes()):
        return ["zenfed_result.json differs from the one the server's closing record pins: it was changed "
                "after the job"]
    return []


def _check_previous(server_records: list[dict[str, Any]], audit: Path, root: Path) -> list[str]:
    """The earlier runs' server logs a resumed job pinned must verify and end where it pinned them."""
    out = []
    for record in server_records:
        if record.get("event") != events.JOB_RESUMED:
            continue
        for entry in (record.get("fields") or {}).get("previous") or []:
            path = audit / str(entry.get("file", ""))
            if not path.is_file() or audit not in path.resolve().parents:
                out.append(f"the log of the resumed run {entry.get('job')} is missing from audit/previous/")
                continue
            verdict = verify_log(path, root_ca_path=root)
            lines = path.read_bytes().rstrip(b"\n").split(b"\n")
            if not verdict.ok:
                out.append(f"the log of the resumed run {entry.get('job')}: {verdict.describe()}")
            elif len(lines) - 1 != entry.get("seq") or sha256_hex(lines[-1]) != entry.get("sha256"):
                out.append(f"the log of the resumed run {entry.get('job')} does not end where the resuming "
                           "server pinned it: records were cut or swapped")
    return out


def _check_anchors(server_records: list[dict[str, Any]], logs: dict[str, LogVerdict]) -> list[str]:
    out = []
    for record in server_records:
        if record.get("event") != events.LOG_ANCHORED:
            continue
        fields = record.get("fields") or {}
        name, seq, sha = fields.get("participant"), fields.get("seq"), fields.get("sha256")
        verdict = logs.get(str(name))
        if verdict is None or not isinstance(seq, int):
            continue
        if seq >= len(verdict.seq_hashes):
            if verdict.ok:
                out.append(f"{name}'s log ends at seq {verdict.intact - 1}, but the server "
                           f"anchored its seq {seq}: records were deleted from its end")
        elif verdict.seq_hashes[seq] != sha:
            out.append(f"{name}'s record seq {seq} differs from the one the server anchored")
    return out


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
