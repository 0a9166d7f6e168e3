"""Server checkpoints: a round trip restores the state; a damaged checkpoint is ignored, not trusted."""

from __future__ import annotations

import json

import torch

from zenfed.controllers.checkpoint import GLOBAL_FILE, STATE_FILE, CheckpointStore, RunState


def state(round_no: int = 2) -> RunState:
    gen = torch.Generator().manual_seed(round_no)
    return RunState(
        completed_round=round_no,
        history=[{"round": r, "eval_loss": 1.0 / r, "contributors": ["site-1", "site-2"]}
                 for r in range(1, round_no + 1)],
        global_adapter={"x.lora_A.weight": torch.randn(4, 8, generator=gen),
                        "x.lora_B.weight": torch.randn(8, 4, generator=gen)},
    )


def test_save_then_load_restores_the_state(tmp_path):
    # Prepare
    store = CheckpointStore(tmp_path / "ckpt")
    saved = state()

    # Execute
    store.save(saved)
    loaded = store.load()

    # Assert
    assert loaded is not None
    assert loaded.completed_round == 2 and loaded.history == saved.history and not loaded.finished
    assert loaded.global_adapter is not None
    for name, tensor in saved.global_adapter.items():
        assert torch.equal(loaded.global_adapter[name], tensor)


def test_a_later_save_replaces_the_earlier_one_without_temp_files(tmp_path):
    # Prepare
    store = CheckpointStore(tmp_path)

    # Execute
    store.save(state(1))
    store.save(RunState(**{**state(3).__dict__, "finished": True}))
    loaded = store.load()

    # Assert
    assert loaded is not None and loaded.completed_round == 3 and loaded.finished
    assert sorted(p.name for p in tmp_path.iterdir()) == [GLOBAL_FILE, STATE_FILE]


def test_a_state_without_adapter_round_trips(tmp_path):
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
