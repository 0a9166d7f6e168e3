"""The NeMo engine's hardware: the site policy's device and precision, the launch by environment."""

import types

import pytest
import torch

from zenfed.engines.hardware import Hardware
from zenfed.engines.nemo_runtime import NemoConfigError, NemoRuntime

GPU = torch.device("cuda", 1)


def test_defaults_are_cpu_fp32_single_device():
    # Execute
    runtime = NemoRuntime.for_site(Hardware(), {})
    kwargs = runtime.trainer_kwargs()

    # Assert
    assert (runtime.accelerator, runtime.devices, runtime.precision) == ("cpu", 1, "32")
    assert kwargs["accelerator"] == "cpu" and kwargs["precision"] == "32"
    assert type(kwargs["strategy"]).__name__ == "SingleDeviceStrategy"
    assert kwargs["strategy"].root_device == torch.device("cpu")


def test_a_gpu_site_policy_maps_to_lightning_mixed_precision_on_its_own_device():
    # Prepare: the policy's cuda:1 in bf16 (built directly: this machine has no GPU).
    hardware = Hardware(device=GPU, precision="bf16")

    # Execute
    single = NemoRuntime.for_site(hardware, {})
    data_parallel = NemoRuntime.for_site(hardware, {"ZENFED_NEMO_DEVICES": "4"})

    # Assert: Lightning's bf16-mixed keeps float32 weights, on the device the site named.
    assert (single.accelerator, single.precision) == ("gpu", "bf16-mixed")
    assert single.trainer_kwargs()["strategy"].root_device == GPU
    assert data_parallel.world_size == 4 and data_parallel.strategy_name() == "ddp"
    fp16 = NemoRuntime.for_site(Hardware(device=GPU, precision="fp16-mixed"), {})
    assert fp16.precision == "16-mixed"


def test_bf16_runs_on_a_cpu_and_fp16_does_not():
    assert NemoRuntime.for_site(Hardware(precision="bf16"), {}).precision == "bf16-mixed"
    with pytest.raises(NemoConfigError, match="needs a GPU"):
        NemoRuntime.for_site(Hardware(precision="fp16-mixed"), {})


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"ZENFED_NEMO_DEVICES": "two"}, "not an integer"),
        ({"ZENFED_NEMO_DEVICES": "0"}, "at least 1"),
        ({"ZENFED_NEMO_DEVICES": "2", "ZENFED_NEMO_STRATEGY": "single"}, "STRATEGY=ddp"),
        ({"ZENFED_NEMO_STRATEGY": "fsdp9"}, "STRATEGY='fsdp9'"),
    ],
)
def test_bad_launch_settings_are_refused_with_the_fix(env, message):
    with pytest.raises(NemoConfigError, match=message):
        NemoRuntime.for_site(Hardware(device=GPU), env)


def test_the_nemo_engine_refuses_8bit_loading_before_building_anything(tmp_path):
    from zenfed.engines.nemo import NemoEngine
    from zenfed.errors import ModelError
    from zenfed.spec import LoraSpec, TrainingSpec

    with pytest.raises(ModelError, match="not in 8 bits"):
        NemoEngine(model_dir=tmp_path, lora=LoraSpec(), training=TrainingSpec(),
                   hardware=Hardware(device=GPU, quantization="8bit"))


def test_data_parallel_ranks_split_each_planned_batch():
    # Prepare: one step of four examples, seen by rank 1 of 2.
    from zenfed.data.tokenize import TokenizedExample
    from zenfed.engines.nemo_data import PlannedDataModule

    data = [TokenizedExample((i, i + 1, i + 2), (-100, i + 1, i + 2), 1) for i in range(10, 50, 10)]
    module = PlannedDataModule(data=data, plan=[[3, 2, 1, 0]], pad_id=0, seq_len=16)
    module.trainer = types.SimpleNamespace(global_rank=1, world_size=2)

    # Execute
    batches = list(module.train_dataloader())

    # Assert: rows 1 and 3 of the step (examples 2 and 0); labels shifted to next-token targets.
    assert len(batches) == 1
    assert batches[0]["input_ids"].tolist() == [[30, 31, 32], [10, 11, 12]]
    assert batches[0]["labels"].tolist() == [[31, 32, -100], [11, 12, -100]]
