"""A restarted server resumes a job from its last checkpoint instead of starting over."""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path

import pytest

from zenfed.demo import loopback_project
from zenfed.jobs import export_job
from zenfed.jobs.submit import load_result, submit
from zenfed.provisioning.deploy import down, up
from zenfed.provisioning.project import provision

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(900)]


def _checkpoint_round(server_kit: Path) -> int:
    for state in server_kit.glob("zenfed-checkpoints/*/state.json"):
        try:
            return int(json.loads(state.read_text())["completed_round"])
        except (OSError, ValueError, KeyError):
            return 0
    return 0


def test_server_restart_resumes_from_checkpoint(tmp_path, tiny_job_spec, small_builtin_data):
    # Prepare: a 3-round job; the deployment is killed once round 1 is checkpointed.
    deployment = provision(loopback_project("e2e-resume", data_dir=small_builtin_data, sites=2), out=tmp_path / "ws")
    server_kit = Path(deployment.server_kit)
    spec = tiny_job_spec("resume-e2e", federation={"rounds": 3, "min_sites": 2, "task_timeout_s": 300})
    job_dir = export_job(spec, out=tmp_path / "jobs" / spec.name)
    up(deployment, progress=False)
    try:
        first = threading.Thread(
            target=lambda: _ignore_errors(lambda: submit(job_dir, admin_kit=deployment.admin_kit(),
                                                         results_root=tmp_path / "first", timeout_s=300,
                                                         progress=False)),
            daemon=True,
        )
        first.start()
        deadline = time.time() + 300
        while _checkpoint_round(server_kit) < 1:
            assert time.time() < deadline, "round 1 was never checkpointed"
            time.sleep(0.5)
        # Execute: a crash of every process, then a restart and the same job again.
        down(deployment, progress=False)
        first.join(timeout=60)
        interrupted_at = _checkpoint_round(server_kit)
        assert 1 <= interrupted_at < 3
        up(deployment, progress=False)
        outcome = submit(job_dir, admin_kit=deployment.admin_kit(), results_root=tmp_path / "second",
                         timeout_s=480, progress=False)
    finally:
        down(deployment, progress=False)

    # Assert: the second run did only the missing rounds and kept the checkpointed history.
    result = load_result(outcome.result_dir)
    assert [r["round"] for r in result["rounds"]] == [1, 2, 3]
    server_log = (outcome.result_dir / "workspace" / "log.txt").read_text()
    assert f"resuming {spec.name} after round {interrupted_at}" in server_log
    # Rounds before the crash were not trained again: the server's audit log of the second job
    # starts its training at the round after the checkpoint.
    records = [json.loads(line) for line in next((outcome.result_dir / "audit").glob("e2e-resume.jsonl")).open()]
    trained = sorted({r["fields"]["round"] for r in records
                      if r["event"] == "round_started" and r["fields"].get("task") == "zenfed_train"})
    assert trained == list(range(interrupted_at + 1, 4))


def _ignore_errors(call):
    try:
        call()
    except Exception:  # The first submission dies with the deployment; that is the point.
        pass
