"""Helpers for the per-job gate tests: kits from a real `nvflare provision`, gates and sites.

The kits are provisioned by ``zenfed.provisioning.project.provision`` (FLARE's
builders, zenfed's kit builder writing ``local/zenfed_site.yaml``, then the
AttestationBuilder). The measured package is a small stand-in, so the
measurements do not move while other code in the repository is edited.
"""

from __future__ import annotations

import shutil
import socket
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from _att_kits import make_package

from zenfed.audit import events as E
from zenfed.audit.log import AuditLog, read_records
from zenfed.audit.sink import AuditSink
from zenfed.provisioning.project import provision
from zenfed.server.attestation_gate import ServerAttestationGate
from zenfed.site.attestation import SiteAttestation
from zenfed.site.policy import POLICY_FILE, load_policy_for
from zenfed.spec import AdminSpec, JobSpec, ProjectSpec, ServerSpec, SiteSpec

SERVER = "localhost"
SITES = ("site-1", "site-2")  # site-2's policy requires an attested server


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def provision_federation(base: Path) -> tuple[Path, Path]:
    """Provision 1 server + 2 sites; return the prod folder and the measured package folder."""
    package_dir = make_package(base / "pkg" / "zenfed")
    fl_port = free_port()
    admin_port = free_port()
    while admin_port == fl_port:
        admin_port = free_port()
    spec = ProjectSpec(
        name="gate",
        server=ServerSpec(name=SERVER, fl_port=fl_port, admin_port=admin_port),
        sites=(SiteSpec(name="site-1"), SiteSpec(name="site-2", require_attested_server=True)),
        admins=(AdminSpec(name="admin@gate.org"),),
        encryption=False,
        attestation=None,  # added below, measuring the stand-in package
    )
    builder = {
        "path": "zenfed.provisioning.attestation_builder.AttestationBuilder",
        "args": {
            "kinds": {"default": ["emulated"]},
            "measured_files": [f"local/{POLICY_FILE}"],
            "package_dir": str(package_dir),
        },
    }
    deployment = provision(spec, out=base / "ws", extra_builders=[builder])
    return Path(deployment.server_kit).parent, package_dir


@dataclass
class Federation:
    """A private copy of the provisioned kits, with audit logs beside them."""

    prod: Path
    package_dir: Path

    @classmethod
    def copy(cls, prod: Path, package_dir: Path, dest: Path) -> Federation:
        shutil.copytree(prod, dest / "prod")
        return cls(prod=dest / "prod", package_dir=package_dir)

    def kit(self, name: str) -> Path:
        return self.prod / name

    def audit(self, name: str) -> AuditSink:
        log_path = self.prod.parent / "audit" / f"{name}.jsonl"
        log_path.parent.mkdir(parents=True, exist_ok=True)
        return AuditSink(
            AuditLog.for_kit(self.kit(name) / "startup", log_path=log_path, participant=name)
        )

    def gate(
        self,
        *,
        mode: str = "required",
        every: int = 0,
        min_sites: int = 2,
        package_dir: Path | None = None,
    ) -> ServerAttestationGate:
        spec = JobSpec.model_validate(
            {
                "name": "gate-job",
                "federation": {"rounds": 4, "min_sites": min_sites},
                "attestation": {"mode": mode, "reattest_every_rounds": every},
            }
        )
        return ServerAttestationGate(
            spec=spec,
            workspace_root=self.kit(SERVER),
            audit=self.audit(SERVER),
            package_dir=package_dir or self.package_dir,
        )

    def site(self, name: str, *, mode: str = "required") -> SiteAttestation:
        policy = load_policy_for(site=name, site_config_dir=str(self.kit(name) / "local"))
        return SiteAttestation(
            workspace_root=self.kit(name),
            site=name,
            policy=policy,
            audit=self.audit(name),
            mode=mode,
            package_dir=self.package_dir,
        )

    def attestation_records(self, name: str) -> list[dict[str, Any]]:
        path = self.prod.parent / "audit" / f"{name}.jsonl"
        return [r["fields"] for r in read_records(path) if r.get("event") == E.ATTESTATION]


def bad_package(base: Path, package_dir: Path) -> Path:
    """A copy of the measured package with one file changed (another build of zenfed)."""
    other = base / "other-pkg" / "zenfed"
    shutil.copytree(package_dir, other)
    (other / "sub" / "mod.py").write_text("def f():\n    return 2  # patched\n")
    return other
