"""The NeMo engine's hardware settings: CPU fp32 by default, GPU bf16 by environment only."""

import types

import pytest
import torch

from zenfed.engines.nemo_runtime import NemoConfigError, NemoRuntime


def test_defaults_are_cpu_fp32_single_device():
    # Execute
    runtime = NemoRuntime.from_env({})
    kwargs = runtime.trainer_kwargs()

    # Assert
    assert (runtime.accelerator, runtime.devices, runtime.precision) == ("cpu", 1, "32")
    assert runtime.model_dtype == torch.float32
    assert kwargs["accelerator"] == "cpu" and kwargs["precision"] == "32"
    assert type(kwargs["strategy"]).__name__ == "SingleDeviceStrategy"
    assert kwargs["strategy"].root_device == torch.device("cpu")


def test_gpu_site_configures_bf16_and_ddp_by_environment():
    # Prepare
    env = {
        "ZENFED_NEMO_ACCELERATOR": "GPU", "ZENFED_NEMO_DEVICES": "4",
        "ZENFED_NEMO_PRECISION": "bf16-true",
    }

    # Execute
    runtime = NemoRuntime.from_env(env)

    # Assert
    assert runtime.accelerator == "gpu" and runtime.world_size == 4
    assert runtime.strategy_name() == "ddp"
    assert runtime.model_dtype == torch.bfloat16
    mixed = NemoRuntime.from_env({**env, "ZENFED_NEMO_PRECISION": "bf16-mixed"})
    assert mixed.model_dtype == torch.float32


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"ZENFED_NEMO_ACCELERATOR": "tpu"}, "ACCELERATOR='tpu'"),
        ({"ZENFED_NEMO_PRECISION": "bf16-mixed"}, "needs a GPU"),
        ({"ZENFED_NEMO_DEVICES": "two"}, "not an integer"),
        ({"ZENFED_NEMO_DEVICES": "0"}, "at least 1"),
        ({"ZENFED_NEMO_ACCELERATOR": "gpu", "ZENFED_NEMO_DEVICES": "2",
          "ZENFED_NEMO_STRATEGY": "single"}, "STRATEGY=ddp"),
        ({"ZENFED_NEMO_STRATEGY": "fsdp9"}, "STRATEGY='fsdp9'"),
    ],
)
def test_bad_settings_are_refused_with_the_fix(env, message):
    with pytest.raises(NemoConfigError, match=message):
        NemoRuntime.from_env(env)


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
