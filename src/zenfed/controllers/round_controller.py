"""Server side of a federated LoRA job on FLARE: a translator between FLARE tasks and the server session.

All round logic (rounds, attestation gate, aggregation, checkpoints, result)
lives in :class:`zenfed.server.session.ServerSession`. This controller finds
the kit's folders, starts the session, and carries its tasks with FLARE's
``broadcast_and_wait``: it is the session's :class:`~zenfed.server.transport.Transport`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from nvflare.apis.client import Client
from nvflare.apis.controller_spec import ClientTask, Task
from nvflare.apis.event_type import EventType
from nvflare.apis.fl_constant import FLContextKey
from nvflare.apis.fl_context import FLContext
from nvflare.apis.impl.controller import Controller
from nvflare.apis.job_def import JobMetaKey
from nvflare.apis.shareable import Shareable
from nvflare.apis.signal import Signal
from nvflare.widgets.info_collector import GroupInfoCollector, InfoCollector

from zenfed.errors import ZenfedError
from zenfed.kit_files import KitFolders
from zenfed.protocol import Message
from zenfed.server.session import ServerSession
from zenfed.server.transport import ResultCallback
from zenfed.spec import FederationSpec


class FedLoRAController(Controller):
    """Runs a :class:`ServerSession` on FLARE: federated LoRA rounds with evaluation and checkpoints."""

    def __init__(self, spec: dict[str, Any], task_check_period: float = 0.5):
        """Create the controller.

        Args:
            spec: The job spec as a dict (``JobSpec.model_dump(mode="json")``).
            task_check_period: Seconds between task status checks.
        """
        super().__init__(task_check_period=task_check_period)
        self._spec_data = spec
        self._session: ServerSession | None = None
        self._lost: dict[str, str] = {}  # site -> why FLARE counts it lost (its job process is gone)

    # -- FLARE lifecycle -------------------------------------------------------------------
    def start_controller(self, fl_ctx: FLContext) -> None:
        """Start the server session in this job's run folder."""
        job_id = fl_ctx.get_job_id()
        folders = KitFolders.of_workspace(fl_ctx.get_engine().get_workspace(), job_id=job_id)
        meta = fl_ctx.get_prop(FLContextKey.JOB_META) or {}
        self._session = ServerSession(
            spec_data=self._spec_data, job_id=job_id, identity=fl_ctx.get_identity_name(), folders=folders,
            submitter=str(meta.get(JobMetaKey.SUBMITTER_NAME.value, "unknown")),
        )
        self._session.start(sites=[c.name for c in fl_ctx.get_engine().get_clients()])

    def control_flow(self, abort_signal: Signal, fl_ctx: FLContext) -> None:
        """Run the session's rounds, carrying its tasks with FLARE."""
        self._require_session().run(_FlareTransport(self, fl_ctx, abort_signal))

    def stop_controller(self, fl_ctx: FLContext) -> None:
        """Close the session (and its audit log)."""
        if self._session is not None:
            self._session.close()

    def process_result_of_unknown_task(
        self, client: Client, task_name: str, client_task_id: str, result: Shareable, fl_ctx: FLContext
    ) -> None:
        """Ignore late results of tasks that already ended."""
        self.log_warning(fl_ctx, f"ignored a late result for {task_name} from {client.name}")

    def handle_event(self, event_type: str, fl_ctx: FLContext) -> None:
        """Track lost sites; report progress to ``show_stats`` (used by ``zenfed submit``'s progress bar).

        FLARE fires ``CLIENT_DISCONNECTED`` once a site's job process has been reported gone for the
        job's ``lost_site_grace_s`` (the site launcher reports a killed job process that way instead of
        failing the job); later rounds leave that site out, and the session records why.
        """
        super().handle_event(event_type, fl_ctx)
        if event_type == EventType.CLIENT_DISCONNECTED:
            site = str(fl_ctx.get_prop(FLContextKey.DISCONNECTED_CLIENT_NAME))
            default = FederationSpec.model_fields["lost_site_grace_s"].default
            grace = (self._spec_data.get("federation") or {}).get("lost_site_grace_s", default)
            self._lost[site] = (f"{site} is lost: its job process is gone (crashed, killed or cut off) and did not "
                                f"come back within lost_site_grace_s={grace} s")
            if self._session is not None:
                remaining = [c.name for c in fl_ctx.get_engine().get_clients() if c.name not in self._lost]
                self._session.site_lost(site, self._lost[site], remaining=len(remaining))
        elif event_type == EventType.CLIENT_RECONNECTED:
            site = str(fl_ctx.get_prop(FLContextKey.RECONNECTED_CLIENT_NAME))
            if self._lost.pop(site, None) is not None:
                self.log_info(fl_ctx, f"{site} is back; later rounds may ask it again")
        if event_type == InfoCollector.EVENT_TYPE_GET_STATS and self._session is not None:
            collector = fl_ctx.get_prop(InfoCollector.CTX_KEY_STATS_COLLECTOR, None)
            if isinstance(collector, GroupInfoCollector):
                collector.add_info(group_name="zenfed", info=self._session.progress())

    def lost(self) -> dict[str, str]:
        """Sites whose job process FLARE counts as gone, with why."""
        return dict(self._lost)

    def _require_session(self) -> ServerSession:
        if self._session is None:
            raise ZenfedError("controller used before start_controller")
        return self._session


class _FlareTransport:
    """The session's tasks as FLARE tasks: one ``broadcast_and_wait`` per task."""

    def __init__(self, controller: FedLoRAController, fl_ctx: FLContext, abort_signal: Signal) -> None:
        self._controller = controller
        self._fl_ctx = fl_ctx
        self._abort = abort_signal

    def sites(self) -> list[str]:
        """The connected sites, less those whose job process FLARE counts as gone."""
        lost = self._controller.lost()
        return sorted(c.name for c in self._fl_ctx.get_engine().get_clients() if c.name not in lost)

    def lost(self) -> dict[str, str]:
        """The sites FLARE counts as lost, with why."""
        return self._controller.lost()

    def broadcast(self, *, task: str, message: Message, targets: Sequence[str], min_responses: int,
                  timeout_s: float, wait_after_min_s: float, on_result: ResultCallback) -> bool:
        """Send the task and pass each result, as a Message, to ``on_result``; False if aborted."""

        def received(client_task: ClientTask, fl_ctx: FLContext) -> None:
            result: Shareable = client_task.result
            client_task.result = None  # Folded in by the session; do not keep per-site copies.
            on_result(client_task.client.name, Message.from_mapping(result, status=result.get_return_code()))

        data = Shareable()
        data.update(message.to_dict())
        flare_task = Task(name=task, data=data, timeout=int(timeout_s), result_received_cb=received)
        self._controller.broadcast_and_wait(
            task=flare_task, fl_ctx=self._fl_ctx, targets=list(targets), min_responses=min_responses,
            wait_time_after_min_received=int(wait_after_min_s), abort_signal=self._abort,
        )
        return not self._abort.triggered

    def stop(self, reason: str) -> None:
        """Fail the job with ``reason`` and stop waiting."""
        self._controller.system_panic(reason, self._fl_ctx)
        self._abort.trigger(reason)
