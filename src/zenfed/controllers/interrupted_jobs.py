"""Jobs a server crash interrupted: marked ended with the reason, and resumed from their checkpoint.

FLARE 2.9 leaves a job that was running when the server process died listed as
``RUNNING`` after a restart, with nothing running it. The server kit names this
component in ``local/resources.json``; when the restarted server starts it:

1. marks every job still listed ``RUNNING`` or ``DISPATCHED`` as
   ``FINISHED:ABNORMAL``, with the reason in its meta (``zenfed_interrupted``);
2. if ``resume`` is on (the default), submits a clone of it. The clone resumes
   after the job's last checkpointed round (checkpoints are kept by job spec, not
   job id) and copies the interrupted run's audit logs into its own, so its
   result holds the whole trail from round 1. The interrupted job's meta names the
   clone (``zenfed_resumed_as``), which ``zenfed submit`` follows.

Nothing here reads or changes a model; it only moves job records.
"""

from __future__ import annotations

import time
from typing import Any

from nvflare.apis.event_type import EventType
from nvflare.apis.fl_component import FLComponent
from nvflare.apis.fl_constant import SystemComponents
from nvflare.apis.fl_context import FLContext
from nvflare.apis.job_def import JobMetaKey, RunStatus
from nvflare.private.fed.server.job_cmds import CLONED_META_KEYS

from zenfed.protocol import META_INTERRUPTED, META_RESUMED_AS, META_RESUMES

# Who submitted the resumed job, so the original submitter can still see and download it.
_SUBMITTER_KEYS = (JobMetaKey.SUBMITTER_NAME.value, JobMetaKey.SUBMITTER_ORG.value, JobMetaKey.SUBMITTER_ROLE.value)


class InterruptedJobRecovery(FLComponent):
    """On server start, end the jobs a crash left ``RUNNING`` and, optionally, resume them."""

    def __init__(self, resume: bool = True, max_resumes: int = 3):
        """Create the component.

        Args:
            resume: Submit a clone of each interrupted job, which resumes from its checkpoint.
            max_resumes: Stop resuming a job after this many interruptions in a row (a crash loop).
        """
        super().__init__()
        self.resume = resume
        self.max_resumes = max_resumes

    def handle_event(self, event_type: str, fl_ctx: FLContext) -> None:
        """Recover interrupted jobs once, when the server starts."""
        if event_type == EventType.SYSTEM_START:
            self.recover(fl_ctx)

    def recover(self, fl_ctx: FLContext) -> list[tuple[str, str | None]]:
        """End every job the crash left running; resume each unless it was resumed too often.

        Returns:
            (interrupted job id, the id of the job that resumes it, or None) for each.
        """
        manager = fl_ctx.get_engine().get_component(SystemComponents.JOB_MANAGER)
        if manager is None:
            return []
        done = []
        stamp = time.strftime("%Y-%m-%dT%H:%M:%S%z")
        for job in manager.get_jobs_by_status([RunStatus.RUNNING, RunStatus.DISPATCHED], fl_ctx):
            resumes = int(job.meta.get(META_RESUMES, 0) or 0)
            resumed_as = None
            reason = f"the server stopped while this job ran; the restarted server ended it at {stamp}"
            if self.resume and resumes < self.max_resumes:
                resumed_as = self._resubmit(manager, job.job_id, job.meta, resumes, fl_ctx)
                reason += f" and resubmitted it as {resumed_as}, which resumes after its last checkpointed round"
            elif self.resume:
                reason += f"; not resumed: it was interrupted {resumes + 1} times in a row"
            meta: dict[str, Any] = {META_INTERRUPTED: reason}
            if resumed_as:
                meta[META_RESUMED_AS] = resumed_as
            manager.update_meta(job.job_id, meta, fl_ctx)  # before the status, which a follower polls
            manager.set_status(job.job_id, RunStatus.FINISHED_ABNORMAL, fl_ctx)
            self.log_warning(fl_ctx, f"job {job.job_id}: {reason}")
            done.append((job.job_id, resumed_as))
        return done

    @staticmethod
    def _resubmit(manager: Any, job_id: str, old: dict[str, Any], resumes: int, fl_ctx: FLContext) -> str:
        meta = {str(k): old[k] for k in old.keys() & (set(CLONED_META_KEYS) | set(_SUBMITTER_KEYS))}
        meta[JobMetaKey.CLONED_FROM.value] = job_id
        meta[META_RESUMES] = resumes + 1
        return str(manager.clone(from_jid=job_id, meta=meta, fl_ctx=fl_ctx)[JobMetaKey.JOB_ID.value])
