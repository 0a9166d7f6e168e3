"""Run a job in the FLARE simulator, for development: real FLARE processes, no kits."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from collections.abc import Callable, Mapping
from pathlib import Path

import yaml

from zenfed.data.builtin_preferences import BUILTIN_PREFERENCES, PREFERENCE_TRAIN_FILE, PREFERENCE_VALID_FILE
from zenfed.errors import JobError
from zenfed.jobs.allow_list import class_allow_list
from zenfed.jobs.export import export_job
from zenfed.kit_files import SHARED_SITE_DIR
from zenfed.spec import DatasetLocation, JobSpec, SitePolicy

SIMULATOR_JOB = "simulate_job"


def builtin_locations(site_dir: Path, *, dataset: str = "builtin") -> dict[str, DatasetLocation]:
    """The datasets of one site's folder of the built-in data: ``dataset`` (SFT) and ``builtin-preferences``."""
    return {dataset: DatasetLocation(path=site_dir),
            BUILTIN_PREFERENCES: DatasetLocation(path=site_dir, train=PREFERENCE_TRAIN_FILE,
                                                 valid=PREFERENCE_VALID_FILE)}


def builtin_policies(data_dir: Path, *, sites: int, dataset: str, allow_any_model: bool) -> dict[str, SitePolicy]:
    """Return site policies pointing each ``site-K`` at its folder of the built-in data (and preference pairs)."""
    models = ("*",) if allow_any_model else ("default",)
    return {
        f"site-{k}": SitePolicy(
            site=f"site-{k}", datasets=builtin_locations(data_dir / f"site-{k}", dataset=dataset),
            allowed_base_models=models, torch_threads=1,
        )
        for k in range(1, sites + 1)
    }


def prepare_workspace(workspace: Path, policies: Mapping[str, SitePolicy], *, encrypted: bool = False) -> None:
    """Write the shared ``local/`` folder the simulator copies to every participant.

    With ``encrypted``, a fresh CKKS key pair is made for this run: the secret
    context for the sites under ``zenfed_sites/`` and the public one for the
    server. The simulator gives every participant the same ``local/`` folder on
    one machine, so it is a development tool, not a key-separation boundary;
    provisioned kits are (see docs/he.md).
    """
    local = workspace / "local"
    (local / SHARED_SITE_DIR).mkdir(parents=True, exist_ok=True)
    (local / "resources.json").write_text(json.dumps({"class_allow_list": class_allow_list()}, indent=2))
    for site, policy in policies.items():
        text = yaml.safe_dump(policy.model_dump(mode="json"), sort_keys=False)
        (local / SHARED_SITE_DIR / f"{site}.yaml").write_text(text)
    if encrypted:
        from zenfed.privacy.he import (
            SERVER_CONTEXT_FILE,
            SITE_CONTEXT_FILE,
            make_public_context,
            make_secret_context,
            save_context,
        )

        secret = make_secret_context()
        save_context(secret, local / SHARED_SITE_DIR / SITE_CONTEXT_FILE)
        save_context(make_public_context(secret), local / SERVER_CONTEXT_FILE)


def run_simulation(
    spec: JobSpec, *, workspace: str | Path, policies: Mapping[str, SitePolicy], threads: int | None = None,
    log_path: Path | None = None, watch: Callable[[int], None] | None = None,
) -> Path:
    """Run ``spec`` in the FLARE simulator and return the server's result folder.

    Args:
        spec: The job.
        workspace: Run folder (replaced if it exists): ``job/``, the simulator's ``sim/``, and its log.
        policies: Site name -> its policy; one simulated site each.
        threads: Worker processes (default: one per site). With fewer workers than sites the
            simulator starts a new process for every task of a site; a zenfed site resumes what it
            decided in earlier tasks from its run folder (``site/run_state.py``), so this only costs
            time, and lets many sites share a machine's memory.
        log_path: Where the simulator's output goes (default: ``WORKSPACE/simulator.log``).
        watch: Called with the simulator's process id once it started (a benchmark samples it).

    Returns:
        The folder holding ``zenfed_result.json`` and the final adapter.

    Raises:
        JobError: If ``threads`` is below 1, the simulator fails, or the job leaves no result.
    """
    if threads is not None and threads < 1:
        raise JobError(f"threads={threads}: the simulator needs at least one worker process")
    # The simulator clears its own workspace at start, so the job folder and the
    # log live beside it: WORKSPACE/{job,sim,simulator.log}.
    root = Path(workspace).resolve()
    if root.exists():
        shutil.rmtree(root)
    ws = root / "sim"
    ws.mkdir(parents=True)
    prepare_workspace(ws, policies, encrypted=spec.encryption.enabled)
    job_dir = export_job(spec, out=root / "job" / spec.name)
    sites = sorted(policies)
    log = log_path or root / "simulator.log"
    cmd = [
        str(Path(sys.executable).with_name("nvflare")), "simulator", str(job_dir), "-w", str(ws),
        "-c", ",".join(sites), "-t", str(min(threads or len(sites), len(sites))),
    ]
    with log.open("w") as out:
        simulator = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT)
        try:
            if watch is not None:
                watch(simulator.pid)
        except BaseException:
            simulator.kill()  # the process this call started, by its handle
            simulator.wait()
            raise
        code = simulator.wait()
    result_dir = ws / "server" / SIMULATOR_JOB / "zenfed"
    if code != 0 or not (result_dir / "zenfed_result.json").is_file():
        raise JobError(f"the simulator run failed (exit {code}); see {log}")
    return result_dir


def load_policies(folder: Path) -> dict[str, SitePolicy]:
    """Load every ``SITE.yaml`` site policy in ``folder``.

    Raises:
        JobError: If the folder holds no policy.
    """
    from zenfed.spec import load_site_policy

    policies = {p.stem: load_site_policy(p) for p in sorted(Path(folder).glob("*.yaml"))}
    if not policies:
        raise JobError(f"{folder} holds no SITE.yaml site policies")
    for name, policy in policies.items():
        if policy.site != name:
            raise JobError(f"{folder / (name + '.yaml')} is for site {policy.site!r}; name the file {policy.site}.yaml")
    return policies
