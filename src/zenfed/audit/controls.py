"""Map the collected evidence to HIPAA §164.312, GDPR and EU AI Act controls.

Each control states what the regulation asks, in a line, and the evidence from
this job's result and logs that bears on it, with a status: ``evidenced`` (the
evidence is present and verified), ``partial`` (some of it), or ``not evidenced``.
The table supports a compliance assessment; it does not replace one.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

EVIDENCED, PARTIAL, MISSING = "evidenced", "partial", "not evidenced"

_ENCRYPTION_WORDS = ("homomorphic", "encrypt", "ckks", "tenseal", "he")
_DP_WORDS = ("differential", "dp", "gaussian")


@dataclass(frozen=True)
class Control:
    """One row of the controls table."""

    framework: str
    reference: str
    title: str
    assess: Callable[[dict[str, Any]], tuple[str, str]]


def _has(report: dict[str, Any], words: tuple[str, ...]) -> list[str]:
    names = [m["name"] for m in report["privacy"]["mechanisms"]]
    return [n for n in names if any(w == n.lower() or w in n.lower().split("_") or
                                    (len(w) > 3 and w in n.lower()) for w in words)]


def _chained(report: dict[str, Any]) -> tuple[int, int]:
    parts = report["participants"]
    good = [p for p in parts if p["log_status"] == "intact"]
    return len(good), len(parts)


def _access(report: dict[str, Any]) -> tuple[str, str]:
    good, total = _chained(report)
    policy = report["summary"]["policy_decisions"]
    text = (f"{good} of {total} participants signed their logs with certificates issued by the "
            f"project root CA; site policy decisions recorded: {policy['accepted']} accepted, "
            f"{policy['refused']} refused.")
    return (EVIDENCED if total and good == total else PARTIAL if good else MISSING), text


def _audit_controls(report: dict[str, Any]) -> tuple[str, str]:
    audit = report["audit"]
    records = sum(log["records"] for log in audit["logs"])
    text = (f"{len(audit['logs'])} hash-chained, signed logs with {records} verified records; "
            f"verdict: {'intact' if audit['ok'] else 'NOT intact'}; "
            f"{len(audit['missing_logs'])} missing log(s).")
    return (EVIDENCED if audit["ok"] else PARTIAL if records else MISSING), text


def _integrity(report: dict[str, Any]) -> tuple[str, str]:
    audit = report["audit"]
    lineage = report["lineage"]
    hashed = sum(1 for r in lineage["rounds"] if r["global_adapter_sha256"])
    text = (f"{audit['matched_updates']} update(s) carried the same SHA-256 and size at sending "
            f"and receipt; {len(audit['mismatches'])} mismatch(es); {hashed} round(s) with a "
            "global adapter hash; final adapter hash "
            f"{'recorded' if lineage['final_adapter_sha256'] else 'absent'}.")
    ok = audit["matched_updates"] > 0 and not audit["mismatches"]
    return (EVIDENCED if ok and audit["ok"] else PARTIAL if ok or hashed else MISSING), text


def _transmission(report: dict[str, Any]) -> tuple[str, str]:
    enc = _has(report, _ENCRYPTION_WORDS)
    good, total = _chained(report)
    text = (f"Participants authenticate with project-issued certificates ({good}/{total} "
            "verified); updates in transit encrypted by: "
            f"{', '.join(enc) if enc else 'no payload encryption recorded'}.")
    return (EVIDENCED if enc and good == total and total else PARTIAL if good else MISSING), text


def _confidentiality(report: dict[str, Any]) -> tuple[str, str]:
    enc, dp = _has(report, _ENCRYPTION_WORDS), _has(report, _DP_WORDS)
    text = (f"Encryption: {', '.join(enc) or 'none recorded'}; differential privacy: "
            f"{', '.join(dp) or 'none recorded'}; audit chain "
            f"{'intact' if report['audit']['ok'] else 'NOT intact'}.")
    ok = report["audit"]["ok"]
    status = EVIDENCED if enc and dp and ok else PARTIAL if enc or dp else MISSING
    return status, text


def _by_design(report: dict[str, Any]) -> tuple[str, str]:
    res = report["data_residency"]
    mechs = [m["name"] for m in report["privacy"]["mechanisms"]]
    text = (f"Only model updates left the sites ({res['total_updates']} transfers, "
            f"{res['total_bytes']:,} bytes); mechanisms in force by the job spec: "
            f"{', '.join(mechs) or 'none'}.")
    return (EVIDENCED if mechs and res["total_updates"] else PARTIAL if mechs else MISSING), text


def _records(report: dict[str, Any]) -> tuple[str, str]:
    s = report["summary"]
    text = (f"Job {s['job_name']} ({s['job_id']}), spec SHA-256 {str(s['spec_sha256'])[:16]}..., "
            f"submitted by {s['submitted_by'] or 'unrecorded'}; {len(report['participants'])} "
            f"participants; events from {s['first_event']} to {s['last_event']}.")
    full = s["job_id"] and s["spec_sha256"] and s["submitted_by"]
    return (EVIDENCED if full and report["audit"]["ok"] else PARTIAL if s["job_id"] else MISSING,
            text)


def _security(report: dict[str, Any]) -> tuple[str, str]:
    enc = _has(report, _ENCRYPTION_WORDS)
    att = report["privacy"]["attestations"]
    trusted = sum(1 for a in att if str(a.get("verdict")).lower() in ("trusted", "ok", "pass"))
    text = (f"Encryption: {', '.join(enc) or 'none recorded'}; {trusted} of {len(att)} "
            "attestation check(s) trusted; integrity of records and updates verified "
            f"({'intact' if report['audit']['ok'] else 'NOT intact'}).")
    status = EVIDENCED if enc and report["audit"]["ok"] else PARTIAL if enc or att else MISSING
    return status, text


def _data_governance(report: dict[str, Any]) -> tuple[str, str]:
    rounds = report["curves"]["rounds"]
    last = rounds[-1]["sites"] if rounds else {}
    counts = {s: v["num_examples"] for s, v in last.items() if v["num_examples"] is not None}
    masked = any(m["params"].get("secure_aggregation") == "pairwise" for m in report["privacy"]["mechanisms"])
    listed = ", ".join(f"{s}: {n}" for s, n in sorted(counts.items()))
    if not listed:
        listed = "withheld (pairwise masks keep each site's record count inside the encrypted sum)" if masked \
            else "unrecorded"
    text = (f"Training examples per site (last round): {listed}; data were not pooled: each site trained on "
            "its own records.")
    return (EVIDENCED if counts or (masked and last) else MISSING), text


def _record_keeping(report: dict[str, Any]) -> tuple[str, str]:
    s = report["summary"]
    records = sum(log["records"] for log in report["audit"]["logs"])
    text = (f"Events logged automatically: {records} signed records from {s['first_event']} "
            f"to {s['last_event']}, covering {s['rounds_completed']} round(s), updates, "
            "aggregation, evaluation and release.")
    return (EVIDENCED if records and report["audit"]["ok"] else PARTIAL if records else MISSING,
            text)


CONTROLS: tuple[Control, ...] = (
    Control("HIPAA", "§164.312(a)(1)", "Access control", _access),
    Control("HIPAA", "§164.312(b)", "Audit controls", _audit_controls),
    Control("HIPAA", "§164.312(c)(1)", "Integrity", _integrity),
    Control("HIPAA", "§164.312(e)(1)", "Transmission security", _transmission),
    Control("GDPR", "Art. 5(1)(f)", "Integrity and confidentiality", _confidentiality),
    Control("GDPR", "Art. 25", "Data protection by design and by default", _by_design),
    Control("GDPR", "Art. 30", "Records of processing activities", _records),
    Control("GDPR", "Art. 32", "Security of processing", _security),
    Control("EU AI Act", "Art. 10", "Data and data governance", _data_governance),
    Control("EU AI Act", "Art. 12", "Record-keeping", _record_keeping),
)


def controls_table(report: dict[str, Any]) -> list[dict[str, str]]:
    """Return the controls table rows for a report holding the other sections."""
    rows = []
    for c in CONTROLS:
        status, evidence = c.assess(report)
        rows.append({"framework": c.framework, "reference": c.reference, "control": c.title,
                     "evidence": evidence, "status": status})
    return rows
