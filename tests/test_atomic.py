import os
import stat
from pathlib import Path

import pytest

from zenfed.atomic import atomic_write_bytes, staged_dir


def test_staged_dir_replaces_target_only_on_success(tmp_path: Path) -> None:
    # Prepare
    target = tmp_path / "out"
    target.mkdir()
    (target / "old.txt").write_text("old")
    # Execute: a failing body leaves the old folder and no staging behind.
    with pytest.raises(RuntimeError), staged_dir(target) as staging:
        (staging / "new.txt").write_text("new")
        raise RuntimeError("crash mid-write")
    # Assert
    assert sorted(p.name for p in target.iterdir()) == ["old.txt"]
    assert [p.name for p in tmp_path.iterdir()] == ["out"]
    # Execute: a successful body replaces it whole.
    with staged_dir(target) as staging:
        (staging / "new.txt").write_text("new")
    assert sorted(p.name for p in target.iterdir()) == ["new.txt"]


def test_atomic_write_bytes_leaves_no_temporary_file(tmp_path: Path) -> None:
    path = tmp_path / "deep" / "file.bin"
    atomic_write_bytes(path, b"one")
    atomic_write_bytes(path, b"two")
    assert path.read_bytes() == b"two"
    assert [p.name for p in path.parent.iterdir()] == ["file.bin"]


def test_atomic_write_bytes_sets_the_mode_even_over_an_existing_file(tmp_path: Path) -> None:
    # Prepare: a file that already exists with loose permissions.
    path = tmp_path / "ledger.json"
    path.write_bytes(b"old")
    path.chmod(0o666)
    # Execute
    atomic_write_bytes(path, b"secret")
    shared = tmp_path / "report.json"
    atomic_write_bytes(shared, b"{}", mode=0o644)
    # Assert: owner-only by default, as asked otherwise.
    assert path.read_bytes() == b"secret"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert stat.S_IMODE(shared.stat().st_mode) == 0o644


def test_atomic_write_bytes_syncs_the_file_and_then_its_folder(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Prepare: record what each fsync was given.
    synced: list[str] = []
    real_fsync = os.fsync

    def fsync(fd: int) -> None:
        synced.append("dir" if stat.S_ISDIR(os.fstat(fd).st_mode) else "file")
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    # Execute
    atomic_write_bytes(tmp_path / "state.json", b"{}")
    # Assert: the rename is durable only once the folder is synced too.
    assert synced == ["file", "dir"]


def test_a_failed_write_leaves_the_old_file_and_no_temporary(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Prepare
    path = tmp_path / "state.json"
    atomic_write_bytes(path, b"old")

    def replace(src: str, dst: str) -> None:
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", replace)
    # Execute
    with pytest.raises(OSError, match="disk full"):
        atomic_write_bytes(path, b"new")
    # Assert
    assert path.read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["state.json"]
