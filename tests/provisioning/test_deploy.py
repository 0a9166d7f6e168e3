"""`zenfed down`: stops what `up` started, also after a crash, and nothing else."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
from pathlib import Path

import psutil
import pytest

from zenfed.errors import DeploymentError
from zenfed.provisioning.deploy import PROCESSES, STATE_DIR, down, status, up
from zenfed.provisioning.project import Deployment

SLEEPER = "import time; time.sleep(120)"


@pytest.fixture
def deployment(tmp_path, free_ports) -> Deployment:
    """A workspace layout like `zenfed provision` writes (kits are plain folders here)."""
    prod = tmp_path / "ws" / "proj" / "prod_00"
    kits = {name: prod / name for name in ("localhost", "site-1", "site-2", "admin@x.org")}
    for kit in kits.values():
        (kit / "startup").mkdir(parents=True)
    return Deployment(
        workspace=str(tmp_path / "ws"),
        project="proj",
        server="localhost",
        server_kit=str(kits["localhost"]),
        fl_port=free_ports[0],
        admin_port=free_ports[1],
        site_kits={"site-1": str(kits["site-1"]), "site-2": str(kits["site-2"])},
        admin_kits={"admin@x.org": str(kits["admin@x.org"])},
    )


@pytest.fixture
def spawned():
    """Start sleeper processes in their own sessions; kill any survivors afterwards."""
    procs: list[subprocess.Popen] = []

    def spawn(*args: str, cwd: str | None = None) -> subprocess.Popen:
        proc = subprocess.Popen(
            [sys.executable, "-c", SLEEPER, *args],
            cwd=cwd,
            start_new_session=True,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        procs.append(proc)
        return proc

    yield spawn
    for proc in procs:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=10)


def record(dep: Deployment, pids: dict[str, int]) -> Path:
    path = Path(dep.workspace) / STATE_DIR / PROCESSES
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(pids))
    return path


def test_down_with_nothing_running_stops_nothing(deployment):
    # Execute
    stopped = down(deployment, progress=False)

    # Assert
    assert stopped == 0
    assert status(deployment) == {}


def test_down_after_a_crash_stops_tracked_and_stray_kit_processes(deployment, spawned):
    # Prepare: a tracked "server" whose command line names its kit, and an untracked per-job
    # process running inside a site kit (as FLARE's job processes do) -- then the CLI "crashed".
    server = spawned(str(Path(deployment.server_kit) / "startup" / "fed_server.json"))
    stray = spawned(cwd=deployment.site_kits["site-1"])
    state = record(deployment, {"localhost": server.pid})
    assert status(deployment) == {"localhost": True}

    # Execute
    stopped = down(deployment, grace_s=5, progress=False)

    # Assert
    assert server.wait(timeout=10) is not None and stray.wait(timeout=10) is not None
    assert stopped == 2
    assert not state.exists()
    assert status(deployment) == {}


def test_down_leaves_processes_outside_the_workspace_alone(deployment, spawned):
    # Prepare
    bystander = spawned("/some/other/kit")
    record(deployment, {})

    # Execute
    down(deployment, grace_s=2, progress=False)

    # Assert
    assert bystander.poll() is None


def test_down_does_not_kill_a_stale_pid_that_now_belongs_to_another_program(deployment, spawned):
    # Prepare: after a crash and a reboot, the PID recorded for the server may belong to some
    # unrelated program. `down` must check a tracked PID still runs from this workspace's kits.
    unrelated = spawned("/not/a/kit")
    record(deployment, {"localhost": unrelated.pid})

    # Execute
    down(deployment, grace_s=2, progress=False)

    # Assert
    assert unrelated.poll() is None, "down() killed a process that was not part of the deployment"


def test_up_refuses_a_port_in_use_and_starts_nothing(deployment):
    # Prepare
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as busy:
        busy.bind(("127.0.0.1", deployment.fl_port))
        busy.listen(1)

        # Execute
        with pytest.raises(DeploymentError, match=f"port {deployment.fl_port} on localhost is in use"):
            up(deployment, progress=False)

    # Assert
    assert status(deployment) == {}


def test_up_refuses_a_kit_without_start_script_and_cleans_up(deployment):
    # Execute
    with pytest.raises(DeploymentError, match="sub_start.sh is missing"):
        up(deployment, progress=False)

    # Assert
    assert status(deployment) == {}
    assert not any(deployment.workspace in " ".join(p.info["cmdline"] or []) for p in psutil.process_iter(["cmdline"]))
