"""Which linear layers LoRA adapts, per model architecture.

A job spec's ``lora.target_modules`` lists module names (``q_proj``) or groups
(``attention``, ``mlp``). Both engines resolve them here against the base model's
``model_type`` (from its ``config.json``), so a job gets the same LoRA on a Llama, a
Qwen2 or a Mistral site, and a clear error on an architecture zenfed has not mapped.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from zenfed.errors import ModelError

GROUPS = ("attention", "mlp")


@dataclass(frozen=True)
class Architecture:
    """The LoRA-adaptable linear layers of one decoder architecture, by group."""

    attention: tuple[str, ...]
    mlp: tuple[str, ...]

    @property
    def modules(self) -> tuple[str, ...]:
        """Every adaptable module name."""
        return self.attention + self.mlp


_LLAMA_STYLE = Architecture(attention=("q_proj", "k_proj", "v_proj", "o_proj"),
                            mlp=("gate_proj", "up_proj", "down_proj"))

# model_type (Hugging Face config) -> its layers. Llama, Mistral and Qwen share the layout.
ARCHITECTURES: dict[str, Architecture] = {
    "llama": _LLAMA_STYLE,
    "mistral": _LLAMA_STYLE,
    "qwen2": _LLAMA_STYLE,
    "qwen3": _LLAMA_STYLE,
    "gemma": _LLAMA_STYLE,
    "gemma2": _LLAMA_STYLE,
    "phi3": Architecture(attention=("qkv_proj", "o_proj"), mlp=("gate_up_proj", "down_proj")),
}


def architecture_of(model_config: Any, *, model_dir: Path | str) -> tuple[str, Architecture]:
    """Return the ``model_type`` of a Hugging Face config and its layers.

    Raises:
        ModelError: If the architecture is not one zenfed maps, naming those it does.
    """
    model_type = str(getattr(model_config, "model_type", "") or "")
    found = ARCHITECTURES.get(model_type)
    if found is None:
        raise ModelError(
            f"the base model in {model_dir} is a {model_type or 'model without model_type'!r} architecture, "
            f"which zenfed does not map to LoRA target modules; use a model of one of these families: "
            f"{', '.join(sorted(ARCHITECTURES))}"
        )
    return model_type, found


def resolve_target_modules(requested: Sequence[str], model_config: Any, *, model_dir: Path | str) -> tuple[str, ...]:
    """Return the module names LoRA adapts on this model, groups expanded, in a stable order.

    Raises:
        ModelError: If the architecture is unknown or a name is not one of its linear layers.
    """
    model_type, layers = architecture_of(model_config, model_dir=model_dir)
    names: list[str] = []
    for item in requested:
        expanded = getattr(layers, item) if item in GROUPS else (item,)
        for name in expanded:
            if name not in layers.modules:
                raise ModelError(
                    f"lora.target_modules names {name!r}, which a {model_type} model does not have; "
                    f"choose from {', '.join(layers.modules)} or the groups {', '.join(GROUPS)}"
                )
            if name not in names:
                names.append(name)
    return tuple(names)


def targets_of(adapter_names: Sequence[str]) -> list[str]:
    """Return the module names an adapter's tensors adapt (``...q_proj.lora_A.weight`` -> ``q_proj``)."""
    return sorted({name.split(".lora_")[0].rsplit(".", 1)[-1] for name in adapter_names if ".lora_" in name})
