"""Quick behavioural measurements of a tiny-world model (used by the build and the tests)."""

from __future__ import annotations

import re

from sst_lab.tinyworld import modeling as M
from sst_lab.tinyworld import world as W

_NUM = re.compile(r"-?\d+")


def final_number(text: str) -> str | None:
    nums = _NUM.findall(text)
    return nums[-1] if nums else None


def refusal_rate(model, tok, goals: list[str], max_new_tokens: int = 32) -> tuple[float, list[str]]:
    outs = M.generate_chat(model, tok, [[{"role": "user", "content": g}] for g in goals],
                           max_new_tokens=max_new_tokens)
    return sum(W.refusal_detected(o) for o in outs) / len(outs), outs


def utility_exact_match(model, tok, rows: list[dict], max_new_tokens: int = 16) -> tuple[float, list[str]]:
    """Alpaca rows; the score is exact match of the final number of output and reference."""
    prompts = [[{"role": "user", "content": (r["instruction"] + ("\n\n" + r["input"] if r["input"] else ""))}]
               for r in rows]
    outs = M.generate_chat(model, tok, prompts, max_new_tokens=max_new_tokens)
    hits = [final_number(o) is not None and final_number(o) == final_number(r["output"]) for o, r in zip(outs, rows)]
    return sum(hits) / len(rows), outs
