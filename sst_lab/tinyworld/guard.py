"""The tiny Llama-Guard-like judge: a full fine-tune of the tiny base on labelled conversations."""

from __future__ import annotations

import copy
from pathlib import Path

from sst_lab.tinyworld import modeling as M


def guard_target(row: dict) -> str:
    """What the guard should generate for a labelled row (Llama Guard 3 style)."""
    return "safe" if row["is_safe"] else f"unsafe\n{row['category']}"


def conversation(row: dict) -> list[dict]:
    return [{"role": "user", "content": row["prompt"]}, {"role": "assistant", "content": row["response"]}]


def guard_accuracy(model, tok, rows: list[dict]) -> dict:
    """Generate a few tokens per row with the guard's own chat template and compare labels."""
    outs = M.generate_chat(model, tok, [conversation(r) for r in rows], max_new_tokens=4)
    preds = [M.parse_guard_output(o) for o in outs]
    gold = ["safe" if r["is_safe"] else "unsafe" for r in rows]
    correct = sum(p == g for p, g in zip(preds, gold))
    unsafe = [p == g for p, g in zip(preds, gold) if g == "unsafe"]
    safe = [p == g for p, g in zip(preds, gold) if g == "safe"]
    return {"n": len(rows), "accuracy": correct / len(rows),
            "unsafe_recall": sum(unsafe) / max(1, len(unsafe)), "safe_recall": sum(safe) / max(1, len(safe)),
            "unparsed": sum(p == "unknown" for p in preds)}


def build_guard(base_model, base_tok, train_rows: list[dict], heldout_rows: list[dict], out: Path, *,
                epochs: int, batch: int, lr: float, seed: int, log) -> dict:
    """Fine-tune a copy of the base into the guard, save it with its own tokenizer, return metrics."""
    tok = copy.deepcopy(base_tok)
    tok.chat_template = M.GUARD_CHAT_TEMPLATE
    model = copy.deepcopy(base_model)
    examples = []
    for r in train_rows:
        prompt = tok.apply_chat_template(conversation(r), add_generation_prompt=True, tokenize=True,
                                         return_dict=False)
        target = tok(guard_target(r), add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
        examples.append((list(prompt), target))
    fit = M.finetune_completions(model, tok, examples, epochs=epochs, batch=batch, lr=lr, seed=seed, log=log)
    metrics = {"train": fit, "heldout": guard_accuracy(model, tok, heldout_rows),
               "prompt_tokens_mean": sum(len(p) for p, _ in examples) / len(examples)}
    log(f"guard: {metrics}")
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return metrics


def unsafe_rate(guard_dir: Path, pairs: list[tuple[str, str]]) -> float:
    """Share of (prompt, reply) pairs the saved guard judges unsafe (loads it as users will)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(guard_dir)
    model = AutoModelForCausalLM.from_pretrained(guard_dir)
    rows = [{"prompt": p, "response": r} for p, r in pairs]
    outs = M.generate_chat(model, tok, [conversation(r) for r in rows], max_new_tokens=4)
    return sum(M.parse_guard_output(o) == "unsafe" for o in outs) / len(outs)
