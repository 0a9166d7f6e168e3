"""Benchmark: the federated algorithms side by side on the built-in non-IID data, through the real round code.

Prints one JSON object. Every arm runs the same job (same data, seed, rounds and
local steps) through zenfed's own site and server sessions in one process
(``zenfed.jobs.in_process``), so what is measured is what a deployment runs,
less FLARE's transport. Arms: FedAvg, FedProx, FedAdam, SCAFFOLD, FFA-LoRA,
FFA-LoRA with ranks capped at r_max/4, r_max/2 and r_max by site, FlexLoRA
(product-space mean, SVD to r_max) with the same caps, and FedAvg with the top
quarter of the decoder layers personal (at least one). ``central`` trains one adapter on all sites'
data pooled, for the same total number of steps.

Per arm: eval loss and accuracy of the released adapter on the union test set,
each site's accuracy on its own task's test examples (with its own personal
layers, for that arm), bytes a site sends per round, and seconds. Each skew in
``skews`` is a separate block.

``dp_comparison``: FedAvg and FFA-LoRA under record-level DP at epsilon 8, in the
privacy benchmark's preset (3 rounds x 8 steps of an expected 96 examples over 1,200
records a site, LoRA r=2 on q and v of the top 8 layers), through the same round code
with each site's own accountant, for each of ``dp_seeds``: accuracy per seed, mean and
spread (max - min), and the epsilon each site spent.

``local`` trains each site alone, for the steps it trains in the federation, and
reports its own-task accuracy: the reference of the personal-layers goal.

Run: ``python bench/bench_algorithms.py [--tiny] [--only skews|dp]`` or
``zenfed bench algorithms --json [--tiny]``. The SmolLM2 run takes hours on 2 cores:
``--arms``, ``--skews`` and ``--progress FILE`` split it, and a stopped run given the
same ``--progress`` file resumes after its last finished arm.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import logging
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))  # _arms sits beside this file, however it is loaded
import _arms as arms  # noqa: E402
from zenfed import protocol as P  # noqa: E402
from zenfed.data.builtin import TASKS  # noqa: E402
from zenfed.jobs.in_process import run_in_process  # noqa: E402
from zenfed.jobs.simulate import builtin_policies  # noqa: E402
from zenfed.server.result import RESULT_FILE  # noqa: E402
from zenfed.spec import JobSpec  # noqa: E402

ARMS = ("fedavg", "fedprox", "fedadam", "scaffold", "ffa_lora", "ffa_lora_ranks", "flexlora_ranks", "personal")


@dataclass(frozen=True)
class AlgorithmsConfig:
    """What every arm trains; ``tiny_*`` size the tiny random Llama."""

    rounds: int
    local_steps: int
    batch_size: int
    learning_rate: float
    rank: int
    alpha: float
    target_modules: tuple[str, ...]
    skews: tuple[float, ...] = (0.9, 0.98)
    seq_len: int = 128
    train_per_site: int = 400
    test_per_task: int = 40
    skew: float = 0.9  # the data loader's field; each block sets its own
    max_new_tokens: int = 6
    proximal_mu: float = 0.01
    server_learning_rate: float | None = None  # None: each optimizer's default
    server_tau: float | None = None  # FedAdam's adaptivity; None: the job spec's default
    tiny_hidden: int = 64
    tiny_layers: int = 2
    tiny_vocab: int = 1024
    tiny_output_scale: float = 8.0
    # The DP comparison (FedAvg vs FFA-LoRA at epsilon 8): the privacy benchmark's preset, several seeds.
    dp_epsilon: float = 8.0
    dp_seeds: tuple[int, ...] = (0, 1)
    dp_rounds: int = 3
    dp_local_steps: int = 8
    dp_batch_size: int = 96
    dp_learning_rate: float = 5e-2
    dp_rank: int = 2
    dp_top_layers: int = 8
    dp_train_per_site: int = 1200
    dp_test_per_task: int = 50
    arms: tuple[str, ...] = field(default=(
        "central", "local", "fedavg", "fedprox", "fedadam", "scaffold", "ffa_lora", "ffa_lora_ranks", "flexlora_ranks",
        "personal"))


TINY = AlgorithmsConfig(rounds=10, local_steps=5, batch_size=8, learning_rate=5e-3, rank=8, alpha=16.0,
                        target_modules=arms.ALL_LINEAR, train_per_site=200, test_per_task=20,
                        dp_rounds=3, dp_local_steps=4, dp_batch_size=16, dp_learning_rate=2e-2, dp_rank=8,
                        dp_top_layers=2, dp_train_per_site=400, dp_test_per_task=20)
# SmolLM2-135M-Instruct at bench_quality's shape: about half an hour an arm and skew on 2 cores.
FULL = AlgorithmsConfig(rounds=16, local_steps=4, batch_size=4, learning_rate=3e-3, rank=8, alpha=16.0,
                        target_modules=arms.ATTENTION, test_per_task=20)

_log = arms.logger("algorithms")


def _arm(name: str, config: AlgorithmsConfig, *, layers: int) -> tuple[dict[str, Any], dict[str, dict], dict]:
    """The job-spec overrides, site-policy overrides and lora overrides of one arm."""
    caps = {"site-1": max(1, config.rank // 4), "site-2": max(1, config.rank // 2)}
    federation: dict[str, Any] = {"strategy": name}
    sites: dict[str, dict] = {}
    lora: dict[str, Any] = {}
    if name == "fedprox":
        federation["proximal_mu"] = config.proximal_mu
    elif name == "fedadam":
        optimizer = {"learning_rate": config.server_learning_rate, "tau": config.server_tau}
        federation["server_optimizer"] = {k: v for k, v in optimizer.items() if v is not None}
    elif name in ("ffa_lora_ranks", "flexlora_ranks"):
        federation["strategy"] = name.removesuffix("_ranks")
        sites = {site: {"max_lora_rank": cap} for site, cap in caps.items()}
    elif name == "personal":
        federation["strategy"] = "fedavg"
        lora["personal_layers"] = personal_layers(layers)
    return federation, sites, lora


def personal_layers(layers: int) -> list[int]:
    """The layers the ``personal`` arm keeps at each site: the top quarter, at least one (FedPer's top layers)."""
    return list(range(layers - max(1, layers // 4), layers))


def _difference(results: dict[str, dict], arm: str, reference: str) -> float | None:
    """``arm``'s accuracy minus ``reference``'s, where both ran."""
    if arm not in results or reference not in results:
        return None
    return round(results[arm]["accuracy"] - results[reference]["accuracy"], 4)


def _spec(config: AlgorithmsConfig, model: Path, *, name: str, federation: dict, lora: dict, seed: int) -> JobSpec:
    return JobSpec.model_validate({
        "name": f"bench-{name}", "model": {"base": str(model)},
        "lora": {"rank": config.rank, "alpha": config.alpha, "target_modules": list(config.target_modules), **lora},
        "training": {"local_steps": config.local_steps, "batch_size": config.batch_size, "seq_len": config.seq_len,
                     "learning_rate": config.learning_rate, "seed": seed},
        "federation": {"rounds": config.rounds, "min_sites": 3, **federation},
        "evaluation": {"max_examples": 8, "max_new_tokens": config.max_new_tokens},
    })


def _own_task_accuracy(engine: Any, adapter: dict, test: Sequence[Any], *, site_index: int,
                       config: AlgorithmsConfig) -> float:
    own = [example for example in test if example.task == TASKS[site_index % len(TASKS)].name]
    return round(engine.evaluate(adapter=adapter, examples=own, max_new_tokens=config.max_new_tokens).accuracy, 4)


def _run_arm(name: str, *, config: AlgorithmsConfig, model: Path, data: Path, test: Sequence[Any], engine: Any,
             scratch: Path, seed: int, layers: int) -> dict[str, Any]:
    started = time.perf_counter()
    federation, site_overrides, lora = _arm(name, config, layers=layers)
    spec = _spec(config, model, name=name, federation=federation, lora=lora, seed=seed)
    policies = builtin_policies(data, sites=3, dataset="builtin", allow_any_model=True)
    policies = {site: policy.model_copy(update={"torch_threads": arms.THREADS, **site_overrides.get(site, {})})
                for site, policy in policies.items()}
    run = run_in_process(spec, workspace=scratch / name, policies=policies)
    result = json.loads((run.result_dir / RESULT_FILE).read_text())
    from safetensors.torch import load_file

    released = load_file(str(run.result_dir / result["final"]["adapter_dir"] / "adapter_model.safetensors"))
    sent = [a.header[P.H_PAYLOAD_BYTES] for task, _, a in run.transport.answers if task == P.TASK_TRAIN and a.payload]
    own = {}
    for index, (site, session) in enumerate(sorted(run.sites.items())):
        mine = session._personal.for_training(released) if name == "personal" and session._personal else released
        own[site] = _own_task_accuracy(engine, mine, test, site_index=index, config=config)
    return {
        **arms.scores(engine, released, test, config=config),
        "own_task_accuracy": own,
        "bytes_per_site_round": round(sum(sent) / len(sent)) if sent else 0,
        "seconds": round(time.perf_counter() - started, 1),
    }


DP_ARMS = ("fedavg", "ffa_lora")


def _dp_arm(name: str, *, config: AlgorithmsConfig, model: Path, data: Path, test: Sequence[Any], engine: Any,
            scratch: Path, seed: int, layers: int) -> dict[str, Any]:
    """One strategy under record-level DP at ``dp_epsilon``, through the in-process round code."""
    started = time.perf_counter()
    top = tuple(range(max(0, layers - config.dp_top_layers), layers))
    spec = JobSpec.model_validate({
        "name": f"bench-dp-{name}", "model": {"base": str(model)},
        "lora": {"rank": config.dp_rank, "alpha": 2.0 * config.dp_rank, "target_modules": ["q_proj", "v_proj"],
                 "layers": list(top)},
        "training": {"local_steps": config.dp_local_steps, "batch_size": config.dp_batch_size,
                     "seq_len": config.seq_len, "learning_rate": config.dp_learning_rate, "seed": seed},
        "federation": {"rounds": config.dp_rounds, "min_sites": 3, "strategy": name},
        "privacy": {"level": "record", "target_epsilon": config.dp_epsilon, "clip_norm": 1.0},
        "evaluation": {"max_examples": 8, "max_new_tokens": config.max_new_tokens},
    })
    policies = builtin_policies(data, sites=3, dataset="builtin", allow_any_model=True)
    policies = {site: policy.model_copy(update={"torch_threads": arms.THREADS}) for site, policy in policies.items()}
    run = run_in_process(spec, workspace=scratch / f"dp-{name}-{seed}", policies=policies)
    result = json.loads((run.result_dir / RESULT_FILE).read_text())
    from safetensors.torch import load_file

    released = load_file(str(run.result_dir / result["final"]["adapter_dir"] / "adapter_model.safetensors"))
    spent = {site: float(a.header[P.H_DP_SPENT]["epsilon"]) for task, site, a in run.transport.answers
             if task == P.TASK_TRAIN and a.payload and a.header.get(P.H_DP_SPENT)}
    scoring = engine.lora.model_copy(update={"rank": config.dp_rank, "alpha": 2.0 * config.dp_rank,
                                             "target_modules": ("q_proj", "v_proj"), "layers": top})
    scorer = type(engine)(model_dir=model, lora=scoring, training=engine.training)
    return {**arms.scores(scorer, released, test, config=config), "epsilon_spent": spent,
            "seconds": round(time.perf_counter() - started, 1)}


def dp_comparison(config: AlgorithmsConfig, *, model: Path, engine: Any, scratch: Path, layers: int) -> dict[str, Any]:
    """FedAvg vs FFA-LoRA under record-level DP at ``dp_epsilon``, each over ``dp_seeds``, with the spread."""
    shaped = dataclasses.replace(config, train_per_site=config.dp_train_per_site,
                                 test_per_task=config.dp_test_per_task, skew=0.9)
    runs: dict[str, list[dict[str, Any]]] = {name: [] for name in DP_ARMS}
    for seed in config.dp_seeds:
        _, test = arms.load_sites(scratch / f"dp-seed-{seed}", sites=3, config=shaped, seed=seed)
        for name in DP_ARMS:
            figures = _dp_arm(name, config=config, model=model, data=scratch / f"dp-seed-{seed}" / "data",
                              test=test, engine=engine, scratch=scratch / "dp-runs", seed=seed, layers=layers)
            runs[name].append({"seed": seed, **figures})
            _log(f"dp epsilon={config.dp_epsilon}: {name} seed {seed}: {figures}")
    summary = {}
    for name, rows in runs.items():
        accuracies = [row["accuracy"] for row in rows]
        summary[name] = {"runs": rows, "accuracy_mean": round(sum(accuracies) / len(accuracies), 4),
                         "accuracy_spread": round(max(accuracies) - min(accuracies), 4),
                         "eval_loss_mean": round(sum(row["eval_loss"] for row in rows) / len(rows), 4)}
    return {"epsilon": config.dp_epsilon, "seeds": list(config.dp_seeds), "arms": summary,
            "ffa_minus_fedavg_accuracy": round(summary["ffa_lora"]["accuracy_mean"]
                                               - summary["fedavg"]["accuracy_mean"], 4)}


BASELINES = ("central", "local")  # not federated: the pooled data, and each site on its own


class Progress:
    """What a long run has finished, kept in a file, so that a stopped run resumes where it stopped.

    The file holds the run's configuration and every finished arm's figures; it is
    rewritten (atomically) after each arm. A file of another configuration is refused.
    """

    def __init__(self, path: Path | None, config: dict[str, Any]) -> None:
        self.path = path
        self.config = json.loads(json.dumps(config))  # as it reads back from the file
        self.done: dict[str, Any] = {}
        if path is not None and path.is_file():
            try:
                saved = json.loads(path.read_text())
            except json.JSONDecodeError as err:
                raise SystemExit(f"{path} is not a progress file of this benchmark ({err}); remove it or "
                                 "pass another --progress") from err
            if saved.get("config") != self.config:
                raise SystemExit(f"{path} holds a run of another configuration; remove it or pass another --progress")
            self.done = saved.get("done", {})

    def run(self, key: str, work: Any) -> Any:
        """Return ``key``'s saved figures, or compute them with ``work()`` and save them."""
        if key in self.done:
            _log(f"{key}: resumed from {self.path}")
            return self.done[key]
        self.done[key] = work()
        if self.path is not None:
            partial = self.path.with_name(self.path.name + ".partial")
            partial.write_text(json.dumps({"config": self.config, "done": self.done}, indent=1))
            partial.replace(self.path)
        return self.done[key]


def _local_own_task(engine: Any, start: dict, train: dict[str, list], test: Sequence[Any], *,
                    config: AlgorithmsConfig, seed: int) -> dict[str, Any]:
    """Each site training alone, for the steps it trains in the federation: its own-task accuracy."""
    started = time.perf_counter()
    own = {}
    for index, (site, examples) in enumerate(sorted(train.items())):
        adapter = engine.train(adapter=start, examples=examples, steps=config.rounds * config.local_steps,
                               seed=seed).adapter
        own[site] = _own_task_accuracy(engine, adapter, test, site_index=index, config=config)
    return {"own_task_accuracy": own, "seconds": round(time.perf_counter() - started, 1)}


def _best_and_gap_share(federated: dict[str, dict], central: dict | None, metric: str,
                        *, sign: int) -> tuple[str | None, float | None]:
    """The best arm on ``metric`` (``sign`` 1: higher is better, -1: lower) and the share of FedAvg's gap to
    central it closes; None where an arm it needs did not run or central is no better than FedAvg."""
    if not federated:
        return None, None
    best = max(federated, key=lambda arm: sign * federated[arm][metric])
    if not central or "fedavg" not in federated:
        return best, None
    fedavg = federated["fedavg"][metric]
    gap = sign * (central[metric] - fedavg)
    return best, (round(sign * (federated[best][metric] - fedavg) / gap, 4) if gap > 0 else None)


def _block(skew: float, results: dict[str, dict], central: dict | None, local: dict | None) -> dict[str, Any]:
    """One skew's arms and the goals computed from them (``None`` where an arm it needs did not run)."""
    federated = {name: figures for name, figures in results.items() if name not in BASELINES}
    best, share = _best_and_gap_share(federated, central, "accuracy", sign=1)
    # The same goal on eval loss: continuous, so not tied to whole test examples as accuracy is.
    best_by_loss, loss_share = _best_and_gap_share(federated, central, "eval_loss", sign=-1)
    personal_vs_local = None
    if local and "personal" in federated:
        personal_vs_local = {site: round(federated["personal"]["own_task_accuracy"][site] - accuracy, 4)
                             for site, accuracy in local["own_task_accuracy"].items()}
    return {
        "skew": skew, "central": central, "local": local, "arms": federated, "best_arm": best,
        "best_closes_gap_share": share,
        "best_arm_by_eval_loss": best_by_loss, "best_closes_eval_loss_gap_share": loss_share,
        "ranks_vs_full_rank_accuracy": _difference(federated, "ffa_lora_ranks", "ffa_lora"),
        # FlexLoRA with the same caps against FedAvg with every site at the job's rank.
        "flexlora_ranks_vs_full_rank_accuracy": _difference(federated, "flexlora_ranks", "fedavg"),
        # The goal: personal layers at least as accurate on each site's own task as the site alone (>= 0).
        "personal_vs_local_own_task_accuracy": personal_vs_local,
    }


def _skew_block(skew: float, *, config: AlgorithmsConfig, model: Path, engine: Any, scratch: Path, seed: int,
                layers: int, saved: Progress) -> dict[str, Any]:
    """Every chosen arm (and baseline) at one skew, from the same data and initial adapter."""
    skewed = dataclasses.replace(config, skew=skew)
    train, test = arms.load_sites(scratch / f"skew-{skew}", sites=3, config=skewed, seed=seed)
    start = engine.initial_adapter()

    def one(name: str) -> dict[str, Any]:
        if name == "central":
            pooled = [example for examples in train.values() for example in examples]
            steps = config.rounds * config.local_steps * 3
            return arms.scores(engine, engine.train(adapter=start, examples=pooled, steps=steps, seed=seed).adapter,
                               test, config=config)
        if name == "local":
            return _local_own_task(engine, start, train, test, config=config, seed=seed)
        return _run_arm(name, config=config, model=model, data=scratch / f"skew-{skew}" / "data", test=test,
                        engine=engine, scratch=scratch / f"runs-{skew}", seed=seed, layers=layers)

    results = {}
    for name in config.arms:
        results[name] = saved.run(f"skew-{skew}/{name}", functools.partial(one, name))
        _log(f"skew {skew}: {name} {results[name]}")
    return _block(skew, results, results.get("central"), results.get("local"))


def run(*, tiny: bool, sites: int = 3, seed: int = 0, config: AlgorithmsConfig | None = None,
        parts: tuple[str, ...] = ("skews", "dp"), progress: Path | None = None) -> dict:
    """Run every arm at every skew, and the DP comparison, and return the JSON object.

    Args:
        tiny: Use a tiny random Llama (minutes) instead of SmolLM2-135M-Instruct.
        sites: Must be 3 (the arms' rank caps and own tasks are per site).
        seed: Seed of the data, the initial adapter and the data order.
        config: Override the preset (``TINY`` or ``FULL``); its ``arms`` may name the baselines
            ``central`` and ``local`` too (the preset runs both).
        parts: ``skews`` (every arm at every skew) and/or ``dp`` (the DP comparison).
        progress: A file that keeps every finished arm: a run stopped part-way resumes from it.
    """
    if sites != 3:
        raise SystemExit("the algorithms benchmark runs 3 sites (one per built-in task)")
    started = time.perf_counter()
    config = config or (TINY if tiny else FULL)
    unknown = set(config.arms) - set(ARMS) - set(BASELINES)
    if unknown:
        raise SystemExit(f"unknown arm(s) {sorted(unknown)}; the arms are {', '.join((*ARMS, *BASELINES))}")
    # Which arms and skews run is left out: a later run may add arms to the same file.
    saved = Progress(progress, {"tiny": tiny, "seed": seed, **{
        k: v for k, v in arms.config_fields(config, tiny=tiny).items() if k not in ("arms", "skews")}})
    arms.seed_torch(seed)
    # In one process no kit holds keys: each session would warn that it is not audited, every arm.
    logging.getLogger("zenfed").setLevel(logging.ERROR)
    blocks = []
    dp = None
    with tempfile.TemporaryDirectory(prefix="zenfed-bench-algorithms-") as tmp:
        scratch = Path(tmp)
        model, model_name = arms.model_dir(tiny=tiny, config=config, scratch=scratch, seed=seed,
                                           adjust=lambda path: arms.scale_output(path, factor=config.tiny_output_scale))
        engine = arms.make_engine(model, config=config, seed=seed)
        layers = int(engine.model.config.num_hidden_layers)
        if "dp" in parts:
            dp = saved.run("dp", lambda: dp_comparison(config, model=model, engine=engine, scratch=scratch,
                                                       layers=layers))
        for skew in config.skews if "skews" in parts else ():
            blocks.append(_skew_block(skew, config=config, model=model, engine=engine, scratch=scratch, seed=seed,
                                      layers=layers, saved=saved))
    return {
        "benchmark": "algorithms", "tiny": tiny, "blocks": blocks, "dp_comparison": dp,
        "config": {"model": model_name, "engine": "peft", "sites": 3, "seed": seed, "encrypted": False,
                   **arms.config_fields(config, tiny=tiny), "threads": arms.THREADS,
                   "personal_layers": personal_layers(layers)},
        "seconds": round(time.perf_counter() - started, 1),
    }


def main(argv: Sequence[str] | None = None) -> None:
    """``--only skews|dp`` runs one part; ``--arms``, ``--skews`` and ``--progress`` split a long run."""
    parser = argparse.ArgumentParser(add_help=False)
    parser.add_argument("--only", choices=("skews", "dp"), help="run one part: every arm at every skew, or DP")
    parser.add_argument("--arms", help=f"comma-separated arms to run (default all: {', '.join((*BASELINES, *ARMS))})")
    parser.add_argument("--skews", help="comma-separated skews to run (default 0.9,0.98)")
    parser.add_argument("--progress", type=Path, help="file that keeps finished arms; a rerun resumes from it")
    ours, rest = parser.parse_known_args(sys.argv[1:] if argv is None else argv)
    parts = (ours.only,) if ours.only else ("skews", "dp")

    def chosen(tiny: bool) -> AlgorithmsConfig:
        config = TINY if tiny else FULL
        if ours.arms:
            config = dataclasses.replace(config, arms=tuple(a.strip() for a in ours.arms.split(",") if a.strip()))
        if ours.skews:
            try:
                config = dataclasses.replace(config, skews=tuple(float(x) for x in ours.skews.split(",")))
            except ValueError as err:
                raise SystemExit(f"--skews takes comma-separated numbers, e.g. 0.9,0.98 ({err})") from err
        return config

    arms.main(lambda **kw: run(**kw, config=chosen(kw["tiny"]), parts=parts, progress=ours.progress),
              description=__doc__.splitlines()[0], argv=rest, tiny_help="tiny random Llama, a few minutes (CI)",
              parents=(parser,))


if __name__ == "__main__":
    main()
