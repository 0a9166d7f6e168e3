import torch

from zenfed.data import make_builtin
from zenfed.data.jsonl import load_jsonl
from zenfed.engines.peft import PeftEngine
from zenfed.spec import LoraSpec, TrainingSpec


def test_optimizer_state_continues_across_rounds(tiny_model_dir, tmp_path):
    # Prepare
    make_builtin(tmp_path, sites=1, train_per_site=32, valid_per_site=4, test_per_task=1)
    examples = load_jsonl(tmp_path / "site-1" / "train.jsonl")
    engine = PeftEngine(model_dir=tiny_model_dir, lora=LoraSpec(rank=4, alpha=8),
                        training=TrainingSpec(batch_size=4, seq_len=128, learning_rate=5e-3))
    start = engine.initial_adapter()
    first = engine.train(adapter=start, examples=examples, steps=3, seed=1)

    # Execute: the next round from the same adapter, with and without the kept state.
    resumed = engine.train(adapter=first.adapter, examples=examples, steps=2, seed=2,
                           optimizer_state=first.optimizer_state)
    restarted = engine.train(adapter=first.adapter, examples=examples, steps=2, seed=2)

    # Assert: the state records every step taken, and continuing it changes the update.
    steps = {int(s["step"]) for s in resumed.optimizer_state["state"].values()}
    assert steps == {5}
    assert any(not torch.allclose(resumed.adapter[k], restarted.adapter[k]) for k in resumed.adapter)
    # The state is the site's own: it is never part of the adapter that is sent.
    assert not any("exp_avg" in k for k in resumed.adapter)
