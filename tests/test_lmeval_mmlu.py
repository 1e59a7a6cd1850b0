"""MMLU in lm-eval 0.4.x's rendering (plain and chat) beside the project's own format.

lm-eval is not a dependency; the pinned strings below were written from its source (tasks/mmlu
template, ConfigurableTask.fewshot_context / build_qa_turn / construct_requests, LM._encode_pair)
and agree item for item with lm-eval 0.4.13's own rendering on real MMLU files
(bench/lmeval_mmlu_agreement.py, numbers in evaluate/README.md)."""

from __future__ import annotations

import numpy as np
import pytest

from sst_lab.evaluate import loaders as L
from sst_lab.evaluate.engine import HFEngine
from sst_lab.evaluate.suites import (SuiteError, infer, lmeval_mmlu_messages, load_items, mmlu_eval_item,
                                     parse_suite, suite_metrics)


def _item(k: int, answer: str) -> L.Item:
    return L.Item(id=f"mmlu/test/high_school_biology/{k}", prompt=f"  Question {k}?\n", suite="mmlu",
                  choices=(f"a{k}", f"b{k}", f"c{k}", f"d{k}"), answer=answer,
                  meta={"subject": "high_school_biology", "split": "test"})


EXEMPLARS = [_item(0, "B"), _item(1, "D")]
QUESTION = _item(2, "A")
HEADER = "The following are multiple choice questions (with answers) about high school biology.\n\n"


def test_lmeval_plain_rendering_is_pinned():
    item = mmlu_eval_item(QUESTION, EXEMPLARS, "lm-eval-plain")
    assert item.context_text == (
        HEADER
        + "Question 0?\nA. a0\nB. b0\nC. c0\nD. d0\nAnswer: B\n\n"
        + "Question 1?\nA. a1\nB. b1\nC. c1\nD. d1\nAnswer: D\n\n"
        + "Question 2?\nA. a2\nB. b2\nC. c2\nD. d2\nAnswer:")
    assert item.continuations == (" A", " B", " C", " D") and item.conversation == []


def test_lmeval_chat_rendering_is_pinned_and_differs_from_the_project_format():
    item = mmlu_eval_item(QUESTION, EXEMPLARS, "lm-eval-chat")
    assert item.conversation == [
        {"role": "system", "content": HEADER},
        {"role": "user", "content": "Question 0?\nA. a0\nB. b0\nC. c0\nD. d0\nAnswer:"},
        {"role": "assistant", "content": "B"},
        {"role": "user", "content": "Question 1?\nA. a1\nB. b1\nC. c1\nD. d1\nAnswer:"},
        {"role": "assistant", "content": "D"},
        {"role": "user", "content": "Question 2?\nA. a2\nB. b2\nC. c2\nD. d2\nAnswer:"}]
    assert item.continuations == ("A", "B", "C", "D")
    own = mmlu_eval_item(QUESTION, EXEMPLARS, "chat")
    assert own.continuations is None and own.conversation[0] == {
        "role": "user", "content": HEADER + "Question 0?\nA. a0\nB. b0\nC. c0\nD. d0\nAnswer:"}


def test_prompt_format_is_validated_and_default_keeps_suite_ids():
    raw = {"name": "m", "version": 1, "kind": "mmlu", "data": {"path": "tiny-world:mc", "format": "mmlu"}}
    assert "prompt_format" not in parse_suite(raw).to_dict()
    assert parse_suite({**raw, "prompt_format": "lm-eval-plain"}).to_dict()["prompt_format"] == "lm-eval-plain"
    with pytest.raises(SuiteError, match="prompt_format must be one of chat, lm-eval-chat, lm-eval-plain"):
        parse_suite({**raw, "prompt_format": "lm-eval"})
    with pytest.raises(SuiteError, match="not valid for kind 'gsm8k'"):
        parse_suite({"name": "g", "version": 1, "kind": "gsm8k", "data": {"path": "x", "format": "gsm8k"},
                     "max_new_tokens": 8, "prompt_format": "lm-eval-plain"})


@pytest.fixture(scope="module")
def engine(world):
    from sst_lab.models import load_for_inference

    model, tok, _ = load_for_inference(str(world.model), dtype="float32", device="cpu")
    return HFEngine(model, tok, name="tiny-world", batch_size=3)


def test_lmeval_scoring_on_the_tiny_model(engine):
    # chat: lm-eval moves the template's trailing newline into the continuation ("\nA"); where the
    # newline and the letter are separate tokens, its scores are the project's letter scores plus one
    # constant per item (log p of the newline), so the predicted letters agree
    chat = mmlu_eval_item(QUESTION, EXEMPLARS, "lm-eval-chat")
    context = engine.render_text(chat.conversation)
    assert context.endswith("\n")
    ctx_ids, cont_ids = engine.encode_pair(context, "A")
    assert engine.tokenizer.decode(cont_ids) == "\nA" and ctx_ids == engine.render(chat.conversation)[:-1]
    lm = engine.continuation_logprobs([context], [chat.continuations])[0]
    own = engine.choice_logprobs([chat.conversation], L.LETTERS)[0]
    assert len(cont_ids) == 2  # the tiny world's tokenizer: "\n" and "A" are separate tokens
    np.testing.assert_allclose(lm - own, np.full(4, (lm - own)[0]), atol=1e-4)
    assert (lm - own)[0] < 0
    # plain: " A" after "Answer:", batched == one at a time
    plain = [mmlu_eval_item(q, EXEMPLARS[:k], "lm-eval-plain") for k, q in enumerate([QUESTION, *EXEMPLARS])]
    texts, conts = [p.context_text for p in plain], [p.continuations for p in plain]
    batched = engine.continuation_logprobs(texts, conts)
    single = np.vstack([engine.continuation_logprobs([t], [c]) for t, c in zip(texts, conts)])
    assert batched.shape == (3, 4) and np.all(batched < 0)
    np.testing.assert_allclose(batched, single, atol=1e-4)


def test_lmeval_plain_suite_scores_end_to_end(world, engine):
    spec = parse_suite({"name": "mmlu-lm", "version": 1, "kind": "mmlu", "shots": 2, "prompt_format": "lm-eval-plain",
                        "data": {"path": "tiny-world:mc", "format": "mmlu", "split": "test"}})
    loaded = load_items(spec, limit=6)
    assert loaded.items[0].context_text.startswith("The following are multiple choice questions")
    rows = infer(loaded, engine)
    for row, item in zip(rows, loaded.items):
        expected = engine.continuation_logprobs([item.context_text], [item.continuations])[0]
        np.testing.assert_allclose([row[f"logprob_{c}"] for c in L.LETTERS], expected, atol=1e-4)
        assert row["pred"] == L.LETTERS[int(np.argmax(expected))]
    m, _ = suite_metrics(spec, rows)
    assert m["utility/mmlu-lm/n"] == 6
    assert m["utility/mmlu-lm/accuracy"] == pytest.approx(sum(r["correct"] for r in rows) / 6)
