"""`zenfed down`: stops what `up` started, also after a crash, and nothing else."""

from __future__ import annotations

import dataclasses
import json
import socket
import subprocess
import sys
import time
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


def record(dep: Deployment, procs: dict[str, subprocess.Popen], *, create_time: float | None = None) -> Path:
    """Write the state file as `up` does: PID and start time of each process it started."""
    path = Path(dep.workspace) / STATE_DIR / PROCESSES
    path.parent.mkdir(parents=True, exist_ok=True)
    entries = {
        name: {"pid": proc.pid, "create_time": create_time if create_time is not None
               else psutil.Process(proc.pid).create_time()}
        for name, proc in procs.items()
    }
    path.write_text(json.dumps(entries))
    return path


# A "server" that starts a per-job child in its own session, as FLARE's server does.
PARENT = ("import subprocess, sys, time; "
          "subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(120)']); time.sleep(120)")


def session_children(leader_pid: int, timeout: float = 10.0) -> list[psutil.Process]:
    deadline = time.time() + timeout
    while time.time() < deadline:
        found = psutil.Process(leader_pid).children()
        if found:
            return found
        time.sleep(0.05)
    raise AssertionError("the parent did not start its child")


def test_down_with_nothing_running_stops_nothing(deployment):
    # Execute
    stopped = down(deployment, progress=False)

    # Assert
    assert stopped == 0
    assert status(deployment) == {}


def test_down_stops_what_up_started_and_its_children_only(deployment, spawned):
    # Prepare: a tracked server with a per-job child; an operator's shell in the server kit and a
    # process whose argument merely names a site kit, neither started by `up`.
    server = subprocess.Popen([sys.executable, "-c", PARENT], start_new_session=True)
    child = session_children(server.pid)[0]
    operator_shell = spawned(cwd=deployment.server_kit)
    tail = spawned(deployment.site_kits["site-1"] + "-backup")
    state = record(deployment, {"localhost": server})
    assert status(deployment) == {"localhost": True}

    # Execute
    stopped = down(deployment, grace_s=5, progress=False)

    # Assert
    assert server.wait(timeout=10) is not None
    psutil.wait_procs([child], timeout=10)
    assert not child.is_running()
    assert stopped == 2
    assert operator_shell.poll() is None and tail.poll() is None
    assert not state.exists()


def test_down_after_a_crash_stops_the_orphans_of_the_tracked_session(deployment, spawned):
    # Prepare: the tracked server crashed (SIGKILL), leaving its per-job child orphaned in its session
    server = subprocess.Popen([sys.executable, "-c", PARENT], start_new_session=True)
    orphan = session_children(server.pid)[0]
    state = record(deployment, {"localhost": server})
    server.kill()
    server.wait(timeout=10)
    bystander = spawned(cwd=deployment.site_kits["site-1"])

    # Execute
    stopped = down(deployment, grace_s=5, progress=False)

    # Assert
    psutil.wait_procs([orphan], timeout=10)
    assert not orphan.is_running() and stopped == 1
    assert bystander.poll() is None
    assert not state.exists()


def test_down_does_not_kill_a_stale_pid_that_now_belongs_to_another_program(deployment, spawned):
    # Prepare: after a crash and a reboot, the PID recorded for the server may belong to some
    # unrelated program; its start time differs from the one `up` recorded.
    unrelated = spawned("/not/a/kit")
    record(deployment, {"localhost": unrelated}, create_time=1.0)

    # Execute
    down(deployment, grace_s=2, progress=False)

    # Assert
    assert unrelated.poll() is None, "down() killed a process that was not part of the deployment"


def test_down_never_trusts_an_entry_without_a_start_time(deployment, spawned):
    # Prepare: an old state file with a bare PID
    unrelated = spawned()
    path = Path(deployment.workspace) / STATE_DIR / PROCESSES
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"localhost": unrelated.pid}))

    # Execute
    stopped = down(deployment, grace_s=2, progress=False)

    # Assert
    assert stopped == 0 and unrelated.poll() is None


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


def test_up_on_a_partly_running_deployment_starts_only_what_is_missing(deployment, spawned):
    # Prepare: the server runs (tracked); both sites are down; kits start a sleeper
    dep = dataclasses.replace(deployment, admin_kits={})  # no admin: up does not wait on the Flare API
    for kit in dep.site_kits.values():
        script = Path(kit) / "startup" / "sub_start.sh"
        script.write_text(f'exec {sys.executable} -c "import time; time.sleep(120)"\n')
    server = spawned()
    record(dep, {"localhost": server})

    # Execute
    try:
        pids = up(dep, progress=False)

        # Assert
        assert pids["localhost"] == server.pid
        assert set(pids) == {"localhost", "site-1", "site-2"}
        assert status(dep) == {"localhost": True, "site-1": True, "site-2": True}
        with pytest.raises(DeploymentError, match="already up"):
            up(dep, progress=False)
    finally:
        down(dep, grace_s=2, progress=False)
    assert server.poll() is not None
