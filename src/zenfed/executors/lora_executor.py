"""Site side of a federated LoRA job on FLARE: a translator between Shareables and the site session.

The executor runs the installed ``zenfed`` package; the job folder carries
configuration only. Everything the site decides (policy, attestation,
training, DP, encryption, release, audit) happens in
:class:`zenfed.site.session.SiteSession`; this class only finds the kit's
folders, turns a task's Shareable into a :class:`~zenfed.protocol.Message`
and the session's answer back into a Shareable.
"""

from __future__ import annotations

from typing import Any

from nvflare.apis.executor import Executor
from nvflare.apis.fl_context import FLContext
from nvflare.apis.shareable import Shareable, make_reply
from nvflare.apis.signal import Signal

from zenfed.kit_files import KitFolders
from zenfed.protocol import Message
from zenfed.site.session import SiteSession


class LoRAExecutor(Executor):
    """Trains and evaluates the job's adapter on this site's data, through a :class:`SiteSession`."""

    def __init__(self, spec: dict[str, Any]):
        """Create the executor.

        Args:
            spec: The job spec as a dict (``JobSpec.model_dump(mode="json")``).
        """
        super().__init__()
        self._spec_data = spec
        self._session: SiteSession | None = None

    def execute(self, task_name: str, shareable: Shareable, fl_ctx: FLContext, abort_signal: Signal) -> Shareable:
        """Run one zenfed task through the site session and answer with its message."""
        session = self._session_for(fl_ctx)
        answer = session.handle(task_name, Message.from_mapping(shareable),
                                should_abort=lambda: bool(abort_signal.triggered))
        reply = make_reply(answer.status)
        reply.update(answer.to_dict())
        return reply

    def _session_for(self, fl_ctx: FLContext) -> SiteSession:
        """The session of this job, made on the first task from the kit's folders."""
        if self._session is None:
            job_id = fl_ctx.get_job_id()
            folders = KitFolders.of_workspace(fl_ctx.get_engine().get_workspace(), job_id=job_id)
            self._session = SiteSession(spec_data=self._spec_data, site=fl_ctx.get_identity_name(), job_id=job_id,
                                        folders=folders)
        return self._session
