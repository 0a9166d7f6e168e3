"""``zenfed provision``: a ProjectSpec -> an ``nvflare provision`` run with zenfed's builders.

The generated ``project.yml`` is kept in the workspace, so what FLARE was asked
to build is on the record. Certificates and keys come from FLARE's own
builders; zenfed's builders add site policies and resources.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import yaml

from zenfed.errors import DeploymentError
from zenfed.privacy.he import SITE_CONTEXT_FILE
from zenfed.site.policy import POLICY_FILE
from zenfed.spec import ProjectSpec

LAYOUT_FILE = "zenfed-deployment.json"


@dataclass(frozen=True)
class Deployment:
    """Where a provisioned project's kits are."""

    workspace: str
    project: str
    server: str
    server_kit: str
    fl_port: int
    admin_port: int
    site_kits: dict[str, str]
    admin_kits: dict[str, str]
    relay_kits: dict[str, str] = field(default_factory=dict)
    relay_ports: dict[str, int] = field(default_factory=dict)

    @classmethod
    def load(cls, workspace: str | Path) -> Deployment:
        """Read the layout ``zenfed provision`` wrote into ``workspace``.

        Raises:
            DeploymentError: If ``workspace`` was not made by ``zenfed provision``.
        """
        path = Path(workspace) / LAYOUT_FILE
        if not path.is_file():
            raise DeploymentError(f"{workspace} is not a zenfed workspace (no {LAYOUT_FILE}); run `zenfed provision`")
        return cls(**json.loads(path.read_text()))

    def admin_kit(self, name: str | None = None) -> Path:
        """Return an admin's kit (the first admin's if ``name`` is None)."""
        if not self.admin_kits:
            raise DeploymentError("this project has no admin")
        key = name or sorted(self.admin_kits)[0]
        if key not in self.admin_kits:
            raise DeploymentError(f"no admin named {key!r}; admins: {sorted(self.admin_kits)}")
        return Path(self.admin_kits[key])


def _absolute_paths(policy: dict[str, Any]) -> dict[str, Any]:
    """Resolve relative dataset paths against the folder `zenfed provision` runs in."""
    for location in policy.get("datasets", {}).values():
        location["path"] = str(Path(location["path"]).expanduser().resolve())
    return policy


def flare_project(spec: ProjectSpec, *, extra_builders: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    """Return the ``nvflare provision`` project file for ``spec``."""
    participants: list[dict[str, Any]] = [{
        "name": spec.server.name, "type": "server", "org": "zenfed",
        "fed_learn_port": spec.server.fl_port, "admin_port": spec.server.admin_port,
    }]
    # A relay listens on loopback for its sites with mutual TLS, and connects to the server like a site.
    participants += [{"name": r.name, "type": "relay", "org": r.org,
                      "listening_host": {"default_host": "localhost", "port": r.port, "scheme": "grpc",
                                         "connection_security": "mtls"}} for r in spec.relays]
    participants += [{"name": s.name, "type": "client", "org": s.org,
                      **({"connect_to": {"name": s.relay}} if s.relay else {})} for s in spec.sites]
    participants += [{"name": a.name, "type": "admin", "org": a.org, "role": a.role} for a in spec.admins]
    policies = {s.name: _absolute_paths(s.policy().model_dump(mode="json")) for s in spec.sites}
    zenfed_builders: list[dict[str, Any]] = [
        {"path": "zenfed.provisioning.kit_builder.ZenfedKitBuilder", "args": {"site_policies": policies}},
    ]
    if spec.encryption:
        zenfed_builders.append({"path": "zenfed.provisioning.he_builder.HEContextBuilder"})
    if spec.attestation is not None:
        # After the kit builder: the site policy it writes is part of each site's measurement.
        zenfed_builders.append({
            "path": "zenfed.provisioning.attestation_builder.AttestationBuilder",
            "args": {
                "kinds": {k: list(v) for k, v in spec.attestation.kinds.items()},
                "measured_files": [f"local/{POLICY_FILE}"],
                "accepted_measurements": {
                    who: {kind: list(m) for kind, m in kinds.items()}
                    for who, kinds in spec.attestation.accepted_measurements.items()
                } or None,
            },
        })
    builders: list[dict[str, Any]] = [
        {"path": "nvflare.lighter.impl.workspace.WorkspaceBuilder"},
        {"path": "nvflare.lighter.impl.static_file.StaticFileBuilder", "args": {"config_folder": "config"}},
        {"path": "nvflare.lighter.impl.cert.CertBuilder"},
        *zenfed_builders,
        *(extra_builders or []),
        # Signing comes last, after every builder has written its files.
        {"path": "nvflare.lighter.impl.signature.SignatureBuilder"},
    ]
    return {
        "api_version": 3, "name": spec.name, "description": "zenfed federated LoRA project",
        "participants": participants, "builders": builders,
    }


def provision(spec: ProjectSpec, *, out: str | Path, extra_builders: list[dict[str, Any]] | None = None) -> Deployment:
    """Provision ``spec`` into the workspace ``out`` and return where the kits are.

    Args:
        spec: The project.
        out: Workspace folder. A previous provisioning there is replaced.
        extra_builders: More FLARE builders (path/args dicts) to run before signing.

    Raises:
        DeploymentError: If ``nvflare provision`` fails.
    """
    ws = Path(out).resolve()
    ws.mkdir(parents=True, exist_ok=True)
    # Earlier kits go; the project's state/ (root CA and keys) stays, so re-provisioning keeps its identity.
    for stale in [*sorted((ws / spec.name).glob("prod_*")), *sorted((ws / spec.name).glob("wip*"))]:
        shutil.rmtree(stale)
    (ws / LAYOUT_FILE).unlink(missing_ok=True)
    project_file = ws / "project.yml"
    project_file.write_text(yaml.safe_dump(flare_project(spec, extra_builders=extra_builders), sort_keys=False))
    nvflare = str(Path(sys.executable).with_name("nvflare"))
    cmd = [nvflare, "provision", "-p", str(project_file), "-w", str(ws), "--force"]
    run = subprocess.run(cmd, capture_output=True, text=True, check=False)
    prod = ws / spec.name / "prod_00"
    if run.returncode != 0 or not prod.is_dir():
        tail = (run.stdout + run.stderr).strip().splitlines()[-15:]
        raise DeploymentError("nvflare provision failed:\n" + "\n".join(tail))
    deployment = Deployment(
        workspace=str(ws), project=spec.name, server=spec.server.name,
        server_kit=str(prod / spec.server.name), fl_port=spec.server.fl_port,
        admin_port=spec.server.admin_port,
        site_kits={s.name: str(prod / s.name) for s in spec.sites},
        admin_kits={a.name: str(prod / a.name) for a in spec.admins},
        relay_kits={r.name: str(prod / r.name) for r in spec.relays},
        relay_ports={r.name: r.port for r in spec.relays},
    )
    (ws / LAYOUT_FILE).write_text(json.dumps(asdict(deployment), indent=2) + "\n")
    restrict_secret_files(ws)
    return deployment


def holds_secret(path: Path) -> bool:
    """Whether a provisioned file holds a private key (PEM, or in FLARE's state/cert.json) or a secret context."""
    if path.suffix == ".key" or path.name == SITE_CONTEXT_FILE:
        return True
    try:
        with path.open("rb") as handle:
            return b"PRIVATE KEY" in handle.read(1 << 20)
    except OSError:
        return False


def restrict_secret_files(workspace: Path) -> list[Path]:
    """Make every file that holds a key 0600 and its folder 0700; return those files.

    ``nvflare provision`` writes the root CA's and every participant's private key
    (``state/cert.json``, each kit's ``startup/*.key``) with the process umask.
    """
    secrets = [path for path in sorted(workspace.rglob("*")) if path.is_file() and holds_secret(path)]
    for path in secrets:
        os.chmod(path, 0o600)
        os.chmod(path.parent, 0o700)
    return secrets
