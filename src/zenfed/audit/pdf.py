"""The PDF version of the compliance report (reportlab): same sections, titles and figures."""

from __future__ import annotations

import io
from typing import Any
from xml.sax.saxutils import escape

from reportlab.lib import colors
from reportlab.lib.pagesizes import A4
from reportlab.lib.styles import ParagraphStyle, getSampleStyleSheet
from reportlab.lib.units import mm
from reportlab.platypus import Image, Paragraph, SimpleDocTemplate, Spacer, Table, TableStyle

from zenfed.audit.formatting import SECTIONS, format_number, human_bytes

_STYLES = getSampleStyleSheet()
_BODY = ParagraphStyle("body", parent=_STYLES["BodyText"], fontSize=9, leading=11.5)
_CELL = ParagraphStyle("cell", parent=_BODY, fontSize=8, leading=10)
_HASH = ParagraphStyle("hash", parent=_CELL, fontName="Courier", fontSize=7, leading=9)
_H1 = _STYLES["Title"]
_H2 = ParagraphStyle("h2", parent=_STYLES["Heading2"], textColor=colors.HexColor("#2c5282"),
                     keepWithNext=1)
_STATUS_COLOURS = {"evidenced": "#1b5e20", "partial": "#8a5a00", "not evidenced": "#8a1c1c"}
_WIDTH = A4[0] - 36 * mm


def _p(text: Any, style: ParagraphStyle = _BODY) -> Paragraph:
    return Paragraph(escape("n/a" if text is None else str(text)), style)


def _table(header: list[str], rows: list[list[Any]], widths: list[float]) -> Table:
    data = [[_p(h, _CELL) for h in header]]
    for row in rows:
        data.append([c if isinstance(c, Paragraph) else _p(c, _CELL) for c in row])
    table = Table(data, colWidths=[w * _WIDTH for w in widths], repeatRows=1)
    table.setStyle(TableStyle([
        ("GRID", (0, 0), (-1, -1), 0.4, colors.HexColor("#b8c2cc")),
        ("BACKGROUND", (0, 0), (-1, 0), colors.HexColor("#eef2f6")),
        ("VALIGN", (0, 0), (-1, -1), "TOP"),
    ]))
    return table


def _kv(pairs: list[tuple[str, Any]], hashes: tuple[str, ...] = ()) -> Table:
    rows = [[k, _p(v, _HASH) if k in hashes else v] for k, v in pairs]
    return _table(["Item", "Value"], rows, [0.32, 0.68])


def _profile(profile: dict[str, Any] | None) -> str:
    if not profile:
        return "none recorded"
    if profile.get("withheld"):
        return "withheld by the site's policy"
    return "; ".join(f"{k} = {', '.join(v) if isinstance(v, list) else v}" for k, v in sorted(profile.items()))


def _params(params: dict[str, Any]) -> str:
    return "; ".join(f"{k} = {format_number(v)}" for k, v in sorted(params.items())) or "none"


def _verdict(ok: bool, text: str) -> Table:
    table = Table([[_p(text, ParagraphStyle("v", parent=_BODY, fontSize=11, leading=14))]],
                  colWidths=[_WIDTH])
    table.setStyle(TableStyle([
        ("BACKGROUND", (0, 0), (-1, -1), colors.HexColor("#e3f4e8" if ok else "#fde8e8")),
        ("BOX", (0, 0), (-1, -1), 0.8, colors.HexColor("#7cc48b" if ok else "#e49a9a")),
        ("TOPPADDING", (0, 0), (-1, -1), 6), ("BOTTOMPADDING", (0, 0), (-1, -1), 6),
    ]))
    return table


def _status(status: str) -> Paragraph:
    colour = _STATUS_COLOURS.get(status, "#1d232a")
    return Paragraph(f'<font color="{colour}"><b>{escape(status)}</b></font>', _CELL)


def render_pdf(report: dict[str, Any], plots: dict[str, bytes]) -> bytes:
    """Render the report as PDF bytes."""
    s, titles = report["summary"], dict(SECTIONS)
    story: list[Any] = [
        Paragraph("Compliance report", _H1),
        _p(f"Federated fine-tuning job {s['job_name'] or 'unnamed'} "
           f"(id {s['job_id'] or 'unrecorded'}) - generated {report['generated_at']} "
           f"by {report['generator']}"),
    ]

    def section(key: str, number: int) -> None:
        story.append(Paragraph(f"{number}. {escape(titles[key])}", _H2))

    section("summary", 1)
    story.append(_verdict(s["audit_intact"], (
        "Audit trail intact: every record is signed, chained and accounted for."
        if s["audit_intact"] else "Audit trail NOT intact: see section 7 for what is wrong.")))
    story.append(Spacer(1, 4))
    planned = f" of {s['rounds_planned']} planned" if s["rounds_planned"] else ""
    story.append(_kv([
        ("Job", f"{s['job_name'] or 'unrecorded'} ({s['job_id'] or 'no id'})"),
        ("Job specification hash", s["spec_sha256"] or "unrecorded"),
        ("Objective", s["objective"] or "unrecorded"),
        ("Unit of privacy", s["privacy_unit"] or "no differential privacy"),
        ("Submitted by", s["submitted_by"] or "unrecorded"),
        ("Rounds completed", f"{s['rounds_completed']}{planned}"),
        ("Sites", ", ".join(s["sites"]) or "none recorded"),
        ("Privacy mechanisms", ", ".join(s["privacy_mechanisms"]) or "none recorded"),
        ("Data that left the sites",
         f"{human_bytes(s['bytes_left_sites'])} of model updates, no data records"),
        ("Final evaluation loss", format_number(s["final_eval_loss"])),
        ("Final accuracy", format_number(s["final_accuracy"])),
        *([("Final preference accuracy", f"{format_number(s['final_preference_accuracy'])} (reward margin "
                                         f"{format_number(s['final_reward_margin'])})")]
          if s["final_preference_accuracy"] is not None else []),
        ("Final adapter hash", s["final_adapter_sha256"] or "unrecorded"),
        ("Events recorded", f"from {s['first_event'] or '?'} to {s['last_event'] or '?'}"),
        ("Site policy decisions", f"{s['policy_decisions']['accepted']} accepted, "
                                  f"{s['policy_decisions']['refused']} refused"),
    ], hashes=("Job specification hash", "Final adapter hash")))

    section("participants", 2)
    story.append(_p("Each organisation took part with its own certificate, issued by this "
                    "project's certificate authority. The fingerprint identifies it exactly."))
    story.append(_table(
        ["Participant", "Role", "Certificate", "SHA-256 fingerprint", "Audit log"],
        [[p["name"], p["role"],
          f"{p['cert_subject'] or 'n/a'}" + (f", issued by {p['cert_issuer']}"
                                             if p["cert_issuer"] else ""),
          _p(p["cert_sha256"], _HASH), f"{p['log_status']} ({p['log_records']} records)"]
         for p in report["participants"]],
        [0.15, 0.1, 0.2, 0.37, 0.18]))
    declared = [p for p in report["participants"] if p.get("profile") is not None or p.get("cohort_excluded")]
    if declared:
        story.append(_p("What each site declared about itself for this job (its enrollment profile, only as far "
                        "as its own policy allows), and whether the job's cohort requirements let it train."))
        story.append(_table(
            ["Site", "Declared profile", "Training cohort"],
            [[p["name"], _profile(p.get("profile")),
              f"left out: {p['cohort_excluded']}" if p.get("cohort_excluded") else "eligible"] for p in declared],
            [0.2, 0.55, 0.25]))

    privacy = report["privacy"]
    section("privacy", 3)
    story.append(_p("Protections applied to every model update before it left a site."))
    if privacy["mechanisms"]:
        story.append(_table(["Mechanism", "Parameters"],
                            [[m["name"], _params(m["params"])] for m in privacy["mechanisms"]],
                            [0.3, 0.7]))
    else:
        story.append(_p("No privacy mechanism was recorded for this job."))
    if privacy["dp_spent"]:
        story.append(Spacer(1, 4))
        story.append(_table(["Site", "Privacy-budget records", "Latest record"],
                            [[d["participant"], d["records"], _params(d["latest"])]
                             for d in privacy["dp_spent"]], [0.2, 0.2, 0.6]))
    if privacy["attestations"]:
        story.append(Spacer(1, 4))
        story.append(_table(["Checked by", "Peer", "Environment", "Verdict", "Time"],
                            [[a["participant"], a["peer"], a["tee_kind"], a["verdict"], a["time"]]
                             for a in privacy["attestations"]], [0.18, 0.18, 0.16, 0.14, 0.34]))

    res = report["data_residency"]
    section("data_residency", 4)
    story.append(_p(res["statement"]))
    story.append(_table(
        ["Site", "Transfers out", "Bytes out", "What they were", "Source", "Matches job result"],
        [[r["site"], r["updates_sent"], human_bytes(r["bytes_sent"]),
          ", ".join(r["kinds"]) or "nothing", r["source"],
          "n/a" if r["consistent"] is None else ("yes" if r["consistent"] else "NO")]
         for r in res["sites"]], [0.12, 0.11, 0.22, 0.25, 0.15, 0.15]))

    section("curves", 5)
    for name, png in sorted(plots.items(), key=lambda kv: kv[0] != "loss"):
        img = Image(io.BytesIO(png))
        scale = min(1.0, (_WIDTH * 0.85) / img.drawWidth)
        img.drawWidth, img.drawHeight = img.drawWidth * scale, img.drawHeight * scale
        story.append(img)
        story.append(_p("Loss per round: lower is better." if name == "loss"
                        else "Accuracy per round: higher is better.", _CELL))
    if not plots:
        story.append(_p("No round metrics were recorded."))
    sites = s["sites"]
    metrics = ["eval_loss", "accuracy"]
    headers = ["Round", "Evaluation loss", "Accuracy"]
    if s["final_preference_accuracy"] is not None:
        metrics += ["preference_accuracy", "reward_margin"]
        headers += ["Preference accuracy", "Reward margin"]
    rows = [[r["round"], *(format_number(r[m]) for m in metrics)]
            + [format_number(r["sites"][x].get("train_loss")) if x in r["sites"] else "n/a"
               for x in sites]
            for r in report["curves"]["rounds"]]
    n = len(headers) + len(sites)
    story.append(_table(headers + [f"{x} training loss" for x in sites], rows, [1 / n] * n))
    story.append(_p("n/a: not reported. A site under differential privacy keeps its training loss: "
                    "epsilon does not cover it.", _CELL))

    lin = report["lineage"]
    section("lineage", 6)
    story.append(_p("Where the model came from: the base model and the adapter produced in each "
                    "round, each identified by its SHA-256 hash."))
    story.append(_kv([("Base model", lin["base_model"]["name"] or "unrecorded"),
                      ("Base model hash", lin["base_model"]["sha256"] or "unrecorded"),
                      ("Final adapter hash", lin["final_adapter_sha256"] or "unrecorded")],
                     hashes=("Base model hash", "Final adapter hash")))
    story.append(Spacer(1, 4))
    story.append(_table(["Round", "Global adapter hash", "Updates combined"],
                        [[r["round"], _p(r["global_adapter_sha256"] or "unrecorded", _HASH),
                          len(r["inputs"])] for r in lin["rounds"]], [0.12, 0.68, 0.2]))
    for rel in lin["released"]:
        story.append(_p(f"Released: adapter {rel['adapter_sha256']} to {rel['released_to']} "
                        f"at {rel['time']}."))

    audit = report["audit"]
    section("audit", 7)
    story.append(_verdict(audit["ok"], (
        f"{'INTACT' if audit['ok'] else 'DAMAGED'}: {len(audit['logs'])} log(s) checked, "
        f"{audit['matched_updates']} update(s) matched between sender and receiver.")))
    story.append(Spacer(1, 4))
    story.append(_table(
        ["Participant", "Log file", "Verified records", "Result"],
        [[x["participant"], x["file"], x["records"],
          "intact" if x["ok"] else (f"first bad record: line {x['first_bad']['line']}, "
                                    f"{x['first_bad']['kind']}: {x['first_bad']['detail']}")]
         for x in audit["logs"]], [0.15, 0.25, 0.12, 0.48]))
    for label, items in (("Missing log", audit["missing_logs"]),
                         ("Mismatch", audit["mismatches"]), ("Problem", audit["problems"])):
        for item in items:
            story.append(_p(f"{label}: {item}"))
    story.append(_p("Failures and rejected results:" if audit["failures"] else
                    "Failures and rejected results: none recorded."))
    if audit["failures"]:
        story.append(_table(
            ["Recorded by", "Round", "Site", "Kind", "Reason"],
            [[f["participant"], "" if f["round"] is None else f["round"], f["site"], f["kind"], f["message"]]
             for f in audit["failures"]], [0.14, 0.08, 0.12, 0.16, 0.5]))

    section("controls", 8)
    story.append(_p("How the evidence above bears on each regulatory control. This mapping "
                    "supports a compliance assessment; it does not replace one."))
    story.append(_table(["Framework", "Reference", "Control", "Evidence from this job", "Status"],
                        [[c["framework"], c["reference"], c["control"], c["evidence"],
                          _status(c["status"])] for c in report["controls"]],
                        [0.12, 0.15, 0.16, 0.43, 0.14]))
    story.append(Spacer(1, 6))
    story.append(_p(f"Result folder: {report['result_dir']}. The machine-readable version of "
                    "this report is report.json.", _CELL))

    buf = io.BytesIO()
    doc = SimpleDocTemplate(buf, pagesize=A4, leftMargin=18 * mm, rightMargin=18 * mm,
                            topMargin=16 * mm, bottomMargin=16 * mm,
                            title=f"Compliance report {s['job_name'] or ''}",
                            author=report["generator"], invariant=1)
    doc.build(story)
    return buf.getvalue()
