"""Jobs a server crash interrupted: marked ended with the reason, and resumed from their checkpoint.

FLARE 2.9 leaves a job that was running when the server process died listed as
``RUNNING`` after a restart, with nothing running it. The server kit names this
component in ``local/resources.json``; when the restarted server starts it:

1. marks every job still listed ``RUNNING`` or ``DISPATCHED`` as
   ``FINISHED:ABNORMAL``, with the reason in its meta (``zenfed_interrupted``);
   a job that had already written its result is only marked, with where the
   result is (it must not train again);
2. if ``resume`` is on (the default), submits a clone of each zenfed job that
   started and had not finished, once (a clone left by an earlier, cut-short
   recovery is reused), and at most ``max_resumes`` times in a row. The clone resumes
   after the job's last checkpointed round (checkpoints are kept by job spec, not
   job id) and copies the interrupted run's audit logs into its own, so its
   result holds the whole trail from round 1. The interrupted job's meta names the
   clone (``zenfed_resumed_as``), which ``zenfed submit`` follows.

Nothing here reads or changes a model; it only moves job records.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from nvflare.apis.event_type import EventType
from nvflare.apis.fl_component import FLComponent
from nvflare.apis.fl_constant import FLContextKey, SystemComponents
from nvflare.apis.fl_context import FLContext
from nvflare.apis.job_def import JobMetaKey, RunStatus
from nvflare.private.fed.server.job_cmds import CLONED_META_KEYS

from zenfed.protocol import META_INTERRUPTED, META_RESUMED_AS, META_RESUMES
from zenfed.server.result import RESULT_FILE

# Who submitted the resumed job, so the original submitter can still see and download it.
_SUBMITTER_KEYS = (JobMetaKey.SUBMITTER_NAME.value, JobMetaKey.SUBMITTER_ORG.value, JobMetaKey.SUBMITTER_ROLE.value)


class InterruptedJobRecovery(FLComponent):
    """On server start, end the jobs a crash left ``RUNNING`` and, optionally, resume them."""

    def __init__(self, resume: bool = True, max_resumes: int = 3):
        """Create the component.

        Args:
            resume: Submit a clone of each interrupted job, which resumes from its checkpoint.
            max_resumes: Do not resume a job that was already resumed this many times (a crash loop).
        """
        super().__init__()
        self.resume = resume
        self.max_resumes = max_resumes

    def handle_event(self, event_type: str, fl_ctx: FLContext) -> None:
        """Recover interrupted jobs once, when the server starts."""
        if event_type == EventType.SYSTEM_START:
            self.recover(fl_ctx)

    def recover(self, fl_ctx: FLContext) -> list[tuple[str, str | None]]:
        """End every job the crash left running; resume each zenfed job that had not finished.

        Returns:
            (interrupted job id, the id of the job that resumes it, or None) for each.
        """
        engine = fl_ctx.get_engine()
        manager = engine.get_component(SystemComponents.JOB_MANAGER)
        if manager is None:
            return []
        workspace = fl_ctx.get_prop(FLContextKey.WORKSPACE_OBJECT)
        done = []
        for job in manager.get_jobs_by_status([RunStatus.RUNNING, RunStatus.DISPATCHED], fl_ctx):
            try:
                done.append((job.job_id, self._recover_one(manager, workspace, job, fl_ctx)))
            except Exception as err:  # One job's trouble must not leave the others RUNNING.
                reason = f"the server stopped while this job ran; it could not be resumed ({type(err).__name__}: {err})"
                self.log_error(fl_ctx, f"job {job.job_id}: {reason}")
                try:
                    manager.update_meta(job.job_id, {META_INTERRUPTED: reason}, fl_ctx)
                    manager.set_status(job.job_id, RunStatus.FINISHED_ABNORMAL, fl_ctx)
                except Exception as again:  # The store itself fails: FLARE's log is all that is left.
                    self.log_error(fl_ctx, f"job {job.job_id}: could not mark it ended either: {again}")
        return done

    def _recover_one(self, manager: Any, workspace: Any, job: Any, fl_ctx: FLContext) -> str | None:
        stamp = time.strftime("%Y-%m-%dT%H:%M:%S%z")
        reason = f"the server stopped while this job ran; the restarted server ended it at {stamp}"
        run = Path(workspace.get_run_dir(job.job_id)) / "zenfed" if workspace is not None else None
        resumes = int(job.meta.get(META_RESUMES, 0) or 0)
        resumed_as = None
        if run is not None and (run / RESULT_FILE).is_file():
            reason += f"; it had finished: its result is in {run} on the server (FLARE had not archived it)"
        elif run is None or not run.is_dir():
            reason += "; not resumed: it is not a zenfed job that started"
        elif not self.resume:
            reason += "; not resumed (resume is off)"
        elif resumes >= self.max_resumes:
            reason += f"; not resumed: it was resumed {resumes} times and interrupted again"
        else:
            resumed_as = self._existing_clone(manager, job.job_id, fl_ctx) or self._resubmit(
                manager, job.job_id, job.meta, resumes, fl_ctx)
            reason += f" and resubmitted it as {resumed_as}, which resumes after its last checkpointed round"
        meta: dict[str, Any] = {META_INTERRUPTED: reason}
        if resumed_as:
            meta[META_RESUMED_AS] = resumed_as
        manager.update_meta(job.job_id, meta, fl_ctx)  # before the status, which a follower polls
        manager.set_status(job.job_id, RunStatus.FINISHED_ABNORMAL, fl_ctx)
        self.log_warning(fl_ctx, f"job {job.job_id}: {reason}")
        return resumed_as

    @staticmethod
    def _existing_clone(manager: Any, job_id: str, fl_ctx: FLContext) -> str | None:
        """A resuming clone made before an earlier crash cut this recovery short (never clone twice)."""
        for other in manager.get_all_jobs(fl_ctx):
            if other.meta.get(JobMetaKey.CLONED_FROM.value) == job_id and other.meta.get(META_RESUMES):
                return str(other.job_id)
        return None

    @staticmethod
    def _resubmit(manager: Any, job_id: str, old: dict[str, Any], resumes: int, fl_ctx: FLContext) -> str:
        meta = {str(k): old[k] for k in old.keys() & (set(CLONED_META_KEYS) | set(_SUBMITTER_KEYS))}
        meta[JobMetaKey.CLONED_FROM.value] = job_id
        meta[META_RESUMES] = resumes + 1
        return str(manager.clone(from_jid=job_id, meta=meta, fl_ctx=fl_ctx)[JobMetaKey.JOB_ID.value])
