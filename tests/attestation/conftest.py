"""Fixture: a provisioned project (server, site-1, site-2) with a hand-moved clock."""

from __future__ import annotations

from pathlib import Path

import pytest
from _att_kits import FakeClock, Project, make_package, provision


@pytest.fixture
def project(tmp_path: Path) -> Project:
    package_dir = make_package(tmp_path / "pkg" / "zenfed")
    clock = FakeClock()
    root = provision(tmp_path / "ws", package_dir=package_dir)
    return Project(
        root=tmp_path / "ws", package_dir=package_dir, clock=clock, attestation_root=root
    )
