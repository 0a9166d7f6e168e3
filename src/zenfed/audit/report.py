"""The compliance report of a job: report.json, report.html and report.pdf.

    paths = build_report(result_dir, out_dir=Path("report"))

``report.json`` is validated against ``report.schema.json``, shipped in this
package (``src/zenfed/audit/report.schema.json``). The HTML is self-contained (styles
and plots inline) and the PDF holds the same sections, in the same order, under
the same titles.
"""

from __future__ import annotations

import base64
import json
from dataclasses import dataclass
from datetime import UTC, datetime
from importlib import resources
from pathlib import Path
from typing import Any

import jinja2
import jsonschema

import zenfed
from zenfed.atomic import atomic_write_bytes
from zenfed.audit import evidence
from zenfed.audit.controls import controls_table
from zenfed.audit.errors import AuditError
from zenfed.audit.formatting import SECTIONS, format_number, human_bytes
from zenfed.audit.plots import curve_plots

SCHEMA_VERSION = 1

@dataclass(frozen=True)
class ReportPaths:
    """Where the report's files were written."""

    json: Path
    html: Path
    pdf: Path


def load_schema() -> dict[str, Any]:
    """Return the JSON Schema of report.json shipped with the package."""
    text = resources.files("zenfed.audit").joinpath("report.schema.json").read_text()
    schema: dict[str, Any] = json.loads(text)
    return schema


def assemble(result_dir: Path) -> dict[str, Any]:
    """Return the report as a JSON-ready dict (validated against the schema)."""
    result_dir = Path(result_dir)
    if not result_dir.is_dir():
        raise AuditError(f"{result_dir} is not a folder; pass a downloaded job result")
    sections, _ = evidence.collect(result_dir)
    report: dict[str, Any] = {
        "schema_version": SCHEMA_VERSION,
        "generated_at": datetime.now(UTC).isoformat(timespec="seconds").replace("+00:00", "Z"),
        "generator": f"zenfed {zenfed.__version__}",
        "result_dir": str(result_dir),
        **sections,
    }
    report["controls"] = controls_table(report)
    report = {"schema_version": report.pop("schema_version"),
              "generated_at": report.pop("generated_at"),
              "generator": report.pop("generator"),
              "result_dir": report.pop("result_dir"),
              **{key: report[key] for key, _ in SECTIONS}}
    validate(report)
    return report


def validate(report: dict[str, Any]) -> None:
    """Raise AuditError if ``report`` does not follow report.schema.json."""
    validator = jsonschema.Draft202012Validator(load_schema())
    errors = sorted(validator.iter_errors(report), key=lambda e: list(e.path))
    if errors:
        where = "/".join(str(p) for p in errors[0].path) or "(top)"
        raise AuditError(
            f"the report does not follow report.schema.json at {where}: {errors[0].message}; "
            "this is a bug in zenfed.audit, please report it with the result folder"
        )


def render_html(report: dict[str, Any], plots: dict[str, bytes]) -> str:
    """Render the self-contained HTML report."""
    env = jinja2.Environment(
        loader=jinja2.PackageLoader("zenfed.audit", "templates"),
        autoescape=jinja2.select_autoescape(["html", "j2"]),
        undefined=jinja2.StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
    )
    env.filters["bytes"] = human_bytes
    env.filters["num"] = format_number
    images = {k: base64.b64encode(v).decode("ascii") for k, v in plots.items()}
    return env.get_template("report.html.j2").render(r=report, sections=dict(SECTIONS),
                                                     plots=images)


def build_report(result_dir: Path, *, out_dir: Path) -> ReportPaths:
    """Write report.json, report.html and report.pdf for a job result.

    Args:
        result_dir: the downloaded job result (``zenfed_result.json`` and ``audit/``).
        out_dir: where to write; created if needed.

    Returns:
        The paths of the three files.

    Raises:
        AuditError: the result cannot be read, or the report cannot be written.

    """
    try:
        from zenfed.audit.pdf import render_pdf  # reportlab is only needed here
    except ImportError as exc:
        raise AuditError(
            f"report.pdf needs reportlab ({exc}); install zenfed with its dependencies"
        ) from exc

    report = assemble(result_dir)
    plots = curve_plots(report["curves"]["rounds"])
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = ReportPaths(json=out / "report.json", html=out / "report.html", pdf=out / "report.pdf")
    _write(paths.json, (json.dumps(report, indent=2, ensure_ascii=False) + "\n").encode())
    _write(paths.html, render_html(report, plots).encode("utf-8"))
    _write(paths.pdf, render_pdf(report, plots))
    return paths


def _write(path: Path, data: bytes) -> None:
    try:
        # 0644: a report is for people to read and pass on, unlike keys and ledgers.
        atomic_write_bytes(path, data, mode=0o644)
    except OSError as exc:
        raise AuditError(f"cannot write {path} ({exc}); check the output folder") from exc
