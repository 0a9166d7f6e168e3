"""Benchmark: preference alignment (DPO) after instruction tuning, federated against centralised.

Prints one JSON object. In-process, on the built-in non-IID data and preference
pairs of three sites, from the same initial adapter and seed, every arm scored
on the same held-out union pairs (``pref-test.jsonl``) and SFT test set:

- ``base``: the base model (its implicit reward against itself is 0: accuracy 0.5).
- ``sft``: FedAvg SFT, ``sft_rounds`` x ``local_steps`` a site (the start of every DPO arm).
- ``federated_dpo``: then FedAvg DPO over the sites' own pairs, ``dpo_rounds`` x
  ``local_steps`` a site, each site against the SFT adapter as its reference
  (``engines/dpo.py``, what a site of a ``dpo`` job runs).
- ``central_dpo``: DPO on all sites' pairs pooled, from the same SFT adapter, for the
  same total number of steps (``dpo_rounds * local_steps * sites``).
- ``federated_dpo_dp`` / ``central_dpo_dp``: the same under record-level DP-SGD with the
  pair as the unit, each at epsilon 8 (delta 1/(10 n)) over its own pairs (the SFT
  stage, shared by every arm, is not private here).

Per arm: preference accuracy and reward margin (implicit reward against the base
model), the SFT test's exact-match accuracy and loss (what alignment costs the
supervised skill), and seconds. Goals: federated DPO raises preference accuracy
over SFT by at least 20 points and reaches at least 0.95 of centralised DPO's
gain, without and with DP.

Run: ``python bench/bench_alignment.py [--tiny]`` or ``zenfed bench alignment --json [--tiny]``.
"""

from __future__ import annotations

import dataclasses
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))  # _arms sits beside this file, however it is loaded
import _arms as arms  # noqa: E402
from zenfed.data.builtin_preferences import PREFERENCE_TEST_FILE, write_builtin_preferences  # noqa: E402
from zenfed.data.preference import PreferencePair, load_preferences  # noqa: E402
from zenfed.engines.base import TrainResult  # noqa: E402
from zenfed.engines.peft import PeftEngine  # noqa: E402
from zenfed.privacy.dp import PrivacyAccountant, plan_record_dp  # noqa: E402
from zenfed.types import AdapterState, RecordDP  # noqa: E402

TARGET_EPSILON = 8.0


@dataclass(frozen=True)
class AlignmentConfig:
    """What one run trains (``tiny_*`` only for the tiny random Llama)."""

    sft_rounds: int
    dpo_rounds: int
    local_steps: int
    batch_size: int  # SFT examples a step
    pair_batch_size: int  # preference pairs a step (two rows each)
    learning_rate: float
    dpo_learning_rate: float
    beta: float
    rank: int
    alpha: float
    target_modules: tuple[str, ...]
    train_per_site: int
    pairs_per_site: int
    test_per_task: int
    test_pairs_per_task: int
    dp_learning_rate: float
    dp_pair_batch_size: int
    clip_norm: float = 1.0
    seq_len: int = 128
    skew: float = 0.9
    max_new_tokens: int = 6
    tiny_hidden: int = 64
    tiny_layers: int = 2
    tiny_vocab: int = 1024
    tiny_output_scale: float = 8.0

    @property
    def rounds(self) -> int:
        """The SFT stage's rounds (what the shared FedAvg loop reads)."""
        return self.sft_rounds


TINY = AlignmentConfig(
    sft_rounds=4, dpo_rounds=3, local_steps=4, batch_size=8, pair_batch_size=8, learning_rate=2e-2,
    dpo_learning_rate=1e-2, beta=0.1, rank=8, alpha=16.0, target_modules=arms.ALL_LINEAR, train_per_site=120,
    pairs_per_site=120, test_per_task=10, test_pairs_per_task=16, dp_learning_rate=2e-2, dp_pair_batch_size=24,
)
# SmolLM2-135M-Instruct: about 1-2 s a step on 2 idle cores. SFT as the quality benchmark's
# LoRA (r=8 on the attention projections), fewer rounds: the DPO arms only need a start that
# knows the codes. DPO's pairs are two rows each, so a step of 8 pairs is 16 sequences.
FULL = AlignmentConfig(
    sft_rounds=8, dpo_rounds=4, local_steps=4, batch_size=8, pair_batch_size=8, learning_rate=3e-3,
    dpo_learning_rate=2e-3, beta=0.1, rank=8, alpha=16.0, target_modules=arms.ATTENTION, train_per_site=400,
    pairs_per_site=400, test_per_task=20, test_pairs_per_task=24, dp_learning_rate=5e-3, dp_pair_batch_size=32,
)

_log = arms.logger("alignment")


def _dpo_train(engine: PeftEngine, *, reference: AdapterState, beta: float):
    """The local training of a DPO site, in the shape ``arms.fedavg`` calls it."""

    def train(*, adapter: AdapterState, data: Sequence[PreferencePair], steps: int, seed: int,
              dp: RecordDP | None, optimizer_state: Any) -> TrainResult:
        return engine.train_preferences(adapter=adapter, reference=reference, pairs=data, steps=steps, seed=seed,
                                        beta=beta, dp=dp, optimizer_state=optimizer_state)

    return train


def _site_dp(config: AlignmentConfig, *, pairs: int, steps: int) -> tuple[RecordDP, dict[str, float]]:
    """DP-SGD at epsilon 8 over ``steps`` steps of an expected ``dp_pair_batch_size`` of ``pairs`` pairs."""
    plan = plan_record_dp(rounds=1, local_steps=steps, batch_size=config.dp_pair_batch_size, num_records=pairs,
                          target_epsilon=TARGET_EPSILON)
    accountant = PrivacyAccountant()
    dp = RecordDP(noise_multiplier=plan.noise_multiplier, clip_norm=config.clip_norm, sample_rate=plan.sample_rate,
                  accountant=accountant)
    return dp, {"noise_multiplier": round(plan.noise_multiplier, 4), "sample_rate": round(plan.sample_rate, 5),
                "planned_epsilon": round(plan.epsilon, 4), "delta": plan.delta}


def _dpo_arms(engine: PeftEngine, sft: AdapterState, pairs: dict[str, list[PreferencePair]], *,
              config: AlignmentConfig, seed: int, private: bool,
              ) -> tuple[tuple[AdapterState, AdapterState], tuple[float, float], dict[str, Any]]:
    """Train federated and centralised DPO from ``sft`` (their reference); return both, their seconds, the DP plans."""
    rate = config.dp_learning_rate if private else config.dpo_learning_rate
    batch = config.dp_pair_batch_size if private else config.pair_batch_size
    engine.training = engine.training.model_copy(update={"learning_rate": rate, "batch_size": batch})
    local = _dpo_train(engine, reference=sft, beta=config.beta)
    site_steps = config.dpo_rounds * config.local_steps
    central_steps = site_steps * len(pairs)
    pooled = [pair for site_pairs in pairs.values() for pair in site_pairs]
    plans: dict[str, Any] = {}
    site_dp: dict[str, RecordDP] = {}
    central_dp = None
    if private:
        for site, site_pairs in pairs.items():
            site_dp[site], plans[site] = _site_dp(config, pairs=len(site_pairs), steps=site_steps)
        central_dp, plans["central"] = _site_dp(config, pairs=len(pooled), steps=central_steps)
    label = "federated dpo" + (" under DP" if private else "")
    begin = time.perf_counter()
    federated = arms.fedavg(engine, sft, pairs, config=dataclasses.replace(config, sft_rounds=config.dpo_rounds),
                            seed=seed, log=_log, label=label, local_train=local, dp=lambda site: site_dp.get(site))
    middle = time.perf_counter()
    central = local(adapter=sft, data=pooled, steps=central_steps, seed=seed, dp=central_dp,
                    optimizer_state=None).adapter
    seconds = (middle - begin, time.perf_counter() - middle)
    if private:  # what each accountant really counted, against the plan
        for name, dp in [*site_dp.items(), ("central", central_dp)]:
            if dp is not None:
                plans[name]["spent_epsilon"] = round(dp.accountant.get_epsilon(plans[name]["delta"]), 4)
    return (federated, central), seconds, plans


def _scores(engine: PeftEngine, adapter: AdapterState, *, test: Sequence[Any], pairs: Sequence[PreferencePair],
            config: AlignmentConfig) -> dict[str, float]:
    preference = engine.evaluate_preferences(adapter=adapter, pairs=pairs, beta=config.beta)
    return {"preference_accuracy": round(preference.accuracy, 4),
            "reward_margin": round(preference.reward_margin, 4),
            **arms.scores(engine, adapter, test, config=config)}


def _gain(results: dict[str, dict], arm: str) -> float:
    return results[arm]["preference_accuracy"] - results["sft"]["preference_accuracy"]


def _goals(results: dict[str, dict], *, federated: str, central: str) -> dict[str, Any]:
    gain, central_gain = _gain(results, federated), _gain(results, central)
    points = round(100 * gain, 2)
    share = round(gain / central_gain, 4) if central_gain > 0 else None
    return {"gain_points_over_sft": points, "gain_points_goal": 20.0, "gain_points_met": points >= 20.0,
            "share_of_central_gain": share, "share_goal": 0.95, "share_met": share is not None and share >= 0.95}


def run(*, tiny: bool, sites: int = 3, seed: int = 0, config: AlignmentConfig | None = None,
        dp: bool = True) -> dict[str, Any]:
    """Run every arm and return the JSON object.

    Args:
        tiny: Use a tiny random Llama (seconds) instead of SmolLM2-135M-Instruct.
        sites: Number of sites.
        seed: Seed of the data, the initial adapter and the data order.
        config: Override the preset (``TINY`` or ``FULL``).
        dp: Also run the two DP arms.
    """
    started = time.perf_counter()
    config = config or (TINY if tiny else FULL)
    arms.seed_torch(seed)
    results: dict[str, dict] = {}
    privacy: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="zenfed-bench-alignment-") as tmp:
        scratch = Path(tmp)
        model, model_name = arms.model_dir(tiny=tiny, config=config, scratch=scratch, seed=seed,
                                           adjust=lambda path: arms.scale_output(path, factor=config.tiny_output_scale))
        engine = arms.make_engine(model, config=config, seed=seed)
        train, test = arms.load_sites(scratch, sites=sites, config=config, seed=seed)
        write_builtin_preferences(scratch / "data", sites=sites, train_per_site=config.pairs_per_site,
                                  valid_per_site=1, test_per_task=config.test_pairs_per_task, skew=config.skew,
                                  seed=seed)
        pairs = {site: load_preferences(scratch / "data" / site / "pref-train.jsonl") for site in train}
        held_out = load_preferences(scratch / "data" / PREFERENCE_TEST_FILE)

        def timed(name: str, adapter_of: Any, *, trained_s: float = 0.0) -> AdapterState:
            begin = time.perf_counter()
            adapter = adapter_of()
            results[name] = {**_scores(engine, adapter, test=test, pairs=held_out, config=config),
                             "seconds": round(trained_s + time.perf_counter() - begin, 1)}
            _log(f"{name}: {results[name]}")
            return adapter

        start = timed("base", engine.initial_adapter)
        sft = timed("sft", lambda: arms.fedavg(engine, start, train, config=config, seed=seed, log=_log, label="sft"))
        for private in (False, True) if dp else (False,):
            (federated, central), seconds, spent = _dpo_arms(engine, sft, pairs, config=config, seed=seed,
                                                             private=private)
            suffix = "_dp" if private else ""
            timed(f"federated_dpo{suffix}", lambda federated=federated: federated, trained_s=seconds[0])
            timed(f"central_dpo{suffix}", lambda central=central: central, trained_s=seconds[1])
            privacy.update(spent)
    goals = {"no_dp": _goals(results, federated="federated_dpo", central="central_dpo")}
    if dp:
        goals["dp_epsilon_8"] = _goals(results, federated="federated_dpo_dp", central="central_dpo_dp")
    return {
        "benchmark": "alignment", "tiny": tiny, "arms": results, "goals": goals, "privacy": privacy or None,
        "config": {"model": model_name, "engine": "peft", "sites": sites, "seed": seed,
                   **arms.config_fields(config, tiny=tiny), "threads": arms.THREADS},
        "seconds": round(time.perf_counter() - started, 1),
    }


def main(argv: Sequence[str] | None = None) -> None:
    arms.main(run, description=__doc__.splitlines()[0], argv=argv, tiny_help="tiny random Llama, about a minute (CI)")


if __name__ == "__main__":
    main()
