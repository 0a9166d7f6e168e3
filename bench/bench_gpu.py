"""Benchmark: LoRA training speed, memory and model FLOP utilisation per engine and precision, and DP at GPU scale.

Prints one JSON object, measured side by side in one run on one device:

- ``matmul``: the device's measured dense matrix rate (FLOP/s) in bf16 and fp32, the
  denominator of the utilisation figures.
- ``training``: for each engine (``peft``, ``nemo`` where installed), precision (fp32,
  bf16), batch (32 and 256 examples of exactly 512 tokens; ``--tiny``: 4 and 8 of 64)
  and with or without DP-SGD: tokens per second, seconds per step, peak device memory
  (MiB; on a CPU the process's peak resident memory, which only grows), and
  ``mfu`` = 6 x parameters x tokens per second / the bf16 matrix rate. 6 x params is the
  usual count for full training; LoRA skips the frozen weights' gradients (about 4 x
  params), so the figure overstates the work a little, and is comparable across arms.
  ``ratios`` puts bf16 against fp32 and DP against no DP for every engine and batch.
- ``privacy_at_scale``: the privacy benchmark's preset at GPU scale: 12,000 records and
  an expected batch of 960 per site, the preset's rounds and steps, FedAvg of 3 sites
  with and without DP-SGD at epsilon 8, evaluated on the same held-out set.

An arm that fails (no NeMo, out of memory) is reported with its error; the others still run.

Run: ``python bench/bench_gpu.py [--tiny] [--device cuda:0] [--model FOLDER]`` or
``zenfed bench gpu --json [--tiny]``. ``--tiny`` runs in about a minute on a CPU.
It needs torch, transformers, peft, pydantic, opacus and dp-accounting, not FLARE or
TenSEAL (docs/gpu.md says what to carry to a GPU machine).
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import random
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from zenfed.data.builtin import TASKS, make_builtin, make_example
from zenfed.data.jsonl import Example, Message, load_jsonl
from zenfed.engines import make_engine
from zenfed.engines.hardware import Hardware, peak_memory
from zenfed.spec import JobSpec, LoraSpec, TrainingSpec
from zenfed.types import AdapterState, RecordDP


@dataclasses.dataclass(frozen=True)
class GpuBenchConfig:
    """Sizes of one run."""

    seq_len: int
    batches: tuple[int, ...]
    steps: int
    matmul_size: int
    # The privacy benchmark's preset (bench_privacy.FULL) at GPU scale.
    privacy_records: int
    privacy_batch: int
    privacy_rounds: int
    privacy_steps: int
    privacy_test_per_task: int
    privacy_epsilon: float = 8.0
    engines: tuple[str, ...] = ("peft", "nemo")
    precisions: tuple[str, ...] = ("fp32", "bf16")


FULL = GpuBenchConfig(seq_len=512, batches=(32, 256), steps=5, matmul_size=8192, privacy_records=12_000,
                      privacy_batch=960, privacy_rounds=3, privacy_steps=8, privacy_test_per_task=50)
TINY = GpuBenchConfig(seq_len=64, batches=(4, 8), steps=2, matmul_size=256, privacy_records=200,
                      privacy_batch=16, privacy_rounds=2, privacy_steps=2, privacy_test_per_task=4)
LORA = LoraSpec(rank=8, alpha=16.0, target_modules=("attention",))
# bench_privacy.FULL's LoRA and learning rates: DP wants few parameters and a larger step.
PRIVACY_LORA = LoraSpec(rank=2, alpha=4.0, target_modules=("q_proj", "v_proj"))
PRIVACY_RATES = {"none": 2e-2, "dp": 5e-2}


def _log(text: str) -> None:
    print(f"bench gpu: {text}", file=sys.stderr, flush=True)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def matmul_rate(device: torch.device, dtype: torch.dtype, *, size: int, repeats: int = 20) -> float:
    """Return the measured FLOP/s of ``size`` x ``size`` matrix products in ``dtype`` on ``device``."""
    a = torch.randn(size, size, device=device, dtype=dtype)
    b = torch.randn(size, size, device=device, dtype=dtype)
    for _ in range(3):
        a @ b
    _sync(device)
    started = time.perf_counter()
    for _ in range(repeats):
        a @ b
    _sync(device)
    return 2 * size**3 * repeats / (time.perf_counter() - started)


def fixed_length_examples(count: int, *, seq_len: int, seed: int) -> list[Example]:
    """Examples whose prompt is long enough to be cut to exactly ``seq_len`` tokens."""
    rng = random.Random(seed)
    out = []
    for i in range(count):
        base = make_example(TASKS[i % len(TASKS)], rng)
        filler_turns = max(2, seq_len // 16)
        filler = " ".join(make_example(TASKS[j % len(TASKS)], rng).prompt[0].content for j in range(filler_turns))
        out.append(Example(prompt=(Message("user", f"{filler}\n\n{base.prompt[0].content}"),),
                           response=base.response, task=base.task))
    return out


def _engine(name: str, model_dir: Path, hardware: Hardware, *, lora: LoraSpec, training: TrainingSpec) -> Any:
    spec = JobSpec(name="bench-gpu", model={"engine": name}, lora=lora, training=training)
    return make_engine(spec, model_dir=model_dir, hardware=hardware)


def _release(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def _time_training(engine: Any, *, batch: int, dp: bool, config: GpuBenchConfig, params: int,
                   bf16_rate: float, device: torch.device) -> dict[str, Any]:
    """Train one warm-up step and ``config.steps`` timed steps; return the arm's figures."""
    # Four times the batch in records: a DP step samples each at rate 1/4, an expected batch of ``batch``.
    examples = fixed_length_examples(batch * 4, seq_len=config.seq_len, seed=batch)
    engine.training = engine.training.model_copy(update={"batch_size": batch})
    private = RecordDP(noise_multiplier=1.0, clip_norm=1.0, sample_rate=0.25, accountant=None) if dp else None
    adapter = engine.initial_adapter()
    engine.train(adapter=adapter, examples=examples, steps=1, seed=0, dp=private)
    with peak_memory(device) as memory:
        started = time.perf_counter()
        result = engine.train(adapter=adapter, examples=examples, steps=config.steps, seed=1, dp=private)
        _sync(device)
        elapsed = time.perf_counter() - started
    examples_per_step = result.metrics.get("dp_mean_batch_size", batch) if dp else batch
    tokens_per_s = examples_per_step * config.seq_len * config.steps / elapsed
    return {"tokens_per_s": round(tokens_per_s, 1), "step_s": round(elapsed / config.steps, 4),
            "peak_mib": round(memory["peak_mib"], 1), "mfu": round(6 * params * tokens_per_s / bf16_rate, 4),
            "examples_per_step": round(float(examples_per_step), 1)}


def training_arms(model_dir: Path, device: torch.device, config: GpuBenchConfig, *,
                  bf16_rate: float) -> list[dict[str, Any]]:
    """Every engine x precision x batch x DP arm, one engine (one model copy) at a time."""
    rows: list[dict[str, Any]] = []
    training = TrainingSpec(local_steps=config.steps, batch_size=config.batches[0], seq_len=config.seq_len,
                            learning_rate=1e-4, seed=0)
    for engine_name in config.engines:
        for precision in config.precisions:
            arm = {"engine": engine_name, "precision": precision}
            try:
                hardware = Hardware.for_site(device=str(device), precision=precision)
                engine = _engine(engine_name, model_dir, hardware, lora=LORA, training=training)
                engine.initial_adapter()  # loads the model
            except Exception as err:  # noqa: BLE001 - an engine that cannot start is a result, not a crash
                rows.append({**arm, "error": f"{type(err).__name__}: {err}"[:300]})
                _log(f"{engine_name} {precision}: cannot start ({err})")
                continue
            module = getattr(engine, "model", None) or engine.module
            params = sum(p.numel() for p in module.parameters())
            for batch in config.batches:
                for dp in (False, True):
                    label = f"{engine_name} {precision} batch {batch} {'DP' if dp else 'no DP'}"
                    try:
                        figures = _time_training(engine, batch=batch, dp=dp, config=config, params=params,
                                                 bf16_rate=bf16_rate, device=device)
                    except Exception as err:  # noqa: BLE001 - e.g. out of memory: reported, the rest still run
                        figures = {"error": f"{type(err).__name__}: {err}"[:300]}
                    rows.append({**arm, "batch": batch, "dp": dp, **figures})
                    _log(f"{label}: {figures}")
                    _release(device)
            del engine, module
            _release(device)
    return rows


def ratios(rows: list[dict[str, Any]], *, memory: bool) -> list[dict[str, Any]]:
    """bf16 against fp32 and DP against no DP, per engine and batch (tokens per second, and peak memory
    where ``memory``: on a GPU, not from a CPU process's ever-growing peak)."""
    table = {(r["engine"], r["precision"], r.get("batch"), r.get("dp")): r for r in rows if "tokens_per_s" in r}
    out = []
    for (engine, precision, batch, dp), row in sorted(table.items(), key=str):
        fp32 = table.get((engine, "fp32", batch, dp))
        plain = table.get((engine, precision, batch, False))
        entry: dict[str, Any] = {"engine": engine, "precision": precision, "batch": batch, "dp": dp}
        if precision == "bf16" and fp32:
            entry["bf16_over_fp32_speed"] = round(row["tokens_per_s"] / fp32["tokens_per_s"], 3)
            if memory:
                entry["bf16_over_fp32_memory"] = round(row["peak_mib"] / fp32["peak_mib"], 3)
        if dp and plain:
            entry["dp_over_plain_speed"] = round(row["tokens_per_s"] / plain["tokens_per_s"], 3)
        if len(entry) > 4:
            out.append(entry)
    return out


def _mean(adapters: list[tuple[AdapterState, float]]) -> AdapterState:
    total = sum(weight for _, weight in adapters)
    return {name: sum(a[name].double() * w for a, w in adapters).div(total).float() for name in adapters[0][0]}


def privacy_at_scale(model_dir: Path, device: torch.device, config: GpuBenchConfig, *, tiny: bool,
                     seed: int = 0) -> dict[str, Any]:
    """FedAvg of 3 sites with and without DP-SGD at the preset's epsilon, at GPU-scale records and batch."""
    from zenfed.privacy.dp import PrivacyAccountant, plan_record_dp

    with tempfile.TemporaryDirectory(prefix="zenfed-bench-gpu-") as tmp:
        make_builtin(tmp, sites=3, train_per_site=config.privacy_records, valid_per_site=4,
                     test_per_task=config.privacy_test_per_task, seed=seed)
        sites = {f"site-{i}": load_jsonl(Path(tmp) / f"site-{i}" / "train.jsonl") for i in (1, 2, 3)}
        test = load_jsonl(Path(tmp) / "test.jsonl")
    layers = json.loads((model_dir / "config.json").read_text()).get("num_hidden_layers", 0)
    # The preset adapts the top 8 of SmolLM2's 30 layers; another model gets its own top 8.
    lora = PRIVACY_LORA.model_copy(update={"layers": tuple(range(max(0, layers - 8), layers)) or None})
    hardware = Hardware.for_site(device=str(device), precision="bf16" if device.type == "cuda" else "fp32")
    training = TrainingSpec(local_steps=config.privacy_steps, batch_size=config.privacy_batch, seq_len=128,
                            learning_rate=PRIVACY_RATES["none"], seed=seed)
    engine = _engine("peft", model_dir, hardware, lora=lora, training=training)
    start = engine.initial_adapter()
    arms: dict[str, Any] = {}
    for arm, epsilon in (("no_dp", None), (f"epsilon_{config.privacy_epsilon:g}", config.privacy_epsilon)):
        began = time.perf_counter()
        rate = PRIVACY_RATES["none"] if epsilon is None else PRIVACY_RATES["dp"]
        engine.training = engine.training.model_copy(update={"learning_rate": rate})
        plans = {site: plan_record_dp(rounds=config.privacy_rounds, local_steps=config.privacy_steps,
                                      batch_size=config.privacy_batch, num_records=len(rows),
                                      target_epsilon=epsilon) for site, rows in sites.items()} if epsilon else {}
        accountants = {site: PrivacyAccountant() for site in plans}
        global_adapter, states = start, {}
        for round_index in range(config.privacy_rounds):
            trained = []
            for index, (site, rows) in enumerate(sites.items()):
                dp = RecordDP(noise_multiplier=plans[site].noise_multiplier, clip_norm=1.0,
                              sample_rate=plans[site].sample_rate, accountant=accountants[site]) if plans else None
                result = engine.train(adapter=global_adapter, examples=rows, steps=config.privacy_steps,
                                      seed=seed * 1000 + round_index * 3 + index, dp=dp,
                                      optimizer_state=states.get(site))
                states[site] = result.optimizer_state
                trained.append((result.adapter, float(result.num_examples)))
            global_adapter = _mean(trained)
            _log(f"privacy {arm}: round {round_index + 1}/{config.privacy_rounds}")
        scored = engine.evaluate(adapter=global_adapter, examples=test, max_new_tokens=6)
        arms[arm] = {"eval_loss": round(scored.loss, 4), "accuracy": round(scored.accuracy, 4),
                     "seconds": round(time.perf_counter() - began, 1)}
        if plans:
            arms[arm]["epsilon_spent"] = {site: round(accountants[site].get_epsilon(plans[site].delta), 3)
                                          for site in plans}
            arms[arm]["noise_multiplier"] = round(next(iter(plans.values())).noise_multiplier, 4)
    dp_arm = arms[f"epsilon_{config.privacy_epsilon:g}"]
    return {**arms, "records_per_site": config.privacy_records, "expected_batch": config.privacy_batch,
            "rounds": config.privacy_rounds, "local_steps": config.privacy_steps, "precision": hardware.precision,
            "accuracy_ratio_dp_over_no_dp": (round(dp_arm["accuracy"] / arms["no_dp"]["accuracy"], 3)
                                             if arms["no_dp"]["accuracy"] else None)}


def _model(tiny: bool, folder: str | None, scratch: Path) -> tuple[Path, str]:
    if folder:
        return Path(folder), Path(folder).name
    if tiny:
        from zenfed.engines.tiny import build_tiny_model

        return build_tiny_model(scratch / "tiny-model", hidden_size=64, layers=2, vocab_size=1024), "tiny-random-llama"
    from zenfed.engines.base_model import DEFAULT_MODEL_NAME, prepare_default_model

    return prepare_default_model(progress=False), DEFAULT_MODEL_NAME


def run(*, tiny: bool, device: str = "auto", model: str | None = None, sections: tuple[str, ...] = (
        "training", "privacy"), config: GpuBenchConfig | None = None,
        say: Callable[[str], None] = _log) -> dict[str, Any]:
    """Run the benchmark and return its JSON object (see the module docstring).

    Args:
        tiny: The tiny random Llama and small batches (``TINY``), for a CPU.
        device: Where to run: ``auto``, ``cpu``, ``cuda`` or ``cuda:N``.
        model: A Hugging Face model folder instead of SmolLM2 (or the tiny model).
        sections: ``training`` and/or ``privacy``.
        config: Override the preset (``TINY`` or ``FULL``).
        say: Progress lines.
    """
    started = time.perf_counter()
    config = config or (TINY if tiny else FULL)
    hardware = Hardware.for_site(device=device)
    target = hardware.device
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory(prefix="zenfed-bench-gpu-model-") as tmp:
        model_dir, model_name = _model(tiny, model, Path(tmp))
        say(f"model {model_name} on {target}")
        bf16_rate = matmul_rate(target, torch.bfloat16, size=config.matmul_size)
        fp32_rate = matmul_rate(target, torch.float32, size=config.matmul_size)
        rows = training_arms(model_dir, target, config, bf16_rate=bf16_rate) if "training" in sections else []
        privacy = privacy_at_scale(model_dir, target, config, tiny=tiny) if "privacy" in sections else None
    name = torch.cuda.get_device_name(target) if target.type == "cuda" else "cpu"
    return {
        "benchmark": "gpu",
        "tiny": tiny,
        "device": {"name": name, "torch": torch.__version__, "cuda": torch.version.cuda, "kind": target.type},
        "model": model_name,
        "matmul": {"bf16_flops": round(bf16_rate), "fp32_flops": round(fp32_rate), "size": config.matmul_size},
        "training": rows,
        "ratios": ratios(rows, memory=target.type == "cuda"),
        "privacy_at_scale": privacy,
        "config": {**{k: v for k, v in dataclasses.asdict(config).items()}, "lora_rank": LORA.rank,
                   "lora_targets": list(LORA.target_modules)},
        "seconds": round(time.perf_counter() - started, 1),
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiny", action="store_true", help="tiny random Llama, small batches (a minute on a CPU)")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N (default auto)")
    parser.add_argument("--model", help="a Hugging Face model folder (default: SmolLM2, or the tiny model)")
    parser.add_argument("--only", choices=("training", "privacy"), help="run one section only")
    parser.add_argument("--out", help="also write the JSON object to this file")
    args = parser.parse_args(argv)
    result = run(tiny=args.tiny, device=args.device, model=args.model,
                 sections=(args.only,) if args.only else ("training", "privacy"))
    text = json.dumps(result, indent=2)
    if args.out:
        Path(args.out).write_text(text + "\n")
    print(text)


if __name__ == "__main__":
    main()
