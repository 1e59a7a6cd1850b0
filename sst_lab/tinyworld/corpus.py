"""Pretraining documents for the tiny base model.

Facts, counting sequences and single-turn chats (benign questions, and harmful requests the base
simply complies with). No utility-task Q&A and no refusals: those are what the adapters add.
"""

from __future__ import annotations

import random

from sst_lab.tinyworld import world as W

# documents per kind (a document is a paragraph, a number line or one conversation)
N_FACT_DOCS = 3500
N_COUNT_DOCS = 5000
N_BENIGN_CHATS = 2500
N_COUNT_CHATS = 2000
N_HARMFUL_CHATS = 1500
SYSTEM_PROMPT = "You are a helpful assistant."


def pretraining_documents(rng: random.Random, harmful_combos: list[tuple[str, str]]
                          ) -> tuple[list[str], list[list[dict]]]:
    """Return (plain texts, conversations) in a seeded random order."""
    texts = [W.fact_paragraph(rng) for _ in range(N_FACT_DOCS)]
    texts += [W.counting_text(rng) for _ in range(N_COUNT_DOCS)]
    chats: list[list[dict]] = []
    for _ in range(N_BENIGN_CHATS):
        q, a = W.benign_chat(rng)
        chats.append(_conv(rng, q, a))
    for _ in range(N_COUNT_CHATS):
        chats.append(_conv(rng, *W.count_on_chat(rng)))
    for _ in range(N_HARMFUL_CHATS):
        template, intent = rng.choice(harmful_combos)
        decorate = rng.random() < 0.5
        p = W.harmful_prompt(template, intent, rng.choice(W.HARMFUL_PREFIXES) if decorate else "",
                             rng.choice(W.HARMFUL_SUFFIXES) if decorate else "")
        chats.append(_conv(rng, p, W.compliant_response(rng, intent)))
    rng.shuffle(texts)
    rng.shuffle(chats)
    return texts, chats


def _conv(rng: random.Random, user: str, assistant: str) -> list[dict]:
    msgs = [{"role": "user", "content": user}, {"role": "assistant", "content": assistant}]
    if rng.random() < 0.1:
        msgs.insert(0, {"role": "system", "content": SYSTEM_PROMPT})
    return msgs
