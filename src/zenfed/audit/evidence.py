"""Collect the report's facts from a job result and its audit logs.

Every number here is read from ``zenfed_result.json`` or from the logs; nothing
is assumed. Where both hold a figure (bytes sent per site), the log is the
evidence and the result is checked against it.
"""

from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path
from typing import Any

from zenfed.audit import events
from zenfed.audit.errors import AuditError
from zenfed.audit.log import read_records
from zenfed.audit.verify import ResultVerdict, verify_result


def load_result(result_dir: Path) -> dict[str, Any]:
    """Read ``zenfed_result.json``; an absent file gives an empty result."""
    path = Path(result_dir) / "zenfed_result.json"
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text())
    except ValueError as exc:
        raise AuditError(
            f"{path} is not valid JSON ({exc}); download the job result again"
        ) from exc
    if not isinstance(data, dict):
        raise AuditError(f"{path} does not hold a JSON object; download the job result again")
    return data


def _dict(value: Any) -> dict[str, Any]:
    return value if isinstance(value, dict) else {}


def _list(value: Any) -> list[Any]:
    return value if isinstance(value, list) else []


def _num(value: Any) -> float | None:
    return float(value) if isinstance(value, int | float) and not isinstance(value, bool) else None


def collect(result_dir: Path) -> tuple[dict[str, Any], ResultVerdict | None]:
    """Return the report's sections (without controls) and the audit verdict."""
    result_dir = Path(result_dir)
    result = load_result(result_dir)
    verdict = verify_result(result_dir) if (result_dir / "audit").is_dir() else None
    logs = {}
    if verdict is not None:
        logs = {name: read_records(v.path) for name, v in verdict.logs.items()}
    rounds = _rounds(result)
    site_names = sorted({s for r in rounds for s in r["sites"]} | _site_logs(verdict))
    server_records = logs.get(verdict.server, []) if verdict and verdict.server else []
    report = {
        "participants": _participants(verdict, site_names, _enrollment(server_records)),
        "privacy": _privacy(result, logs),
        "data_residency": _residency(result, logs, verdict, site_names),
        "curves": {"rounds": rounds},
        "lineage": _lineage(result, logs, verdict),
        "audit": {**_audit(verdict), "failures": _failures(logs)},
    }
    report["summary"] = _summary(result, report, verdict, site_names, logs)
    return report, verdict


def _site_logs(verdict: ResultVerdict | None) -> set[str]:
    if verdict is None:
        return set()
    return {n for n, v in verdict.logs.items() if n != verdict.server and v.role != "admin"}


def _rounds(result: dict[str, Any]) -> list[dict[str, Any]]:
    out = []
    for entry in _list(result.get("rounds")):
        entry = _dict(entry)
        if not isinstance(entry.get("round"), int):
            continue
        sites = {}
        for name, site in _dict(entry.get("sites")).items():
            site = _dict(site)
            sites[str(name)] = {
                "train_loss": _num(site.get("train_loss")),
                "eval_loss": _num(site.get("eval_loss")),
                "accuracy": _num(site.get("accuracy")),
                "num_examples": site.get("num_examples") if isinstance(
                    site.get("num_examples"), int) else None,
                "update_sha256": site.get("update_sha256") if isinstance(
                    site.get("update_sha256"), str) else None,
                "update_bytes": site.get("update_bytes") if isinstance(
                    site.get("update_bytes"), int) else None,
            }
        out.append({
            "round": entry["round"],
            "eval_loss": _num(entry.get("eval_loss")),
            "accuracy": _num(entry.get("accuracy")),
            "preference_accuracy": _num(entry.get("preference_accuracy")),
            "reward_margin": _num(entry.get("reward_margin")),
            "global_adapter_sha256": entry.get("global_adapter_sha256")
            if isinstance(entry.get("global_adapter_sha256"), str) else None,
            "sites": sites,
        })
    return sorted(out, key=lambda r: r["round"])


def _enrollment(server_records: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Site -> {"profile": what it declared, or None; "cohort_excluded": why matching left it out, or None}."""
    out: dict[str, dict[str, Any]] = {}
    for record in server_records:
        fields = _dict(record.get("fields"))
        if record.get("event") == events.SITES_ENROLLED:
            for site, profile in _dict(fields.get("profiles")).items():
                out.setdefault(str(site), {"profile": None, "cohort_excluded": None})["profile"] = _dict(profile)
        elif record.get("event") == events.COHORT_MATCHED:
            for site, why in _dict(fields.get("excluded")).items():
                out.setdefault(str(site), {"profile": None, "cohort_excluded": None})["cohort_excluded"] = str(why)
    return out


def _participants(verdict: ResultVerdict | None, sites: list[str],
                  enrollment: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    out = []
    logs = verdict.logs if verdict else {}
    for name, v in sorted(logs.items()):
        bad = v.first_bad
        out.append({
            "name": name,
            "role": v.role or ("server" if verdict and name == verdict.server else "unknown"),
            "cert_subject": v.cert_subject,
            "cert_issuer": v.cert_issuer,
            "cert_sha256": v.cert_sha256,
            "log_records": v.intact,
            "log_status": "intact" if v.ok else "damaged",
            "log_detail": v.describe() if bad else None,
            **enrollment.get(name, {"profile": None, "cohort_excluded": None}),
        })
    missing = set(verdict.missing_logs) if verdict else set(sites)
    for name in sorted(missing | (set(sites) - set(logs))):
        out.append({"name": name, "role": "client", "cert_subject": None, "cert_issuer": None,
                    "cert_sha256": None, "log_records": 0, "log_status": "missing",
                    "log_detail": "no audit log for this participant in the result",
                    **enrollment.get(name, {"profile": None, "cohort_excluded": None})})
    return out


def _privacy(result: dict[str, Any], logs: dict[str, list[dict[str, Any]]]) -> dict[str, Any]:
    mechanisms = []
    for mech in _list(_dict(result.get("privacy")).get("mechanisms")):
        mech = _dict(mech)
        if isinstance(mech.get("name"), str):
            mechanisms.append({"name": mech["name"], "params": _dict(mech.get("params"))})
    dp_spent = []
    attestations = []
    for name, records in sorted(logs.items()):
        spent = [r for r in records if r.get("event") == events.DP_SPENT]
        if spent:
            dp_spent.append({"participant": name, "records": len(spent),
                             "latest": _dict(spent[-1].get("fields"))})
        for r in records:
            if r.get("event") == events.ATTESTATION:
                f = _dict(r.get("fields"))
                attestations.append({"participant": name, "peer": f.get("peer"),
                                     "tee_kind": f.get("tee_kind"), "verdict": f.get("verdict"),
                                     "time": r.get("time")})
    return {"mechanisms": mechanisms, "dp_spent": dp_spent, "attestations": attestations}


def _residency(
    result: dict[str, Any],
    logs: dict[str, list[dict[str, Any]]],
    verdict: ResultVerdict | None,
    sites: list[str],
) -> dict[str, Any]:
    server = verdict.server if verdict else None
    from_result: dict[str, int] = defaultdict(int)
    for entry in _rounds(result):
        for name, site in entry["sites"].items():
            from_result[name] += site["update_bytes"] or 0
    rows = []
    for name in sites:
        if name in logs:
            sent = [_dict(r.get("fields")) for r in logs[name]
                    if r.get("event") == events.UPDATE_SENT]
            source = "site audit log"
        else:
            sent = [_dict(r.get("fields")) for r in logs.get(server or "", [])
                    if r.get("event") == events.UPDATE_RECEIVED
                    and _dict(r.get("fields")).get("site") == name]
            source = "server audit log" if sent else "none"
        sizes = [f["size"] for f in sent if isinstance(f.get("size"), int)]
        logged = sum(sizes)
        in_result = from_result.get(name)
        rows.append({
            "site": name,
            "updates_sent": len(sent),
            "bytes_sent": logged,
            "kinds": sorted({str(f.get("kind", "model_update")) for f in sent}),
            "source": source,
            "bytes_in_result": in_result,
            "consistent": None if in_result is None or source == "none" else in_result == logged,
        })
    total = sum(r["bytes_sent"] for r in rows)
    updates = sum(r["updates_sent"] for r in rows)
    kinds = sorted({k for r in rows for k in r["kinds"]})
    statement = (
        f"Across {len(rows)} site(s), the audit logs record {updates} outbound transfer(s), "
        f"{total:,} bytes in all, each of kind {', '.join(kinds) or 'none'}. These are model "
        "updates (LoRA adapter weights), not data records: a site log records no other outbound "
        "transfer, and the training and evaluation records stayed at their sites."
    )
    unlogged = [r["site"] for r in rows if r["source"] != "site audit log"]
    if unlogged:
        statement += (f" No site log was available for {', '.join(unlogged)}: those figures come "
                      "from the server's receipts, or are absent.")
    return {"statement": statement, "total_bytes": total, "total_updates": updates,
            "sites": rows}


def _lineage(
    result: dict[str, Any], logs: dict[str, list[dict[str, Any]]], verdict: ResultVerdict | None
) -> dict[str, Any]:
    base = _dict(result.get("base_model"))
    aggregated = {}
    released = []
    server = verdict.server if verdict and verdict.server else ""
    # Rounds made before a crash are in the earlier runs' server logs, kept under audit/previous/.
    earlier = sorted((verdict.result_dir / "audit" / "previous").glob(f"*/{server}.jsonl")) if verdict else []
    for r in [*(rec for path in earlier for rec in read_records(path)), *logs.get(server, [])]:
        f = _dict(r.get("fields"))
        if r.get("event") == events.AGGREGATED and isinstance(f.get("round"), int):
            aggregated[f["round"]] = f
        if r.get("event") == events.MODEL_RELEASED:
            released.append({"adapter_sha256": f.get("adapter_sha256"),
                             "released_to": f.get("released_to"), "time": r.get("time")})
    rounds = []
    for entry in _rounds(result):
        agg = aggregated.get(entry["round"], {})
        rounds.append({
            "round": entry["round"],
            "global_adapter_sha256": entry["global_adapter_sha256"],
            "inputs": [s for s in _list(agg.get("inputs")) if isinstance(s, str)],
            "logged_output": agg.get("output") if isinstance(agg.get("output"), str) else None,
        })
    final = _dict(result.get("final"))
    return {
        "base_model": {"name": base.get("name"), "sha256": base.get("sha256")},
        "rounds": rounds,
        "final_adapter_sha256": final.get("adapter_sha256"),
        "released": released,
    }


def _audit(verdict: ResultVerdict | None) -> dict[str, Any]:
    if verdict is None:
        return {"ok": False, "logs": [], "missing_logs": [], "mismatches": [],
                "problems": ["the result has no audit/ folder"], "matched_updates": 0}
    logs = []
    for name, v in sorted(verdict.logs.items()):
        bad = v.first_bad
        logs.append({
            "participant": name, "file": f"audit/{v.path.name}", "ok": v.ok,
            "records": v.intact,
            "first_bad": None if bad is None else {
                "line": bad.line, "seq": bad.seq, "kind": bad.kind.value, "detail": bad.detail},
        })
    return {"ok": verdict.ok, "logs": logs, "missing_logs": list(verdict.missing_logs),
            "mismatches": list(verdict.mismatches), "problems": list(verdict.problems),
            "matched_updates": verdict.matched_updates}


def _failures(logs: dict[str, list[dict[str, Any]]]) -> list[dict[str, Any]]:
    """Every failure a participant recorded: rejected results, site errors, a job stopped for too few sites."""
    found = []
    for participant, records in sorted(logs.items()):
        for record in records:
            if record.get("event") != events.ERROR:
                continue
            fields = _dict(record.get("fields"))
            round_index = fields.get("round")
            found.append({
                "participant": participant, "time": str(record.get("time", "")),
                "round": round_index if isinstance(round_index, int) else None,
                "site": str(fields.get("site", participant)), "kind": str(fields.get("kind", "error")),
                "message": str(fields.get("message", "")),
            })
    return sorted(found, key=lambda f: f["time"])


def _summary(
    result: dict[str, Any],
    report: dict[str, Any],
    verdict: ResultVerdict | None,
    sites: list[str],
    logs: dict[str, list[dict[str, Any]]],
) -> dict[str, Any]:
    job = _dict(result.get("job"))
    final = _dict(result.get("final"))
    planned = _dict(_dict(job.get("spec")).get("federation")).get("rounds")
    times = sorted(str(r["time"]) for recs in logs.values() for r in recs if "time" in r)
    submitted = [
        _dict(r.get("fields")).get("submitter") for recs in logs.values() for r in recs
        if r.get("event") == events.JOB_SUBMITTED
    ]
    decisions = [
        str(_dict(r.get("fields")).get("decision")).lower() for recs in logs.values()
        for r in recs if r.get("event") == events.POLICY_DECISION
    ]
    objective = _dict(job.get("objective"))
    return {
        "job_name": job.get("name"),
        "job_id": job.get("job_id"),
        "spec_sha256": job.get("spec_hash"),
        "objective": _objective_text(objective),
        "privacy_unit": objective.get("privacy_unit") if isinstance(objective.get("privacy_unit"), str) else None,
        "submitted_by": next((s for s in submitted if isinstance(s, str)), None),
        "rounds_completed": len(report["curves"]["rounds"]),
        "rounds_planned": planned if isinstance(planned, int) else None,
        "sites": sites,
        "final_eval_loss": _num(final.get("eval_loss")),
        "final_accuracy": _num(final.get("accuracy")),
        "final_preference_accuracy": _num(final.get("preference_accuracy")),
        "final_reward_margin": _num(final.get("reward_margin")),
        "final_adapter_sha256": final.get("adapter_sha256"),
        "privacy_mechanisms": [m["name"] for m in report["privacy"]["mechanisms"]],
        "bytes_left_sites": report["data_residency"]["total_bytes"],
        "audit_intact": bool(verdict and verdict.ok),
        "first_event": times[0] if times else None,
        "last_event": times[-1] if times else None,
        "policy_decisions": {"accepted": decisions.count("accepted"),
                             "refused": decisions.count("refused")},
    }


def _objective_text(objective: dict[str, Any]) -> str | None:
    """The job's stages in words, e.g. 'SFT in rounds 1-2 on builtin; DPO (beta 0.1) in rounds 3-5 on ...'."""
    parts = []
    for stage in _list(objective.get("stages")):
        stage = _dict(stage)
        rounds = _list(stage.get("rounds"))
        span = "rounds ?" if len(rounds) != 2 else f"round {rounds[0]}" if rounds[0] == rounds[1] else \
            f"rounds {rounds[0]}-{rounds[1]}"
        name = str(stage.get("objective", "?")).upper()
        beta = f" (beta {stage['beta']})" if stage.get("beta") is not None else ""
        reference = f", against {stage['reference']}" if stage.get("reference") else ""
        parts.append(f"{name}{beta} in {span} on {stage.get('dataset', '?')}{reference}")
    return "; ".join(parts) or None
