"""The job result the server session leaves in its run folder: ``zenfed_result.json`` and the adapter."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from zenfed.engines.export import write_peft_adapter
from zenfed.server.aggregation import Aggregation
from zenfed.spec import JobSpec
from zenfed.types import AdapterState
from zenfed.wire import encode_adapter, sha256_hex

RESULT_FILE = "zenfed_result.json"
_EVAL_KEYS = ("eval_loss", "accuracy", "eval_examples", "preference_accuracy", "reward_margin", "eval_pairs")
# What the history shows per round: each metric, weighted by the count it was measured on.
_WEIGHTED = (("eval_loss", "eval_examples"), ("accuracy", "eval_examples"),
             ("preference_accuracy", "eval_pairs"), ("reward_margin", "eval_pairs"))
PREFERENCE_METRICS = ("preference_accuracy", "reward_margin")


def weighted_eval(round_sites: dict[str, dict[str, Any]]) -> dict[str, float]:
    """Return the sites' evaluation, each metric weighted by the examples (or pairs) it was measured on.

    Sites whose policy withholds their metrics are left out.
    """
    out: dict[str, float] = {}
    for metric, count in _WEIGHTED:
        reporting = [m for m in round_sites.values() if m.get(metric) is not None and m.get(count)]
        total = sum(m[count] for m in reporting)
        if total:
            out[metric] = sum(m[metric] * m[count] for m in reporting) / total
    return out


def round_record(rnd: int, started: float, aggregation: Aggregation, round_sites: dict[str, dict[str, Any]],
                 new_global: Any, *, objective: str = "sft") -> dict[str, Any]:
    """Return one row of the history. Sites evaluated the adapter they received: the previous global."""
    evaluated = weighted_eval(round_sites)
    losses = [m["train_loss"] for m in round_sites.values() if "train_loss" in m]
    return {
        "round": rnd, "objective": objective, "seconds": round(time.time() - started, 3), "evaluated_round": rnd - 1,
        "eval_loss": evaluated.get("eval_loss"), "accuracy": evaluated.get("accuracy"),
        **{k: evaluated[k] for k in PREFERENCE_METRICS if k in evaluated},
        "train_loss": sum(losses) / len(losses) if losses else None,
        "contributors": sorted(aggregation.contributors), "total_weight": aggregation.total_weight,
        "global_adapter_sha256": aggregation.digest(new_global), "encrypted": aggregation.encrypted,
        "sites": dict(round_sites),
    }


def round_summary(entry: dict[str, Any]) -> str:
    """Return one line for the server log about a finished round."""
    train = "withheld (DP)" if entry["train_loss"] is None else f"{entry['train_loss']:.4f}"
    evaluated = "n/a" if entry["eval_loss"] is None else f"{entry['eval_loss']:.4f}"
    return (f"{len(entry['contributors'])} sites, train loss {train}, "
            f"eval loss of round {entry['evaluated_round']} {evaluated}")


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
            **{k: global_eval.get(k) for k in PREFERENCE_METRICS if k in entry},
            "evaluated_round": entry["round"], "sites": sites,
        })
    return rounds


def dpo_reference(spec: JobSpec, history: list[dict[str, Any]]) -> str | None:
    """SHA-256 of the global the DPO stage started from (round ``dpo.sft_rounds``'s result), once it exists.

    None for a supervised job, and for DPO from round 1, whose reference is the initial adapter.
    """
    start = spec.dpo_start_round
    if start is None or start == 1:
        return None
    return next((entry["global_adapter_sha256"] for entry in history if entry.get("round") == start - 1), None)


def objective_summary(spec: JobSpec, history: list[dict[str, Any]]) -> dict[str, Any]:
    """What the job trained, by round, and what one unit of privacy is (for the result and the report)."""
    rounds = spec.federation.rounds
    stages: list[dict[str, Any]] = []
    start = spec.dpo_start_round or rounds + 1
    if start > 1:
        stages.append({"objective": "sft", "rounds": [1, start - 1], "dataset": spec.data.dataset})
    if start <= rounds:
        sha = dpo_reference(spec, history)
        reference = (f"the global adapter after round {start - 1} (sha256 {sha}), kept at each site" if start > 1
                     else "the initial adapter (the base model)")
        stages.append({"objective": "dpo", "rounds": [start, rounds], "dataset": spec.dpo.dataset,
                       "beta": spec.dpo.beta, "reference": reference, "reference_sha256": sha})
    return {"kind": spec.objective, "stages": stages, "privacy_unit": spec.privacy_unit()}


def privacy_mechanisms(spec: JobSpec) -> list[dict[str, Any]]:
    """The privacy mechanisms a job ran with, and their parameters."""
    mechanisms = []
    if spec.privacy.level != "none":
        mechanisms.append({"name": f"differential privacy ({spec.privacy.level} level)",
                           "params": spec.privacy.model_dump(mode="json")})
    if spec.encryption.enabled:
        mechanisms.append({"name": "homomorphic encryption (CKKS, packed)",
                           "params": spec.encryption.model_dump(mode="json")})
    if spec.attestation.mode != "off":
        mechanisms.append({"name": "TEE attestation (nonce-bound, per job)",
                           "params": spec.attestation.model_dump(mode="json")})
    return mechanisms


def build_result(
    *, spec: JobSpec, job_id: str, out_dir: Path, history: list[dict[str, Any]], final_eval: dict[str, float],
    final_sites: dict[str, dict[str, Any]], released: AdapterState | None, global_sha256: str, aggregation: str,
    base_model_sha256: str | None,
) -> dict[str, Any]:
    """Write the final adapter (if released) and ``zenfed_result.json`` into ``out_dir``; return the result."""
    final: dict[str, Any] = {
        "eval_loss": final_eval.get("eval_loss"), "accuracy": final_eval.get("accuracy"),
        **{k: final_eval[k] for k in PREFERENCE_METRICS if k in final_eval}, "sites": final_sites,
        "adapter_dir": None, "adapter_sha256": None, "global_sha256": global_sha256,
    }
    if released is not None:
        write_peft_adapter(out_dir / spec.output.adapter_dir, released, lora=spec.lora, base_model=spec.model.base)
        final.update(adapter_dir=spec.output.adapter_dir, adapter_sha256=sha256_hex(encode_adapter(released)))
    baseline = history[0] if history else {}
    result = {
        "job": {"name": spec.name, "job_id": job_id, "spec_hash": spec.spec_hash(),
                "objective": objective_summary(spec, history), "spec": spec.model_dump(mode="json")},
        "base_model": {"name": spec.model.base, "sha256": base_model_sha256},
        "aggregation": aggregation,
        "privacy": {"mechanisms": privacy_mechanisms(spec)},
        "baseline": {"eval_loss": baseline.get("eval_loss"), "accuracy": baseline.get("accuracy"),
                     **{k: baseline[k] for k in PREFERENCE_METRICS if k in baseline}},
        "rounds": shift_evaluations(history, final_eval, final_sites),
        "final": final,
    }
    (out_dir / RESULT_FILE).write_text(json.dumps(result, indent=2) + "\n")
    return result
