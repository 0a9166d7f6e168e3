"""Shared fixtures: one tiny random Llama per session, small job specs, the built-in data.

Sub-folders (audit, attestation, ...) have their own conftest.py; fixtures here
use names that do not clash with theirs.
"""

from __future__ import annotations

import socket
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from zenfed.spec import JobSpec


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random Llama + BPE tokenizer, built once per session (about 7 s)."""
    from zenfed.engines.tiny import build_tiny_model

    return build_tiny_model(tmp_path_factory.mktemp("tiny-model") / "model")


@pytest.fixture(scope="session")
def tiny_job_spec(tiny_model_dir: Path) -> Callable[..., JobSpec]:
    """Factory of small, fast job specs on the tiny model (pinned by its SHA-256); keyword sections override."""
    from zenfed.engines.base_model import model_fingerprint

    pin = model_fingerprint(tiny_model_dir)

    def make(name: str = "tiny-job", **sections: Any) -> JobSpec:
        data: dict[str, Any] = {
            "name": name,
            "model": {"base": str(tiny_model_dir), "engine": "peft", "base_sha256": pin},
            "lora": {"rank": 4, "alpha": 8.0, "target_modules": ["q_proj", "v_proj"]},
            "training": {
                "local_steps": 4,
                "batch_size": 4,
                "seq_len": 96,
                "learning_rate": 0.01,
                "seed": 0,
            },
            "federation": {
                "rounds": 2,
                "min_sites": 2,
                "weighting": "samples",
                "task_timeout_s": 300,
            },
            "data": {"dataset": "builtin"},
            "evaluation": {"max_examples": 8, "max_new_tokens": 4},
        }
        for key, value in sections.items():
            data[key] = {**data.get(key, {}), **value} if isinstance(value, dict) else value
        return JobSpec.model_validate(data)

    return make


@pytest.fixture(scope="session")
def small_builtin_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The built-in benchmark for 2 sites, small (read-only: do not modify it in a test)."""
    from zenfed.data import make_builtin

    out = tmp_path_factory.mktemp("builtin-data")
    make_builtin(out, sites=2, train_per_site=60, valid_per_site=12, test_per_task=8, seed=0)
    return out


def free_tcp_port() -> int:
    """Return a TCP port on localhost that is free right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.fixture
def free_ports() -> tuple[int, int]:
    """Two distinct free TCP ports (FL port, admin port)."""
    first = free_tcp_port()
    second = free_tcp_port()
    while second == first:
        second = free_tcp_port()
    return first, second

