"""Base models: a manifest catches a partial or modified cache; a spec's model path is checked."""

from __future__ import annotations

import json
import shutil

import pytest

from zenfed.engines.base_model import (
    MANIFEST,
    check_manifest,
    default_model_dir,
    model_fingerprint,
    prepare_default_model,
    resolve_base_model,
    write_manifest,
)
from zenfed.errors import ModelError


@pytest.fixture
def model_copy(tiny_model_dir, tmp_path):
    target = tmp_path / "model"
    shutil.copytree(tiny_model_dir, target)
    return target


def test_an_intact_model_matches_its_manifest(model_copy):
    # Execute / Assert
    assert check_manifest(model_copy) is None
    assert len(model_fingerprint(model_copy)) == 64


def test_a_truncated_weights_file_is_detected(model_copy):
    # Prepare
    weights = model_copy / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2])

    # Execute
    problem = check_manifest(model_copy)

    # Assert
    assert problem is not None and "model.safetensors has" in problem and "expected" in problem
    with pytest.raises(ModelError, match="not usable"):
        model_fingerprint(model_copy)


def test_a_modified_weights_file_of_the_same_size_is_detected(model_copy):
    # Prepare: flip one byte in the middle.
    weights = model_copy / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[len(data) // 2] ^= 0xFF
    weights.write_bytes(bytes(data))

    # Execute / Assert
    assert check_manifest(model_copy) == "model.safetensors does not match its recorded SHA-256"


def test_a_missing_file_or_manifest_is_detected(model_copy):
    # Execute
    (model_copy / "tokenizer.json").unlink()
    missing_file = check_manifest(model_copy)
    (model_copy / MANIFEST).unlink()
    missing_manifest = check_manifest(model_copy)

    # Assert
    assert missing_file == "tokenizer.json is missing"
    assert missing_manifest is not None and "no manifest" in missing_manifest


def test_an_unreadable_manifest_is_detected(model_copy):
    # Prepare
    (model_copy / MANIFEST).write_text("{not json")

    # Execute / Assert
    assert check_manifest(model_copy) == "manifest is unreadable"


def test_write_manifest_records_every_file_and_the_weights_hash(model_copy):
    # Execute
    manifest = write_manifest(model_copy, source="test")

    # Assert
    files = manifest["files"]
    assert MANIFEST not in files
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= set(files)
    assert manifest["weights_sha256"] == files["model.safetensors"]["sha256"]
    assert json.loads((model_copy / MANIFEST).read_text()) == manifest


def test_resolve_base_model_accepts_a_model_folder(model_copy):
    # Execute / Assert
    assert resolve_base_model(str(model_copy)) == model_copy


def test_resolve_base_model_refuses_a_folder_that_is_not_a_model(tmp_path):
    # Prepare
    (tmp_path / "notes.txt").write_text("hello")

    # Execute / Assert
    with pytest.raises(ModelError, match="no config.json"):
        resolve_base_model(str(tmp_path))
    with pytest.raises(ModelError, match="is not a Hugging Face model folder"):
        resolve_base_model(str(tmp_path / "missing"))


def test_the_default_model_unprepared_says_to_run_models_prepare(tmp_path, monkeypatch):
    # Prepare
    monkeypatch.setenv("ZENFED_CACHE", str(tmp_path / "cache"))

    # Execute / Assert
    assert default_model_dir() == tmp_path / "cache" / "models" / "SmolLM2-135M-Instruct"
    with pytest.raises(ModelError, match="zenfed models prepare"):
        resolve_base_model("default", prepare=False)


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_prepare_default_model_reuses_an_intact_cache_and_rebuilds_a_corrupt_one(tmp_path, monkeypatch):
    # Prepare
    monkeypatch.setenv("ZENFED_CACHE", str(tmp_path / "cache"))
    folder = prepare_default_model(progress=False)
    weights = folder / "model.safetensors"
    first_mtime = weights.stat().st_mtime_ns

    # Execute: a second call reuses it; a truncated weights file is rebuilt.
    again = prepare_default_model(progress=False)
    reused_mtime = weights.stat().st_mtime_ns
    with weights.open("r+b") as handle:
        handle.truncate(1000)
    rebuilt = prepare_default_model(progress=False)

    # Assert
    assert again == folder and reused_mtime == first_mtime
    assert rebuilt == folder and check_manifest(folder) is None
    assert weights.stat().st_size > 100_000_000
    assert not [p for p in folder.parent.iterdir() if p.name.startswith(".building-")]
    assert resolve_base_model("default", prepare=False) == folder


def test_a_users_model_folder_without_manifest_is_fingerprinted_by_its_weights(model_copy):
    # Prepare: a plain Hugging Face folder (no zenfed manifest), as a site's own model would be.
    (model_copy / MANIFEST).unlink()

    # Execute
    first = model_fingerprint(model_copy)
    again = model_fingerprint(model_copy)
    weights = model_copy / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0x01
    weights.write_bytes(bytes(data))
    changed = model_fingerprint(model_copy)

    # Assert
    assert first == again and len(first) == 64
    assert changed != first
