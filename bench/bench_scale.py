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

Prints one JSON object (``zenfed bench scale --json``)::

    {"sites": [{"sites", "workers", "server_peak_rss_mib", "round_seconds", "server_cpu_seconds_per_round",
                "rounds", "wall_seconds", "site_processes_peak_rss_mib"}, ...],
     "sites_at_once": {... the same row, one process per site},
     "ratios": {"peak_rss_largest_over_smallest", "round_seconds_per_site_largest_over_smallest",
                "peak_rss_16_sites_at_once_over_smallest"},
     "cohorts": {"all": {...}, "fraction_0.25": {...}, "site_rounds"},
     "targets": {...}, "config": {...}, "seconds"}
"""

from __future__ import annotations

import argparse
import json
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
    result, sampler, wall = _simulate(_spec(model, sites=sites, rounds=2), data, sites, workspace, workers=workers)
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


def run(*, tiny: bool, counts: tuple[int, ...] | None = None) -> dict[str, Any]:
    """Run the scale benchmark (``tiny``: 3 and 8 sites; ``counts``: these site counts instead)."""
    started = time.time()
    counts = counts or (TINY_SITE_COUNTS if tiny else SITE_COUNTS)
    largest = counts[-1]
    with tempfile.TemporaryDirectory(prefix="zenfed-bench-scale-") as tmp:
        root = Path(tmp)
        model = build_tiny_model(root / "tiny")
        data = root / "data"
        make_builtin(data, sites=largest, train_per_site=24, valid_per_site=4, test_per_task=8)
        rows = [_measure(model, data, sites, root / f"run-{sites}") for sites in counts]
        # The same job with every site in its own process, all at once: what the server holds per site
        # *connected and active at the same time*, against per site in the federation (the rows above).
        concurrent = min(CONCURRENT_SITES, largest)
        at_once = _measure(model, data, concurrent, root / f"concurrent-{concurrent}", workers=concurrent)
        first, last = rows[0], rows[-1]
        largest = last["sites"]
        ratios = {
            "peak_rss_largest_over_smallest": round(last["server_peak_rss_mib"] / first["server_peak_rss_mib"], 3),
            "round_seconds_per_site_largest_over_smallest": round(
                (last["round_seconds"] / last["sites"]) / (first["round_seconds"] / first["sites"]), 3),
            f"peak_rss_{concurrent}_sites_at_once_over_smallest": round(
                at_once["server_peak_rss_mib"] / first["server_peak_rss_mib"], 3),
        }

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
    return {
        "sites": rows, "sites_at_once": at_once, "ratios": ratios, "cohorts": cohorts,
        "targets": {
            "peak_rss_at_most_1.2x": ratios["peak_rss_largest_over_smallest"] <= 1.2,
            "round_time_at_most_linear": ratios["round_seconds_per_site_largest_over_smallest"] <= 1.0,
        },
        "config": {"model": "tiny random Llama", "encryption": "CKKS", "rounds": 2,
                   "site_processes": f"{SIMULATOR_WORKERS} workers, a new process per site task",
                   "local_steps": 2, "batch_size": 4, "site_counts": list(counts)},
        "seconds": round(time.time() - started, 1),
    }


def main(argv: list[str] | None = None) -> None:
    """``python bench/bench_scale.py [--tiny] [--counts 3,8,16]``: print the JSON object."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiny", action="store_true", help="3 and 8 sites (a few minutes)")
    parser.add_argument("--counts", help="comma-separated site counts, e.g. 3,64 (the last one runs the cohorts)")
    args = parser.parse_args(argv)
    counts = None
    if args.counts:
        try:
            counts = tuple(sorted({int(c) for c in args.counts.split(",")}))
        except ValueError:
            parser.error(f"--counts {args.counts!r}: give whole numbers separated by commas, e.g. 3,8,16")
        if counts[0] < 2:
            parser.error("--counts: a job needs at least 2 sites")
    print(json.dumps(run(tiny=args.tiny, counts=counts), indent=2))


if __name__ == "__main__":
    main()
