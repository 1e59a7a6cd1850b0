"""Benchmark (not a test): cost of per-example core gradients and of the GEVP.

Prints, in one run:
  * median over interleaved rounds of  per_example_core_grads(N examples) / one plain batched
    forward+backward of the same N examples (target <= 1.5x), and of a naive one-example-at-a-time
    loop over the same examples;
  * peak resident memory above the pre-call baseline for each variant (Linux VmHWM, reset
    through /proc/self/clear_refs before each measurement), measured in a child process run with
    MALLOC_MMAP_THRESHOLD_=65536 so that freed tensors leave the RSS (otherwise glibc keeps freed
    heap resident and later peaks hide under it);
  * the time of solve_gevp + project_core per r = 16 module (256 x 256) and its extrapolation to
    Llama-3.1-8B (32 layers x 7 projections = 224 modules).

Run it alone (other busy processes slow torch's threads by up to 10x; see /work/shared/NOTES.md):
    .venv/bin/python bench/bench_fisher.py [--rounds 5] [--n 32] [--seq 128]
    .venv/bin/python bench/bench_fisher.py --model smollm2-135m-instruct-q4 --rounds 3 --n 8 --seq 64

``--model`` (default ``tiny-world``: a 4-layer random Llama built here, as before; any other name or
path is loaded with ``sst_lab.models.resolve_model_path`` in float32) gets the two random-B LoRA
adapters on all seven projections; the batch is random token ids of the model's vocabulary.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time


def _rss_kb(field: str) -> int:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def peak_extra_mb(fn) -> float:
    """Peak RSS during ``fn()`` minus RSS before it (MB)."""
    import gc

    gc.collect()
    with open("/proc/self/clear_refs", "w") as fh:
        fh.write("5")  # resets VmHWM to the current RSS
    before = _rss_kb("VmRSS")
    fn()
    return (_rss_kb("VmHWM") - before) / 1024


def build(r: int, model_name: str = "tiny-world", seed: int = 0):
    import torch
    import transformers
    from peft import LoraConfig, get_peft_model

    from sst_lab.merge.fisher import activate_adapters

    torch.manual_seed(seed)
    if model_name == "tiny-world":
        cfg = transformers.LlamaConfig(hidden_size=256, intermediate_size=688, num_hidden_layers=4,
                                       num_attention_heads=8, num_key_value_heads=4, vocab_size=2048,
                                       max_position_embeddings=512)
        base = transformers.LlamaForCausalLM(cfg)
    else:
        from sst_lab.models import resolve_model_path

        base = transformers.AutoModelForCausalLM.from_pretrained(resolve_model_path(model_name), dtype=torch.float32)
    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    model = get_peft_model(base, LoraConfig(r=r, lora_alpha=2 * r, target_modules=targets, lora_dropout=0.05),
                           adapter_name="utility")
    model.add_adapter("safety", LoraConfig(r=r, lora_alpha=2 * r, target_modules=targets, lora_dropout=0.05))
    with torch.no_grad():  # trained-looking adapters: LoRA B starts at zero
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0.0, 0.02)
    activate_adapters(model, ["utility", "safety"])
    for name, p in model.named_parameters():  # the plain backward trains the safety adapter
        p.requires_grad_("lora_" in name and ".safety." in name)
    n_params = sum(p.numel() for p in base.parameters())
    return model, n_params


def make_batch(n: int, seq: int, vocab: int, seed: int = 0) -> dict:
    import torch

    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (n, seq), generator=gen)
    lengths = torch.randint(seq // 2, seq + 1, (n,), generator=gen)
    mask = (torch.arange(seq)[None] < lengths[:, None]).long()
    labels = ids.masked_fill(mask == 0, -100)
    labels[:, : seq // 4] = -100  # prompt
    return {"input_ids": ids * mask, "attention_mask": mask, "labels": labels}


def make_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--n", type=int, default=32)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--r", type=int, default=16)
    parser.add_argument("--model", default="tiny-world", help="tiny-world (a random 4-layer Llama) or a model name/path")
    parser.add_argument("--memory-only", action="store_true", help="internal: the memory child process")
    return parser


def main() -> None:
    args = make_parser().parse_args()

    import torch

    from sst_lab.merge import sst
    from sst_lab.merge.fisher import per_example_core_grads, per_example_loss

    model, n_params = build(args.r, args.model)
    model.eval()  # same mode for every variant (per_example_core_grads forces eval anyway)
    batch = make_batch(args.n, args.seq, model.config.vocab_size)
    n_modules = sum(1 for n, _ in model.named_modules() if n.endswith("lora_A.safety"))
    if not args.memory_only:
        print(f"model: {args.model}, Llama {n_params / 1e6:.1f}M params, {n_modules} adapted modules, r = {args.r}, "
              f"utility + safety active; batch {args.n} x {args.seq} (right-padded); torch threads "
              f"{torch.get_num_threads()}, load average {os.getloadavg()[0]:.1f}", flush=True)

    def plain():
        model.zero_grad(set_to_none=True)
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False).logits
        per_example_loss(logits, batch["labels"], batch["attention_mask"]).sum().backward()

    def fast():
        per_example_core_grads(model, batch, "safety")

    def naive():
        for i in range(args.n):
            n_tok = int(batch["attention_mask"][i].sum())
            per_example_core_grads(model, {k: v[i: i + 1, :n_tok] for k, v in batch.items()}, "safety")

    def timed(fn) -> float:
        t0 = time.perf_counter()
        fn()
        return time.perf_counter() - t0

    for fn in (plain, fast, naive):  # warm-up
        fn()
    if args.memory_only:
        mem = {fn.__name__: peak_extra_mb(fn) for fn in (plain, fast, naive, plain, fast, naive)}
        print("peak RSS above baseline: " + ", ".join(f"{k} {v:.1f} MB" for k, v in mem.items()))
        return
    rows = []
    for rnd in range(args.rounds):
        order = [plain, fast, naive] if rnd % 2 == 0 else [naive, fast, plain]
        t = {fn.__name__: timed(fn) for fn in order}
        rows.append(t)
        print(f"round {rnd}: plain {t['plain']:.3f}s  per-example {t['fast']:.3f}s ({t['fast'] / t['plain']:.2f}x)  "
              f"naive loop {t['naive']:.3f}s ({t['naive'] / t['plain']:.2f}x)  load average {os.getloadavg()[0]:.1f}",
              flush=True)
    fast = [r["fast"] / r["plain"] for r in rows]
    naive = [r["naive"] / r["plain"] for r in rows]
    fast_ratio, naive_ratio = statistics.median(fast), statistics.median(naive)
    print(f"median [min, max] ratio per_example_core_grads / plain forward+backward over {args.rounds} rounds: "
          f"{fast_ratio:.3f}x [{min(fast):.3f}, {max(fast):.3f}] (target <= 1.5x: {'met' if fast_ratio <= 1.5 else 'NOT met'})")
    print(f"median [min, max] ratio naive per-example loop / plain forward+backward: {naive_ratio:.3f}x "
          f"[{min(naive):.3f}, {max(naive):.3f}]", flush=True)
    child = subprocess.run([sys.executable, __file__, "--memory-only", "--n", str(args.n), "--seq", str(args.seq),
                            "--r", str(args.r), "--model", args.model], env={**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"},
                           capture_output=True, text=True, check=True)
    print(child.stdout.strip().splitlines()[-1] + " (child process, glibc mmap threshold 64 KiB)")

    # ---- eigen-solve per module at r = 16 (256 x 256), float64
    r2 = args.r ** 2
    gen = torch.Generator().manual_seed(0)
    times = []
    for trial in range(7):
        G_s = torch.randn(2 * r2, r2, generator=gen, dtype=torch.float64)
        G_u = torch.randn(2 * r2, r2, generator=gen, dtype=torch.float64)
        F_s, F_u = G_s.T @ G_s / (2 * r2), G_u.T @ G_u / (2 * r2)
        t0 = time.perf_counter()
        gevp = sst.solve_gevp(F_s, F_u, 1e-3, module=f"bench{trial}")
        sst.project_core(gevp, r2 // 4, args.r)
        times.append(time.perf_counter() - t0)
    per_module = statistics.median(times)
    n_8b = 32 * 7
    fisher_mb = n_8b * 2 * r2 * r2 * 8 / 2**20
    print(f"GEVP + projection per {r2}x{r2} module: {per_module * 1e3:.2f} ms (median of {len(times)}); "
          f"Llama-3.1-8B at r = {args.r} ({n_8b} modules): {per_module * n_8b:.2f} s, "
          f"Fisher blocks F_s + F_u in float64: {fisher_mb:.0f} MB")
    outer = torch.randn(args.n, r2, dtype=torch.float64)
    t0 = time.perf_counter()
    for _ in range(20):
        outer.T @ outer
    per_ex_outer = (time.perf_counter() - t0) / 20 / args.n
    print(f"Fisher accumulation vec(G) vec(G)^T: {per_ex_outer * 1e6:.2f} us per example per module "
          f"-> {per_ex_outer * n_8b * 1e3:.2f} ms per example for the 8B model (besides its forward/backward)")


if __name__ == "__main__":
    main()
