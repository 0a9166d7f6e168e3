"""A site's device, precision and memory options: resolved and checked up front, trained on for real.

What needs CUDA is marked and skipped without it; everything else runs here, bf16 included
(CPU autocast), because a bf16 site's update must be interchangeable with an fp32 site's.
"""

from __future__ import annotations

import importlib.util
import random

import pytest
import torch

from zenfed.data.builtin import TASKS, make_example
from zenfed.engines.hardware import Hardware, HardwareError, resolve_device
from zenfed.engines.peft import PeftEngine
from zenfed.spec import LoraSpec, TrainingSpec
from zenfed.types import RecordDP

LORA = LoraSpec(rank=4, alpha=8.0, target_modules=("q_proj", "v_proj"))
TRAINING = TrainingSpec(local_steps=3, batch_size=4, seq_len=64, learning_rate=0.01, seed=0)
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (none on this machine)")


@pytest.fixture(scope="module")
def examples():
    rng = random.Random(0)
    return [make_example(TASKS[0], rng) for _ in range(12)]


# -- resolving a policy's settings ------------------------------------------------------------------------
@pytest.mark.parametrize(("requested", "count", "expected"), [
    ("auto", 0, "cpu"), ("auto", 2, "cuda:0"), ("cpu", 2, "cpu"), ("cuda", 1, "cuda:0"), ("CUDA:1", 2, "cuda:1"),
])
def test_devices_resolve_as_the_policy_says(requested, count, expected):
    assert resolve_device(requested, cuda_count=count) == torch.device(expected)


@pytest.mark.parametrize(("requested", "count", "message"), [
    ("cuda", 0, "torch sees no CUDA device here"),
    ("cuda:2", 2, "this machine has 2 CUDA device"),
    ("cuda:x", 1, "malformed"),
    ("tpu", 1, "not one of auto, cpu"),
])
def test_a_device_the_machine_lacks_is_refused_with_the_fix(requested, count, message):
    with pytest.raises(HardwareError, match=message):
        resolve_device(requested, cuda_count=count)


def test_fp16_needs_cuda_and_is_refused_for_dp():
    with pytest.raises(HardwareError, match="fp16-mixed needs a CUDA device"):
        Hardware.for_site(device="cpu", precision="fp16-mixed")
    on_gpu = Hardware.for_site(device="cuda", precision="fp16-mixed", cuda_count=1)
    assert on_gpu.base_dtype == torch.float16 and on_gpu.grad_scaler() is not None
    with pytest.raises(HardwareError, match="set the site's precision to bf16 or fp32"):
        on_gpu.check_dp()


def test_quantized_loading_is_refused_where_bitsandbytes_or_cuda_is_missing(monkeypatch):
    # Execute / Assert: this machine has neither bitsandbytes nor CUDA.
    if importlib.util.find_spec("bitsandbytes") is None:
        with pytest.raises(HardwareError, match="bitsandbytes, which is not installed"):
            Hardware.for_site(device="cpu", quantization="4bit")
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: object() if name == "bitsandbytes" else real_find_spec(name, *a))
    with pytest.raises(HardwareError, match="runs on a CUDA device"):
        Hardware.for_site(device="cpu", quantization="8bit")


# -- training in bf16 and with checkpointing, on this CPU ---------------------------------------------
def test_a_bf16_site_sends_the_same_float32_adapter_layout_as_an_fp32_site(tiny_model_dir, examples):
    # Prepare
    reference = PeftEngine(model_dir=tiny_model_dir, lora=LORA, training=TRAINING)
    half = PeftEngine(model_dir=tiny_model_dir, lora=LORA, training=TRAINING,
                      hardware=Hardware.for_site(device="cpu", precision="bf16"))
    start = reference.initial_adapter()

    # Execute
    fp32 = reference.train(adapter=start, examples=examples, steps=3, seed=0)
    bf16 = half.train(adapter=start, examples=examples, steps=3, seed=0)

    # Assert: same names, shapes and dtype; the base is bfloat16, the LoRA master weights float32;
    # the two trainings agree to bf16 rounding, and differ (the bf16 path really ran).
    assert half.initial_adapter().keys() == start.keys()
    assert {k: (v.shape, v.dtype) for k, v in bf16.adapter.items()} == \
        {k: (v.shape, v.dtype) for k, v in fp32.adapter.items()}
    assert all(v.dtype == torch.float32 and v.device.type == "cpu" for v in bf16.adapter.values())
    weights = dict(half.model.named_parameters())
    assert weights["base_model.model.model.layers.0.mlp.up_proj.weight"].dtype == torch.bfloat16
    assert all(p.dtype == torch.float32 for n, p in weights.items() if "lora_" in n)
    deltas = [(bf16.adapter[k] - fp32.adapter[k]).abs().max().item() for k in fp32.adapter]
    assert 0 < max(deltas) < 0.05
    assert abs(bf16.train_loss - fp32.train_loss) < 0.1


def test_gradient_checkpointing_trains_the_same_adapter_and_dp_steps_run_without_it(tiny_model_dir, examples):
    # Prepare
    plain = PeftEngine(model_dir=tiny_model_dir, lora=LORA, training=TRAINING)
    checkpointed = PeftEngine(model_dir=tiny_model_dir, lora=LORA, training=TRAINING,
                              hardware=Hardware(gradient_checkpointing=True))
    start = plain.initial_adapter()
    dp = RecordDP(clip_norm=1.0, noise_multiplier=0.5, sample_rate=0.5, accountant=None)

    # Execute
    expected = plain.train(adapter=start, examples=examples, steps=2, seed=3)
    recomputed = checkpointed.train(adapter=start, examples=examples, steps=2, seed=3)
    private = checkpointed.train(adapter=start, examples=examples, steps=2, seed=3, dp=dp)

    # Assert: recomputing activations changes nothing; DP-SGD ran (clipped, noised) and left it on.
    assert checkpointed.model.is_gradient_checkpointing
    for name, tensor in expected.adapter.items():
        torch.testing.assert_close(recomputed.adapter[name], tensor, rtol=1e-5, atol=1e-6)
    assert private.metrics["dp_steps"] == 2
    assert any((private.adapter[k] - start[k]).abs().max() > 0 for k in start)


def test_evaluation_and_generation_run_in_the_sites_precision(tiny_model_dir, examples):
    # Prepare
    engine = PeftEngine(model_dir=tiny_model_dir, lora=LORA, training=TRAINING,
                        hardware=Hardware(precision="bf16"))

    # Execute
    result = engine.evaluate(adapter=engine.initial_adapter(), examples=examples[:4], max_new_tokens=3)
    texts = engine.generate(adapter=engine.initial_adapter(), prompts=examples[:2], max_new_tokens=3)

    # Assert
    assert result.num_examples == 4 and torch.isfinite(torch.tensor(result.loss))
    assert len(texts) == 2 and all(isinstance(text, str) for text in texts)


# -- on a GPU --------------------------------------------------------------------------------------------
@needs_cuda
@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_on_cuda_training_dp_and_evaluation_run_on_the_device(tiny_model_dir, examples, precision):
    # Prepare
    engine = PeftEngine(model_dir=tiny_model_dir, lora=LORA, training=TRAINING,
                        hardware=Hardware.for_site(device="cuda", precision=precision))
    cpu = PeftEngine(model_dir=tiny_model_dir, lora=LORA, training=TRAINING)

    # Execute
    trained = engine.train(adapter=engine.initial_adapter(), examples=examples, steps=2, seed=0)
    private = engine.train(adapter=trained.adapter, examples=examples, steps=2, seed=0,
                           dp=RecordDP(clip_norm=1.0, noise_multiplier=0.5, sample_rate=0.5, accountant=None))
    evaluated = engine.evaluate(adapter=private.adapter, examples=examples[:4], max_new_tokens=2)

    # Assert: the model is on the GPU; what leaves is a CPU float32 adapter a CPU site loads.
    assert next(engine.model.parameters()).device.type == "cuda"
    assert all(v.device.type == "cpu" and v.dtype == torch.float32 for v in private.adapter.values())
    cpu.load_adapter(private.adapter)
    assert evaluated.num_examples == 4


@needs_cuda
@pytest.mark.skipif(importlib.util.find_spec("bitsandbytes") is None, reason="needs bitsandbytes (not installed here)")
def test_a_4bit_base_trains_float32_lora_on_cuda(tiny_model_dir, examples):
    # Prepare
    engine = PeftEngine(model_dir=tiny_model_dir, lora=LORA, training=TRAINING,
                        hardware=Hardware.for_site(device="cuda", precision="bf16", quantization="4bit"))

    # Execute
    trained = engine.train(adapter=engine.initial_adapter(), examples=examples, steps=2, seed=0)

    # Assert: the base is quantized, the update float32 and shaped as any site's.
    assert any("4bit" in type(m).__name__ for m in engine.model.modules())
    assert trained.adapter.keys() == PeftEngine(model_dir=tiny_model_dir, lora=LORA,
                                                training=TRAINING).initial_adapter().keys()
    assert all(v.dtype == torch.float32 for v in trained.adapter.values())
