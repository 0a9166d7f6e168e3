"""LoRA training engines behind one protocol (see ``base.Engine``).

Engines register here by name; a job spec picks one with ``model.engine``.
Heavy engines are imported only when a job asks for them.
"""

from __future__ import annotations

import importlib
from pathlib import Path

from zenfed.engines.base import Engine, EvalResult, TrainResult
from zenfed.engines.hardware import Hardware
from zenfed.errors import ModelError
from zenfed.spec import JobSpec
from zenfed.types import AdapterState

# name -> "module:Class"; imported lazily so a PEFT-only site never imports NeMo.
ENGINES: dict[str, str] = {
    "peft": "zenfed.engines.peft:PeftEngine",
    "nemo": "zenfed.engines.nemo:NemoEngine",
}


def make_engine(spec: JobSpec, *, model_dir: Path, threads: int = 0, engine: str | None = None,
                hardware: Hardware | None = None) -> Engine:
    """Build the engine a job spec asks for, or the one a site's policy insists on, on the site's hardware.

    Engines exchange adapters in HF PEFT naming (float32, on the CPU) and start from the same
    initialisation, so sites with different engines, devices and precisions aggregate together.

    Raises:
        ModelError: If the engine is unknown or cannot be imported at this site.
    """
    name = engine or spec.model.engine
    target = ENGINES.get(name)
    if target is None:
        raise ModelError(f"unknown engine {name!r}; choose one of {sorted(ENGINES)}")
    module_name, class_name = target.split(":")
    try:
        engine_class = getattr(importlib.import_module(module_name), class_name)
    except ImportError as err:
        raise ModelError(
            f"engine {name!r} is not available at this site ({err}); "
            f"install zenfed with its extras (`make install`)"
        ) from err
    built: Engine = engine_class(model_dir=model_dir, lora=spec.lora, training=spec.training, threads=threads,
                                 hardware=hardware or Hardware())
    return built


__all__ = ["ENGINES", "AdapterState", "Engine", "EvalResult", "Hardware", "TrainResult", "make_engine"]
