"""Benchmark: NeMo engine vs PEFT engine, per training step, on the same LoRA config in one run.

Prints one JSON object. Both engines train SmolLM2-135M-Instruct (fp32, CPU by
default) with LoRA r=8, alpha=16 on q,k,v,o, batch 4, every example exactly 256
tokens, the same examples and the same seed.

* ``*_startup_s``: importing the engine module, building the engine and loading
  the model until ``initial_adapter()`` returns (torch and transformers are
  imported beforehand, so neither engine pays for them). NeMo's includes its
  import and the 2 s its deprecation notice sleeps.
* ``*_step_s``: a local round's wall time divided by its steps (round overhead
  included: tokenisation, and for NeMo building a Lightning trainer and
  ``llm.api.finetune``'s setup). After one warm-up round each, rounds alternate
  between the engines, and which goes first (so background load hits both
  alike); the median round is reported. ``nemo_inloop_step_s`` is NeMo's time inside its training
  loop only, and ``nemo_round_overhead_s`` the rest of a round.
* ``ratio`` = ``nemo_step_s / peft_step_s`` (target: at most 1.2).
* ``*_cpu_step_s`` / ``cpu_ratio``: the same with process CPU time (all threads),
  less sensitive than wall time to other processes sharing the cores;
  ``load_average`` is the 1-minute load before and after, to judge the noise.

Run: ``python bench/bench_engines.py [--tiny] [--steps N] [--rounds R] [--threads T]`` or
``zenfed bench engines --json``.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import random
import statistics
import time
from pathlib import Path
from typing import Any

import torch
import transformers  # noqa: F401  (imported before timing: both engines need it)

from zenfed.data.builtin import TASKS, make_example
from zenfed.data.jsonl import Example, Message
from zenfed.spec import LoraSpec, TrainingSpec

SEQ_LEN = 256
BATCH = 4


def _examples(count: int, *, seed: int) -> list[Example]:
    """Examples whose prompt is long enough to be cut to exactly SEQ_LEN tokens."""
    rng = random.Random(seed)
    out = []
    for i in range(count):
        base = make_example(TASKS[i % len(TASKS)], rng)
        filler = " ".join(
            make_example(TASKS[j % len(TASKS)], rng).prompt[0].content for j in range(8)
        )
        prompt = Message("user", f"{filler}\n\n{base.prompt[0].content}")
        out.append(Example(prompt=(prompt,), response=base.response, task=base.task))
    return out


def _start(
    module: str, cls: str, *, model_dir: Path, lora: LoraSpec, training: TrainingSpec, threads: int
) -> tuple[Any, float]:
    began = time.perf_counter()
    engine_class = getattr(importlib.import_module(module), cls)
    engine = engine_class(model_dir=model_dir, lora=lora, training=training, threads=threads)
    engine.initial_adapter()
    return engine, time.perf_counter() - began


def _round(
    engine: Any, adapter: dict, examples: list[Example], steps: int, seed: int
) -> tuple[float, float, Any]:
    began, cpu = time.perf_counter(), time.process_time()
    result = engine.train(adapter=adapter, examples=examples, steps=steps, seed=seed)
    wall = (time.perf_counter() - began) / steps
    return wall, (time.process_time() - cpu) / steps, result


def run(*, tiny: bool, steps: int = 3, rounds: int = 2, threads: int = 0) -> dict:
    """Run the benchmark and return the JSON object.

    Args:
        tiny: Use a tiny random Llama (built on the spot) instead of SmolLM2-135M.
        steps: Optimizer steps per timed round.
        rounds: Timed rounds per engine (after one warm-up round each).
        threads: Torch CPU threads for both engines (0: torch's default). One thread
            gives steadier figures when other processes share the cores.
    """
    if tiny:
        import tempfile

        from zenfed.engines.tiny import build_tiny_model

        model_dir = build_tiny_model(Path(tempfile.mkdtemp(prefix="zenfed-bench-")) / "tiny")
        model_name = "tiny-random-llama"
    else:
        from zenfed.engines.base_model import DEFAULT_MODEL_NAME, prepare_default_model

        model_dir, model_name = prepare_default_model(progress=False), DEFAULT_MODEL_NAME
    lora = LoraSpec(rank=8, alpha=16.0, target_modules=("q_proj", "k_proj", "v_proj", "o_proj"))
    training = TrainingSpec(batch_size=BATCH, seq_len=SEQ_LEN, learning_rate=2e-4, seed=0)
    examples = _examples(4 * BATCH, seed=0)

    peft, peft_startup = _start("zenfed.engines.peft", "PeftEngine", model_dir=model_dir, lora=lora,
                                training=training, threads=threads)
    nemo, nemo_startup = _start("zenfed.engines.nemo", "NemoEngine", model_dir=model_dir, lora=lora,
                                training=training, threads=threads)
    lengths = {len(t.input_ids) for t in _tokenized(peft, examples)}
    adapter = peft.initial_adapter()
    _round(peft, adapter, examples, 1, 0)  # warm-up
    _round(nemo, adapter, examples, 1, 0)
    load_before = os.getloadavg()[0]
    wall: dict[str, list[float]] = {"peft": [], "nemo": []}
    cpu: dict[str, list[float]] = {"peft": [], "nemo": []}
    losses: dict[str, list[float]] = {"peft": [], "nemo": []}
    inloop = []
    for r in range(rounds):
        pair = [("peft", peft), ("nemo", nemo)]
        for name, engine in pair[::-1] if r % 2 else pair:  # alternate which engine goes first
            seconds, cpu_seconds, result = _round(engine, adapter, examples, steps, r)
            wall[name].append(seconds)
            cpu[name].append(cpu_seconds)
            losses[name].append(result.train_loss)
            if name == "nemo":
                inloop.append(result.metrics["step_s_mean"])
    nemo_steps, peft_steps = wall["nemo"], wall["peft"]
    nemo_step, peft_step = statistics.median(nemo_steps), statistics.median(peft_steps)
    nemo_cpu, peft_cpu = statistics.median(cpu["nemo"]), statistics.median(cpu["peft"])
    nemo_inloop = statistics.median(inloop)
    return {
        "benchmark": "engines",
        "tiny": tiny,
        "model": model_name,
        "config": {"rank": lora.rank, "alpha": lora.alpha, "targets": list(lora.target_modules),
                   "batch": BATCH, "seq_len": SEQ_LEN, "tokens_per_example": sorted(lengths),
                   "steps_per_round": steps, "rounds": rounds, "dtype": "float32",
                   "torch_threads": torch.get_num_threads(), "nemo_runtime": vars(nemo.runtime)},
        "nemo_step_s": round(nemo_step, 4),
        "peft_step_s": round(peft_step, 4),
        "ratio": round(nemo_step / peft_step, 3),
        "nemo_startup_s": round(nemo_startup, 2),
        "peft_startup_s": round(peft_startup, 2),
        "nemo_cpu_step_s": round(nemo_cpu, 4),
        "peft_cpu_step_s": round(peft_cpu, 4),
        "cpu_ratio": round(nemo_cpu / peft_cpu, 3),
        "nemo_inloop_step_s": round(nemo_inloop, 4),
        "nemo_round_overhead_s": round((nemo_step - nemo_inloop) * steps, 3),
        "nemo_step_s_all": [round(s, 4) for s in nemo_steps],
        "peft_step_s_all": [round(s, 4) for s in peft_steps],
        "load_average": [round(load_before, 2), round(os.getloadavg()[0], 2)],
        "same_losses": all(
            abs(a - b) <= 1e-4 * abs(b) for a, b in zip(losses["nemo"], losses["peft"], strict=True)
        ),
    }


def _tokenized(engine: Any, examples: list[Example]) -> list[Any]:
    from zenfed.data.tokenize import tokenize_all

    return tokenize_all(engine.tokenizer, examples, max_len=SEQ_LEN)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiny", action="store_true", help="tiny random Llama, not SmolLM2")
    parser.add_argument("--steps", type=int, default=3, help="optimizer steps per timed round")
    parser.add_argument("--rounds", type=int, default=2, help="timed rounds per engine")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: default)")
    args = parser.parse_args()
    result = run(tiny=args.tiny, steps=args.steps, rounds=args.rounds, threads=args.threads)
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
