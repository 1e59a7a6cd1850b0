"""Benchmark (not a test): the evaluation engine against the plain ways of doing the same work.

Prints, in one run, per interleaved round and as the median over rounds:
  * generation: ``HFEngine.generate`` (length-sorted, left-padded batches) vs a plain loop of
    one-prompt-at-a-time ``model.generate`` over the same prompts (same greedy outputs, checked);
    also the engine with a static KV cache (``cache_implementation="static"``, no compile);
  * multiple choice: ``HFEngine.choice_logprobs`` (one forward per prompt reading the four letter
    logits, batched) vs one unbatched forward per (prompt, option) pair scoring the option's
    letter as a continuation (same log-probabilities, checked).

Run it alone (other busy processes slow torch's threads by up to 10x; see /work/shared/NOTES.md).
Both wall-clock and process CPU time are measured; on a shared machine the CPU-time ratios (with
``--threads 1``) are the robust ones, since waiting for a core does not count as CPU time:
    .venv/bin/python bench/bench_eval.py [--model tiny-world] [--rounds 5] [--n 48] [--batch 16] [--threads 1]
    .venv/bin/python bench/bench_eval.py --model smollm2-135m-instruct-q4 --parts sst2 --sst2_n 48 --threads 1
"""

from __future__ import annotations

import argparse
import os
import statistics
import time


def prompts(n: int) -> tuple[list, list]:
    """``n`` chat prompts of mixed length and ``n`` 4-option questions, from the tiny world's data."""
    from sst_lab.evaluate import loaders as L
    from sst_lab.evaluate.suites import mmlu_conversation
    from sst_lab.tinyworld import build_tiny_world

    world = build_tiny_world()
    harmful = [i.prompt for i in L.load_advbench(world.harmful_eval)]
    xs = [i.prompt for i in L.load_xstest(world.xstest)]
    texts = [p for pair in zip(harmful, xs) for p in pair][:n]
    mc = L.load_mmlu(world.mc, "test")
    dev = {s: [d for d in L.load_mmlu(world.mc, "dev") if d.meta["subject"] == s][:2] for s in world.mc_subjects}
    questions = [mmlu_conversation(i, dev[i.meta["subject"]]) for i in mc][:n]
    return [[{"role": "user", "content": t}] for t in texts], questions


def naive_generate(engine, conversations, max_new_tokens: int) -> list[str]:
    import torch

    out = []
    with torch.inference_mode():
        for conv in conversations:
            ids = torch.tensor([engine.render(conv)])
            gen = engine.model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=False,
                                        max_new_tokens=max_new_tokens, pad_token_id=engine.tokenizer.pad_token_id,
                                        eos_token_id=engine.eos_token_id)
            out.append(engine.tokenizer.decode(gen[0, ids.shape[1]:], skip_special_tokens=True).strip())
    return out


def naive_choice_logprobs(engine, conversations, letters):
    """One forward per (prompt, option): log p(letter | prompt) from the full sequence's logits."""
    import numpy as np
    import torch

    letter_ids = engine.letter_token_ids(letters)
    out = np.zeros((len(conversations), len(letters)))
    with torch.inference_mode():
        for i, conv in enumerate(conversations):
            ids = engine.render(conv)
            for j, tok in enumerate(letter_ids):
                x = torch.tensor([ids + [tok]])
                logits = engine.model(input_ids=x).logits[0, -2]
                out[i, j] = torch.log_softmax(logits.float(), -1)[tok].item()
    return out


def sst2_conversations(n: int) -> list:
    """The first ``n`` SST-2 dev items of the suite ``sst2-dev``, as the suite renders them."""
    from sst_lab.evaluate.suites import load_items, load_suite

    return [i.conversation for i in load_items(load_suite("sst2-dev"), limit=n).items]


def two_pass_labels(engine, conversations, max_new_tokens: int, labels):
    """The former SST-2 path: ``generate``, then one batched left-padded forward per batch reading
    the last position's logits at the labels' first tokens (the prompt is computed twice)."""
    import numpy as np
    import torch

    from sst_lab.evaluate.engine import length_sorted_batches

    texts = engine.generate(conversations, max_new_tokens)
    ids = engine.label_first_token_ids(labels)
    encoded = [engine.render(c) for c in conversations]
    out = np.zeros((len(encoded), len(labels)))
    with torch.inference_mode():
        for batch in length_sorted_batches([len(e) for e in encoded], engine.batch_size):
            x, mask = engine._pad_left([encoded[i] for i in batch])
            pos = (mask.cumsum(-1) - 1).clamp(min=0)
            logits = engine.model(input_ids=x, attention_mask=mask, position_ids=pos, logits_to_keep=1,
                                  use_cache=False).logits[:, -1, :]
            out[batch] = torch.log_softmax(logits.float(), -1)[:, ids].double().numpy()
    return texts, out


def timed(fn) -> tuple[float, float]:
    """(wall seconds, process CPU seconds) of ``fn()``."""
    wall, cpu = time.perf_counter(), time.process_time()
    fn()
    return time.perf_counter() - wall, time.process_time() - cpu


def make_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="tiny-world", help="a model name (tiny-world, smollm2-135m-instruct-q4) or path")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--n", type=int, default=48, help="prompts per variant and round")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--max_new_tokens", type=int, default=32)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--parts", nargs="+", choices=("gen", "mc", "sst2"), default=["gen", "mc", "sst2"])
    ap.add_argument("--sst2_n", type=int, default=48, help="SST-2 dev items per variant and round")
    return ap


def main() -> None:
    import numpy as np
    import torch

    from sst_lab.evaluate.engine import HFEngine

    a = make_parser().parse_args()
    torch.set_num_threads(a.threads)

    from sst_lab.data import SST2_LABELS

    engine = HFEngine.load(a.model, dtype="float32", device="cpu", batch_size=a.batch)
    static = HFEngine(engine.model, engine.tokenizer, name=engine.name, batch_size=a.batch, static_cache=True)
    convs, questions = prompts(a.n)
    sst = sst2_conversations(a.sst2_n) if "sst2" in a.parts else []
    letters = ["A", "B", "C", "D"]
    # warm-up and equality checks (outside the timed rounds)
    if "gen" in a.parts:
        ref = naive_generate(engine, convs[:8], a.max_new_tokens)
        assert engine.generate(convs[:8], a.max_new_tokens) == ref, "batched generation differs from one-at-a-time"
        assert static.generate(convs[:8], a.max_new_tokens) == ref, "static-cache generation differs"
    if "mc" in a.parts:
        lp_ref = naive_choice_logprobs(engine, questions[:8], letters)
        diff = float(np.abs(engine.choice_logprobs(questions[:8], letters) - lp_ref).max())
        assert diff < 1e-3, f"batched letter log-probs differ from per-option forwards by {diff}"
    if "sst2" in a.parts:
        one_texts, one_lp = engine.generate_with_label_logprobs(sst, 4, SST2_LABELS)
        two_texts, two_lp = two_pass_labels(engine, sst, 4, SST2_LABELS)
        diff = float(np.abs(one_lp - two_lp).max())
        assert one_texts == two_texts and diff < 1e-4, f"one pass differs from two passes (replies or {diff})"
        print(f"SST-2 one pass vs two passes on {len(sst)} items: same replies, max |label log-prob difference| "
              f"{diff:.2e}")

    pairs = {"gen": ("naive", "engine"), "static": ("engine", "static"), "mc": ("mc_naive", "mc"),
             "sst2": ("sst2_two", "sst2_one")}
    runs = {"engine": ("gen", lambda: engine.generate(convs, a.max_new_tokens)),
            "naive": ("gen", lambda: naive_generate(engine, convs, a.max_new_tokens)),
            "static": ("gen", lambda: static.generate(convs, a.max_new_tokens)),
            "mc": ("mc", lambda: engine.choice_logprobs(questions, letters)),
            "mc_naive": ("mc", lambda: naive_choice_logprobs(engine, questions, letters)),
            "sst2_one": ("sst2", lambda: engine.generate_with_label_logprobs(sst, 4, SST2_LABELS)),
            "sst2_two": ("sst2", lambda: two_pass_labels(engine, sst, 4, SST2_LABELS))}
    names = [k for k, (part, _) in runs.items() if part in a.parts]
    active = {k: v for k, v in pairs.items() if v[0] in names}
    ratios = {c: {k: [] for k in active} for c in ("wall", "cpu")}
    print(f"model {a.model}, {a.n} prompts, {len(sst)} SST-2 items, batch {a.batch}, max_new_tokens "
          f"{a.max_new_tokens}, {torch.get_num_threads()} threads, load average {os.getloadavg()[0]:.1f}; "
          "ratios = slower way's time / engine time (higher: engine faster)")
    for r in range(a.rounds):
        order = names if r % 2 == 0 else names[::-1]
        t = {k: timed(runs[k][1]) for k in order}
        for k, clock in enumerate(("wall", "cpu")):
            for key, (slow, fast) in active.items():
                ratios[clock][key].append(t[slow][k] / t[fast][k])
        print(f"round {r} (wall / cpu s, load average {os.getloadavg()[0]:.1f}): "
              + ", ".join(f"{k} {t[k][0]:.2f}/{t[k][1]:.2f}" for k in names), flush=True)
    labels = {"gen": "generation one-at-a-time / batched engine", "static": "static KV cache (dynamic / static, "
              ">1: static helps)", "mc": "MC per-option forwards / batched letter logits",
              "sst2": "SST-2 two passes / one pass"}
    for clock in ("wall", "cpu"):
        print(f"median [min, max] over {a.rounds} rounds ({clock} time): " + "; ".join(
            f"{labels[k]} x{statistics.median(v):.2f} [{min(v):.2f}, {max(v):.2f}]" for k, v in ratios[clock].items()))


if __name__ == "__main__":
    main()
