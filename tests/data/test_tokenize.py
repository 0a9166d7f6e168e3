"""Chat templating with the tiny model's tokenizer: labels only on the response (+ end of turn)."""

from __future__ import annotations

import pytest

from zenfed.data import Example, Message, collate, tokenize_example
from zenfed.data.tokenize import IGNORE_INDEX, collate_prompts, prompt_ids
from zenfed.errors import DataError


@pytest.fixture(scope="module")
def tokenizer(tiny_model_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_model_dir)


EXAMPLE = Example(
    prompt=(
        Message("system", "Answer with a code."),
        Message("user", "Give the triage code (P1, P2, P3 or P4) for this note.\n\nAna reports a rash."),
    ),
    response="P3",
)


def test_only_the_response_and_its_end_of_turn_are_labelled(tokenizer):
    # Execute
    item = tokenize_example(tokenizer, EXAMPLE, max_len=256)

    # Assert
    labelled = [tok for tok, lab in zip(item.input_ids, item.labels, strict=True) if lab != IGNORE_INDEX]
    assert labelled == list(item.input_ids[item.prompt_len :])
    assert tokenizer.decode(labelled[:-1]) == "P3"
    assert labelled[-1] == tokenizer.eos_token_id
    assert all(lab == IGNORE_INDEX for lab in item.labels[: item.prompt_len])
    # The prompt is the template plus the generation prompt: what the model sees at inference.
    assert list(item.input_ids[: item.prompt_len]) == prompt_ids(tokenizer, EXAMPLE)


def test_a_long_prompt_is_cut_from_the_left_and_the_response_kept(tokenizer):
    # Prepare
    long = Example(prompt=(Message("user", "filler words " * 200 + "the end"),), response="Q-ACC")
    full = tokenize_example(tokenizer, long, max_len=4096)

    # Execute
    cut = tokenize_example(tokenizer, long, max_len=32)

    # Assert
    assert len(cut.input_ids) == 32
    response_len = len(full.input_ids) - full.prompt_len
    assert cut.input_ids[-response_len:] == full.input_ids[-response_len:]
    assert cut.labels[-response_len:] == full.labels[-response_len:]
    assert cut.input_ids[: cut.prompt_len] == full.input_ids[full.prompt_len - cut.prompt_len : full.prompt_len]


def test_a_response_longer_than_seq_len_is_a_data_error(tokenizer):
    # Prepare
    example = Example(prompt=(Message("user", "hi"),), response="word " * 100)

    # Execute / Assert
    with pytest.raises(DataError, match="raise training.seq_len"):
        tokenize_example(tokenizer, example, max_len=16)


def test_collate_right_pads_and_masks(tokenizer):
    # Prepare
    short = tokenize_example(tokenizer, Example(prompt=(Message("user", "a"),), response="P1"), max_len=64)
    long = tokenize_example(tokenizer, EXAMPLE, max_len=64)
    pad = tokenizer.pad_token_id

    # Execute
    batch = collate([short, long], pad_id=pad)

    # Assert
    n = len(short.input_ids)
    assert batch["input_ids"].shape == (2, len(long.input_ids))
    assert batch["attention_mask"][0].tolist() == [1] * n + [0] * (len(long.input_ids) - n)
    assert batch["input_ids"][0, n:].eq(pad).all()
    assert batch["labels"][0, n:].eq(IGNORE_INDEX).all()
    assert batch["labels"][1].tolist() == list(long.labels)


def test_collate_prompts_left_pads_for_generation():
    # Execute
    batch = collate_prompts([[5, 6], [7, 8, 9]], pad_id=0)

    # Assert
    assert batch["input_ids"].tolist() == [[0, 5, 6], [7, 8, 9]]
    assert batch["attention_mask"].tolist() == [[0, 1, 1], [1, 1, 1]]
