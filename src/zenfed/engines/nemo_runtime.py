"""Where and how the NeMo engine runs: CPU fp32 by default, GPU bf16 by configuration.

A site picks its hardware with environment variables (no code change, no job
spec change: the job spec says *what* to train, the site says *on what*):

=============================  =========  ==============================================
Variable                       Default    Values
=============================  =========  ==============================================
``ZENFED_NEMO_ACCELERATOR``    ``cpu``    ``cpu``, ``gpu``
``ZENFED_NEMO_DEVICES``        ``1``      devices per node, an integer >= 1
``ZENFED_NEMO_NUM_NODES``      ``1``      nodes, an integer >= 1
``ZENFED_NEMO_PRECISION``      ``32``     ``32``, ``bf16-mixed``, ``bf16-true``, ``16-mixed``
``ZENFED_NEMO_STRATEGY``       ``auto``   ``auto`` (single device if one device, else
                                          ``ddp``), ``single``, ``ddp``
=============================  =========  ==============================================

More than one device needs a distributed launch (``torchrun``, or FLARE's
external-process launcher), so that every rank runs the same engine calls.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch

from zenfed.errors import ModelError

ENV_PREFIX = "ZENFED_NEMO_"
ACCELERATORS = ("cpu", "gpu")
PRECISIONS = ("32", "bf16-mixed", "bf16-true", "16-mixed")
STRATEGIES = ("auto", "single", "ddp")


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

    def __post_init__(self) -> None:
        if self.accelerator not in ACCELERATORS:
            raise NemoConfigError(
                f"{ENV_PREFIX}ACCELERATOR={self.accelerator!r} is not supported; "
                f"use one of {ACCELERATORS}"
            )
        if self.precision not in PRECISIONS:
            raise NemoConfigError(
                f"{ENV_PREFIX}PRECISION={self.precision!r} is not supported; "
                f"use one of {PRECISIONS}"
            )
        if self.strategy not in STRATEGIES:
            raise NemoConfigError(
                f"{ENV_PREFIX}STRATEGY={self.strategy!r} is not supported; use one of {STRATEGIES}"
            )
        if self.devices < 1 or self.num_nodes < 1:
            raise NemoConfigError(
                f"{ENV_PREFIX}DEVICES and {ENV_PREFIX}NUM_NODES must be at least 1 "
                f"(got {self.devices} and {self.num_nodes})"
            )
        if self.accelerator == "cpu" and self.precision != "32":
            raise NemoConfigError(
                f"precision {self.precision!r} needs a GPU; on CPU set {ENV_PREFIX}PRECISION=32"
            )
        if self.strategy == "single" and self.world_size > 1:
            raise NemoConfigError(
                f"strategy 'single' runs on one device but {self.world_size} were asked for; "
                f"set {ENV_PREFIX}STRATEGY=ddp or {ENV_PREFIX}DEVICES=1"
            )

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> NemoRuntime:
        """Read the settings from ``environ`` (default: the process environment).

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
            accelerator=env.get(ENV_PREFIX + "ACCELERATOR", "cpu").strip().lower(),
            devices=integer("DEVICES", 1),
            num_nodes=integer("NUM_NODES", 1),
            precision=env.get(ENV_PREFIX + "PRECISION", "32").strip().lower(),
            strategy=env.get(ENV_PREFIX + "STRATEGY", "auto").strip().lower(),
        )

    @property
    def world_size(self) -> int:
        """Devices over all nodes."""
        return self.devices * self.num_nodes

    @property
    def model_dtype(self) -> torch.dtype:
        """The dtype the base model is loaded in (mixed precision keeps fp32 weights)."""
        return torch.bfloat16 if self.precision == "bf16-true" else torch.float32

    def strategy_name(self) -> str:
        """Return the resolved strategy: ``single`` or ``ddp``."""
        if self.strategy == "auto":
            return "single" if self.world_size == 1 else "ddp"
        return self.strategy

    def trainer_kwargs(self) -> dict[str, Any]:
        """Keyword arguments for ``nl.Trainer`` that set the hardware (NeMo is imported here)."""
        import lightning.pytorch as pl

        if self.strategy_name() == "single":
            device = torch.device("cuda", 0) if self.accelerator == "gpu" else torch.device("cpu")
            strategy: Any = pl.strategies.SingleDeviceStrategy(device)
        else:
            strategy = pl.strategies.DDPStrategy(find_unused_parameters=False)
        return {
            "accelerator": self.accelerator,
            "devices": self.devices,
            "num_nodes": self.num_nodes,
            "precision": self.precision,
            "strategy": strategy,
        }
