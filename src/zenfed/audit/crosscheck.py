"""Cross-checks between the logs of one job result: what verify_result adds to each chain's own check.

Updates sent against updates received, anchors of site logs, the server's closing record,
the logs of an earlier run a resumed job pinned, the globals sites received, the metrics
the result reports for each site, and which gaps a failure the server recorded explains.
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from zenfed.audit import events
from zenfed.audit.chain import LogVerdict, verify_log
from zenfed.digest import sha256_hex

# The server's error kinds that say a site failed in a round (its later log copies may be missing).
FAILURE_KINDS = frozenset({"no_answer", "result_rejected", "site_lost", "straggler"})


def sites_failed(server_records: list[dict[str, Any]]) -> dict[tuple[str, Any], str]:
    """(site, round) the server recorded a site failing or staying silent in, with the reason it gave."""
    failed: dict[tuple[str, Any], str] = {}
    for record in server_records:
        fields = record.get("fields") or {}
        if record.get("event") == events.ERROR and fields.get("kind") in FAILURE_KINDS and fields.get("site"):
            failed.setdefault((str(fields["site"]), fields.get("round")),
                              f"{fields.get('kind')}: {str(fields.get('message', ''))[:120]}")
    return failed


def update_key(site: str, fields: dict[str, Any]) -> tuple[str, Any, Any, Any]:
    """What identifies one update on both sides: site, round, hash, size."""
    return site, fields.get("round"), fields.get("sha256"), fields.get("size")


@dataclass(frozen=True)
class Mismatch:
    """One update the two sides disagree on: ``kind`` is ``unreceived``, ``substituted`` or ``unsent``."""

    kind: str
    site: str
    round: Any
    text: str


def cross_check(
    server_records: list[dict[str, Any]], sites: dict[str, list[dict[str, Any]]]
) -> tuple[int, list[Mismatch]]:
    """Match every site's ``update_sent`` with the server's ``update_received``; return matches and mismatches."""
    sent = Counter(
        update_key(name, r.get("fields") or {})
        for name, recs in sites.items() for r in recs if r.get("event") == events.UPDATE_SENT
    )
    received = Counter(
        update_key(str((r.get("fields") or {}).get("site")), r.get("fields") or {})
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
        out.append(Mismatch("substituted" if other else "unreceived", site, rnd,
                             f"{site} sent round {rnd} update sha256 {str(sha)[:16]}... ({size} bytes); {what}"))
    for key in sorted((received - sent).elements(), key=str):
        site, rnd, sha, size = key
        if site not in sites:
            continue
        if any(k[:2] == (site, rnd) for k in sent):
            continue  # already described from the sender's side
        out.append(Mismatch("unsent", site, rnd,
                             f"the server received round {rnd} update sha256 {str(sha)[:16]}... "
                             f"({size} bytes) from {site}; {site}'s log has no matching update_sent"))
    return sum((sent & received).values()), out


def explains(mismatch: Mismatch, failed: dict[tuple[str, Any], str],
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


def check_globals(server_records: list[dict[str, Any]], sites: dict[str, list[dict[str, Any]]]) -> list[str]:
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


def check_metrics(result_dir: Path, sites: dict[str, list[dict[str, Any]]]) -> list[str]:
    """Each site's metrics in ``zenfed_result.json`` are those its own signed log records.

    A site signs every answer, so a relay cannot change its metrics unseen, but the server
    writes the result and the report from them: it could. A site records every evaluation in
    its log (``evaluated``, scope "local validation", with the round of the global it scored);
    the result files each round's site metrics under the round whose global they score
    (``evaluated_round``), and the final evaluation under the last round. Metrics a site
    withheld (None) are not compared.
    """
    try:
        result = json.loads((result_dir / "zenfed_result.json").read_text())
        rounds = [(int(r.get("evaluated_round", r["round"])), r.get("sites") or {}) for r in result.get("rounds", [])]
        final = result.get("final")
        if isinstance(final, dict) and result.get("rounds"):
            rounds.append((int(result["rounds"][-1]["round"]), final.get("sites") or {}))
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return []  # no result, or one whose own damage the closing check reports
    own = {(site, (r.get("fields") or {}).get("round")): (r.get("fields") or {}).get("metrics") or {}
           for site, records in sites.items() for r in records
           if r.get("event") == events.EVALUATED and (r.get("fields") or {}).get("scope") == "local validation"}
    out = []
    for evaluated_round, reported in rounds:
        for site, figures in sorted(reported.items()):
            logged = own.get((site, evaluated_round))
            if logged is None or not isinstance(figures, dict):
                continue
            for name in ("eval_loss", "accuracy"):
                value = figures.get(name)
                if value is not None and value != logged.get(name):
                    out.append(f"the result reports {name} {value} for {site} on the global of round "
                               f"{evaluated_round}, but {site}'s own log records {logged.get(name)}: "
                               "the metric was changed at the server, or after")
    return out


def check_closing(server_records: list[dict[str, Any]], server_log: LogVerdict, result_dir: Path) -> list[str]:
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


def check_previous(server_records: list[dict[str, Any]], audit: Path, root: Path) -> list[str]:
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


def check_anchors(server_records: list[dict[str, Any]], logs: dict[str, LogVerdict]) -> list[str]:
    """Each site log still holds the record the server anchored (nothing cut from its end)."""
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
