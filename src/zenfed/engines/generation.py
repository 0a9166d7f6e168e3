"""Greedy generation for exact-match evaluation, shared by every engine."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from zenfed.data.jsonl import Example
from zenfed.data.tokenize import collate_prompts, prompt_ids
from zenfed.engines.hardware import Hardware

EVAL_BATCH = 16


@torch.no_grad()
def greedy_generate(
    model: Any, tokenizer: Any, prompts: Sequence[Example], *, max_new_tokens: int,
    hardware: Hardware | None = None,
) -> list[str]:
    """Return greedy completions of ``prompts`` from a Hugging Face causal LM, in batches, on ``hardware``."""
    hardware = hardware or Hardware()
    model.eval()
    outputs: list[str] = []
    for start in range(0, len(prompts), EVAL_BATCH):
        chunk = [prompt_ids(tokenizer, e) for e in prompts[start:start + EVAL_BATCH]]
        batch = collate_prompts(chunk, pad_id=tokenizer.pad_token_id)
        batch = hardware.to(batch)
        with hardware.autocast():
            generated = model.generate(
                **batch, max_new_tokens=max_new_tokens, do_sample=False,
                eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
            )
        new_tokens = generated[:, batch["input_ids"].shape[1]:]
        outputs.extend(tokenizer.batch_decode(new_tokens, skip_special_tokens=True))
    return outputs
