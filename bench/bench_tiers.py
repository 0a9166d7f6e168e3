"""Two tiers of encrypted sums on a FLARE simulator job: tier partial sums, summed again at the top.

One job runs in the FLARE simulator (the tiny model, 8 sites on two worker
processes, CKKS with pairwise masks, one round). The server keeps every site's
encrypted update and records the SHA-256 of the sum it sent back. Afterwards,
with the server's public context only (as a tier would hold), the kept updates
are added in tiers of 4 and of 2, and the top adds the tiers' partial sums.

Reported per tiering: whether the two-tier sum is byte-identical to the flat sum
the server recorded (ciphertext addition is exact modular arithmetic, so it
must be), how many additions the top did against the flat sum's, the seconds
of each, and whether a tier's partial sum, decrypted with the sites' key, is
refused: pairwise masks cancel only across the whole cohort.

Prints one JSON object (``zenfed bench tiers --json``)::

    {"sites", "round", "flat": {"additions", "seconds"},
     "tierings": [{"tiers", "top_additions", "top_seconds", "tier_seconds", "equals_recorded_sum",
                   "partial_sum_refused"}], "decrypted_max_abs_difference", "config", "seconds"}
"""

from __future__ import annotations

import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from zenfed.audit.replay import REPLAY_CONTEXT, UPDATES_DIR
from zenfed.data import make_builtin
from zenfed.digest import sha256_hex
from zenfed.engines import make_engine
from zenfed.engines.tiny import build_tiny_model
from zenfed.jobs.simulate import builtin_policies, run_simulation
from zenfed.kit_files import SHARED_SITE_DIR
from zenfed.privacy.he import (
    SITE_CONTEXT_FILE,
    EncryptedSum,
    HEDecodeError,
    UpdateLayout,
    decrypt_sum,
    load_context,
    open_update,
    packing_for,
)
from zenfed.spec import JobSpec

SITES = 8
WORKERS = 2
TIER_SIZES = (4, 2)


def _say(text: str) -> None:
    print(f"bench tiers: {text}", file=sys.stderr, flush=True)


def _spec(model: Path) -> JobSpec:
    return JobSpec.model_validate({
        "name": "tiers", "model": {"base": str(model), "engine": "peft"},
        "lora": {"rank": 4, "alpha": 8, "target_modules": ["q_proj", "v_proj"]},
        "training": {"local_steps": 2, "batch_size": 4, "seq_len": 96, "learning_rate": 0.01},
        "federation": {"rounds": 1, "min_sites": SITES, "task_timeout_s": 1800},
        "evaluation": {"max_examples": 4, "max_new_tokens": 2},
        "encryption": {"enabled": True, "secure_aggregation": "pairwise", "max_sites": 16},
    })


def _add(ciphertexts: list[bytes], context: Any) -> tuple[bytes, float]:
    """The sum of ``ciphertexts`` with a public context, and the seconds it took."""
    started = time.perf_counter()
    total = EncryptedSum(context=context)
    for ciphertext in ciphertexts:
        total.add(ciphertext)
    out = total.to_bytes()
    return out, time.perf_counter() - started


def run(*, tiny: bool = True) -> dict[str, Any]:
    """Run the job, then re-add its kept updates in tiers (``tiny`` is accepted; the run is always small)."""
    started = time.time()
    with tempfile.TemporaryDirectory(prefix="zenfed-bench-tiers-") as tmp:
        root = Path(tmp)
        model = build_tiny_model(root / "tiny")
        make_builtin(root / "data", sites=SITES, train_per_site=24, valid_per_site=4, test_per_task=8)
        spec = _spec(model)
        policies = builtin_policies(root / "data", sites=SITES, dataset="builtin", allow_any_model=True)
        _say(f"{SITES} sites on {WORKERS} simulator workers, CKKS with pairwise masks ...")
        out = run_simulation(spec, workspace=root / "run", policies=policies, threads=WORKERS)
        result = json.loads((out / "zenfed_result.json").read_text())
        recorded = result["rounds"][0]["global_adapter_sha256"]
        public = load_context(out / UPDATES_DIR / REPLAY_CONTEXT, require_secret=False)
        packing = packing_for(spec.encryption)
        kept = sorted((out / UPDATES_DIR / "round-0001").glob("*.bin"))
        sent = [open_update(path.read_bytes(), context=public, packing=packing, job=str(result["job"]["job_id"]),
                            round=1, site=path.stem)[1] for path in kept]
        _say(f"re-adding {len(sent)} kept updates: flat and in tiers ...")
        flat, flat_seconds = _add(sent, public)
        secret = load_context(root / "run" / "sim" / "local" / SHARED_SITE_DIR / SITE_CONTEXT_FILE,
                              require_secret=True)
        layout = UpdateLayout.from_update(make_engine(spec, model_dir=model, threads=1).initial_adapter())
        tierings = []
        for size in TIER_SIZES:
            partials, tier_seconds = [], []
            for first in range(0, len(sent), size):
                partial, seconds = _add(sent[first:first + size], public)
                partials.append(partial)
                tier_seconds.append(seconds)
            top, top_seconds = _add(partials, public)
            try:
                decrypt_sum(partials[0], context=secret, packing=packing, layout=layout, total_weight=None)
                refused = False
            except HEDecodeError:
                refused = True
            tierings.append({
                "tiers": len(partials), "sites_per_tier": size, "top_additions": len(partials),
                "top_seconds": round(top_seconds, 4), "tier_seconds_max": round(max(tier_seconds), 4),
                "equals_recorded_sum": sha256_hex(top) == recorded, "partial_sum_refused": refused,
            })
            _say(json.dumps(tierings[-1]))
        flat_mean = decrypt_sum(flat, context=secret, packing=packing, layout=layout, total_weight=None)
        two_tier_mean = decrypt_sum(top, context=secret, packing=packing, layout=layout, total_weight=None)
        difference = max(float((flat_mean[k] - two_tier_mean[k]).abs().max()) for k in flat_mean)
    return {
        "sites": SITES, "round": 1,
        "flat": {"additions": len(sent), "seconds": round(flat_seconds, 4),
                 "equals_recorded_sum": sha256_hex(flat) == recorded},
        "tierings": tierings, "decrypted_max_abs_difference": difference,
        "config": {"model": "tiny random Llama", "encryption": "CKKS, pairwise masks", "simulator_workers": WORKERS,
                   "tier_sizes": list(TIER_SIZES)},
        "seconds": round(time.time() - started, 1),
    }


if __name__ == "__main__":
    print(json.dumps(run(), indent=2))
