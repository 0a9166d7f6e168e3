"""What the HTML and PDF reports share: the section list and number formatting for people."""

from __future__ import annotations

from typing import Any

SECTIONS: tuple[tuple[str, str], ...] = (
    ("summary", "Summary"),
    ("participants", "Participants and certificates"),
    ("privacy", "Privacy mechanisms in force"),
    ("data_residency", "Data residency"),
    ("curves", "Training and evaluation curves"),
    ("lineage", "Model lineage"),
    ("audit", "Audit-chain verdict"),
    ("controls", "Controls mapping"),
)
"""(key in report.json, title) of each section, in report order."""


def human_bytes(n: Any) -> str:
    """Format a byte count for people: ``1,234,567 bytes (1.2 MB)``."""
    if not isinstance(n, int):
        return "unknown"
    size, unit = float(n), "B"
    for unit in ("B", "kB", "MB", "GB", "TB"):
        if size < 1000 or unit == "TB":
            break
        size /= 1000
    return f"{n:,} bytes" if unit == "B" else f"{n:,} bytes ({size:.1f} {unit})"


def format_number(value: Any, digits: int = 4) -> str:
    """Format a number for people (4 significant digits); None becomes n/a."""
    if value is None:
        return "n/a"
    if isinstance(value, float):
        return f"{value:.{digits}g}"
    return str(value)
