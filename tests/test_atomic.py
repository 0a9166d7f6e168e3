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
