"""Fisher data: training-style records -> tokenized, label-masked batches for per-example gradients.

Records come from ``sst_lab.data.load_training_records`` (any training format). Each example is
rendered with the tokenizer's chat template exactly as the train stage renders it: the prompt
with ``add_generation_prompt=True``, then prompt + completion; labels are -100 on the prompt and on
padding, so the loss (and every gradient) covers the completion tokens only. Batches are
right-padded and always carry ``input_ids``, ``attention_mask`` and ``labels``; an example whose
completion is truncated away entirely is an error naming it, never silently dropped.
"""

from __future__ import annotations

from typing import Any

import torch


class FisherDataError(ValueError):
    """Fisher data cannot be turned into training-like batches; names the data set and item."""


def encode(record: dict[str, Any], tokenizer: Any, max_length: int, source: str) -> dict[str, list[int]]:
    prompt_ids = tokenizer.apply_chat_template(record["prompt"], add_generation_prompt=True, tokenize=True,
                                               return_dict=False)
    full_ids = tokenizer.apply_chat_template(record["prompt"] + record["completion"], tokenize=True,
                                             return_dict=False)
    # the completion starts where the rendered prompt stops being a prefix of the full text
    start = 0
    while start < min(len(prompt_ids), len(full_ids)) and prompt_ids[start] == full_ids[start]:
        start += 1
    full_ids = full_ids[:max_length]
    labels = [-100] * min(start, len(full_ids)) + full_ids[start:]
    if not any(t != -100 for t in labels):
        raise FisherDataError(f"{source}: item {record['id']!r} has no completion token within max_length="
                              f"{max_length} (prompt is {len(prompt_ids)} tokens); raise max_length")
    return {"input_ids": full_ids, "labels": labels}


def make_batches(records: list[dict[str, Any]], tokenizer: Any, *, max_length: int, batch_size: int,
                 source: str) -> list[dict[str, torch.Tensor]]:
    """Right-padded batches with ``input_ids``, ``attention_mask`` and ``labels``."""
    if not records:
        raise FisherDataError(f"{source}: no Fisher examples")
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    encoded = [encode(r, tokenizer, max_length, source) for r in records]
    batches = []
    for i in range(0, len(encoded), batch_size):
        chunk = encoded[i:i + batch_size]
        width = max(len(e["input_ids"]) for e in chunk)
        ids = torch.full((len(chunk), width), pad, dtype=torch.long)
        labels = torch.full((len(chunk), width), -100, dtype=torch.long)
        mask = torch.zeros((len(chunk), width), dtype=torch.long)
        for j, e in enumerate(chunk):
            n = len(e["input_ids"])
            ids[j, :n] = torch.tensor(e["input_ids"])
            labels[j, :n] = torch.tensor(e["labels"])
            mask[j, :n] = 1
        batches.append({"input_ids": ids, "attention_mask": mask, "labels": labels})
    return batches
