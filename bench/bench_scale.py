"""Scale: the server's memory, round time and CPU as the number of sites grows, in the FLARE simulator.

For each site count the same job runs in the FLARE simulator (the tiny model,
CKKS encryption on, two rounds, every site in every round). Every count runs on
the same two worker processes (the machine's two cores): the simulator starts a
process for each task of a site, and the site resumes its job run from its run
folder (``site/run_state.py``). So the sites' memory stays that of two processes
at 64 sites as at 3, and every count pays the same per-task start-up. A sampler
reads, every 0.2 s, the resident memory and CPU time of the simulator's server
side: its runner process and the process that hosts the server (everything but
the per-site worker processes).

Two workers keep at most two sites active at once. To show what the server
holds per site active *at the same time*, the job also runs once with every site
in its own process, all at once (16 sites, as many as this machine's memory holds).

Then, at the largest site count, the cohort comparison: all sites for R rounds
against ``cohort_fraction`` 0.25 for 4R rounds, the same number of site-rounds,
each evaluated on the same held-out union test set.

With ``--baseline``, every count also runs a FLARE job without zenfed, built from
FLARE's own components (ScatterAndGather over NumPy weights, ``NPTrainer`` at the
sites), on the same simulator set-up and sampler. The simulator's runner hosts a
FLARE client (its cell and threads) for every simulated site, which a deployment
runs at the site. The baseline's runner memory is FLARE's own share (its server
and those hosted clients), so zenfed's peak less the baseline's estimates what
zenfed's server code adds on top. ``--sites-only`` skips the
all-at-once run and the cohort comparison (``sites_at_once`` and ``cohorts`` are
then null).

Prints one JSON object (``zenfed bench scale --json``)::

    {"sites": [{"sites", "workers", "server_peak_rss_mib", "round_seconds", "server_cpu_seconds_per_round",
                "rounds", "wall_seconds", "site_processes_peak_rss_mib"}, ...],
     "sites_at_once": {... the same row, one process per site},
     "ratios": {"peak_rss_largest_over_smallest", "round_seconds_per_site_largest_over_smallest",
                "peak_rss_16_sites_at_once_over_smallest"},
     "cohorts": {"all": {...}, "fraction_0.25": {...}, "site_rounds"},
     "targets": {...}, "config": {...}, "seconds"}

and with ``--baseline``::

    "baseline": {"sites": [{"sites", "workers", "rounds", "updates_per_round", "runner_peak_rss_mib",
                            "runner_cpu_seconds_per_round", "wall_seconds", "site_processes_peak_rss_mib"}, ...],
                 "compare": [{"sites", "zenfed_server_peak_rss_mib", "baseline_runner_peak_rss_mib",
                              "zenfed_own_mib"}, ...],
                 "growth_mib": {"zenfed", "baseline", "zenfed_own"},
                 "ratios": {"zenfed_peak_largest_over_smallest", "baseline_peak_largest_over_smallest",
                            "zenfed_own_largest_over_smallest"}}
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import psutil

from zenfed.data import make_builtin
from zenfed.data.jsonl import load_jsonl
from zenfed.engines import make_engine
from zenfed.engines.tiny import build_tiny_model
from zenfed.jobs.simulate import builtin_policies, run_simulation
from zenfed.spec import JobSpec

SITE_COUNTS = (3, 8, 16, 32, 64)
TINY_SITE_COUNTS = (3, 8)
WORKERS = 2  # threads for the final evaluation: the machine's cores
SIMULATOR_WORKERS = 2  # site processes at once, whatever the site count
ROUNDS = 2
SETTLE_S = 2.0  # a process this young may be a worker between fork and exec
CONCURRENT_SITES = 16  # the most site processes this machine's memory holds at once (about 600 MiB each)


def _say(text: str) -> None:
    print(f"bench scale: {text}", file=sys.stderr, flush=True)


class ServerSampler:
    """Samples the simulator's server side (all its processes but the per-site workers)."""

    def __init__(self, period_s: float = 0.2) -> None:
        self.period_s = period_s
        self.peak_rss = 0
        self.sites_peak_rss = 0  # all per-site worker processes together
        self.cpu_seconds = 0.0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._root: psutil.Process | None = None

    def watch(self, pid: int) -> None:
        """Start sampling the simulator whose root process is ``pid``."""
        self._root = psutil.Process(pid)
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Stop sampling."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(5)

    def _split(self) -> tuple[list[psutil.Process], list[psutil.Process]]:
        """(server side, per-site workers) of the simulator's process tree.

        A worker is forked from the runner before it execs, and for that moment it carries the
        runner's command line and resident pages: a process younger than ``SETTLE_S`` is not
        yet known to be server side, and is not counted (the server's own processes live all run).
        """
        assert self._root is not None
        server, sites = [], []
        now = time.time()
        for proc in [self._root, *self._root.children(recursive=True)]:
            try:
                if any("simulator_worker" in part for part in proc.cmdline()):
                    sites.append(proc)
                elif proc is self._root or now - proc.create_time() >= SETTLE_S:
                    server.append(proc)
            except psutil.Error:
                continue
        return server, sites

    def _run(self) -> None:
        cpu: dict[int, float] = {}
        while not self._stop.is_set():
            try:
                server, sites = self._split()
                rss = 0
                for proc in server:
                    with proc.oneshot():
                        rss += proc.memory_info().rss
                        times = proc.cpu_times()
                        cpu[proc.pid] = times.user + times.system
                self.peak_rss = max(self.peak_rss, rss)
                self.sites_peak_rss = max(self.sites_peak_rss, sum(p.memory_info().rss for p in sites))
                self.cpu_seconds = sum(cpu.values())
            except psutil.Error:
                pass
            time.sleep(self.period_s)


def _spec(model: Path, *, sites: int, rounds: int, fraction: float = 1.0, name: str = "scale") -> JobSpec:
    return JobSpec.model_validate({
        "name": name, "model": {"base": str(model), "engine": "peft"},
        "lora": {"rank": 4, "alpha": 8, "target_modules": ["q_proj", "v_proj"]},
        "training": {"local_steps": 2, "batch_size": 4, "seq_len": 96, "learning_rate": 0.01},
        "federation": {"rounds": rounds, "min_sites": 2, "cohort_fraction": fraction, "task_timeout_s": 1800},
        "evaluation": {"max_examples": 4, "max_new_tokens": 2},
        "encryption": {"enabled": True, "max_sites": max(64, sites)},
    })


def _simulate(spec: JobSpec, data: Path, sites: int, workspace: Path, *, workers: int = SIMULATOR_WORKERS,
              ) -> tuple[dict[str, Any], ServerSampler, float]:
    policies = builtin_policies(data, sites=sites, dataset="builtin", allow_any_model=True)
    sampler = ServerSampler()
    started = time.time()
    try:
        out = run_simulation(spec, workspace=workspace, policies=policies, threads=workers, watch=sampler.watch)
    finally:
        sampler.stop()
    return json.loads((out / "zenfed_result.json").read_text()) | {"_dir": str(out)}, sampler, time.time() - started


def baseline_job_configs(sites: int, *, rounds: int = ROUNDS) -> dict[str, dict[str, Any]]:
    """A zenfed-free FLARE job in FLARE's format: relative path -> JSON content.

    FedAvg from FLARE's own components (ScatterAndGather, NumPy persistor, in-time weighted
    aggregation, ``NPTrainer``), laid out as ``zenfed.jobs.export`` lays out zenfed's job.

    Args:
        sites: The number of sites; every round waits for all of them.
        rounds: FedAvg rounds.

    Returns:
        ``meta.json`` and the app's server and client configs.
    """
    server = {
        "format_version": 2,
        "components": [
            {"id": "persistor", "path": "nvflare.app_common.np.np_model_persistor.NPModelPersistor", "args": {}},
            {"id": "shareable_generator", "args": {},
             "path": "nvflare.app_common.shareablegenerators.full_model_shareable_generator."
                     "FullModelShareableGenerator"},
            {"id": "aggregator", "args": {"expected_data_kind": "WEIGHTS"},
             "path": "nvflare.app_common.aggregators.intime_accumulate_model_aggregator."
                     "InTimeAccumulateWeightedAggregator"},
        ],
        "workflows": [{
            "id": "scatter_and_gather", "path": "nvflare.app_common.workflows.scatter_and_gather.ScatterAndGather",
            # Every site every round, as in the zenfed job: a round closes once all sites answered, with no time limit.
            "args": {"min_clients": sites, "num_rounds": rounds, "wait_time_after_min_received": 0,
                     "aggregator_id": "aggregator", "persistor_id": "persistor",
                     "shareable_generator_id": "shareable_generator", "train_task_name": "train",
                     "train_timeout": 0},
        }],
        "task_data_filters": [],
        "task_result_filters": [],
    }
    site = {
        "format_version": 2,
        "executors": [{"tasks": ["train"],
                       "executor": {"id": "np_trainer", "path": "nvflare.app_common.np.np_trainer.NPTrainer",
                                    "args": {}}}],
        "task_data_filters": [],
        "task_result_filters": [],
        "components": [],
    }
    return {
        "meta.json": {"name": "scale-baseline", "resource_spec": {}, "deploy_map": {"app": ["@ALL"]},
                      "min_clients": 2},
        "app/config/config_fed_server.json": server,
        "app/config/config_fed_client.json": site,
    }


def _simulate_baseline(sites: int, workspace: Path, *, workers: int = SIMULATOR_WORKERS,
                       ) -> tuple[list[int], ServerSampler, float]:
    """Run the baseline job; return the updates aggregated each round, the sampler and the wall time.

    The simulator command is ``run_simulation``'s, with the same workspace layout
    (``job/``, ``sim/``, ``simulator.log``); that function exports a zenfed job, so it is not called.

    Raises:
        RuntimeError: If the simulator fails or a round did not aggregate every site.
    """
    job_dir = workspace / "job" / "scale-baseline"
    for relative, content in baseline_job_configs(sites).items():
        path = job_dir / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(content, indent=2) + "\n")
    ws = workspace / "sim"
    ws.mkdir(parents=True)
    log = workspace / "simulator.log"
    cmd = [
        str(Path(sys.executable).with_name("nvflare")), "simulator", str(job_dir), "-w", str(ws),
        "-c", ",".join(f"site-{k}" for k in range(1, sites + 1)), "-t", str(min(workers, sites)),
    ]
    sampler = ServerSampler()
    started = time.time()
    with log.open("w") as out:
        simulator = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT)
        try:
            sampler.watch(simulator.pid)
            code = simulator.wait()
        except BaseException:
            simulator.kill()  # the process this call started, by its handle
            simulator.wait()
            raise
        finally:
            sampler.stop()
    wall = time.time() - started
    # The aggregator's own log line is the proof that a round folded in every site.
    updates = [int(n) for n in re.findall(r"aggregating (\d+) update\(s\) at round \d+", log.read_text())]
    if code != 0 or len(updates) != ROUNDS or any(n != sites for n in updates):
        raise RuntimeError(f"the baseline simulator run failed (exit {code}, updates per round {updates}); see {log}")
    return updates, sampler, wall


def _measure_baseline(sites: int, workspace: Path, *, workers: int = SIMULATOR_WORKERS) -> dict[str, Any]:
    """One baseline row: the zenfed-free FLARE job at ``sites`` sites on ``workers`` worker processes."""
    _say(f"baseline: {sites} sites on {workers} worker processes ...")
    updates, sampler, wall = _simulate_baseline(sites, workspace, workers=workers)
    row = {
        "sites": sites, "workers": workers, "rounds": len(updates), "updates_per_round": updates,
        "runner_peak_rss_mib": round(sampler.peak_rss / 2**20, 1),
        "runner_cpu_seconds_per_round": round(sampler.cpu_seconds / len(updates), 2),
        "wall_seconds": round(wall, 1),
        "site_processes_peak_rss_mib": round(sampler.sites_peak_rss / 2**20, 1),
    }
    _say(json.dumps(row))
    return row


def _baseline_summary(rows: list[dict[str, Any]], baseline: list[dict[str, Any]]) -> dict[str, Any]:
    """Set zenfed's rows beside the baseline's: what zenfed's own server code adds, and how that grows."""
    compare = [{
        "sites": z["sites"], "zenfed_server_peak_rss_mib": z["server_peak_rss_mib"],
        "baseline_runner_peak_rss_mib": b["runner_peak_rss_mib"],
        "zenfed_own_mib": round(z["server_peak_rss_mib"] - b["runner_peak_rss_mib"], 1),
    } for z, b in zip(rows, baseline, strict=True)]
    first, last = compare[0], compare[-1]

    def growth(key: str) -> float:
        return round(last[key] - first[key], 1)

    def ratio(key: str) -> float:
        return round(last[key] / first[key], 3)

    return {
        "sites": baseline, "compare": compare,
        "growth_mib": {"zenfed": growth("zenfed_server_peak_rss_mib"),
                       "baseline": growth("baseline_runner_peak_rss_mib"), "zenfed_own": growth("zenfed_own_mib")},
        "ratios": {"zenfed_peak_largest_over_smallest": ratio("zenfed_server_peak_rss_mib"),
                   "baseline_peak_largest_over_smallest": ratio("baseline_runner_peak_rss_mib"),
                   "zenfed_own_largest_over_smallest": ratio("zenfed_own_mib")},
    }


def _test_loss(model: Path, spec: JobSpec, result_dir: Path, test: list[Any]) -> float | None:
    """Loss of the released adapter on the held-out union test set (None if none was released)."""
    adapter_file = result_dir / "adapter" / "adapter_model.safetensors"
    if not adapter_file.is_file():
        return None
    from safetensors.torch import load_file

    engine = make_engine(spec, model_dir=model, threads=WORKERS)
    return float(engine.evaluate(adapter=load_file(str(adapter_file)), examples=test, max_new_tokens=1).loss)


def _measure(model: Path, data: Path, sites: int, workspace: Path, *, workers: int = SIMULATOR_WORKERS,
             ) -> dict[str, Any]:
    """One row: the two-round job at ``sites`` sites on ``workers`` worker processes."""
    _say(f"{sites} sites on {workers} worker processes ...")
    result, sampler, wall = _simulate(_spec(model, sites=sites, rounds=ROUNDS), data, sites, workspace, workers=workers)
    rounds = result["rounds"]
    row = {
        "sites": sites, "workers": workers, "rounds": len(rounds),
        "server_peak_rss_mib": round(sampler.peak_rss / 2**20, 1),
        "round_seconds": round(sum(r["seconds"] for r in rounds) / len(rounds), 2),
        "server_cpu_seconds_per_round": round(sampler.cpu_seconds / len(rounds), 2),
        "wall_seconds": round(wall, 1),
        "site_processes_peak_rss_mib": round(sampler.sites_peak_rss / 2**20, 1),
    }
    _say(json.dumps(row))
    return row


def run(*, tiny: bool, counts: tuple[int, ...] | None = None, baseline: bool = False,
        sites_only: bool = False) -> dict[str, Any]:
    """Run the scale benchmark.

    Args:
        tiny: 3 and 8 sites.
        counts: These site counts instead.
        baseline: Also run the zenfed-free FLARE job at every count (the ``baseline`` key).
        sites_only: Skip the all-at-once run and the cohort comparison (their keys are null).

    Returns:
        The JSON-able result (see the module docstring).
    """
    started = time.time()
    counts = counts or (TINY_SITE_COUNTS if tiny else SITE_COUNTS)
    largest = counts[-1]
    at_once: dict[str, Any] | None = None
    cohorts: dict[str, Any] | None = None
    baseline_rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="zenfed-bench-scale-") as tmp:
        root = Path(tmp)
        model = build_tiny_model(root / "tiny")
        data = root / "data"
        make_builtin(data, sites=largest, train_per_site=24, valid_per_site=4, test_per_task=8)
        rows = []
        for sites in counts:
            rows.append(_measure(model, data, sites, root / f"run-{sites}"))
            if baseline:
                baseline_rows.append(_measure_baseline(sites, root / f"baseline-{sites}"))
        first, last = rows[0], rows[-1]
        largest = last["sites"]
        ratios = {
            "peak_rss_largest_over_smallest": round(last["server_peak_rss_mib"] / first["server_peak_rss_mib"], 3),
            "round_seconds_per_site_largest_over_smallest": round(
                (last["round_seconds"] / last["sites"]) / (first["round_seconds"] / first["sites"]), 3),
        }
        if not sites_only:
            # The same job with every site in its own process, all at once: what the server holds per site
            # *connected and active at the same time*, against per site in the federation (the rows above).
            concurrent = min(CONCURRENT_SITES, largest)
            at_once = _measure(model, data, concurrent, root / f"concurrent-{concurrent}", workers=concurrent)
            ratios[f"peak_rss_{concurrent}_sites_at_once_over_smallest"] = round(
                at_once["server_peak_rss_mib"] / first["server_peak_rss_mib"], 3)
            cohorts = _cohorts(model, data, largest, root)
    result = {
        "sites": rows, "sites_at_once": at_once, "ratios": ratios, "cohorts": cohorts,
        "targets": {
            "peak_rss_at_most_1.2x": ratios["peak_rss_largest_over_smallest"] <= 1.2,
            "round_time_at_most_linear": ratios["round_seconds_per_site_largest_over_smallest"] <= 1.0,
        },
        "config": {"model": "tiny random Llama", "encryption": "CKKS", "rounds": ROUNDS,
                   "site_processes": f"{SIMULATOR_WORKERS} workers, a new process per site task",
                   "local_steps": 2, "batch_size": 4, "site_counts": list(counts)},
    }
    if baseline:
        result["baseline"] = _baseline_summary(rows, baseline_rows)
    return result | {"seconds": round(time.time() - started, 1)}


def _cohorts(model: Path, data: Path, largest: int, root: Path) -> dict[str, Any]:
    """At ``largest`` sites: all sites for one round against a quarter of them for four, on the union test set."""
    test = load_jsonl(data / "test.jsonl")
    cohorts: dict[str, Any] = {}
    arms = {"all": (1.0, 1), "fraction_0.25": (0.25, 4)}  # the same site-rounds: n x 1 = n/4 x 4
    for arm, (fraction, rounds) in arms.items():
        _say(f"cohort comparison: {arm} ({rounds} round(s)) ...")
        spec = _spec(model, sites=largest, rounds=rounds, fraction=fraction, name=f"scale-{arm.replace('.', '')}")
        result, _, wall = _simulate(spec, data, largest, root / f"cohort-{arm}")
        trained = sum(len(r["contributors"]) for r in result["rounds"])
        cohorts[arm] = {"rounds": rounds, "site_rounds": trained, "wall_seconds": round(wall, 1),
                        "test_loss": _test_loss(model, spec, Path(result["_dir"]), test)}
    ratio_quality = None
    if cohorts["all"]["test_loss"] and cohorts["fraction_0.25"]["test_loss"]:
        ratio_quality = round(cohorts["fraction_0.25"]["test_loss"] / cohorts["all"]["test_loss"], 3)
    cohorts["test_loss_fraction_over_all"] = ratio_quality
    return cohorts


def main(argv: list[str] | None = None) -> None:
    """``python bench/bench_scale.py [--tiny] [--counts 3,8,16] [--baseline] [--sites-only] [--out FILE]``.

    Prints the JSON object (and writes it to ``--out``, if given).
    """
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiny", action="store_true", help="3 and 8 sites (a few minutes)")
    parser.add_argument("--counts", help="comma-separated site counts, e.g. 3,64 (the last one runs the cohorts)")
    parser.add_argument("--baseline", action="store_true",
                        help="also run a zenfed-free FLARE job (NumPy FedAvg) at every count, on the same simulator")
    parser.add_argument("--sites-only", action="store_true",
                        help="skip the all-at-once run and the cohort comparison")
    parser.add_argument("--out", type=Path, help="also write the JSON object to this file")
    args = parser.parse_args(argv)
    counts = None
    if args.counts:
        try:
            counts = tuple(sorted({int(c) for c in args.counts.split(",")}))
        except ValueError:
            parser.error(f"--counts {args.counts!r}: give whole numbers separated by commas, e.g. 3,8,16")
        if counts[0] < 2:
            parser.error("--counts: a job needs at least 2 sites")
    text = json.dumps(run(tiny=args.tiny, counts=counts, baseline=args.baseline, sites_only=args.sites_only),
                      indent=2)
    if args.out is not None:
        args.out.write_text(text + "\n")
    print(text)


if __name__ == "__main__":
    main()
