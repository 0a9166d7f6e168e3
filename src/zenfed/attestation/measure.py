"""The emulated TEE's measurement: the installed zenfed code plus the runtime configuration.

``measurement = SHA-256("zenfed-measurement/1" | package digest | config digest)``.
The package digest walks the installed ``zenfed`` package in sorted order and
hashes every file's relative path and contents (compiled ``__pycache__`` files
are skipped: Python writes them at run time). The config digest hashes the
listed runtime configuration files (e.g. the site policy) by name and content.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from zenfed.attestation.records import AttestationError

_SKIP_DIRS = {"__pycache__"}
_SKIP_SUFFIXES = (".pyc", ".pyo")


@dataclass(frozen=True)
class Measurement:
    """A measurement and the two digests it is made of (hex strings)."""

    value: str
    package: str
    config: str


def default_package_dir() -> Path:
    """Return the folder of the installed ``zenfed`` package."""
    import zenfed

    return Path(zenfed.__file__).resolve().parent


def package_digest(*, package_dir: Path | None = None) -> str:
    """Hash every file of the installed package (path and contents), in sorted order.

    Args:
        package_dir: Package folder to hash; the installed ``zenfed`` if None.

    Returns:
        The SHA-256 hex digest.

    """
    root = Path(package_dir) if package_dir is not None else default_package_dir()
    if not root.is_dir():
        raise AttestationError(f"package folder {root} does not exist; is zenfed installed?")
    files: list[Path] = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in _SKIP_DIRS)
        files.extend(Path(dirpath, f) for f in filenames if not f.endswith(_SKIP_SUFFIXES))
    digest = hashlib.sha256(b"zenfed-package/1\0")
    for path in sorted(files, key=lambda p: p.relative_to(root).as_posix()):
        _add_file(digest, path.relative_to(root).as_posix(), path)
    return digest.hexdigest()


def config_digest(*, workspace_dir: Path, files: Sequence[str]) -> str:
    """Hash the named runtime configuration files (relative to ``workspace_dir``).

    Raises:
        AttestationError: If a listed file is missing: the measured configuration
            must be what provisioning measured, so a missing file cannot pass.

    """
    digest = hashlib.sha256(b"zenfed-config/1\0")
    for name in sorted(files):
        path = Path(workspace_dir) / name
        if not path.is_file():
            raise AttestationError(
                f"measured configuration file {path} is missing; restore it from the "
                "startup kit or re-provision this participant"
            )
        _add_file(digest, name, path)
    return digest.hexdigest()


def combine(*, package: str, config: str) -> Measurement:
    """Combine the two digests into the measurement."""
    value = hashlib.sha256(f"zenfed-measurement/1\0{package}\0{config}".encode()).hexdigest()
    return Measurement(value=value, package=package, config=config)


def measure(
    *, workspace_dir: Path, measured_files: Sequence[str], package_dir: Path | None = None
) -> Measurement:
    """Measure the installed package and a participant's runtime configuration."""
    return combine(
        package=package_digest(package_dir=package_dir),
        config=config_digest(workspace_dir=workspace_dir, files=measured_files),
    )


def _add_file(digest: hashlib._Hash, name: str, path: Path) -> None:
    content = path.read_bytes()
    encoded = name.encode()
    digest.update(len(encoded).to_bytes(8, "big") + encoded)
    digest.update(len(content).to_bytes(8, "big") + hashlib.sha256(content).digest())
