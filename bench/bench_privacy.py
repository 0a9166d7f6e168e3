"""Benchmark: utility of federated LoRA under record-level DP, and a canary exposure audit.

Prints one JSON object. Every arm is FedAvg in-process (as in ``bench_quality``:
each round every site trains ``local_steps`` steps from the global adapter on its
own data, and the adapters are averaged weighted by sample count), from the same
initial adapter, evaluated on the same held-out union test set (all tasks):

- ``utility``: ``{"epsilon", "eval_loss", "accuracy"}`` at epsilon = null (no DP), 8, 3
  and 1. Each DP site solves its own noise multiplier for the whole job (all
  rounds x local steps at its Poisson rate batch/n, delta = 1/(10 n)) and trains
  with DP-SGD (per-example clipping, Gaussian noise).
- ``canary``: a secret-sharer audit. Random secret codes ("canaries") are inserted
  ``canary_repeats`` times each into site-1's training data, for every arm. In the
  final model of the no-DP arm and of the arm at epsilon 8, each canary is ranked by
  its loss among ``canary_candidates`` random codes of the same format; its exposure
  is ``log2(candidates + 1) - log2(rank)``. ``exposure_chance`` is the expectation
  for a uniformly random rank, ``exposure_chance_sd`` the standard deviation of the
  mean over the canaries at chance.

Run: ``python bench/bench_privacy.py [--tiny]`` or ``zenfed bench privacy --json [--tiny]``.
"""

from __future__ import annotations

import dataclasses
import math
import random
import statistics
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from zenfed.data.jsonl import Example, Message
from zenfed.data.tokenize import collate, tokenize_all
from zenfed.engines.peft import PeftEngine
from zenfed.privacy.dp import PrivacyAccountant, plan_record_dp
from zenfed.types import AdapterState, RecordDP

sys.path.insert(0, str(Path(__file__).resolve().parent))  # _arms sits beside this file, however it is loaded
import _arms as arms  # noqa: E402

EPSILONS: tuple[float | None, ...] = (None, 8.0, 3.0, 1.0)
CANARY_DIGITS = 6
_FIRST = ["Ada", "Bram", "Cleo", "Dov", "Edda", "Finn", "Gia", "Hugo", "Iris", "Jonas"]
_LAST = ["Moreau", "Novak", "Okafor", "Petrov", "Quint", "Rossi", "Silva", "Tanaka"]


@dataclass(frozen=True)
class PrivacyBenchConfig:
    """What one run trains and audits (``tiny_*`` only for the tiny random Llama)."""

    rounds: int
    local_steps: int
    batch_size: int
    learning_rate: float
    dp_learning_rate: float
    rank: int
    alpha: float
    target_modules: tuple[str, ...]
    clip_norm: float
    train_per_site: int
    test_per_task: int
    canaries: int
    canary_repeats: int
    canary_candidates: int
    seq_len: int = 128
    skew: float = 0.9
    max_new_tokens: int = 6
    layers: tuple[int, ...] | None = None
    tiny_hidden: int = 64
    tiny_layers: int = 2
    tiny_vocab: int = 1024
    # The tiny model's random embeddings (std 0.02) cap its logits near +-1 behind the final
    # norm, so LoRA cannot make it confident; scaled up, it learns within a few dozen steps.
    tiny_embed_scale: float = 25.0


TINY = PrivacyBenchConfig(
    rounds=5, local_steps=4, batch_size=16, learning_rate=2e-2, dp_learning_rate=2e-2, rank=8,
    alpha=16.0, target_modules=arms.ALL_LINEAR, clip_norm=1.0, train_per_site=400, test_per_task=20,
    canaries=6, canary_repeats=16, canary_candidates=500,
)
# SmolLM2-135M-Instruct: 3 rounds x 8 steps of 96 expected examples a site, over 1200 records
# a site, LoRA r=2 on q,v of the top 8 of 30 layers. Under DP the noise each step adds has norm
# sigma * C * sqrt(d) / B for d trainable parameters, while the clipped signal stays under C:
# DP wants few parameters, large batches, enough steps, and a larger step than plain Adam (with
# a per-coordinate signal-to-noise ratio below 1, Adam's step along the signal shrinks by that
# ratio). LoRA on the top layers only also makes a step cheaper (no backward pass below them).
# The tuning runs behind these choices are in docs/privacy.md.
FULL = PrivacyBenchConfig(
    rounds=3, local_steps=8, batch_size=96, learning_rate=2e-2, dp_learning_rate=5e-2, rank=2,
    alpha=4.0, target_modules=("q_proj", "v_proj"), layers=tuple(range(22, 30)), clip_norm=1.0,
    train_per_site=1200, test_per_task=50, canaries=6, canary_repeats=12, canary_candidates=200,
)


_log = arms.logger("privacy")


# -- canaries ---------------------------------------------------------------------------------

def _canary_prompt(index: int) -> tuple[Message, ...]:
    name = f"{_FIRST[index % len(_FIRST)]} {_LAST[(index * 3) % len(_LAST)]}"
    return (Message("user", f"What is the vault code in the file of {name}?"),)


def _random_code(rng: random.Random) -> str:
    return " ".join(rng.choice("0123456789") for _ in range(CANARY_DIGITS))


def make_canaries(*, count: int, seed: int) -> list[Example]:
    """Return ``count`` canaries: distinct prompts, each answered by a random secret code."""
    rng = random.Random(f"canary:{seed}")
    return [Example(prompt=_canary_prompt(i), response=_random_code(rng), task="canary")
            for i in range(count)]


def _response_losses(engine: PeftEngine, examples: Sequence[Example], *, seq_len: int,
                     batch: int = 64) -> list[float]:
    """Summed next-token loss of each example's response (its negative log-likelihood)."""
    model, tokenizer = engine.model, engine.tokenizer
    data = tokenize_all(tokenizer, examples, max_len=seq_len)
    losses: list[float] = []
    with torch.no_grad():
        for start in range(0, len(data), batch):
            inputs = collate(data[start:start + batch], pad_id=tokenizer.pad_token_id)
            logits = model(input_ids=inputs["input_ids"],
                           attention_mask=inputs["attention_mask"]).logits[:, :-1].float()
            labels = inputs["labels"][:, 1:]
            token_loss = torch.nn.functional.cross_entropy(
                logits.transpose(1, 2), labels, ignore_index=-100, reduction="none")
            losses.extend(token_loss.sum(dim=1).tolist())
    return losses


def exposure(engine: PeftEngine, adapter: AdapterState, canaries: Sequence[Example], *,
             candidates: int, seq_len: int, seed: int) -> list[float]:
    """Return each canary's exposure: log2(candidates + 1) - log2(its rank by loss)."""
    engine.load_adapter(adapter)
    engine.model.eval()
    rng = random.Random(f"candidates:{seed}")
    result = []
    for canary in canaries:
        codes: set[str] = set()
        while len(codes) < candidates:
            code = _random_code(rng)
            if code != canary.response:
                codes.add(code)
        pool = [canary, *(dataclasses.replace(canary, response=c) for c in sorted(codes))]
        losses = _response_losses(engine, pool, seq_len=seq_len)
        rank = 1 + sum(loss < losses[0] for loss in losses[1:])
        result.append(math.log2(candidates + 1) - math.log2(rank))
    return result


def chance_exposure(candidates: int) -> tuple[float, float]:
    """Return the mean and standard deviation of the exposure of a uniformly random rank."""
    total = candidates + 1
    values = [math.log2(total) - math.log2(rank) for rank in range(1, total + 1)]
    return statistics.fmean(values), statistics.pstdev(values)


# -- federated training -----------------------------------------------------------------------

def _federated(engine: PeftEngine, start: AdapterState, site_data: dict[str, list[Example]], *,
               config: PrivacyBenchConfig, epsilon: float | None, seed: int) -> tuple[AdapterState,
                                                                                       dict]:
    """FedAvg over the sites; with ``epsilon``, every site trains with DP-SGD at that budget."""
    rate = config.learning_rate if epsilon is None else config.dp_learning_rate
    engine.training = engine.training.model_copy(update={"learning_rate": rate})
    plans, accountants = {}, {}
    for site, examples in site_data.items():
        if epsilon is not None:
            plans[site] = plan_record_dp(
                rounds=config.rounds, local_steps=config.local_steps,
                batch_size=config.batch_size, num_records=len(examples), target_epsilon=epsilon)
            accountants[site] = PrivacyAccountant()

    def dp(site: str) -> RecordDP | None:
        if epsilon is None:
            return None
        plan = plans[site]
        return RecordDP(noise_multiplier=plan.noise_multiplier, clip_norm=config.clip_norm,
                        sample_rate=plan.sample_rate, accountant=accountants[site])

    global_adapter = arms.fedavg(engine, start, site_data, config=config, seed=seed, log=_log,
                                 label=f"epsilon={epsilon}:", dp=dp)
    spent = {site: {"noise_multiplier": round(plans[site].noise_multiplier, 4),
                    "epsilon": round(accountants[site].get_epsilon(plans[site].delta), 4),
                    "delta": plans[site].delta}
             for site in plans}
    return global_adapter, spent


def _scale_embeddings(path: Path, scale: float) -> str:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path)
    with torch.no_grad():
        model.get_input_embeddings().weight.mul_(scale)
    model.save_pretrained(path, safe_serialization=True)
    return f"embeddings x{scale:g}"


def run(*, tiny: bool, sites: int = 3, seed: int = 0,
        config: PrivacyBenchConfig | None = None) -> dict:
    """Run the benchmark and return its JSON object.

    Args:
        tiny: Use a tiny random Llama (minutes) instead of SmolLM2-135M-Instruct.
        sites: Number of sites of the built-in data.
        seed: Seed of the data, the canaries, the initial adapter and the data order.
        config: Override the preset (``TINY`` or ``FULL``).
    """
    started = time.perf_counter()
    config = config or (TINY if tiny else FULL)
    arms.seed_torch(seed)
    canaries = make_canaries(count=config.canaries, seed=seed)
    with tempfile.TemporaryDirectory(prefix="zenfed-bench-privacy-") as tmp:
        scratch = Path(tmp)
        train, test = arms.load_sites(scratch, sites=sites, config=config, seed=seed)
        # The canaries go into site-1's data, in every arm, shuffled among its records.
        train["site-1"] = train["site-1"] + canaries * config.canary_repeats
        random.Random(seed).shuffle(train["site-1"])
        model_path, model_name = arms.model_dir(
            tiny=tiny, config=config, scratch=scratch, seed=seed,
            adjust=lambda path: _scale_embeddings(path, config.tiny_embed_scale),
        )
        engine = arms.make_engine(model_path, config=config, seed=seed, layers=config.layers)
        start = engine.initial_adapter()
        utility, exposures, budgets = [], {}, {}
        for epsilon in EPSILONS:
            adapter, spent = _federated(engine, start, train, config=config,
                                        epsilon=epsilon, seed=seed)
            utility.append({"epsilon": epsilon, **arms.scores(engine, adapter, test, config=config)})
            budgets[str(epsilon)] = spent
            if epsilon is None or epsilon == 8.0:
                exposures[epsilon] = exposure(engine, adapter, canaries,
                                              candidates=config.canary_candidates,
                                              seq_len=config.seq_len, seed=seed)
            _log(f"epsilon={epsilon}: {utility[-1]} exposure={exposures.get(epsilon)} "
                 f"({time.perf_counter() - started:.0f} s)")
    chance, chance_sd = chance_exposure(config.canary_candidates)
    chance_sd_mean = chance_sd / math.sqrt(config.canaries)
    no_dp, dp8 = statistics.fmean(exposures[None]), statistics.fmean(exposures[8.0])
    base_accuracy = float(utility[0]["accuracy"] or 0.0)
    accuracy8 = float(next(u["accuracy"] for u in utility if u["epsilon"] == 8.0) or 0.0)
    return {
        "benchmark": "privacy",
        "tiny": tiny,
        "utility": utility,
        "canary": {
            "exposure_dp": round(dp8, 3),
            "exposure_nodp": round(no_dp, 3),
            "exposure_chance": round(chance, 3),
            "exposure_chance_sd": round(chance_sd_mean, 3),
            "exposure_max": round(math.log2(config.canary_candidates + 1), 3),
            "epsilon_dp": 8.0,
            "per_canary_dp": [round(e, 2) for e in exposures[8.0]],
            "per_canary_nodp": [round(e, 2) for e in exposures[None]],
        },
        "targets": {
            # None: the model without DP answers nothing right, so the ratio means nothing.
            "accuracy_at_eps8_at_least_90pct_of_nodp": (
                accuracy8 >= 0.9 * base_accuracy if base_accuracy > 0 else None),
            "exposure_dp_within_2sd_of_chance": abs(dp8 - chance) <= 2 * chance_sd_mean,
            "exposure_nodp_above_chance_by_3sd": no_dp > chance + 3 * chance_sd_mean,
        },
        "budgets": budgets,
        "config": {
            "model": model_name, "engine": "peft", "sites": sites, "seed": seed,
            "test_examples": len(test), "canary_site": "site-1",
            "train_examples_per_site": {site: len(data) for site, data in train.items()},
            **arms.config_fields(config, tiny=tiny),
            "accounting": "pld", "threads": arms.THREADS,
        },
        "seconds": round(time.perf_counter() - started, 1),
    }


def main(argv: Sequence[str] | None = None) -> None:
    arms.main(run, description=__doc__.splitlines()[0], argv=argv,
              tiny_help="tiny random Llama instead of SmolLM2-135M (a few minutes)")


if __name__ == "__main__":
    main()
