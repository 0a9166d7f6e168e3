"""The PEFT engine on the tiny model: deterministic start, HF PEFT names, learning, evaluation."""

from __future__ import annotations

import random

import pytest
import torch

from zenfed.data.builtin import TASKS, make_example
from zenfed.engines import Engine, make_engine
from zenfed.engines.peft import PeftEngine
from zenfed.errors import AdapterError, DataError, ModelError
from zenfed.spec import LoraSpec, TrainingSpec

LORA = LoraSpec(rank=4, alpha=8.0, target_modules=("q_proj", "v_proj"))
TRAINING = TrainingSpec(batch_size=4, seq_len=96, learning_rate=1e-2, seed=11)


@pytest.fixture(scope="module")
def engine(tiny_model_dir) -> PeftEngine:
    return PeftEngine(model_dir=tiny_model_dir, lora=LORA, training=TRAINING)


@pytest.fixture(scope="module")
def examples():
    rng = random.Random(0)
    return [make_example(TASKS[i % len(TASKS)], rng) for i in range(24)]


@pytest.fixture(scope="module")
def trained(engine, examples):
    return engine.train(adapter=engine.initial_adapter(), examples=examples, steps=8, seed=1)


def test_the_engine_speaks_the_protocol(engine):
    assert isinstance(engine, Engine)


def test_initial_adapter_is_identical_across_engine_instances(engine, tiny_model_dir):
    # Prepare
    other = PeftEngine(model_dir=tiny_model_dir, lora=LORA, training=TRAINING)

    # Execute
    first, again, second = (
        engine.initial_adapter(),
        engine.initial_adapter(),
        other.initial_adapter(),
    )

    # Assert
    assert list(first) == list(second)
    for name in first:
        assert torch.equal(first[name], second[name]) and torch.equal(first[name], again[name])


def test_initial_adapter_depends_on_the_seed(tiny_model_dir, engine):
    # Prepare
    reseeded = PeftEngine(model_dir=tiny_model_dir, lora=LORA, training=TRAINING.model_copy(update={"seed": 12}))

    # Execute
    a, b = engine.initial_adapter(), reseeded.initial_adapter()

    # Assert: lora_A differs, lora_B is zero for both (the adapted model starts as the base model).
    a_names = [n for n in a if ".lora_A." in n]
    assert any(not torch.equal(a[n], b[n]) for n in a_names)
    assert all(torch.count_nonzero(a[n]) == 0 for n in a if ".lora_B." in n)


def test_adapter_keys_are_hf_peft_names_in_float32(engine):
    # Execute
    state = engine.initial_adapter()

    # Assert: 2 layers x (q_proj, v_proj) x (A, B) tensors, PEFT state-dict names, rank-4 shapes.
    assert len(state) == 2 * 2 * 2
    for name, tensor in state.items():
        assert name.startswith("base_model.model.model.layers.")
        assert (".lora_A." in name) != (".lora_B." in name)
        assert name.endswith(".weight") and ".default" not in name
        assert tensor.dtype == torch.float32 and tensor.is_contiguous()
        assert 4 in tensor.shape
    assert {n.split(".")[-3] for n in state} == {"q_proj", "v_proj"}


def test_the_initial_adapter_leaves_the_base_model_unchanged(engine, examples, tiny_model_dir):
    # Prepare
    from transformers import AutoModelForCausalLM

    from zenfed.data.tokenize import collate, tokenize_all

    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir, torch_dtype=torch.float32).eval()
    batch = collate(
        tokenize_all(engine.tokenizer, examples[:4], max_len=96),
        pad_id=engine.tokenizer.pad_token_id,
    )
    engine.load_adapter(engine.initial_adapter())

    # Execute
    with torch.no_grad():
        ours = engine.model.eval()(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        theirs = base(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits

    # Assert
    assert torch.allclose(ours, theirs, atol=1e-6)


def test_training_lowers_the_loss(engine, examples, trained):
    # Prepare
    start = engine.initial_adapter()

    # Execute
    before = engine.evaluate(adapter=start, examples=examples, max_new_tokens=1)
    after = engine.evaluate(adapter=trained.adapter, examples=examples, max_new_tokens=1)

    # Assert: the response loss on the training examples drops clearly (about 7.0 -> 6.6 here).
    assert after.loss < before.loss - 0.2
    assert trained.steps == 8 and trained.num_examples == len(examples)
    assert before.loss > trained.train_loss > 0


def test_training_changes_the_adapter_and_returns_wire_tensors(engine, trained):
    # Prepare
    start = engine.initial_adapter()

    # Assert
    assert list(trained.adapter) == list(start)
    assert any(not torch.equal(trained.adapter[n], start[n]) for n in start if ".lora_B." in n)
    assert all(t.dtype == torch.float32 for t in trained.adapter.values())


def test_training_is_reproducible_from_the_same_adapter_and_seed(engine, examples):
    # Execute
    one = engine.train(adapter=engine.initial_adapter(), examples=examples, steps=2, seed=5)
    two = engine.train(adapter=engine.initial_adapter(), examples=examples, steps=2, seed=5)

    # Assert
    assert one.train_loss == pytest.approx(two.train_loss, rel=1e-5)
    for name in one.adapter:
        assert torch.allclose(one.adapter[name], two.adapter[name], atol=1e-6)


def test_evaluate_returns_loss_and_accuracy_in_range(engine, examples, trained):
    # Execute
    result = engine.evaluate(adapter=trained.adapter, examples=examples[:6], max_new_tokens=3)

    # Assert
    assert result.num_examples == 6
    assert 0.0 < result.loss < 20.0
    assert 0.0 <= result.accuracy <= 1.0
    assert result.accuracy * 6 == pytest.approx(round(result.accuracy * 6))


def test_generate_returns_one_string_per_prompt(engine, examples):
    # Execute
    out = engine.generate(adapter=engine.initial_adapter(), prompts=examples[:3], max_new_tokens=3)

    # Assert
    assert len(out) == 3 and all(isinstance(s, str) for s in out)


@pytest.mark.parametrize("damage", ["drop", "extra", "shape", "dtype"])
def test_a_mismatched_adapter_is_refused(engine, examples, damage):
    # Prepare
    bad = engine.initial_adapter()
    name = sorted(bad)[0]
    if damage == "drop":
        del bad[name]
    elif damage == "extra":
        bad["base_model.model.model.layers.9.self_attn.q_proj.lora_A.weight"] = torch.zeros(4, 64)
    elif damage == "shape":
        bad[name] = torch.zeros(bad[name].shape[0] + 1, bad[name].shape[1])
    else:
        bad[name] = bad[name].double()

    # Execute / Assert
    with pytest.raises(AdapterError):
        engine.train(adapter=bad, examples=examples, steps=1, seed=0)
    with pytest.raises(AdapterError):
        engine.evaluate(adapter=bad, examples=examples[:2], max_new_tokens=1)


def test_no_examples_is_a_data_error(engine):
    # Execute / Assert
    with pytest.raises(DataError):
        engine.train(adapter=engine.initial_adapter(), examples=[], steps=1, seed=0)
    with pytest.raises(DataError):
        engine.evaluate(adapter=engine.initial_adapter(), examples=[], max_new_tokens=1)


def test_target_modules_the_model_lacks_are_a_model_error(tiny_model_dir):
    # Prepare
    engine = PeftEngine(model_dir=tiny_model_dir, lora=LoraSpec(target_modules=("no_such_proj",)), training=TRAINING)

    # Execute / Assert
    with pytest.raises(ModelError, match="a llama model does not have"):
        engine.initial_adapter()


def test_make_engine_builds_the_engine_the_spec_names(tiny_job_spec, tiny_model_dir):
    # Execute
    engine = make_engine(tiny_job_spec(), model_dir=tiny_model_dir)

    # Assert
    assert isinstance(engine, PeftEngine)
    assert engine.lora.rank == 4


def test_lora_layers_adapt_only_those_layers_and_export_loads_in_peft(tiny_model_dir, tmp_path):
    # Prepare
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from zenfed.engines.export import write_peft_adapter

    lora = LORA.model_copy(update={"layers": (1,)})
    engine = PeftEngine(model_dir=tiny_model_dir, lora=lora, training=TRAINING)

    # Execute
    state = engine.initial_adapter()
    state = {k: (v + 0.05 if ".lora_B." in k else v) for k, v in state.items()}
    folder = write_peft_adapter(tmp_path / "adapter", state, lora=lora, base_model=str(tiny_model_dir))
    loaded = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir), folder)

    # Assert: layer 1's q and v only (A and B), and PEFT puts them back in the same place
    assert len(state) == 2 * 2 and all(".layers.1." in name for name in state)
    lora_names = [n for n, _ in loaded.named_parameters() if "lora_" in n]
    assert len(lora_names) == 4 and all(".layers.1." in n for n in lora_names)


def test_lora_layers_past_the_models_last_layer_are_a_model_error(tiny_model_dir):
    # Prepare: the tiny model has 2 decoder layers (0 and 1)
    engine = PeftEngine(model_dir=tiny_model_dir, lora=LORA.model_copy(update={"layers": (1, 2)}),
                        training=TRAINING)

    # Execute / Assert
    with pytest.raises(ModelError, match=r"layer\(s\) \[2\].*2 decoder layers"):
        engine.initial_adapter()


def test_a_batch_larger_than_a_micro_batch_gets_the_whole_batch_gradient(engine, examples):
    # Prepare: more examples than one micro-batch, with responses of different lengths
    from zenfed.data.tokenize import collate, tokenize_all
    from zenfed.engines.peft import MICRO_BATCH

    engine.load_adapter(engine.initial_adapter())
    model = engine.model
    batch = tokenize_all(engine.tokenizer, examples, max_len=TRAINING.seq_len)
    assert len(batch) > MICRO_BATCH
    params = {name: p for name, p in model.named_parameters() if p.requires_grad}
    model.zero_grad(set_to_none=True)
    whole_loss = model(**collate(batch, pad_id=engine.tokenizer.pad_token_id)).loss
    whole_loss.backward()
    expected = {name: p.grad.clone() for name, p in params.items()}
    model.zero_grad(set_to_none=True)

    # Act
    loss = engine._accumulate_gradients(batch)

    # Assert: same loss and the same gradient as one pass over the whole batch
    assert loss == pytest.approx(float(whole_loss), rel=1e-5)
    for name, p in params.items():
        assert torch.allclose(p.grad, expected[name], rtol=1e-4, atol=1e-6), name
    model.zero_grad(set_to_none=True)
