"""How long the server waits, once a job has ended, for every site to report that its job process ended.

FLARE's server keeps a finished job ``RUNNING`` until each site's daemon reports
how its job process ended, up to 900 s. A site whose job process hangs (frozen,
or cut off from the server) never reports, so the job's final status, and
``zenfed submit``'s download, wait the full 900 s although zenfed's result is
already written. The server kit names this component in
``local/resources.json`` with a shorter wait; after it, FLARE finalises the job
from the server's own outcome and tells the silent site to abort the job.
"""

from __future__ import annotations

from nvflare.apis.event_type import EventType
from nvflare.apis.fl_component import FLComponent
from nvflare.apis.fl_context import FLContext


class SiteOutcomeWait(FLComponent):
    """Sets the server's wait for site outcomes when the server starts."""

    def __init__(self, wait_s: float = 120.0):
        """Create the component.

        Args:
            wait_s: Seconds to wait, after a job ended on the server, for every site's outcome.
        """
        super().__init__()
        if wait_s <= 0:
            raise ValueError(f"wait_s must be positive, got {wait_s}")
        self.wait_s = float(wait_s)

    def handle_event(self, event_type: str, fl_ctx: FLContext) -> None:
        """Apply the wait once the server's job runner exists."""
        if event_type != EventType.SYSTEM_START:
            return
        runner = getattr(fl_ctx.get_engine(), "job_runner", None)
        if runner is None or not hasattr(runner, "client_outcome_wait_timeout"):
            self.log_warning(fl_ctx, "this FLARE server has no client outcome wait to set; keeping FLARE's")
            return
        runner.client_outcome_wait_timeout = self.wait_s
        self.log_info(fl_ctx, f"waiting at most {self.wait_s:.0f} s for sites to report a finished job's end")
