"""Site job launcher: a site's job process that dies is a lost site, not a failed job.

FLARE's client daemon tells the server how each job process at its site ended,
and the server fails the *whole* job when a process died (``kill -9``, the OOM
killer, a segfault): one crashed hospital would stop every other. A zenfed job
is built to go on without a site (pairwise masks are recovered, ``min_sites``
still holds), so the site kits name this launcher in ``local/resources.json``.
It starts the job process exactly as FLARE's does; when that process is ended
by a signal it reports the ending as *unknown* rather than as an exception.
The server's round controller then notices the site is gone (FLARE's dead-job
report, after the job's ``federation.lost_site_grace_s``), records it in the
audit log, and rounds go on without it.

Deliberate failures keep FLARE's handling: a job process that exits with its
own error code (a bad configuration, an unsafe component) still fails the job.
"""

from __future__ import annotations

import logging
import signal
import time
from typing import Any

from nvflare.apis.fl_context import FLContext
from nvflare.apis.job_launcher_spec import JobHandleSpec, JobReturnCode
from nvflare.app_common.job_launcher.client_process_launcher import ClientProcessJobLauncher
from nvflare.app_common.job_launcher.process_launcher import ProcessHandle

_log = logging.getLogger(__name__)

# FLARE sites send a heartbeat every 10 s; two and a half of them after launch.
MIN_LISTED_S = 25.0


def exit_code_after_signal(raw_code: int | None) -> int | None:
    """Return the raw exit code of a job process, or ``UNKNOWN`` if a signal ended it.

    Args:
        raw_code: The process's return code as ``Popen.poll`` gives it (negative: the signal).

    Returns:
        ``None`` while it runs; ``JobReturnCode.UNKNOWN`` after a signal; otherwise ``raw_code``.
    """
    if raw_code is not None and raw_code < 0:
        return JobReturnCode.UNKNOWN
    return raw_code


def signal_name(raw_code: int) -> str:
    """Name the signal behind a negative return code (``SIGKILL`` for -9)."""
    try:
        return signal.Signals(-raw_code).name
    except ValueError:
        return f"signal {-raw_code}"


class LostSiteHandle(JobHandleSpec):
    """FLARE's process handle, except that a job process ended by a signal reads as ``UNKNOWN``."""

    def __init__(self, inner: ProcessHandle, job_id: str, *, min_listed_s: float = MIN_LISTED_S) -> None:
        """Wrap ``inner``, the handle FLARE's launcher returned for job ``job_id``.

        Args:
            inner: FLARE's handle.
            job_id: The job, for the log.
            min_listed_s: After a signal, keep the job listed at least this long after its launch.
        """
        super().__init__()
        self._inner = inner
        self._job_id = job_id
        self._told = False
        self._launched = time.monotonic()
        self._min_listed_s = min_listed_s

    def terminate(self) -> None:
        """End the job process (an abort from the server)."""
        self._inner.terminate()

    def wait(self) -> None:
        """Wait for the job process to end; after a signal, until the server can have seen the job here.

        The server counts a site's job as gone only once a heartbeat that listed it is followed by one
        that does not. A job process killed before the first heartbeat would never be counted lost
        (every round would wait for it), so its ending is held back until two heartbeats have passed.
        """
        self._inner.wait()
        raw = self._inner.adapter.poll()
        if raw is not None and raw < 0:
            time.sleep(max(0.0, self._min_listed_s - (time.monotonic() - self._launched)))

    def poll(self) -> Any:
        """FLARE's exit code, or ``UNKNOWN`` once a signal ended the job process."""
        raw = self._inner.adapter.poll()
        code = exit_code_after_signal(raw)
        if code == JobReturnCode.UNKNOWN and raw is not None:
            if not self._told:
                self._told = True
                _log.warning(
                    "job %s: this site's job process was ended by %s; the server is told the site is lost, "
                    "not that the job failed, so the other sites go on while min_sites holds",
                    self._job_id, signal_name(raw),
                )
            return code
        return self._inner.poll()


class SiteJobLauncher(ClientProcessJobLauncher):
    """FLARE's client process launcher, with :class:`LostSiteHandle` around each job process."""

    def launch_job(self, job_meta: dict, fl_ctx: FLContext) -> JobHandleSpec:
        """Start the job process as FLARE does; wrap its handle."""
        handle = super().launch_job(job_meta, fl_ctx)
        if not isinstance(handle, ProcessHandle):
            return handle
        return LostSiteHandle(handle, str(job_meta.get("job_id", "?")))
