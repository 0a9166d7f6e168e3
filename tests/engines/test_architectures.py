"""Base models of several families: LoRA targets resolved per architecture, pinned by content."""

from __future__ import annotations

import json
import random
import shutil

import pytest
import torch

from zenfed.data.builtin import TASKS, make_example
from zenfed.engines.architectures import resolve_target_modules
from zenfed.engines.base_model import MANIFEST, model_fingerprint
from zenfed.engines.export import write_peft_adapter
from zenfed.engines.peft import PeftEngine
from zenfed.engines.tiny import build_tiny_model
from zenfed.errors import ModelError
from zenfed.spec import LoraSpec, TrainingSpec

TRAINING = TrainingSpec(local_steps=2, batch_size=4, seq_len=64, learning_rate=0.01, seed=0)


@pytest.fixture(scope="module", params=["qwen2", "mistral"])
def family_model(request, tmp_path_factory):
    return request.param, build_tiny_model(tmp_path_factory.mktemp(request.param) / "model",
                                           architecture=request.param, layers=1, vocab_size=512)


def test_other_families_train_with_groups_resolved_for_their_architecture(family_model, tmp_path):
    # Prepare
    family, folder = family_model
    lora = LoraSpec(rank=2, alpha=4.0, target_modules=("attention", "down_proj"))
    engine = PeftEngine(model_dir=folder, lora=lora, training=TRAINING)
    rng = random.Random(0)
    examples = [make_example(TASKS[1], rng) for _ in range(8)]

    # Execute
    trained = engine.train(adapter=engine.initial_adapter(), examples=examples, steps=2, seed=0)
    adapter_dir = write_peft_adapter(tmp_path / "adapter", trained.adapter, lora=lora, base_model=str(folder))

    # Assert: q, k, v, o and down_proj adapted, nothing else; the exported config names them, and PEFT loads it.
    assert json.loads((folder / "config.json").read_text())["model_type"] == family
    adapted = {name.split(".lora_")[0].rsplit(".", 1)[-1] for name in trained.adapter}
    assert adapted == {"q_proj", "k_proj", "v_proj", "o_proj", "down_proj"}
    config = json.loads((adapter_dir / "adapter_config.json").read_text())
    assert config["target_modules"] == sorted(adapted)
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    loaded = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(folder), adapter_dir)
    name = next(n for n in trained.adapter if ".down_proj.lora_B" in n)
    live = dict(loaded.named_parameters())[name.replace(".lora_B.weight", ".lora_B.default.weight")]
    torch.testing.assert_close(live, trained.adapter[name])


def test_an_architecture_zenfed_does_not_map_is_refused_naming_those_it_does(tmp_path, tiny_model_dir):
    # Prepare: a GPT-2 config (its attention is one c_attn layer).
    from transformers import GPT2Config

    config = GPT2Config(n_layer=1, n_embd=32, n_head=2)

    # Execute / Assert
    with pytest.raises(ModelError, match="'gpt2' architecture.*llama, mistral, phi3, qwen2"):
        resolve_target_modules(("q_proj",), config, model_dir=tmp_path)
    from transformers import AutoConfig

    llama = AutoConfig.from_pretrained(tiny_model_dir)
    with pytest.raises(ModelError, match="'qkv_proj', which a llama model does not have; choose from q_proj"):
        resolve_target_modules(("qkv_proj",), llama, model_dir=tiny_model_dir)
    assert resolve_target_modules(("mlp", "q_proj", "up_proj"), llama, model_dir=tiny_model_dir) == \
        ("gate_proj", "up_proj", "down_proj", "q_proj")


def test_the_pin_covers_config_and_tokenizer_not_the_folders_place_or_manifest(tiny_model_dir, tmp_path):
    # Prepare: the same model at two paths, one without zenfed's manifest.
    copy = shutil.copytree(tiny_model_dir, tmp_path / "elsewhere")
    (copy / MANIFEST).unlink()
    edited = shutil.copytree(copy, tmp_path / "edited")
    config = json.loads((edited / "tokenizer_config.json").read_text())
    config["model_max_length"] = 7
    (edited / "tokenizer_config.json").write_text(json.dumps(config))
    resaved = shutil.copytree(copy, tmp_path / "resaved")  # by another transformers release, reformatted
    saved = json.loads((resaved / "config.json").read_text())
    (resaved / "config.json").write_text(json.dumps({**saved, "transformers_version": "9.9.9"}, indent=4))
    nested = shutil.copytree(copy, tmp_path / "nested")
    (nested / "original").mkdir()
    (nested / "original" / "params.bin").write_bytes(b"another copy of the weights")

    # Execute
    pins = [model_fingerprint(folder) for folder in (tiny_model_dir, copy, edited, resaved, nested)]

    # Assert: place, manifest and the saving library's version do not matter; content anywhere does.
    assert pins[0] == pins[1] == pins[3] and len(pins[0]) == 64
    assert pins[2] != pins[0] and pins[4] != pins[0]
