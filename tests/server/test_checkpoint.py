"""Server checkpoints: a round trip restores the state; a damaged one is ignored, not trusted."""

from __future__ import annotations

import json

import pytest
import torch

from zenfed.errors import ZenfedError
from zenfed.server.aggregation import PlainAggregation
from zenfed.server.checkpoint import GLOBAL_FILE, STATE_FILE, CheckpointStore, RunState

PLAIN = PlainAggregation(method="fedavg", weight_of=lambda num_examples: 1.0)


def adapter(seed: int):
    gen = torch.Generator().manual_seed(seed)
    return {
        "x.lora_A.weight": torch.randn(4, 8, generator=gen),
        "x.lora_B.weight": torch.randn(8, 4, generator=gen),
    }


def state(round_no: int = 2) -> RunState:
    payload, meta = PLAIN.to_checkpoint(adapter(round_no))
    return RunState(
        completed_round=round_no,
        history=[
            {"round": r, "eval_loss": 1.0 / r, "contributors": ["site-1", "site-2"]} for r in range(1, round_no + 1)
        ],
        global_payload=payload,
        global_meta=meta,
    )


def test_save_then_load_restores_the_state_and_the_adapter(tmp_path):
    # Prepare
    store = CheckpointStore(tmp_path / "ckpt")
    saved = state()

    # Execute
    store.save(saved)
    loaded = store.load()

    # Assert
    assert loaded == saved
    restored = PLAIN.from_checkpoint(loaded.global_payload, loaded.global_meta)
    for name, tensor in adapter(2).items():
        assert torch.equal(restored[name], tensor)


def test_a_later_save_replaces_the_earlier_one_without_temp_files(tmp_path):
    # Prepare
    store = CheckpointStore(tmp_path)

    # Execute
    store.save(state(1))
    later = state(3)
    later.finished = True
    store.save(later)
    loaded = store.load()

    # Assert
    assert loaded is not None and loaded.completed_round == 3 and loaded.finished
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([GLOBAL_FILE, STATE_FILE])


def test_a_state_without_a_global_round_trips(tmp_path):
    # Execute
    CheckpointStore(tmp_path).save(RunState())
    loaded = CheckpointStore(tmp_path).load()

    # Assert
    assert loaded == RunState()


def test_no_checkpoint_loads_as_none(tmp_path):
    assert CheckpointStore(tmp_path / "empty").load() is None


def test_a_corrupted_global_file_loads_as_none(tmp_path):
    # Prepare
    store = CheckpointStore(tmp_path)
    store.save(state())
    data = bytearray((tmp_path / GLOBAL_FILE).read_bytes())
    data[-1] ^= 0x01
    (tmp_path / GLOBAL_FILE).write_bytes(bytes(data))

    # Execute / Assert
    assert store.load() is None


def test_a_missing_global_file_or_bad_state_loads_as_none(tmp_path):
    # Prepare
    store = CheckpointStore(tmp_path)
    store.save(state())

    # Execute
    (tmp_path / GLOBAL_FILE).unlink()
    missing = store.load()
    (tmp_path / STATE_FILE).write_text("{truncated")
    unreadable = store.load()
    (tmp_path / STATE_FILE).write_text(json.dumps({"history": []}))
    incomplete = store.load()

    # Assert
    assert missing is None and unreadable is None and incomplete is None


def test_a_plain_job_refuses_an_encrypted_checkpoint():
    # Execute / Assert
    with pytest.raises(ZenfedError, match="encrypted"):
        PLAIN.from_checkpoint(b"whatever", {"kind": "ckks-sum"})
