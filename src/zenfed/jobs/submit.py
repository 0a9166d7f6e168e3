"""``zenfed submit``: submit a job folder with the Flare API, follow it, download its result."""

from __future__ import annotations

import json
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from zenfed import protocol as P
from zenfed.errors import DeploymentError, JobError
from zenfed.provisioning.link_check import diagnose_link

TERMINAL = ("FINISHED", "ABORTED", "FAILED")  # FLARE statuses start with one of these.
RESULT_NAME = "zenfed_result.json"


@dataclass(frozen=True)
class SubmitResult:
    """What a submitted job ended as."""

    job_id: str
    status: str
    result_dir: Path


def open_session(admin_kit: Path, timeout_s: float) -> Any:
    """Open a Flare API session with an admin's kit.

    Raises:
        DeploymentError: If the kit is not an admin kit or the server cannot be reached.
    """
    from nvflare.fuel.flare_api.flare_api import new_secure_session

    if not (admin_kit / "startup" / "fed_admin.json").is_file():
        raise DeploymentError(f"{admin_kit} is not an admin kit (no startup/fed_admin.json)")
    try:
        return new_secure_session(username=admin_kit.name, startup_kit_location=str(admin_kit), timeout=timeout_s)
    except Exception as err:  # The Flare API raises several unrelated types here.
        raise DeploymentError(
            f"cannot reach the server with the admin kit {admin_kit}: {err}; {diagnose_link(admin_kit)}"
        ) from None


def _reconnect(session: Any, admin: Path, *, deadline: float) -> Any:
    """Open a new session once the server answers again; give up at ``deadline``.

    Raises:
        JobError: If the server is not back by ``deadline``.
    """
    try:
        session.close()
    except Exception:  # The old session's connection is already gone.
        pass
    while True:
        if time.time() > deadline:
            raise JobError("the server did not come back before the submit timeout; once it is up, the admin console's "
                           "`list_jobs` shows whether the job resumed")
        try:
            return open_session(admin, timeout_s=10.0)
        except DeploymentError:
            time.sleep(3.0)


def _server_gone() -> tuple[type[BaseException], ...]:
    """The Flare API's errors that mean the server cannot be reached (rather than a refused request)."""
    from nvflare.fuel.flare_api.api_spec import NoConnection, NoReply, SessionClosed

    return (NoConnection, NoReply, SessionClosed, OSError)


def _progress(session: Any, job_id: str) -> dict[str, Any]:
    try:
        stats = session.show_stats(job_id, "server")
    except Exception:  # Stats are best-effort; the job's status decides.
        return {}
    found = stats.get("zenfed") if isinstance(stats, dict) else None
    if found is None and isinstance(stats, dict):
        found = next((v.get("zenfed") for v in stats.values() if isinstance(v, dict) and "zenfed" in v), None)
    return found or {}


def submit(
    job_dir: str | Path, *, admin_kit: str | Path, results_root: str | Path, timeout_s: float = 3600.0,
    progress: bool = True,
) -> SubmitResult:
    """Submit ``job_dir``, follow it with a progress bar, and download its result.

    Args:
        job_dir: A FLARE job folder (e.g. from ``zenfed job export``).
        admin_kit: The admin's startup kit folder.
        results_root: The result goes to ``results_root/JOB_ID/``.
        timeout_s: Give up (and abort the job) after this many seconds.
        progress: Show a live progress bar.

    Raises:
        JobError: If the job does not finish or cannot be downloaded.
    """
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

    job = Path(job_dir).resolve()
    if not (job / "meta.json").is_file():
        raise JobError(f"{job} is not a FLARE job folder (no meta.json); make one with `zenfed job export`")
    admin = Path(admin_kit).resolve()
    session = open_session(admin, timeout_s=30.0)
    try:
        job_id = session.submit_job(str(job))
        status = "SUBMITTED"
        deadline = time.time() + timeout_s
        columns = (TextColumn("[bold]{task.description}"), BarColumn(), TextColumn("{task.fields[info]}"),
                   TimeElapsedColumn())
        with Progress(*columns, disable=not progress, transient=False) as bar:
            task = bar.add_task(f"job {job_id[:8]}", total=None, info="submitted")
            live = bar.console.is_terminal

            def say(text: str) -> None:
                if progress:
                    bar.console.print(f"zenfed: {text}")
            last_line = ""
            while True:
                try:
                    meta = session.get_job_meta(job_id)
                except _server_gone() as err:
                    until = time.strftime("%H:%M:%S", time.localtime(deadline))
                    say(f"lost the server ({type(err).__name__}); waiting until {until} for it to come back "
                        "(restart it with `zenfed up WS`)")
                    session = _reconnect(session, admin, deadline=deadline)
                    continue
                except Exception as err:  # The server answered, but not with the job (deleted, not allowed, ...).
                    raise JobError(f"cannot follow job {job_id}: {type(err).__name__}: {err}") from None
                status = str(meta.get("status", ""))
                if meta.get(P.META_RESUMED_AS):
                    say(f"job {job_id[:8]}: {meta.get(P.META_INTERRUPTED, 'interrupted')}; following it")
                    job_id = str(meta[P.META_RESUMED_AS])
                    bar.update(task, description=f"job {job_id[:8]}")
                    continue
                if meta.get(P.META_INTERRUPTED):
                    raise JobError(f"job {job_id} ended: {meta[P.META_INTERRUPTED]}")
                info = _progress(session, job_id) if status == "RUNNING" else {}
                if info.get("rounds"):
                    done = info["round"] - (0 if info.get("phase") in ("evaluate", "done") else 1)
                    loss = info.get("eval_loss")
                    line = (
                        f"round {info['round']}/{info['rounds']} · {info.get('phase')} · "
                        f"{info.get('sites_answered', 0)} site(s) answered"
                        + (f" · eval loss {loss:.4f}" if isinstance(loss, float) else "")
                    )
                    bar.update(task, total=info["rounds"], completed=max(done, 0), info=line)
                else:
                    line = status.lower()
                    bar.update(task, info=line)
                if progress and not live and line != last_line:
                    print(f"job {job_id[:8]}: {line}", flush=True)  # Logs and CI get one line per change.
                last_line = line
                if status.startswith(TERMINAL):
                    break
                if time.time() > deadline:
                    session.abort_job(job_id)
                    raise JobError(f"job {job_id} did not finish within {timeout_s:.0f} s; it was aborted")
                time.sleep(2.0)
        target = Path(results_root).resolve() / job_id
        downloaded = Path(session.download_job_result(job_id))
        if target.exists():
            shutil.rmtree(target)
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.move(str(downloaded), str(target))
        _lift_zenfed_outputs(target)
    finally:
        session.close()
    if not status.startswith("FINISHED") or not (target / RESULT_NAME).is_file():
        why = why_it_stopped(target)
        raise JobError(f"job {job_id} ended as {status} without a result"
                       + (f": {why}" if why else "")
                       + f"; its downloaded workspace and audit logs are in {target}")
    return SubmitResult(job_id=job_id, status=status, result_dir=target)


# The server's error kinds that explain why a job stopped, most telling first.
_STOP_KINDS = ("too_few_sites", "attestation_quorum", "cohort_too_large", "mask_recovery_failed", "site_lost",
               "no_answer", "result_rejected", "correction_rejected", "attestation_evidence")


def why_it_stopped(result_dir: Path, *, most: int = 3) -> str:
    """The server's recorded reasons a job stopped (from the audit log in its downloaded result), or "".

    Args:
        result_dir: The downloaded job result.
        most: How many reasons to give.
    """
    reasons: list[tuple[int, str]] = []
    for log in sorted((result_dir / "audit").glob("*.jsonl")):
        for line in log.read_text(errors="replace").splitlines():
            try:
                record = json.loads(line)
            except ValueError:
                continue
            fields = record.get("fields") or {}
            kind = str(fields.get("kind", ""))
            if record.get("event") == "error" and kind in _STOP_KINDS and fields.get("message"):
                reasons.append((_STOP_KINDS.index(kind), str(fields["message"])))
    ordered = [text for _, text in sorted(reasons, key=lambda item: item[0])]
    return "; ".join(list(dict.fromkeys(ordered))[:most])


def _lift_zenfed_outputs(target: Path) -> None:
    """Move the controller's outputs (result, adapter, audit logs) to the top of the result folder.

    FLARE's download nests them in ``workspace/zenfed/``; the rest of FLARE's
    download (its logs, the job as submitted) stays where it is.
    """
    nested = target / "workspace" / "zenfed"
    if not nested.is_dir():
        return
    for item in nested.iterdir():
        destination = target / item.name
        if not destination.exists():
            shutil.move(str(item), str(destination))
    if not any(nested.iterdir()):
        nested.rmdir()


def find_result_file(result_dir: Path) -> Path:
    """Return ``zenfed_result.json`` inside a downloaded job result.

    Raises:
        JobError: If the result holds none (the job did not complete).
    """
    direct = result_dir / "zenfed_result.json"
    matches = [direct] if direct.is_file() else sorted(result_dir.rglob("zenfed_result.json"))
    if not matches:
        raise JobError(f"{result_dir} holds no zenfed_result.json; the job did not complete")
    return matches[0]


def load_result(result_dir: Path) -> dict[str, Any]:
    """Load the job result written by the controller."""
    data: dict[str, Any] = json.loads(find_result_file(result_dir).read_text())
    return data
