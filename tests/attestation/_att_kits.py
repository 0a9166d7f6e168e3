"""Helpers: provision emulated-TEE kits without FLARE, and a clock moved by hand."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from zenfed.attestation.identity import AttestationRoot
from zenfed.attestation.kits import KitPlan, build_policies, write_kit
from zenfed.attestation.measure import combine, config_digest, package_digest
from zenfed.attestation.service import AttestationService


class FakeClock:
    """A clock the test moves by hand, so expiry is tested without sleeping."""

    def __init__(self, start: float = 1_800_000_000.0) -> None:
        self.now = start

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


@dataclass
class Project:
    root: Path
    package_dir: Path
    clock: FakeClock
    attestation_root: AttestationRoot

    def workspace(self, name: str) -> Path:
        return self.root / name

    def service(self, name: str) -> AttestationService:
        return AttestationService.from_workspace(
            self.workspace(name), clock=self.clock, package_dir=self.package_dir
        )


def make_package(path: Path) -> Path:
    """A stand-in for the installed zenfed package: its digest is stable during the test."""
    (path / "sub").mkdir(parents=True)
    (path / "__init__.py").write_text("VERSION = '1'\n")
    (path / "sub" / "mod.py").write_text("def f():\n    return 1\n")
    return path


def provision(
    root: Path,
    *,
    names: tuple[str, ...] = ("server", "site-1", "site-2"),
    package_dir: Path,
    attestation_root: AttestationRoot | None = None,
    project: str = "demo",
) -> AttestationRoot:
    """Write kits the way AttestationBuilder does, without FLARE."""
    attestation_root = attestation_root or AttestationRoot.create(project=project)
    package = package_digest(package_dir=package_dir)
    plans = []
    for name in names:
        workspace = root / name
        (workspace / "local").mkdir(parents=True, exist_ok=True)
        (workspace / "local" / "site_policy.yaml").write_text(f"site: {name}\n")
        files = ("local/site_policy.yaml",)
        expected = combine(
            package=package, config=config_digest(workspace_dir=workspace, files=files)
        )
        plans.append(
            KitPlan(
                name=name,
                kinds=("emulated",),
                measured_files=files,
                accepted={"emulated": (expected.value,)},
            )
        )
    policies = build_policies(project=project, plans=plans)
    for name in names:
        write_kit(
            startup_dir=root / name / "startup",
            policy=policies[name],
            root_cert_pem=attestation_root.cert_pem(),
            identity=attestation_root.issue(participant=name),
        )
    return attestation_root
