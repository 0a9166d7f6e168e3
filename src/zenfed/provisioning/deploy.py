"""``zenfed up`` / ``zenfed down``: run a provisioned deployment on this machine.

Every process is started in its own session and tracked by PID in
``WS/.zenfed/processes.json``. ``down`` ends those process groups and then
any stray process still running from one of the workspace's kits (FLARE's
per-job processes), so it also cleans up after a crash.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import psutil

from zenfed.errors import DeploymentError
from zenfed.provisioning.project import Deployment

STATE_DIR = ".zenfed"
PROCESSES = "processes.json"


def _state_dir(dep: Deployment) -> Path:
    path = Path(dep.workspace) / STATE_DIR
    path.mkdir(parents=True, exist_ok=True)
    return path


def _env() -> dict[str, str]:
    """Environment for kit scripts: this interpreter's venv first, so `python3` is ours."""
    env = dict(os.environ)
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    env["PYTHONUNBUFFERED"] = "1"
    return env


def _port_open(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.settimeout(0.5)
        return sock.connect_ex(("127.0.0.1", port)) == 0


def _start(kit: str, log: Path) -> int:
    script = Path(kit) / "startup" / "sub_start.sh"
    if not script.is_file():
        raise DeploymentError(f"{script} is missing; is {kit} a provisioned kit?")
    with log.open("ab") as out:
        proc = subprocess.Popen(
            ["bash", str(script), "--once"], stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            cwd=kit, env=_env(), start_new_session=True,
        )
    return proc.pid


def _kit_processes(dep: Deployment) -> list[psutil.Process]:
    """Processes whose command line or working folder is inside one of this workspace's kits."""
    kits = [dep.server_kit, *dep.site_kits.values()]
    found = []
    for proc in psutil.process_iter(["pid", "cmdline", "cwd"]):
        try:
            text = " ".join(proc.info.get("cmdline") or []) + " " + (proc.info.get("cwd") or "")
        except (psutil.Error, TypeError):
            continue
        if proc.pid != os.getpid() and any(kit in text for kit in kits):
            found.append(proc)
    return found


def _tracked(dep: Deployment) -> dict[str, dict[str, Any]]:
    """The processes ``up`` recorded: name -> {"pid", "create_time"} (a bare PID from older files)."""
    path = _state_dir(dep) / PROCESSES
    if not path.is_file():
        return {}
    try:
        raw = json.loads(path.read_text())
    except ValueError:
        return {}
    return {
        name: entry if isinstance(entry, dict) else {"pid": entry, "create_time": None} for name, entry in raw.items()
    }


def _ours(entry: dict[str, Any], dep: Deployment) -> psutil.Process | None:
    """The tracked process if it is still the one ``up`` started, else None (its PID may be reused)."""
    try:
        proc = psutil.Process(int(entry["pid"]))
        if entry.get("create_time") is not None:
            return proc if abs(proc.create_time() - float(entry["create_time"])) < 0.01 else None
        text = " ".join(proc.cmdline()) + " " + proc.cwd()
    except (psutil.Error, KeyError, TypeError, ValueError):
        return None
    kits = [dep.server_kit, *dep.site_kits.values()]
    return proc if any(kit in text for kit in kits) else None


def status(dep: Deployment) -> dict[str, bool]:
    """Return participant -> whether the process ``up`` started for it is alive."""
    return {name: _ours(entry, dep) is not None for name, entry in _tracked(dep).items()}


def up(dep: Deployment, *, timeout_s: float = 90.0, progress: bool = True) -> dict[str, int]:
    """Start the server, wait for its ports, then start every site.

    Returns:
        Participant name -> PID.

    Raises:
        DeploymentError: If a port is taken or the server does not come up in time
            (everything started so far is stopped again).
    """
    if any(status(dep).values()):
        raise DeploymentError(f"{dep.workspace} is already up; run `zenfed down {dep.workspace}` first")
    for port in (dep.fl_port, dep.admin_port):
        if _port_open(port):
            raise DeploymentError(f"port {port} on localhost is in use; free it or provision other ports")
    logs = _state_dir(dep) / "logs"
    logs.mkdir(exist_ok=True)
    pids: dict[str, int] = {}
    state_file = _state_dir(dep) / PROCESSES

    def record() -> None:
        entries = {}
        for name, pid in pids.items():
            try:
                entries[name] = {"pid": pid, "create_time": psutil.Process(pid).create_time()}
            except psutil.Error:
                entries[name] = {"pid": pid, "create_time": None}
        state_file.write_text(json.dumps(entries, indent=2))

    try:
        pids[dep.server] = _start(dep.server_kit, logs / f"{dep.server}.log")
        record()
        deadline = time.time() + timeout_s
        while not (_port_open(dep.fl_port) and _port_open(dep.admin_port)):
            if time.time() > deadline or not psutil.pid_exists(pids[dep.server]):
                raise DeploymentError(f"the server did not start; see {logs / (dep.server + '.log')}")
            time.sleep(0.5)
        for site, kit in sorted(dep.site_kits.items()):
            pids[site] = _start(kit, logs / f"{site}.log")
            record()
        _wait_for_sites(dep, deadline=time.time() + timeout_s, logs=logs)
        if progress:
            print(f"zenfed: {len(pids)} processes up (logs in {logs})", flush=True)
    except BaseException:
        down(dep, progress=False)
        raise
    return pids


def _wait_for_sites(dep: Deployment, *, deadline: float, logs: Path) -> None:
    """Wait until the server lists every site as connected, so a job submitted next includes them all."""
    if not dep.admin_kits:
        return
    from zenfed.jobs.submit import open_session

    session = open_session(dep.admin_kit(), timeout_s=max(deadline - time.time(), 5.0))
    try:
        while True:
            connected = {c.name for c in session.get_system_info().client_info}
            missing = sorted(set(dep.site_kits) - connected)
            if not missing:
                return
            if time.time() > deadline:
                raise DeploymentError(
                    f"site(s) {', '.join(missing)} did not connect to the server; see their logs in {logs}"
                )
            time.sleep(0.5)
    finally:
        session.close()


def down(dep: Deployment, *, grace_s: float = 10.0, progress: bool = True) -> int:
    """Stop every process of the deployment; return how many were stopped."""
    state_file = _state_dir(dep) / PROCESSES
    ours = [proc for entry in _tracked(dep).values() if (proc := _ours(entry, dep)) is not None]
    victims: dict[int, psutil.Process] = {}
    for proc in ours:
        victims[proc.pid] = proc
        try:
            for child in proc.children(recursive=True):
                victims[child.pid] = child
        except psutil.Error:
            continue
    for proc in _kit_processes(dep):
        victims[proc.pid] = proc
    for proc in ours:
        try:
            os.killpg(proc.pid, signal.SIGTERM)  # Each was started as its own session leader.
        except (ProcessLookupError, PermissionError):
            pass
    for proc in victims.values():
        try:
            proc.terminate()
        except psutil.Error:
            pass
    _, alive = psutil.wait_procs(list(victims.values()), timeout=grace_s)
    for proc in alive:
        try:
            proc.kill()
        except psutil.Error:
            pass
    psutil.wait_procs(alive, timeout=5)
    state_file.unlink(missing_ok=True)
    if progress:
        print(f"zenfed: stopped {len(victims)} process(es)", flush=True)
    return len(victims)
