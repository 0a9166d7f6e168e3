"""The compliance report: its numbers are the result's, its sections are all there, in all forms."""

from __future__ import annotations

import base64
import json
import re
from html.parser import HTMLParser
from pathlib import Path

import jsonschema
import pytest

from zenfed.audit import crypto

pytest.importorskip("reportlab", reason="report.pdf is drawn with reportlab, a dependency")

from zenfed.audit.report import SECTIONS, build_report, load_schema
from zenfed.audit.verify import verify_result

PACKAGED_SCHEMA = Path(__file__).resolve().parents[2] / "src" / "zenfed" / "audit" / "report.schema.json"


@pytest.fixture(scope="module")
def built(pristine_result, tmp_path_factory):
    out = tmp_path_factory.mktemp("report")
    paths = build_report(pristine_result, out_dir=out)
    result = json.loads((pristine_result / "zenfed_result.json").read_text())
    return paths, json.loads(paths.json.read_text()), result


class _Sections(HTMLParser):
    """Collects section ids, h2 texts and inline images of an HTML page."""

    def __init__(self) -> None:
        super().__init__()
        self.ids: list[str] = []
        self.h2: list[str] = []
        self.images: list[str] = []
        self._in_h2 = False

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if tag == "section":
            self.ids.append(a.get("id", ""))
        if tag == "img":
            self.images.append(a.get("src", ""))
        self._in_h2 = tag == "h2"

    def handle_data(self, data):
        if self._in_h2:
            self.h2.append(data.strip())

    def handle_endtag(self, tag):
        if tag == "h2":
            self._in_h2 = False


def test_report_json_follows_the_packaged_schema(built):
    _, report, _ = built
    schema = json.loads(PACKAGED_SCHEMA.read_text())
    assert schema == load_schema()  # the one schema, as the installed package reads it
    jsonschema.Draft202012Validator(schema).validate(report)
    assert list(report)[4:] == [key for key, _ in SECTIONS]


def test_report_numbers_equal_the_results(built, project):
    # Prepare
    _, report, result = built
    rounds = result["rounds"]
    # Assert: summary
    s = report["summary"]
    assert s["job_id"] == result["job"]["job_id"] and s["spec_sha256"] == result["job"]["spec_hash"]
    assert s["final_eval_loss"] == result["final"]["eval_loss"]
    assert s["final_accuracy"] == result["final"]["accuracy"]
    assert s["final_adapter_sha256"] == result["final"]["adapter_sha256"]
    assert s["rounds_completed"] == len(rounds) and s["rounds_planned"] == 3
    assert s["submitted_by"] == "admin@example.com"
    # curves and lineage
    for got, want in zip(report["curves"]["rounds"], rounds, strict=True):
        assert (got["round"], got["eval_loss"], got["accuracy"]) == (
            want["round"], want["eval_loss"], want["accuracy"])
        for site, entry in want["sites"].items():
            assert got["sites"][site]["train_loss"] == entry["train_loss"]
            assert got["sites"][site]["num_examples"] == entry["num_examples"]
    assert [r["global_adapter_sha256"] for r in report["lineage"]["rounds"]] == [
        r["global_adapter_sha256"] for r in rounds]
    lineage = report["lineage"]["rounds"]
    assert all(r["logged_output"] == r["global_adapter_sha256"] for r in lineage)
    assert report["lineage"]["base_model"] == result["base_model"]
    # data residency: bytes per site from the logs equal the result's
    per_site = {}
    for r in rounds:
        for site, entry in r["sites"].items():
            per_site[site] = per_site.get(site, 0) + entry["update_bytes"]
    got = {row["site"]: row["bytes_sent"] for row in report["data_residency"]["sites"]}
    assert got == per_site and len(set(got.values())) == 2
    assert all(row["consistent"] for row in report["data_residency"]["sites"])
    total = report["data_residency"]["total_bytes"]
    assert total == s["bytes_left_sites"] == sum(per_site.values())
    # privacy and participants
    assert report["privacy"]["mechanisms"] == result["privacy"]["mechanisms"]
    fps = {p["name"]: p["cert_sha256"] for p in report["participants"]}
    for name in ("server1", "site-1", "site-2"):
        assert fps[name] == crypto.cert_fingerprint(crypto.load_cert(project.cert(name)))
    # audit and controls
    assert report["audit"]["ok"] and report["audit"]["matched_updates"] == 6
    assert [c["reference"] for c in report["controls"]] == [
        "§164.312(a)(1)", "§164.312(b)", "§164.312(c)(1)", "§164.312(e)(1)", "Art. 5(1)(f)",
        "Art. 25", "Art. 30", "Art. 32", "Art. 10", "Art. 12"]
    assert all(c["status"] == "evidenced" for c in report["controls"])


def test_html_is_self_contained_with_all_sections_and_plots(built):
    paths, report, _ = built
    html = paths.html.read_text()
    parser = _Sections()
    parser.feed(html)
    assert parser.ids == [key for key, _ in SECTIONS]
    assert parser.h2 == [f"{i}. {title}" for i, (_, title) in enumerate(SECTIONS, 1)]
    assert len(parser.images) == 2
    for src in parser.images:
        assert src.startswith("data:image/png;base64,")
        assert base64.b64decode(src.split(",", 1)[1])[:8] == b"\x89PNG\r\n\x1a\n"
    assert not re.search(r"""(src|href)=["']https?:""", html)  # nothing fetched from outside
    assert f"{report['summary']['bytes_left_sites']:,} bytes" in html
    assert report["summary"]["final_adapter_sha256"] in html


def test_pdf_holds_the_same_sections(built):
    pypdf = pytest.importorskip("pypdf", reason="pypdf extracts the PDF's text (a dev dependency)")
    paths, report, _ = built
    text = "\n".join(page.extract_text() for page in pypdf.PdfReader(paths.pdf).pages)
    flat = re.sub(r"\s+", " ", text)
    positions = [flat.find(f"{i}. {title}") for i, (_, title) in enumerate(SECTIONS, 1)]
    assert -1 not in positions and positions == sorted(positions)
    assert f"{report['summary']['bytes_left_sites']:,} bytes" in flat
    assert report["summary"]["final_adapter_sha256"] in text.replace("\n", "")
    dense = re.sub(r"\s+", "", text)  # table cells may wrap anywhere
    for control in report["controls"]:
        assert re.sub(r"\s+", "", control["reference"] + control["control"]) in dense
    assert len(pypdf.PdfReader(paths.pdf).pages[0].images) == 0  # plots follow on later pages
    assert sum(len(p.images) for p in pypdf.PdfReader(paths.pdf).pages) == 2


def test_damaged_result_gives_a_report_that_says_so(result_dir, tmp_path):
    # Prepare: one site log edited
    path = result_dir / "audit" / "site-2.jsonl"
    lines = path.read_bytes().split(b"\n")
    rec = json.loads(lines[4])
    rec["fields"]["round"] = 99
    lines[4] = crypto.canonical(rec)
    path.write_bytes(b"\n".join(lines))
    # Execute
    paths = build_report(result_dir, out_dir=tmp_path / "out")
    # Assert
    report = json.loads(paths.json.read_text())
    assert not report["audit"]["ok"] and not report["summary"]["audit_intact"]
    bad = next(x for x in report["audit"]["logs"] if x["participant"] == "site-2")
    assert bad["first_bad"]["kind"] == "edited" and bad["first_bad"]["line"] == 5
    assert "NOT intact" in paths.html.read_text()
    audit_control = next(c for c in report["controls"] if c["reference"] == "§164.312(b)")
    assert audit_control["status"] != "evidenced"
    assert not verify_result(result_dir).ok


def test_result_without_optional_parts_still_reports(result_dir, tmp_path):
    # Prepare: a result holding only the job and the logs
    (result_dir / "zenfed_result.json").write_text(json.dumps({"job": {"name": "bare"}}))
    # Execute
    paths = build_report(result_dir, out_dir=tmp_path / "out")
    # Assert
    report = json.loads(paths.json.read_text())
    assert report["summary"]["job_name"] == "bare" and report["curves"]["rounds"] == []
    assert report["privacy"]["mechanisms"] == []
    assert report["data_residency"]["total_bytes"] > 0  # still backed by the site logs
    assert "No round metrics were recorded." in paths.html.read_text()
    assert paths.pdf.read_bytes().startswith(b"%PDF")


def test_missing_site_log_is_reported_from_the_servers_receipts(result_dir, tmp_path):
    (result_dir / "audit" / "site-2.jsonl").unlink()
    report = json.loads(build_report(result_dir, out_dir=tmp_path / "out").json.read_text())
    row = next(r for r in report["data_residency"]["sites"] if r["site"] == "site-2")
    assert row["source"] == "server audit log" and row["consistent"] is True
    assert "No site log was available for site-2" in report["data_residency"]["statement"]
    assert report["audit"]["missing_logs"] == ["site-2"]
    missing = next(p for p in report["participants"] if p["name"] == "site-2")
    assert missing["log_status"] == "missing"


def test_rejected_results_and_site_failures_are_in_every_form_of_the_report(make_result, tmp_path):
    # Prepare: the server rejected one site's update in round 2
    reason = "the signature on the update from site-2 does not match what arrived"
    result = make_result("with-failure", server_errors=(
        {"kind": "result_rejected", "site": "site-2", "round": 2, "message": reason},))

    # Execute
    paths = build_report(result, out_dir=tmp_path / "out")

    # Assert
    report = json.loads(paths.json.read_text())
    jsonschema.validate(report, load_schema())
    assert [(f["site"], f["round"], f["kind"]) for f in report["audit"]["failures"]] == [
        ("site-2", 2, "result_rejected")]
    assert report["audit"]["failures"][0]["message"] == reason
    assert reason in paths.html.read_text()
    assert paths.pdf.read_bytes().startswith(b"%PDF")


def test_a_report_without_failures_says_none_were_recorded(built):
    # Prepare
    paths, report, _ = built

    # Assert
    assert report["audit"]["failures"] == []
    assert "None recorded." in paths.html.read_text()
