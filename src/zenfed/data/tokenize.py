"""Chat templating and tokenisation that trains on response tokens only."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from zenfed.data.jsonl import Example
from zenfed.errors import DataError

IGNORE_INDEX = -100


@dataclass(frozen=True)
class TokenizedExample:
    """Token ids of prompt + response, with labels only on the response."""

    input_ids: tuple[int, ...]
    labels: tuple[int, ...]
    prompt_len: int


def prompt_ids(tokenizer: Any, example: Example) -> list[int]:
    """Return the token ids of the templated prompt, ending where the response starts."""
    ids = tokenizer.apply_chat_template(example.prompt_dicts(), add_generation_prompt=True, tokenize=True)
    return list(ids)


def tokenize_example(tokenizer: Any, example: Example, *, max_len: int) -> TokenizedExample:
    """Template and tokenise one example, masking everything but the response.

    The response is the assistant turn including its end-of-turn token, so the
    model learns to stop. When the example is longer than ``max_len`` the
    prompt is cut from the left; the response is kept whole.

    Raises:
        DataError: If the response alone does not fit in ``max_len`` tokens.
    """
    prompt = prompt_ids(tokenizer, example)
    messages = [*example.prompt_dicts(), {"role": "assistant", "content": example.response}]
    full = list(tokenizer.apply_chat_template(messages, tokenize=True))
    if full[: len(prompt)] == prompt:
        response = full[len(prompt):]
    else:
        # Templates that re-render earlier turns differently: tokenise the response directly.
        response = tokenizer(example.response, add_special_tokens=False)["input_ids"]
        response = [*response, tokenizer.eos_token_id]
    # Drop the template's trailing newline after the end-of-turn token: nothing to learn there.
    eos = tokenizer.eos_token_id
    if eos in response:
        response = response[: response.index(eos) + 1]
    if len(response) >= max_len:
        raise DataError(
            f"a response of {len(response)} tokens does not fit in seq_len={max_len}; "
            f"raise training.seq_len or shorten the response"
        )
    prompt = prompt[-(max_len - len(response)):]
    ids = prompt + response
    labels = [IGNORE_INDEX] * len(prompt) + response
    return TokenizedExample(tuple(ids), tuple(labels), len(prompt))


def tokenize_all(tokenizer: Any, examples: Sequence[Example], *, max_len: int) -> list[TokenizedExample]:
    """Tokenise every example (see ``tokenize_example``)."""
    return [tokenize_example(tokenizer, ex, max_len=max_len) for ex in examples]


def collate(batch: Sequence[TokenizedExample], *, pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad a batch into ``input_ids``, ``attention_mask`` and ``labels`` tensors."""
    width = max(len(item.input_ids) for item in batch)
    input_ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
    labels = torch.full((len(batch), width), IGNORE_INDEX, dtype=torch.long)
    mask = torch.zeros((len(batch), width), dtype=torch.long)
    for row, item in enumerate(batch):
        n = len(item.input_ids)
        input_ids[row, :n] = torch.tensor(item.input_ids)
        labels[row, :n] = torch.tensor(item.labels)
        mask[row, :n] = 1
    return {"input_ids": input_ids, "attention_mask": mask, "labels": labels}


def collate_prompts(prompts: Sequence[Sequence[int]], *, pad_id: int) -> dict[str, torch.Tensor]:
    """Left-pad prompts for batched generation."""
    width = max(len(p) for p in prompts)
    input_ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for row, ids in enumerate(prompts):
        input_ids[row, width - len(ids):] = torch.tensor(list(ids))
        mask[row, width - len(ids):] = 1
    return {"input_ids": input_ids, "attention_mask": mask}
