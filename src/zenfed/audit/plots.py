"""Training and evaluation curves as PNG images (matplotlib, headless)."""

from __future__ import annotations

import io
from typing import Any

import matplotlib

matplotlib.use("Agg")  # headless: servers and CI have no display

import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402


def _png(fig: Any) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)
    return buf.getvalue()


def _series(rounds: list[dict[str, Any]], key: str) -> tuple[list[int], list[float]]:
    xs = [r["round"] for r in rounds if r.get(key) is not None]
    return xs, [r[key] for r in rounds if r.get(key) is not None]


def _site_series(
    rounds: list[dict[str, Any]], site: str, key: str
) -> tuple[list[int], list[float]]:
    pts = [(r["round"], r["sites"][site][key]) for r in rounds
           if site in r["sites"] and r["sites"][site].get(key) is not None]
    return [p[0] for p in pts], [p[1] for p in pts]


def curve_plots(rounds: list[dict[str, Any]]) -> dict[str, bytes]:
    """Return PNG bytes of the loss and accuracy curves, by name; empty if nothing to plot.

    ``loss``: global evaluation loss and each site's training loss per round.
    ``accuracy``: global and per-site evaluation accuracy per round.
    """
    sites = sorted({s for r in rounds for s in r["sites"]})
    plots: dict[str, bytes] = {}
    for name, global_key, site_key, title, ylabel in (
        ("loss", "eval_loss", "train_loss", "Loss per round", "loss"),
        ("accuracy", "accuracy", "accuracy", "Evaluation accuracy per round", "accuracy"),
    ):
        xs, ys = _series(rounds, global_key)
        site_lines = {s: _site_series(rounds, s, site_key) for s in sites}
        if not xs and not any(v[0] for v in site_lines.values()):
            continue
        fig, ax = plt.subplots(figsize=(6.4, 3.4))
        if xs:
            label = "global model (evaluation)" if name == "loss" else "global model"
            ax.plot(xs, ys, marker="o", linewidth=2.2, color="black", label=label)
        for site, (sx, sy) in site_lines.items():
            if sx:
                suffix = " (training)" if name == "loss" else ""
                ax.plot(sx, sy, marker=".", linestyle="--", label=f"{site}{suffix}")
        ax.set_title(title)
        ax.set_xlabel("round")
        ax.set_ylabel(ylabel)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        plots[name] = _png(fig)
    return plots
