"""What the quality and privacy benchmarks share: data, model, engine, FedAvg arm and command line.

Both benchmarks train every arm in-process on the built-in non-IID data, from
the same initial adapter, and score it on the same held-out union test set.
Only what an arm does differently (DP, canaries, the tiny model's adjustment)
stays in each benchmark.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, Protocol

import torch

from zenfed.data.builtin import make_builtin
from zenfed.data.jsonl import Example, load_jsonl
from zenfed.engines.base import TrainResult
from zenfed.engines.peft import PeftEngine
from zenfed.server.aggregation import WeightedMean
from zenfed.spec import LoraSpec, TrainingSpec
from zenfed.types import AdapterState, RecordDP

THREADS = 2
ATTENTION = ("q_proj", "k_proj", "v_proj", "o_proj")
ALL_LINEAR = (*ATTENTION, "gate_proj", "up_proj", "down_proj")


class ArmConfig(Protocol):
    """The fields of a benchmark's config that the shared set-up reads."""

    @property
    def rounds(self) -> int: ...
    @property
    def local_steps(self) -> int: ...
    @property
    def batch_size(self) -> int: ...
    @property
    def learning_rate(self) -> float: ...
    @property
    def rank(self) -> int: ...
    @property
    def alpha(self) -> float: ...
    @property
    def target_modules(self) -> tuple[str, ...]: ...
    @property
    def seq_len(self) -> int: ...
    @property
    def train_per_site(self) -> int: ...
    @property
    def test_per_task(self) -> int: ...
    @property
    def skew(self) -> float: ...
    @property
    def max_new_tokens(self) -> int: ...
    @property
    def tiny_hidden(self) -> int: ...
    @property
    def tiny_layers(self) -> int: ...
    @property
    def tiny_vocab(self) -> int: ...


def logger(benchmark: str) -> Callable[[str], None]:
    """Return a function that writes progress lines to stderr (stdout holds only the JSON)."""

    def log(message: str) -> None:
        print(f"[bench {benchmark}] {message}", file=sys.stderr, flush=True)

    return log


def seed_torch(seed: int) -> None:
    """Pin the thread count (timings compare across runs) and seed torch."""
    torch.set_num_threads(THREADS)
    torch.manual_seed(seed)


def load_sites(scratch: Path, *, sites: int, config: ArmConfig,
              seed: int) -> tuple[dict[str, list[Example]], list[Example]]:
    """Write the built-in data under ``scratch/data``; return each site's train set and the test set."""
    make_builtin(scratch / "data", sites=sites, train_per_site=config.train_per_site,
                 test_per_task=config.test_per_task, skew=config.skew, seed=seed)
    train = {f"site-{k}": load_jsonl(scratch / "data" / f"site-{k}" / "train.jsonl")
             for k in range(1, sites + 1)}
    return train, load_jsonl(scratch / "data" / "test.jsonl")


def model_dir(*, tiny: bool, config: ArmConfig, scratch: Path, seed: int,
              adjust: Callable[[Path], str]) -> tuple[Path, str]:
    """Return the model folder and its name: the tiny random Llama, or the default model.

    Args:
        tiny: Build the tiny random Llama instead of preparing SmolLM2-135M-Instruct.
        config: Its ``tiny_*`` fields size the tiny model.
        scratch: Where the tiny model is built.
        seed: Seed of the tiny model's weights.
        adjust: Changes the tiny model in place so LoRA can make it confident, and
            returns how, for its name (e.g. ``"output_scale=8"``).

    """
    if tiny:
        from zenfed.engines.tiny import build_tiny_model

        path = build_tiny_model(scratch / "tiny-model", hidden_size=config.tiny_hidden,
                                layers=config.tiny_layers, vocab_size=config.tiny_vocab, seed=seed)
        how = adjust(path)
        return path, f"tiny-random-llama(hidden={config.tiny_hidden}, layers={config.tiny_layers}, {how})"
    from zenfed.engines.base_model import DEFAULT_MODEL_NAME, prepare_default_model

    return prepare_default_model(progress=False), DEFAULT_MODEL_NAME


def scale_output(model_dir: Path, *, factor: float) -> str:
    """Multiply the tiny model's final norm weight by ``factor``.

    A random Llama's tied embeddings (std 0.02) cap every logit near 0.02 * hidden_size
    (about 1.3 at width 64), so no LoRA on the frozen layers can make a confident
    prediction and the loss cannot fall far below log(vocab). Scaling the final norm
    lifts that cap, as trained models have, without touching the residual stream.
    """
    from safetensors.torch import load_file, save_file

    from zenfed.engines.base_model import write_manifest

    weights_path = model_dir / "model.safetensors"
    weights = load_file(weights_path)
    weights["model.norm.weight"] = weights["model.norm.weight"] * factor
    save_file(weights, weights_path, metadata={"format": "pt"})
    write_manifest(model_dir, source=f"tiny-random-llama(output_scale={factor:g})")
    return f"output_scale={factor:g}"


def make_engine(path: Path, *, config: ArmConfig, seed: int,
                layers: tuple[int, ...] | None = None) -> PeftEngine:
    """Return the PEFT engine every arm trains with (LoRA shape and training from ``config``)."""
    return PeftEngine(
        model_dir=path,
        lora=LoraSpec(rank=config.rank, alpha=config.alpha, target_modules=config.target_modules,
                      layers=layers),
        training=TrainingSpec(local_steps=config.local_steps, batch_size=config.batch_size,
                              seq_len=config.seq_len, learning_rate=config.learning_rate, seed=seed),
        threads=THREADS,
    )


def scores(engine: PeftEngine, adapter: AdapterState, test: Sequence[Example], *,
           config: ArmConfig) -> dict[str, float]:
    """Return ``{"eval_loss", "accuracy"}`` of ``adapter`` on the test set, rounded to 4 places."""
    result = engine.evaluate(adapter=adapter, examples=test, max_new_tokens=config.max_new_tokens)
    return {"eval_loss": round(result.loss, 4), "accuracy": round(result.accuracy, 4)}


def fedavg(engine: PeftEngine, start: AdapterState, data: Mapping[str, Sequence[Any]], *,
           config: ArmConfig, seed: int, log: Callable[[str], None], label: str,
           dp: Callable[[str], RecordDP | None] = lambda site: None,
           local_train: Callable[..., TrainResult] | None = None) -> AdapterState:
    """FedAvg over the sites, in-process, with the controller's aggregator.

    Each round every site trains ``local_steps`` steps from the global adapter on
    its own data, and the adapters are averaged weighted by sample count.
    ``local_train`` (default: supervised ``engine.train``) takes ``adapter``, ``data``,
    ``steps``, ``seed``, ``dp`` and ``optimizer_state`` (DPO passes its own).

    Args:
        engine: The engine every site trains with.
        start: The initial global adapter.
        data: Each site's training examples.
        config: Rounds and local steps.
        seed: Seed of the data order (each site and round draws its own).
        log: Where progress goes.
        label: Starts each round's progress line.
        dp: Each site's DP-SGD settings, or None to train without DP.

    """
    global_adapter = start
    train = local_train or (lambda data, **kw: engine.train(examples=data, **kw))
    optimizer_states: dict[str, object] = {}  # Each site keeps its own optimizer, as the executor does.
    for round_index in range(config.rounds):
        mean = WeightedMean()
        for site_index, (site, examples) in enumerate(data.items()):
            result = train(
                adapter=global_adapter, data=examples, steps=config.local_steps,
                seed=seed * 100_003 + round_index * len(data) + site_index, dp=dp(site),
                optimizer_state=optimizer_states.get(site),
            )
            optimizer_states[site] = result.optimizer_state
            mean.add(site, result.adapter, weight=float(result.num_examples))
        global_adapter = mean.result()
        log(f"{label} round {round_index + 1}/{config.rounds} done")
    return global_adapter


def config_fields(config: Any, *, tiny: bool) -> dict[str, Any]:
    """Return the config as the result's ``config`` reports it (``tiny_*`` only for the tiny model)."""
    return {
        **{k: v for k, v in dataclasses.asdict(config).items()
           if not (k.startswith("tiny_") and not tiny)},
        "target_modules": list(config.target_modules),
    }


def main(run: Callable[..., dict[str, Any]], *, description: str, tiny_help: str,
         argv: Sequence[str] | None, parents: Sequence[argparse.ArgumentParser] = ()) -> None:
    """Parse ``--tiny``, ``--sites`` and ``--seed``, run the benchmark and print its JSON.

    ``parents`` adds a benchmark's own options to ``--help`` (the benchmark parses them itself).
    """
    parser = argparse.ArgumentParser(description=description, parents=list(parents))
    parser.add_argument("--tiny", action="store_true", help=tiny_help)
    parser.add_argument("--sites", type=int, default=3, help="number of sites (default 3)")
    parser.add_argument("--seed", type=int, default=0, help="seed (default 0)")
    args = parser.parse_args(argv)
    print(json.dumps(run(tiny=args.tiny, sites=args.sites, seed=args.seed), indent=2))
