"""The job result the controller leaves in its run folder: ``zenfed_result.json`` and the adapter."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

RESULT_FILE = "zenfed_result.json"
_EVAL_KEYS = ("eval_loss", "accuracy", "eval_examples")


def shift_evaluations(
    history: list[dict[str, Any]], final_eval: dict[str, float], final_sites: dict[str, dict[str, Any]]
) -> list[dict[str, Any]]:
    """Return the rounds with each round's evaluation of the adapter it produced.

    Sites evaluate the adapter they receive, so round r+1's answers (or the
    final evaluation) score round r's adapter; training figures stay put.
    """
    rounds = []
    for index, entry in enumerate(history):
        later = history[index + 1] if index + 1 < len(history) else None
        global_eval = later if later else final_eval
        site_evals = later["sites"] if later else final_sites
        sites = {}
        for name, metrics in entry["sites"].items():
            shifted = {k: v for k, v in metrics.items() if k not in _EVAL_KEYS}
            shifted.update({k: site_evals[name][k] for k in _EVAL_KEYS if k in site_evals.get(name, {})})
            sites[name] = shifted
        rounds.append({
            **entry, "eval_loss": global_eval.get("eval_loss"), "accuracy": global_eval.get("accuracy"),
            "evaluated_round": entry["round"], "sites": sites,
        })
    return rounds


def write_result(out_dir: Path, result: dict[str, Any]) -> Path:
    """Write ``zenfed_result.json`` into ``out_dir`` and return its path."""
    path = out_dir / RESULT_FILE
    path.write_text(json.dumps(result, indent=2) + "\n")
    return path
