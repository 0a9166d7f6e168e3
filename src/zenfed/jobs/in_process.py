"""A whole job in one process, without FLARE: every site's session and the server's, on one machine.

For development, tests and benchmarks: the same site and server code as a
FLARE deployment runs, with :class:`~zenfed.server.transport.InProcessTransport`
carrying the tasks. Sites share one simulator-style ``local/`` folder, so this
is no key-separation boundary; provisioned kits are.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from zenfed.jobs.simulate import prepare_workspace
from zenfed.kit_files import KitFolders
from zenfed.server.session import ServerSession
from zenfed.server.transport import InProcessTransport, SiteHandler
from zenfed.site.session import SiteSession
from zenfed.spec import JobSpec, SitePolicy


@dataclass
class InProcessRun:
    """What a job run in one process leaves: the sessions, the transport (every answer) and the result."""

    server: ServerSession
    sites: dict[str, SiteSession]
    transport: InProcessTransport

    @property
    def result_dir(self) -> Path:
        """The job result folder (``zenfed_result.json``, the released adapter)."""
        return self.server.folders.run


def run_in_process(
    spec: JobSpec, *, workspace: Path, policies: Mapping[str, SitePolicy], job_id: str = "job-1",
    transport: Callable[[Mapping[str, SiteHandler]], InProcessTransport] = InProcessTransport,
    unreachable: Sequence[str] = (),
) -> InProcessRun:
    """Run ``spec`` with one site session per policy and the server session, in this process.

    Args:
        spec: The job.
        workspace: An empty folder for the shared ``local/`` and each participant's run folder.
        policies: Site name -> its policy.
        job_id: The job's id.
        transport: Builds the transport from the sites' handlers (a test may pass one that tampers).
        unreachable: Sites that never answer.

    Returns:
        The sessions and the transport; the result is under ``run.result_dir``.
    """
    prepare_workspace(workspace, policies, encrypted=spec.encryption.enabled)
    local = workspace / "local"
    data = spec.model_dump(mode="json")
    sites = {
        name: SiteSession(spec_data=data, site=name, job_id=job_id,
                          folders=KitFolders(startup=None, local=local, root=workspace / name,
                                             run=workspace / name / "run"))
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
