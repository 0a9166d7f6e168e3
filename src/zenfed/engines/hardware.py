"""Where a site trains and in which number format: its device, precision and memory options.

The site decides this in its policy (``device``, ``precision``, ``gradient_checkpointing``,
``base_quantization``), never the job: the job says *what* to train, the site *on what*.
Whatever a site picks, the LoRA parameters and their optimizer state stay float32 (the
master weights), and the adapter that leaves the site is float32 on the CPU, so CPU and
GPU sites aggregate together.

=================  ==========================================================================
precision          what it means
=================  ==========================================================================
``fp32``           base model and LoRA in float32, no autocast (the reference)
``bf16``           base model loaded in bfloat16 (half the memory), LoRA float32, matrix
                   products under bfloat16 autocast; CPU or CUDA
``fp16-mixed``     base model in float16, LoRA float32, float16 autocast with loss scaling;
                   CUDA only, and not under DP-SGD (per-example clipping of scaled losses)
=================  ==========================================================================
"""

from __future__ import annotations

import importlib.util
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from typing import Any, Literal

import torch

from zenfed.errors import ModelError

Precision = Literal["fp32", "bf16", "fp16-mixed"]
Quantization = Literal["none", "8bit", "4bit"]
PRECISIONS: tuple[Precision, ...] = ("fp32", "bf16", "fp16-mixed")
QUANTIZATIONS: tuple[Quantization, ...] = ("none", "8bit", "4bit")
_QUANTIZATION_PACKAGE = "bitsandbytes"


class HardwareError(ModelError):
    """A site's device, precision or quantization setting cannot run on this machine."""


def resolve_device(requested: str, *, cuda_count: int | None = None) -> torch.device:
    """Return the torch device a site's ``device`` setting names on this machine.

    Args:
        requested: ``auto``, ``cpu``, ``cuda`` or ``cuda:N``.
        cuda_count: CUDA devices present (default: ask torch).

    Raises:
        HardwareError: If the setting is malformed or names a GPU this machine does not have.
    """
    count = torch.cuda.device_count() if cuda_count is None else cuda_count
    value = requested.strip().lower()
    if value == "auto":
        return torch.device("cuda", 0) if count > 0 else torch.device("cpu")
    if value == "cpu":
        return torch.device("cpu")
    if value == "cuda" or value.startswith("cuda:"):
        index_text = value.partition(":")[2] or "0"
        if not index_text.isdigit():
            raise HardwareError(f"device {requested!r} is malformed; write cuda or cuda:N with N a number")
        index = int(index_text)
        if count == 0:
            raise HardwareError(
                f"the site policy asks for device {requested!r}, but torch sees no CUDA device here "
                f"(torch {torch.__version__}, CUDA build: {torch.version.cuda or 'no'}); "
                f"set device: cpu or auto, or install a CUDA build of torch"
            )
        if index >= count:
            raise HardwareError(
                f"device {requested!r} does not exist: this machine has {count} CUDA device(s), "
                f"cuda:0 to cuda:{count - 1}"
            )
        return torch.device("cuda", index)
    raise HardwareError(f"device {requested!r} is not one of auto, cpu, cuda, cuda:N")


@dataclass(frozen=True)
class Hardware:
    """A site's resolved training hardware (see the module docstring).

    Build it with ``Hardware.for_site`` so that every combination is checked once, up front.
    """

    device: torch.device = torch.device("cpu")
    precision: Precision = "fp32"
    gradient_checkpointing: bool = False
    quantization: Quantization = "none"

    @classmethod
    def for_site(cls, *, device: str = "auto", precision: str = "fp32", gradient_checkpointing: bool = False,
                 quantization: str = "none", cuda_count: int | None = None) -> Hardware:
        """Resolve and check a site's settings on this machine.

        Raises:
            HardwareError: If a setting is unknown or cannot run here, with what to change.
        """
        if precision not in PRECISIONS:
            raise HardwareError(f"precision {precision!r} is not one of {', '.join(PRECISIONS)}")
        if quantization not in QUANTIZATIONS:
            raise HardwareError(f"base_quantization {quantization!r} is not one of {', '.join(QUANTIZATIONS)}")
        resolved = resolve_device(device, cuda_count=cuda_count)
        if precision == "fp16-mixed" and resolved.type != "cuda":
            raise HardwareError(
                f"precision fp16-mixed needs a CUDA device, and this site trains on {resolved}; "
                f"use bf16 or fp32 on a CPU"
            )
        if precision == "bf16" and resolved.type == "cuda" and cuda_count is None \
                and not torch.cuda.is_bf16_supported():
            raise HardwareError(
                f"{torch.cuda.get_device_name(resolved)} has no native bfloat16 (it came with Ampere); "
                f"set precision: fp16-mixed or fp32 on this site"
            )
        if quantization != "none":
            check_quantization_available(quantization, resolved)
        return cls(device=resolved, precision=precision, gradient_checkpointing=gradient_checkpointing,
                   quantization=quantization)  # type: ignore[arg-type]

    @property
    def base_dtype(self) -> torch.dtype:
        """The dtype of the frozen base weights."""
        if self.precision == "bf16":
            return torch.bfloat16
        if self.precision == "fp16-mixed":
            return torch.float16
        return torch.float32

    @property
    def autocast_dtype(self) -> torch.dtype | None:
        """The dtype matrix products run in, or None for plain float32."""
        return None if self.precision == "fp32" else self.base_dtype

    def autocast(self) -> Any:
        """Return the autocast context for a forward pass (a no-op for fp32)."""
        dtype = self.autocast_dtype
        if dtype is None:
            return nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=dtype)

    def grad_scaler(self) -> torch.amp.GradScaler | None:
        """Return a loss scaler for float16 training, else None (bf16 and fp32 need none)."""
        if self.precision != "fp16-mixed":
            return None
        return torch.amp.GradScaler(self.device.type)

    def check_dp(self) -> None:
        """Refuse settings DP-SGD cannot take.

        Raises:
            HardwareError: Under fp16-mixed, whose loss scaling would be clipped per example.
        """
        if self.precision == "fp16-mixed":
            raise HardwareError(
                "DP-SGD clips each example's gradient, and fp16-mixed scales the loss first, which the "
                "clipping would see; set the site's precision to bf16 or fp32 for jobs with record-level DP"
            )

    def to(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Return ``batch`` on this device."""
        if self.device.type == "cpu":
            return batch
        return {name: tensor.to(self.device, non_blocking=True) for name, tensor in batch.items()}

    def describe(self) -> dict[str, Any]:
        """Return the settings as plain data (for the audit log and benchmarks)."""
        return {"device": str(self.device), "precision": self.precision,
                "gradient_checkpointing": self.gradient_checkpointing, "base_quantization": self.quantization}


def check_quantization_available(quantization: str, device: torch.device) -> None:
    """Refuse 8-bit or 4-bit base loading where it cannot run.

    Raises:
        HardwareError: If bitsandbytes is not installed, or the device is not CUDA.
    """
    if importlib.util.find_spec(_QUANTIZATION_PACKAGE) is None:
        raise HardwareError(
            f"base_quantization: {quantization} loads the base model through {_QUANTIZATION_PACKAGE}, which "
            f"is not installed at this site; install it (`pip install {_QUANTIZATION_PACKAGE}`) on a CUDA "
            f"machine, or set base_quantization: none"
        )
    if device.type != "cuda":
        raise HardwareError(
            f"base_quantization: {quantization} runs on a CUDA device, and this site trains on {device}; "
            f"set device: cuda (or auto on a GPU machine), or base_quantization: none"
        )


def quantization_config(hardware: Hardware) -> Any:
    """Return the transformers ``BitsAndBytesConfig`` for the site's quantization, or None."""
    if hardware.quantization == "none":
        return None
    from transformers import BitsAndBytesConfig

    if hardware.quantization == "8bit":
        return BitsAndBytesConfig(load_in_8bit=True)
    compute = torch.bfloat16 if hardware.precision != "fp16-mixed" else torch.float16
    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                              bnb_4bit_compute_dtype=compute)


@contextmanager
def peak_memory(device: torch.device) -> Iterator[dict[str, float]]:
    """Measure the peak device memory of a block, in MiB, into the yielded dict (``peak_mib``).

    On a CPU it reads the process's peak resident memory, which never goes down: a figure
    for the whole process so far, not the block alone.
    """
    measured: dict[str, float] = {}
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
    try:
        yield measured
    finally:
        if device.type == "cuda":
            torch.cuda.synchronize(device)
            measured["peak_mib"] = torch.cuda.max_memory_allocated(device) / 2**20
        else:
            import resource

            measured["peak_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
