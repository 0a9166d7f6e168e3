"""Benchmark: federated vs centralized vs single-site LoRA on the built-in non-IID data.

Prints one JSON object. Every arm starts from the same initial adapter and is
evaluated on the same held-out union test set (all tasks):

- ``base``: the untrained model (the initial adapter, whose B matrices are zero);
- ``central``: LoRA trained on all sites' data pooled, ``rounds * local_steps * sites`` steps;
- ``federated``: FedAvg in-process with the controller's own ``WeightedMean`` (each round
  every site trains ``local_steps`` steps from the global adapter on its own data, and the
  adapters are averaged weighted by sample count): the same total number of steps;
- ``sites``: each site alone on its own data, again the same total number of steps.

``fed_gain_over_central = (base_loss - fed_loss) / (base_loss - central_loss)``.

Run: ``python bench/bench_quality.py [--tiny]`` or ``zenfed bench quality --json [--tiny]``.
``--tiny`` uses a tiny random Llama with a tokenizer trained on the spot (no model cache).
"""

from __future__ import annotations

import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # _arms sits beside this file, however it is loaded
import _arms as arms  # noqa: E402


@dataclass(frozen=True)
class QualityConfig:
    """What one benchmark run trains and evaluates.

    ``tiny_hidden``/``tiny_layers`` are used only when the model is the tiny random Llama.
    """

    rounds: int
    local_steps: int
    batch_size: int
    learning_rate: float
    rank: int
    alpha: float
    target_modules: tuple[str, ...]
    seq_len: int = 128
    train_per_site: int = 400
    test_per_task: int = 40
    skew: float = 0.9
    max_new_tokens: int = 6
    tiny_hidden: int = 64
    tiny_layers: int = 2
    tiny_vocab: int = 1024
    tiny_output_scale: float = 8.0

    def total_steps(self, sites: int) -> int:
        """Training steps of every arm: what the federation spends over all sites and rounds."""
        return self.rounds * self.local_steps * sites


# The tiny random model learns the answer formats within ~50 steps; learning rates of 1e-2
# and above diverge on it (measured), so 5e-3 with LoRA on every linear layer.
TINY = QualityConfig(
    rounds=10, local_steps=5, batch_size=8, learning_rate=5e-3, rank=16, alpha=32.0,
    target_modules=arms.ALL_LINEAR, test_per_task=40, tiny_hidden=64, tiny_layers=2,
)
# SmolLM2-135M-Instruct: 1-2 s a step on 2 idle cores, so 16 * 4 * 3 = 192 steps an arm
# (960 steps in all, about half an hour). Measured on seed 0: at 96 steps an arm FedAvg
# (0.50 accuracy) had not yet overtaken the best single site (0.55), which overfits its
# own task as it trains longer (0.43 at 192 steps) while FedAvg reaches 0.73.
# Many short rounds keep the non-IID sites from drifting apart.
FULL = QualityConfig(
    rounds=16, local_steps=4, batch_size=4, learning_rate=3e-3, rank=8, alpha=16.0,
    target_modules=arms.ATTENTION, test_per_task=20,
)


_log = arms.logger("quality")


def run(*, tiny: bool, sites: int = 3, seed: int = 0, config: QualityConfig | None = None) -> dict:
    """Run the benchmark and return its JSON object.

    Args:
        tiny: Use a tiny random Llama (minutes) instead of SmolLM2-135M-Instruct.
        sites: Number of sites of the built-in data.
        seed: Seed of the data, the initial adapter and the data order.
        config: Override the preset (``TINY`` or ``FULL``), e.g. for a smoke test.
    """
    started = time.perf_counter()
    config = config or (TINY if tiny else FULL)
    arms.seed_torch(seed)
    total_steps = config.total_steps(sites)
    with tempfile.TemporaryDirectory(prefix="zenfed-bench-quality-") as tmp:
        scratch = Path(tmp)
        train, test = arms.load_sites(scratch, sites=sites, config=config, seed=seed)
        model_path, model_name = arms.model_dir(
            tiny=tiny, config=config, scratch=scratch, seed=seed,
            adjust=lambda path: arms.scale_output(path, factor=config.tiny_output_scale),
        )
        engine = arms.make_engine(model_path, config=config, seed=seed)
        start = engine.initial_adapter()
        base = arms.scores(engine, start, test, config=config)
        _log(f"base {base}")

        pooled = [example for examples in train.values() for example in examples]
        central_adapter = engine.train(adapter=start, examples=pooled, steps=total_steps,
                                       seed=seed).adapter
        central = arms.scores(engine, central_adapter, test, config=config)
        _log(f"central {central}")

        fed_adapter = arms.fedavg(engine, start, train, config=config, seed=seed, log=_log,
                                  label="federated")
        federated = arms.scores(engine, fed_adapter, test, config=config)
        _log(f"federated {federated}")

        alone = []
        for site, examples in train.items():
            adapter = engine.train(adapter=start, examples=examples, steps=total_steps,
                                   seed=seed).adapter
            alone.append({"site": site, **arms.scores(engine, adapter, test, config=config)})
            _log(f"{site} alone {alone[-1]}")

    central_gain = base["eval_loss"] - central["eval_loss"]
    fed_gain = base["eval_loss"] - federated["eval_loss"]
    ratio = fed_gain / central_gain if central_gain > 0 else float("nan")
    best_site = max(entry["accuracy"] for entry in alone)
    return {
        "benchmark": "quality",
        "tiny": tiny,
        "base": base,
        "central": central,
        "federated": federated,
        "sites": alone,
        "fed_gain_over_central": round(ratio, 4),
        "targets": {
            "fed_gain_over_central_at_least_0.95": ratio >= 0.95,
            "federated_accuracy_above_best_site": federated["accuracy"] > best_site,
        },
        "config": {
            "model": model_name,
            "engine": "peft",
            "sites": sites,
            "seed": seed,
            "test_examples": len(test),
            "steps_per_arm": total_steps,
            **arms.config_fields(config, tiny=tiny),
            "threads": arms.THREADS,
        },
        "seconds": round(time.perf_counter() - started, 1),
    }


def main(argv: Sequence[str] | None = None) -> None:
    arms.main(run, description=__doc__.splitlines()[0], argv=argv,
              tiny_help="tiny random Llama instead of SmolLM2-135M (under 3 minutes)")


if __name__ == "__main__":
    main()
