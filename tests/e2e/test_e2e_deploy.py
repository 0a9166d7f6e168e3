"""A real loopback deployment: provision, up, submit, download, down -- and nothing left running."""

from __future__ import annotations

import json
from pathlib import Path

import psutil
import pytest

from zenfed.demo import loopback_project
from zenfed.jobs import export_job
from zenfed.jobs.submit import find_result_file, submit
from zenfed.provisioning.deploy import down, status, up
from zenfed.provisioning.project import provision

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(600)]


def processes_in(path: str) -> list[str]:
    """Descriptions of running processes whose command line or working folder is under ``path``."""
    found = []
    for proc in psutil.process_iter(["pid", "cmdline", "cwd", "status"]):
        try:
            if proc.info["status"] == psutil.STATUS_ZOMBIE:
                continue
            text = " ".join(proc.info["cmdline"] or []) + " " + (proc.info["cwd"] or "")
        except (psutil.Error, TypeError):
            continue
        if path in text:
            found.append(f"{proc.pid}: {text[:200]}")
    return found


def test_provision_up_submit_download_down(tmp_path, tiny_job_spec, small_builtin_data):
    # Prepare
    ws = tmp_path / "ws"
    deployment = provision(loopback_project("e2e-deploy", data_dir=small_builtin_data, sites=2), out=ws)
    spec = tiny_job_spec("deploy-e2e", federation={"rounds": 2, "min_sites": 2, "task_timeout_s": 300})
    job_dir = export_job(spec, out=tmp_path / "jobs" / spec.name)

    # Execute
    try:
        pids = up(deployment, progress=False)
        assert set(pids) == {"localhost", "site-1", "site-2"}
        outcome = submit(
            job_dir,
            admin_kit=deployment.admin_kit(),
            results_root=ws / "results",
            timeout_s=480,
            progress=False,
        )
    finally:
        stopped = down(deployment, progress=False)

    # Assert: the job finished and its result was downloaded into WS/results/JOB_ID.
    assert outcome.status.startswith("FINISHED"), outcome.status
    assert outcome.result_dir == (ws / "results" / outcome.job_id).resolve()
    result = json.loads(find_result_file(outcome.result_dir).read_text())
    assert [r["round"] for r in result["rounds"]] == [1, 2]
    assert all(sorted(r["contributors"]) == ["site-1", "site-2"] for r in result["rounds"])
    assert result["final"]["eval_loss"] < result["baseline"]["eval_loss"]
    adapter_dir = find_result_file(outcome.result_dir).parent / result["final"]["adapter_dir"]
    assert (adapter_dir / "adapter_config.json").is_file()
    assert (adapter_dir / "adapter_model.safetensors").stat().st_size > 0

    # Assert: down stopped everything; nothing runs from the workspace any more.
    assert stopped >= 3
    assert not any(status(deployment).values())
    leftovers = processes_in(str(Path(deployment.workspace)))
    assert not leftovers, "processes left running:\n" + "\n".join(leftovers)
