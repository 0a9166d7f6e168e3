"""``zenfed site probe``: measure what this site's machine can do and write it into the site policy.

The probe trains a few LoRA steps of the base model on synthetic rows (no site
data is read) with the engine, threads, device and precision the site trains with, and
measures steps per minute after one warm-up step. With the device, its count
and memory it goes into ``enrollment`` in ``local/zenfed_site.yaml``, which the
site may then disclose to jobs (``zenfed.site.enrollment``). Re-run it after a
hardware change.
"""

from __future__ import annotations

import datetime as dt
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import psutil
import torch
import yaml

from zenfed.atomic import atomic_write_bytes
from zenfed.data.jsonl import Example
from zenfed.data.jsonl import Message as Turn
from zenfed.engines.hardware import Hardware
from zenfed.errors import SpecError
from zenfed.site.policy import POLICY_FILE
from zenfed.spec import JobSpec, SitePolicy, parse_model

PROBE_BATCH = 4
PROBE_SEQ_LEN = 128


def measure(*, model: str = "default", steps: int = 4, threads: int = 0, engine: str = "peft",
            hardware: Hardware | None = None, say: Callable[[str], None] = lambda text: None) -> dict[str, Any]:
    """Train ``steps`` LoRA steps (after a warm-up step) and return the enrollment compute fields.

    Args:
        model: The base model (``default``: the embedded SmolLM2).
        steps: Timed optimizer steps.
        threads: CPU threads (0: the default), as the site's ``torch_threads``.
        engine: The training engine to time.
        hardware: The site's device and precision (default: CPU, fp32).
        say: Progress lines.

    Returns:
        ``device``, ``device_count``, ``memory_gib``, ``steps_per_minute``, ``probed_at``.
    """
    from zenfed.engines import make_engine
    from zenfed.engines.base_model import resolve_base_model

    if steps < 1:
        raise SpecError(f"the probe needs at least one timed step, got {steps}")
    spec = JobSpec.model_validate({
        "name": "zenfed-probe", "model": {"base": model, "engine": engine},
        "lora": {"rank": 8, "target_modules": ["q_proj", "v_proj"]},
        "training": {"local_steps": steps, "batch_size": PROBE_BATCH, "seq_len": PROBE_SEQ_LEN},
    })
    hardware = hardware or Hardware()
    trainer = make_engine(spec, model_dir=resolve_base_model(model), threads=threads, hardware=hardware)
    rows = [Example(prompt=(Turn("user", f"Probe question {i}: name a colour and a number."),),
                    response=f"Colour {i % 7}, number {i}.") for i in range(PROBE_BATCH * 2)]
    adapter = trainer.initial_adapter()
    say("warming up (one step)")
    trainer.train(adapter=adapter, examples=rows, steps=1, seed=0)
    say(f"timing {steps} step(s) of batch {PROBE_BATCH} x {PROBE_SEQ_LEN} tokens")
    started = time.perf_counter()
    trainer.train(adapter=adapter, examples=rows, steps=steps, seed=1)
    elapsed = time.perf_counter() - started
    on_gpu = hardware.device.type == "cuda"
    memory = torch.cuda.get_device_properties(hardware.device).total_memory if on_gpu \
        else psutil.virtual_memory().total
    return {
        "device": hardware.device.type,
        "device_count": torch.cuda.device_count() if on_gpu else 1,
        "memory_gib": round(memory / 2**30, 1),
        "steps_per_minute": round(steps * 60.0 / elapsed, 2),
        "probed_at": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
    }


def policy_file(kit_or_file: Path) -> Path:
    """The site policy file: the path itself, or ``local/zenfed_site.yaml`` inside a site kit.

    Raises:
        SpecError: If neither exists.
    """
    path = Path(kit_or_file)
    candidate = path / "local" / POLICY_FILE if path.is_dir() else path
    if not candidate.is_file():
        raise SpecError(f"no site policy at {candidate}; pass a site kit folder or its local/{POLICY_FILE}")
    return candidate


def write_measured(path: Path, measured: dict[str, Any]) -> SitePolicy:
    """Put ``measured`` under ``enrollment`` in the policy file, keeping its other fields and its header comment.

    The new policy is validated before it replaces the file (atomically, 0600).

    Raises:
        SpecError: If the file does not hold a valid site policy.
    """
    text = path.read_text(encoding="utf-8")
    data = yaml.safe_load(text) or {}
    if not isinstance(data, dict):
        raise SpecError(f"{path} does not hold a site policy (a mapping of fields)")
    data["enrollment"] = {**(data.get("enrollment") or {}), **measured}
    policy = parse_model(SitePolicy, data, kind="site policy", source=str(path))
    header = []
    for line in text.splitlines():
        if not line.startswith("#"):
            break
        header.append(line + "\n")
    atomic_write_bytes(path, ("".join(header) + yaml.safe_dump(data, sort_keys=False)).encode(), mode=0o600)
    return policy
