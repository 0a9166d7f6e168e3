"""``zenfed up`` / ``zenfed down``: run a provisioned deployment on this machine.

Every process is started in its own session and tracked by PID and start
time in ``WS/.zenfed/processes.json``. ``down`` ends exactly what ``up``
started: each tracked process (if its PID still names the process that was
started), its descendants, and what is left in the session it leads (FLARE's
per-job processes, orphaned when their parent crashed). It never picks
processes by name, command line or folder. ``up`` on a partly running
deployment starts only what is missing.
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

from zenfed.atomic import atomic_write_bytes
from zenfed.errors import DeploymentError
from zenfed.provisioning.link_check import diagnose_link
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


def _ours(entry: dict[str, Any]) -> psutil.Process | None:
    """The tracked process if it is still the one ``up`` started, else None (its PID may be reused)."""
    try:
        proc = psutil.Process(int(entry["pid"]))
        started = float(entry["create_time"])
        return proc if abs(proc.create_time() - started) < 0.01 else None
    except (psutil.Error, KeyError, TypeError, ValueError):
        return None  # Gone, or an entry without a start time: never trusted with a kill.


def _session_members(entry: dict[str, Any]) -> list[psutil.Process]:
    """Processes left in the session a tracked process led, started after it (its orphaned descendants).

    Only when the PID was not reused since: if a process with that PID runs and is not
    the one ``up`` started, the session id may now belong to someone else.
    """
    try:
        leader, started = int(entry["pid"]), float(entry["create_time"])
    except (KeyError, TypeError, ValueError):
        return []
    if psutil.pid_exists(leader) and _ours(entry) is None:
        return []
    members = []
    for proc in psutil.process_iter(["pid", "create_time"]):
        try:
            if proc.pid != os.getpid() and os.getsid(proc.pid) == leader and proc.create_time() >= started - 0.01:
                members.append(proc)
        except (psutil.Error, OSError):
            continue
    return members


def status(dep: Deployment) -> dict[str, bool]:
    """Return participant -> whether the process ``up`` started for it is alive."""
    return {name: _ours(entry) is not None for name, entry in _tracked(dep).items()}


def up(dep: Deployment, *, timeout_s: float = 90.0, progress: bool = True) -> dict[str, int]:
    """Start the server, wait for its ports, then every relay (waiting for its port), then every site.

    Returns:
        Participant name -> PID.

    Raises:
        DeploymentError: If a port is taken or the server does not come up in time
            (everything started so far is stopped again).
    """
    running = {name for name, alive in status(dep).items() if alive}
    wanted = {dep.server, *dep.relay_kits, *dep.site_kits}
    if wanted <= running:
        raise DeploymentError(f"{dep.workspace} is already up; run `zenfed down {dep.workspace}` first")
    if dep.server not in running:
        for port in (dep.fl_port, dep.admin_port):
            if _port_open(port):
                raise DeploymentError(f"port {port} on localhost is in use; free it or provision other ports")
    logs = _state_dir(dep) / "logs"
    logs.mkdir(exist_ok=True)
    tracked = {name: entry for name, entry in _tracked(dep).items() if name in running}
    pids: dict[str, int] = {name: int(entry["pid"]) for name, entry in tracked.items()}
    state_file = _state_dir(dep) / PROCESSES

    def record(name: str, pid: int) -> None:
        pids[name] = pid
        try:
            tracked[name] = {"pid": pid, "create_time": psutil.Process(pid).create_time()}
        except psutil.Error:
            tracked[name] = {"pid": pid, "create_time": None}
        atomic_write_bytes(state_file, json.dumps(tracked, indent=2).encode())

    started: list[str] = []

    def start_listener(name: str, kit: str, ports: tuple[int, ...], deadline: float, *, what: str) -> None:
        """Start a participant others connect to (the server, a relay) and wait until its ports listen."""
        record(name, _start(kit, logs / f"{name}.log"))
        started.append(name)
        while not all(_port_open(port) for port in ports):
            if time.time() > deadline or not psutil.pid_exists(pids[name]):
                raise DeploymentError(f"{what} did not start; see {logs / (name + '.log')}")
            time.sleep(0.5)

    try:
        deadline = time.time() + timeout_s
        if dep.server not in running:
            start_listener(dep.server, dep.server_kit, (dep.fl_port, dep.admin_port), deadline, what="the server")
        for relay, kit in sorted(dep.relay_kits.items()):  # before the sites, which connect to them
            if relay not in running:
                if _port_open(dep.relay_ports[relay]):
                    raise DeploymentError(f"port {dep.relay_ports[relay]} on localhost (relay {relay}) is in use; "
                                          "free it or provision another port")
                start_listener(relay, kit, (dep.relay_ports[relay],), deadline, what=f"relay {relay}")
        for site, kit in sorted(dep.site_kits.items()):
            if site not in running:
                record(site, _start(kit, logs / f"{site}.log"))
                started.append(site)
        _wait_for_sites(dep, deadline=time.time() + timeout_s, logs=logs)
        if progress:
            kept = f"; already running: {', '.join(sorted(running))}" if running else ""
            print(f"zenfed: started {', '.join(started)} (logs in {logs}){kept}", flush=True)
    except BaseException:
        down(dep, progress=False, only=set(started))  # What was already running stays up.
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
                why = "; ".join(f"{site}: {diagnose_link(Path(dep.site_kits[site]))}" for site in missing)
                raise DeploymentError(
                    f"site(s) {', '.join(missing)} did not connect to the server ({why}); see their logs in {logs}"
                )
            time.sleep(0.5)
    finally:
        session.close()


def down(dep: Deployment, *, grace_s: float = 10.0, progress: bool = True,
         only: set[str] | None = None) -> int:
    """Stop every process ``up`` started, and their descendants; return how many were stopped.

    Processes are chosen by the PIDs and start times ``up`` recorded, never by name or
    folder: an operator's shell in a kit, or a ``tail -f`` of a kit's log, is left alone.

    Args:
        dep: The deployment.
        grace_s: Seconds between SIGTERM and SIGKILL.
        progress: Print what was stopped.
        only: Stop only these participants (the others stay tracked); all if None.
    """
    state_file = _state_dir(dep) / PROCESSES
    tracked = _tracked(dep)
    chosen = {name: entry for name, entry in tracked.items() if only is None or name in only}
    victims: dict[int, tuple[str, psutil.Process]] = {}
    leaders: list[psutil.Process] = []
    for name, entry in chosen.items():
        leader = _ours(entry)
        family = [leader, *_descendants(leader)] if leader is not None else []
        for proc in [*family, *_session_members(entry)]:
            victims.setdefault(proc.pid, (name, proc))
        leaders += [leader] if leader is not None else []
    running = {pid: entry for pid, entry in victims.items() if _running(entry[1])}
    described = [f"{name} (pid {proc.pid}: {_command(proc)})" for name, proc in running.values()]
    for leader in leaders:
        try:
            os.killpg(leader.pid, signal.SIGTERM)  # Each was started as its own session leader.
        except (ProcessLookupError, PermissionError):
            pass
    procs = [proc for _, proc in victims.values()]  # an exited child is still reaped below
    for proc in procs:
        try:
            proc.terminate()
        except psutil.Error:
            pass
    _, alive = psutil.wait_procs(procs, timeout=grace_s)
    for proc in alive:
        try:
            proc.kill()
        except psutil.Error:
            pass
    psutil.wait_procs(alive, timeout=5)
    remaining = {name: entry for name, entry in tracked.items() if name not in chosen}
    if remaining:
        atomic_write_bytes(state_file, json.dumps(remaining, indent=2).encode())
    else:
        state_file.unlink(missing_ok=True)
    if progress:
        ended = "".join(f"\n  {line}" for line in described)
        print(f"zenfed: stopped {len(running)} process(es){ended}", flush=True)
    return len(running)


def _running(proc: psutil.Process) -> bool:
    """Whether the process still runs (an exited child waiting to be reaped does not)."""
    try:
        return proc.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def _descendants(proc: psutil.Process) -> list[psutil.Process]:
    try:
        return list(proc.children(recursive=True))
    except psutil.Error:
        return []


def _command(proc: psutil.Process) -> str:
    try:
        return " ".join(proc.cmdline())[:120] or proc.name()
    except psutil.Error:
        return "already gone"
