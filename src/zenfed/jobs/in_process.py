"""A whole job in one process, without FLARE: every site's session and the server's, on one machine.

For development, tests and benchmarks: the same site and server code as a
FLARE deployment runs, with :class:`~zenfed.server.transport.InProcessTransport`
carrying the tasks. Sites share one simulator-style ``local/`` folder, so this
is no key-separation boundary; provisioned kits are.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

from zenfed.jobs.simulate import prepare_workspace
from zenfed.kit_files import KitFolders
from zenfed.protocol import Message
from zenfed.server.session import ServerSession
from zenfed.server.transport import InProcessTransport, SiteHandler
from zenfed.site.session import SiteSession
from zenfed.spec import JobSpec, SitePolicy


@dataclass
class InProcessRun:
    """What a job run in one process leaves: the sessions, the transport (every answer) and the result."""

    server: ServerSession
    sites: dict[str, SiteSession | SessionPerTask]
    transport: InProcessTransport

    @property
    def result_dir(self) -> Path:
        """The job result folder (``zenfed_result.json``, the released adapter)."""
        return self.server.folders.run


class SessionPerTask:
    """A site whose every task runs in a new :class:`SiteSession`, as in a new process.

    FLARE's simulator starts a fresh process for each task when its sites outnumber its
    worker processes; this is that case without FLARE. Whatever a session decides in
    one task and checks in a later one must come back from the run folder.
    """

    def __init__(self, make: Callable[[], SiteSession]) -> None:
        self._make = make
        self.sessions = 0  # how many sessions (processes) took a task

    def handle(self, task: str, message: Message, **kwargs: Any) -> Message:
        """Run ``task`` in a session of its own."""
        self.sessions += 1
        return self._make().handle(task, message, **kwargs)


def run_in_process(
    spec: JobSpec, *, workspace: Path, policies: Mapping[str, SitePolicy], job_id: str = "job-1",
    transport: Callable[[Mapping[str, SiteHandler]], InProcessTransport] = InProcessTransport,
    unreachable: Sequence[str] = (), session_per_task: bool = False,
) -> InProcessRun:
    """Run ``spec`` with one site session per policy and the server session, in this process.

    Args:
        spec: The job.
        workspace: An empty folder for the shared ``local/`` and each participant's run folder.
        policies: Site name -> its policy.
        job_id: The job's id.
        transport: Builds the transport from the sites' handlers (a test may pass one that tampers).
        unreachable: Sites that never answer.
        session_per_task: Run each site's every task in a new session (:class:`SessionPerTask`).

    Returns:
        The sessions and the transport; the result is under ``run.result_dir``.
    """
    prepare_workspace(workspace, policies, encrypted=spec.encryption.enabled)
    local = workspace / "local"
    data = spec.model_dump(mode="json")

    def make_site(name: str) -> SiteSession:
        return SiteSession(spec_data=data, site=name, job_id=job_id,
                           folders=KitFolders(startup=None, local=local, root=workspace / name,
                                              run=workspace / name / "run"))

    sites: dict[str, SiteSession | SessionPerTask] = {
        name: SessionPerTask(partial(make_site, name)) if session_per_task else make_site(name)
        for name in policies
    }
    server = ServerSession(spec_data=data, job_id=job_id, identity="server",
                           folders=KitFolders(startup=None, local=local, root=workspace / "server",
                                              run=workspace / "server" / "run"))
    carrier = transport({name: session.handle for name, session in sites.items()})
    carrier.unreachable |= set(unreachable)
    server.start(sites=list(sites))
    try:
        server.run(carrier)
    finally:
        server.close()
    return InProcessRun(server=server, sites=sites, transport=carrier)
