"""Writing an adapter as a PEFT folder that ``PeftModel.from_pretrained`` loads."""

from __future__ import annotations

import json
from pathlib import Path

from safetensors.torch import save_file

from zenfed.atomic import staged_dir
from zenfed.engines.architectures import targets_of
from zenfed.spec import LoraSpec
from zenfed.types import AdapterState

ADAPTER_WEIGHTS = "adapter_model.safetensors"
ADAPTER_CONFIG = "adapter_config.json"


def peft_adapter_config(lora: LoraSpec, *, base_model: str,
                        target_modules: list[str] | None = None) -> dict[str, object]:
    """Return the ``adapter_config.json`` content for a spec's LoRA section.

    ``target_modules``: the resolved module names (groups such as ``attention`` expanded).
    """
    return {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_model,
        "r": lora.rank,
        "lora_alpha": lora.alpha,
        "lora_dropout": lora.dropout,
        "target_modules": sorted(target_modules or lora.target_modules),
        "layers_to_transform": list(lora.layers) if lora.layers else None,
        "bias": "none",
        "fan_in_fan_out": False,
        "inference_mode": True,
        "init_lora_weights": True,
        "modules_to_save": None,
    }


def write_peft_adapter(out_dir: str | Path, state: AdapterState, *, lora: LoraSpec, base_model: str) -> Path:
    """Write ``state`` as a PEFT adapter folder, atomically (all or nothing).

    Args:
        out_dir: The adapter folder to create or replace.
        state: The adapter, keyed by HF PEFT state-dict names.
        lora: The LoRA shape it was trained with.
        base_model: What to record as ``base_model_name_or_path``.
    """
    out = Path(out_dir)
    with staged_dir(out) as staging:
        save_file({k: state[k].contiguous() for k in sorted(state)}, str(staging / ADAPTER_WEIGHTS))
        config = peft_adapter_config(lora, base_model=base_model, target_modules=targets_of(list(state)))
        (staging / ADAPTER_CONFIG).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    return out
