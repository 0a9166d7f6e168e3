"""Where and how the NeMo engine runs: the site policy's device and precision, plus multi-device launch.

The device, precision, gradient checkpointing and 4-bit loading come from the site
policy (``engines/hardware.py``), as for the PEFT engine. A launch over several
devices or nodes is a property of how the site starts its process, so it stays in
the environment:

=============================  =========  ==============================================
Variable                       Default    Values
=============================  =========  ==============================================
``ZENFED_NEMO_DEVICES``        ``1``      devices per node, an integer >= 1
``ZENFED_NEMO_NUM_NODES``      ``1``      nodes, an integer >= 1
``ZENFED_NEMO_STRATEGY``       ``auto``   ``auto`` (single device if one device, else
                                          ``ddp``), ``single``, ``ddp``
=============================  =========  ==============================================

Precision maps to Lightning's mixed precision, which keeps the weights (LoRA's
included) in float32: ``fp32`` -> ``32``, ``bf16`` -> ``bf16-mixed``, ``fp16-mixed``
-> ``16-mixed``. More than one device needs a distributed launch (``torchrun``, or
FLARE's external-process launcher), so that every rank runs the same engine calls.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch

from zenfed.engines.hardware import Hardware
from zenfed.errors import ModelError

ENV_PREFIX = "ZENFED_NEMO_"
ACCELERATORS = ("cpu", "gpu")
PRECISIONS = ("32", "bf16-mixed", "16-mixed")
STRATEGIES = ("auto", "single", "ddp")
LIGHTNING_PRECISION = {"fp32": "32", "bf16": "bf16-mixed", "fp16-mixed": "16-mixed"}


class NemoConfigError(ModelError):
    """The site's NeMo runtime settings are invalid."""


@dataclass(frozen=True)
class NemoRuntime:
    """Hardware settings for the NeMo engine (see the module docstring)."""

    accelerator: str = "cpu"
    devices: int = 1
    num_nodes: int = 1
    precision: str = "32"
    strategy: str = "auto"
    device: torch.device = torch.device("cpu")

    def __post_init__(self) -> None:
        if self.accelerator not in ACCELERATORS:
            raise NemoConfigError(f"accelerator {self.accelerator!r} is not supported; use one of {ACCELERATORS}")
        if self.precision not in PRECISIONS:
            raise NemoConfigError(f"precision {self.precision!r} is not supported; use one of {PRECISIONS}")
        if self.strategy not in STRATEGIES:
            raise NemoConfigError(
                f"{ENV_PREFIX}STRATEGY={self.strategy!r} is not supported; use one of {STRATEGIES}"
            )
        if self.devices < 1 or self.num_nodes < 1:
            raise NemoConfigError(
                f"{ENV_PREFIX}DEVICES and {ENV_PREFIX}NUM_NODES must be at least 1 "
                f"(got {self.devices} and {self.num_nodes})"
            )
        if self.accelerator == "cpu" and self.precision == "16-mixed":
            raise NemoConfigError("precision fp16-mixed needs a GPU; on a CPU use bf16 or fp32")
        if self.strategy == "single" and self.world_size > 1:
            raise NemoConfigError(
                f"strategy 'single' runs on one device but {self.world_size} were asked for; "
                f"set {ENV_PREFIX}STRATEGY=ddp or {ENV_PREFIX}DEVICES=1"
            )

    @classmethod
    def for_site(cls, hardware: Hardware, environ: Mapping[str, str] | None = None) -> NemoRuntime:
        """Return the runtime for a site's ``hardware``, with the launch read from ``environ``.

        Args:
            hardware: The site's resolved device and precision.
            environ: Default: the process environment.

        Raises:
            NemoConfigError: If a variable holds an unsupported value.

        """
        env = os.environ if environ is None else environ

        def integer(key: str, default: int) -> int:
            raw = env.get(ENV_PREFIX + key, str(default)).strip()
            try:
                return int(raw)
            except ValueError:
                raise NemoConfigError(f"{ENV_PREFIX}{key}={raw!r} is not an integer") from None

        return cls(
            accelerator="gpu" if hardware.device.type == "cuda" else "cpu",
            devices=integer("DEVICES", 1),
            num_nodes=integer("NUM_NODES", 1),
            precision=LIGHTNING_PRECISION[hardware.precision],
            strategy=env.get(ENV_PREFIX + "STRATEGY", "auto").strip().lower(),
            device=hardware.device,
        )

    @property
    def world_size(self) -> int:
        """Devices over all nodes."""
        return self.devices * self.num_nodes

    def strategy_name(self) -> str:
        """Return the resolved strategy: ``single`` or ``ddp``."""
        if self.strategy == "auto":
            return "single" if self.world_size == 1 else "ddp"
        return self.strategy

    def trainer_kwargs(self) -> dict[str, Any]:
        """Keyword arguments for ``nl.Trainer`` that set the hardware (NeMo is imported here)."""
        import lightning.pytorch as pl

        if self.strategy_name() == "single":
            strategy: Any = pl.strategies.SingleDeviceStrategy(self.device)
        else:
            strategy = pl.strategies.DDPStrategy(find_unused_parameters=False)
        return {
            "accelerator": self.accelerator,
            "devices": self.devices,
            "num_nodes": self.num_nodes,
            "precision": self.precision,
            "strategy": strategy,
        }
