"""The NeMo engine on a tiny Llama: same start, same training and same logits as PEFT."""

import logging
import random
from pathlib import Path

import pytest
import torch

from zenfed.data.builtin import TASKS, make_example
from zenfed.data.tokenize import collate, tokenize_all
from zenfed.engines import Engine
from zenfed.engines.export import write_peft_adapter
from zenfed.engines.nemo import NemoEngine
from zenfed.engines.peft import PeftEngine
from zenfed.engines.tiny import build_tiny_model
from zenfed.errors import AdapterError, DataError
from zenfed.privacy.dp import PrivacyAccountant
from zenfed.spec import LoraSpec, TrainingSpec
from zenfed.types import RecordDP

LORA = LoraSpec(rank=4, alpha=8.0)
TRAINING = TrainingSpec(batch_size=4, seq_len=128, learning_rate=1e-2, seed=3)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    return build_tiny_model(tmp_path_factory.mktemp("tiny") / "model")


@pytest.fixture(scope="module")
def nemo(model_dir) -> NemoEngine:
    engine = NemoEngine(model_dir=model_dir, lora=LORA, training=TRAINING)
    engine.initial_adapter()  # build once for the module (NeMo sleeps 2 s per model build)
    return engine


@pytest.fixture(scope="module")
def peft(model_dir) -> PeftEngine:
    return PeftEngine(model_dir=model_dir, lora=LORA, training=TRAINING)


@pytest.fixture(scope="module")
def examples():
    rng = random.Random(0)
    return [make_example(TASKS[i % len(TASKS)], rng) for i in range(24)]


@pytest.fixture(scope="module")
def trained(nemo, examples):
    return nemo.train(adapter=nemo.initial_adapter(), examples=examples, steps=6, seed=5)


def test_engine_speaks_the_protocol(nemo):
    assert isinstance(nemo, Engine)


def test_initial_adapter_equals_the_peft_engines(nemo, peft):
    # Execute
    ours, theirs = nemo.initial_adapter(), peft.initial_adapter()

    # Assert: same names, shapes, dtype and values, so mixed federations start identically.
    assert sorted(ours) == sorted(theirs)
    assert all(torch.equal(ours[k], theirs[k]) for k in ours)
    assert all(v.dtype == torch.float32 for v in ours.values())



def test_lora_on_chosen_layers_gives_both_engines_the_same_adapter(model_dir):
    # Prepare: LoRA on the tiny model's second decoder layer only
    lora = LORA.model_copy(update={"layers": (1,)})

    # Execute
    ours = NemoEngine(model_dir=model_dir, lora=lora, training=TRAINING).initial_adapter()
    theirs = PeftEngine(model_dir=model_dir, lora=lora, training=TRAINING).initial_adapter()

    # Assert: the same tensors, all in layer 1
    assert sorted(ours) == sorted(theirs)
    assert ours and all(".layers.1." in name for name in ours)
    assert all(torch.equal(ours[k], theirs[k]) for k in ours)

def test_training_matches_peft_step_for_step(nemo, peft, examples, trained):
    # Execute: the PEFT reference, same start, data, steps and seed.
    reference = peft.train(adapter=peft.initial_adapter(), examples=examples, steps=6, seed=5)

    # Assert
    assert trained.steps == 6 and trained.num_examples == len(examples)
    assert trained.train_loss == pytest.approx(reference.train_loss, rel=1e-5)
    diff = max(float((trained.adapter[k] - reference.adapter[k]).abs().max())
               for k in trained.adapter)
    assert diff < 1e-5


def test_dpo_in_zenfeds_loop_on_the_nemo_model_matches_peft(nemo, peft):
    # Prepare: a reference that is not the start (one SFT-like step), and preference pairs.
    from zenfed.data.builtin_preferences import make_preference_pair

    rng = random.Random(2)
    pairs = [make_preference_pair(TASKS[i % 3], rng) for i in range(12)]
    reference = peft.train(adapter=peft.initial_adapter(), examples=[p.chosen_example() for p in pairs], steps=1,
                           seed=1).adapter

    # Execute: the same DPO steps from the same start in both engines.
    ours = nemo.train_preferences(adapter=reference, reference=reference, pairs=pairs, steps=3, seed=4, beta=0.1)
    theirs = peft.train_preferences(adapter=reference, reference=reference, pairs=pairs, steps=3, seed=4, beta=0.1)
    scored = nemo.evaluate_preferences(adapter=ours.adapter, pairs=pairs, beta=0.1)

    # Assert: the NeMo model's LoRA layers train to PEFT's adapter, and B moved.
    assert ours.train_loss == pytest.approx(theirs.train_loss, rel=1e-4)
    assert max(float((ours.adapter[k] - theirs.adapter[k]).abs().max()) for k in ours.adapter) < 1e-4
    assert any(not torch.equal(ours.adapter[k], reference[k]) for k in reference if ".lora_B." in k)
    assert scored.num_pairs == 12 and scored.reward_margin != 0


def test_dp_sgd_matches_peft_step_for_step_and_keeps_its_optimizer_across_rounds(nemo, peft, examples):
    # Prepare: no noise and every record in every batch make DP-SGD deterministic; a clip
    # norm this small clips every example's gradient, so the clipping is compared too.
    exact = RecordDP(noise_multiplier=0.0, clip_norm=0.05, sample_rate=1.0, accountant=None)
    data = examples[:8]
    rounds = {}

    # Execute: two rounds in each engine, the second from the first's adapter and optimizer.
    for engine in (nemo, peft):
        first = engine.train(adapter=engine.initial_adapter(), examples=data, steps=2, seed=0, dp=exact)
        second = engine.train(adapter=first.adapter, examples=data, steps=2, seed=0, dp=exact,
                              optimizer_state=first.optimizer_state)
        rounds[engine.name] = (first, second)

    # Assert: the same clipped steps, and the site's Adam moments carried into round 2.
    for index in (0, 1):
        ours, theirs = rounds["nemo"][index].adapter, rounds["peft"][index].adapter
        assert max(float((ours[k] - theirs[k]).abs().max()) for k in ours) < 1e-5
    steps = {int(state["step"]) for state in rounds["nemo"][1].optimizer_state["state"].values()}
    assert steps == {4}


def test_dp_sgd_through_nemo_is_noisy_and_accounted(nemo, examples):
    # Prepare
    accountants = [PrivacyAccountant(), PrivacyAccountant()]
    start = nemo.initial_adapter()

    # Execute: the same seed twice, at a Poisson rate of 4 records in 24.
    results = [nemo.train(adapter=start, examples=examples, steps=3, seed=1,
                          dp=RecordDP(noise_multiplier=1.0, clip_norm=1.0, sample_rate=4 / 24, accountant=a))
               for a in accountants]

    # Assert: every step was accounted at the true rate, and the noise is not the seed's.
    assert accountants[0].history == [{"noise_multiplier": 1.0, "sample_rate": 4 / 24, "num_steps": 3}]
    assert results[0].metrics["dp_steps"] == 3
    assert any(not torch.equal(results[0].adapter[k], results[1].adapter[k]) for k in start)


def test_training_reduces_loss(nemo, examples, trained):
    # Execute
    before = nemo.evaluate(adapter=nemo.initial_adapter(), examples=examples[:8], max_new_tokens=2)
    after = nemo.evaluate(adapter=trained.adapter, examples=examples[:8], max_new_tokens=2)

    # Assert
    assert after.loss < before.loss - 0.1
    assert trained.metrics["train_loss_last"] < trained.train_loss


def test_evaluate_reports_loss_accuracy_and_agrees_with_peft(nemo, peft, examples, trained):
    # Execute
    ours = nemo.evaluate(adapter=trained.adapter, examples=examples[:8], max_new_tokens=3)
    theirs = peft.evaluate(adapter=trained.adapter, examples=examples[:8], max_new_tokens=3)

    # Assert
    assert ours.num_examples == 8 and 0.0 <= ours.accuracy <= 1.0
    assert ours.loss == pytest.approx(theirs.loss, rel=1e-5)
    assert ours.accuracy == theirs.accuracy


def test_nemo_adapter_loads_in_peft_with_the_same_logits(
    nemo, model_dir, examples, trained, tmp_path
):
    # Prepare: the NeMo-trained adapter written as a PEFT folder, and a batch.
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    folder = write_peft_adapter(
        tmp_path / "adapter", trained.adapter, lora=LORA, base_model=str(model_dir)
    )
    batch = collate(tokenize_all(nemo.tokenizer, examples[:4], max_len=128),
                    pad_id=nemo.tokenizer.pad_token_id)
    inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}

    # Execute
    base = AutoModelForCausalLM.from_pretrained(model_dir, torch_dtype=torch.float32)
    with torch.no_grad():
        base_logits = base(**inputs).logits
        peft_logits = PeftModel.from_pretrained(base, folder).eval()(**inputs).logits
        nemo.load_adapter(trained.adapter)
        nemo_logits = nemo.module.forward(dict(inputs)).logits

    # Assert: the adapter matters, and both stacks compute the same function.
    mask = inputs["attention_mask"].bool()
    assert float((peft_logits - base_logits)[mask].abs().max()) > 1e-3
    assert float((peft_logits - nemo_logits)[mask].abs().max()) < 1e-5


def test_generate_returns_one_completion_per_prompt(nemo, examples, trained):
    outputs = nemo.generate(adapter=trained.adapter, prompts=examples[:3], max_new_tokens=3)
    assert len(outputs) == 3 and all(isinstance(o, str) for o in outputs)


def test_foreign_adapter_and_empty_data_are_refused(nemo, examples):
    # Prepare: an adapter missing one tensor.
    adapter = nemo.initial_adapter()
    adapter.pop(sorted(adapter)[0])

    # Execute / Assert
    with pytest.raises(AdapterError, match="does not match this job's LoRA shape"):
        nemo.train(adapter=adapter, examples=examples, steps=1, seed=0)
    with pytest.raises(DataError, match="no training examples"):
        nemo.train(adapter=nemo.initial_adapter(), examples=[], steps=1, seed=0)


def test_rounds_do_not_leak_nemo_log_files(nemo, trained):
    # Assert: NeMoLogger's per-run file handlers are closed after every round.
    for name in ("nemo_logger", "megatron.core"):
        paths = [getattr(h, "baseFilename", "") for h in logging.getLogger(name).handlers]
        assert not any(p.startswith(str(nemo._log_dir)) for p in paths)


def test_fedprox_term_runs_inside_nemos_loop_as_in_pefts(nemo, peft, examples):
    # Prepare: a strong proximal term anchored at the start
    from zenfed.strategies.fedprox import ProximalTerm

    start = nemo.initial_adapter()

    # Execute
    ours = nemo.train(adapter=start, examples=examples, steps=6, seed=5,
                      loss_term=ProximalTerm(global_adapter=start, mu=5.0))
    theirs = peft.train(adapter=start, examples=examples, steps=6, seed=5,
                        loss_term=ProximalTerm(global_adapter=start, mu=5.0))
    free = peft.train(adapter=start, examples=examples, steps=6, seed=5)

    # Assert: the same steps in both engines, and different from training without the term
    assert max(float((ours.adapter[k] - theirs.adapter[k]).abs().max()) for k in ours.adapter) < 1e-5
    assert max(float((theirs.adapter[k] - free.adapter[k]).abs().max()) for k in ours.adapter) > 1e-4


def test_frozen_a_stays_put_inside_nemos_loop_as_in_pefts(nemo, peft, examples):
    # Prepare: FFA-LoRA's frozen A
    start = nemo.initial_adapter()
    frozen = {name for name in start if ".lora_A." in name}

    # Execute
    ours = nemo.train(adapter=start, examples=examples, steps=6, seed=5, frozen=frozen)
    theirs = peft.train(adapter=start, examples=examples, steps=6, seed=5, frozen=frozen)

    # Assert: A untouched in both engines, and both took the same steps on B
    assert all(torch.equal(ours.adapter[k], start[k]) for k in frozen)
    assert max(float((ours.adapter[k] - theirs.adapter[k]).abs().max()) for k in ours.adapter) < 1e-5


def test_bf16_with_checkpointing_trains_float32_lora_as_the_fp32_engine_does(model_dir, nemo, examples):
    # Prepare: the site policy's bf16 and gradient checkpointing, on this CPU.
    from zenfed.engines.hardware import Hardware

    half = NemoEngine(model_dir=model_dir, lora=LORA, training=TRAINING,
                      hardware=Hardware(precision="bf16", gradient_checkpointing=True))
    start = nemo.initial_adapter()

    # Execute
    reference = nemo.train(adapter=start, examples=examples, steps=2, seed=5)
    result = half.train(adapter=start, examples=examples, steps=2, seed=5)

    # Assert: checkpointing is on, the LoRA weights (every one of them moved) stay float32 and close to fp32's.
    assert half.module.model.is_gradient_checkpointing and half.runtime.precision == "bf16-mixed"
    assert all(p.dtype == torch.float32 for n, p in half.module.named_parameters() if "lora_" in n)
    moved = [k for k in start if ".lora_B." in k and float(result.adapter[k].abs().max()) > 0]
    assert moved == [k for k in start if ".lora_B." in k]
    assert max(float((result.adapter[k] - reference.adapter[k]).abs().max()) for k in start) < 0.05
