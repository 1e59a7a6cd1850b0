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
"""

from __future__ import annotations

import argparse
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


def timed(fn) -> tuple[float, float]:
    """(wall seconds, process CPU seconds) of ``fn()``."""
    wall, cpu = time.perf_counter(), time.process_time()
    fn()
    return time.perf_counter() - wall, time.process_time() - cpu


def main() -> None:
    import numpy as np
    import torch

    from sst_lab.evaluate.engine import HFEngine

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="tiny-world")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--n", type=int, default=48, help="prompts per variant and round")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--max_new_tokens", type=int, default=32)
    ap.add_argument("--threads", type=int, default=2)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)

    engine = HFEngine.load(a.model, dtype="float32", device="cpu", batch_size=a.batch)
    static = HFEngine(engine.model, engine.tokenizer, name=engine.name, batch_size=a.batch, static_cache=True)
    convs, questions = prompts(a.n)
    letters = ["A", "B", "C", "D"]
    # warm-up and equality checks (outside the timed rounds)
    ref = naive_generate(engine, convs[:8], a.max_new_tokens)
    assert engine.generate(convs[:8], a.max_new_tokens) == ref, "batched generation differs from one-at-a-time"
    assert static.generate(convs[:8], a.max_new_tokens) == ref, "static-cache generation differs"
    lp_ref = naive_choice_logprobs(engine, questions[:8], letters)
    diff = float(np.abs(engine.choice_logprobs(questions[:8], letters) - lp_ref).max())
    assert diff < 1e-3, f"batched letter log-probs differ from per-option forwards by {diff}"

    ratios: dict[str, dict[str, list[float]]] = {c: {"gen": [], "static": [], "mc": []} for c in ("wall", "cpu")}
    print(f"model {a.model}, {a.n} prompts, batch {a.batch}, max_new_tokens {a.max_new_tokens}, "
          f"{torch.get_num_threads()} threads; ratios = plain time / engine time (higher: engine faster)")
    for r in range(a.rounds):
        t = {"engine": timed(lambda: engine.generate(convs, a.max_new_tokens)),
             "naive": timed(lambda: naive_generate(engine, convs, a.max_new_tokens)),
             "static": timed(lambda: static.generate(convs, a.max_new_tokens)),
             "mc": timed(lambda: engine.choice_logprobs(questions, letters)),
             "mc_naive": timed(lambda: naive_choice_logprobs(engine, questions, letters))}
        for k, clock in enumerate(("wall", "cpu")):
            ratios[clock]["gen"].append(t["naive"][k] / t["engine"][k])
            ratios[clock]["static"].append(t["engine"][k] / t["static"][k])
            ratios[clock]["mc"].append(t["mc_naive"][k] / t["mc"][k])
        print(f"round {r} (wall / cpu s): generate engine {t['engine'][0]:.2f}/{t['engine'][1]:.2f}, one-at-a-time "
              f"{t['naive'][0]:.2f}/{t['naive'][1]:.2f}, static cache {t['static'][0]:.2f}/{t['static'][1]:.2f}; "
              f"MC engine {t['mc'][0]:.2f}/{t['mc'][1]:.2f}, per-option {t['mc_naive'][0]:.2f}/{t['mc_naive'][1]:.2f}")
    for clock in ("wall", "cpu"):
        med = {k: statistics.median(v) for k, v in ratios[clock].items()}
        print(f"median over rounds ({clock} time): generation one-at-a-time / batched engine x{med['gen']:.2f}; "
              f"static KV cache (dynamic / static, >1: static helps) x{med['static']:.2f}; "
              f"MC per-option forwards / batched letter logits x{med['mc']:.2f}")


if __name__ == "__main__":
    main()
