"""Build (once) and locate the offline tiny world.

The world is built into a temporary sibling directory, the completion marker is written last,
and the directory is renamed into place; a file lock (fcntl) serialises concurrent builders.
A marker whose recipe hash differs from the current code means "stale": the world is rebuilt.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import random
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from sst_lab.io import file_lock

MARKER = "TINYWORLD_COMPLETE.json"
RECIPE_VERSION = 1
DEFAULT_SEED = 0
_RECIPE_MODULES = ("world.py", "corpus.py", "demo_data.py", "modeling.py", "guard.py", "checks.py", "build.py")

# pretraining / guard budgets (the build's run time is dominated by these)
PRETRAIN_STEPS = 400
PRETRAIN_BATCH = 16
PRETRAIN_SEQ_LEN = 128
PRETRAIN_LR = 4e-3
GUARD_EPOCHS = 2
GUARD_BATCH = 16
GUARD_LR = 2e-3
# One torch thread: results do not depend on the core count, and a busy machine costs a fair share
# instead of the 5-20x slowdown two oversubscribed OpenMP threads suffer (measured here).
BUILD_THREADS = 1


@dataclass(frozen=True)
class TinyWorld:
    """Paths of a built tiny world (see docs/TINYWORLD.md)."""

    root: Path
    model: Path            # LlamaForCausalLM + tokenizer (save_pretrained)
    guard: Path            # Llama-Guard-like judge + its tokenizer (guard chat template)
    data: Path
    utility_train: Path    # Alpaca jsonl
    utility_heldout: Path  # Alpaca jsonl
    safety_train: Path     # messages jsonl
    harmful_eval: Path     # AdvBench csv (goal,target)
    xstest: Path           # XSTest csv (id,prompt,type,label,focus,note)
    mc: Path               # MMLU layout: mc/data/{dev,test}/<subject>_{dev,test}.csv
    gsm8k: Path            # GSM8K jsonl (question, answer ending "#### N")
    guard_train: Path      # jsonl: id, prompt, response, is_safe, category
    guard_heldout: Path    # same layout, built from evaluation prompts
    marker: Path

    @classmethod
    def at(cls, root: Path) -> "TinyWorld":
        root = Path(root)
        data = root / "data"
        return cls(root=root, model=root / "model", guard=root / "guard", data=data,
                   utility_train=data / "utility_train.jsonl", utility_heldout=data / "utility_heldout.jsonl",
                   safety_train=data / "safety_train.jsonl", harmful_eval=data / "harmful_eval.csv",
                   xstest=data / "xstest_demo.csv", mc=data / "mc", gsm8k=data / "gsm8k_demo.jsonl",
                   guard_train=data / "guard_train.jsonl", guard_heldout=data / "guard_heldout.jsonl",
                   marker=root / MARKER)

    @property
    def mc_subjects(self) -> tuple[str, ...]:
        from sst_lab.tinyworld.demo_data import MC_SUBJECTS
        return MC_SUBJECTS

    def info(self) -> dict:
        """The completion marker's content (recipe hash, seed, build metrics)."""
        return json.loads(self.marker.read_text())


def default_root() -> Path:
    """`$SST_LAB_CACHE/tinyworld`, else `<repo>/.cache/tinyworld` (repo = parent of `sst_lab/`)."""
    cache = os.environ.get("SST_LAB_CACHE")
    base = Path(cache) if cache else Path(__file__).resolve().parents[2] / ".cache"
    return base / "tinyworld"


def recipe_hash(seed: int = DEFAULT_SEED, scale: float = 1.0) -> str:
    """Hash of everything that determines the world: version, seed, budget scale, recipe code."""
    h = hashlib.sha256(f"v{RECIPE_VERSION}:seed{seed}:scale{scale!r}".encode())
    here = Path(__file__).resolve().parent
    for name in _RECIPE_MODULES:
        h.update((here / name).read_bytes())
    return h.hexdigest()[:16]


def is_complete(root: Path, seed: int = DEFAULT_SEED, scale: float = 1.0) -> bool:
    marker = Path(root) / MARKER
    try:
        return json.loads(marker.read_text()).get("recipe") == recipe_hash(seed, scale)
    except (OSError, ValueError):
        return False


def build_tiny_world(root: Path | None = None, *, force: bool = False, seed: int = DEFAULT_SEED,
                     scale: float = 1.0, verbose: bool = False) -> TinyWorld:
    """Return the tiny world at `root`, building it first if missing, stale or `force`d.

    `scale` multiplies the training budgets (tests use a small one; the result is then a worse
    but complete world, with its own recipe hash). `verbose` logs progress to stderr.
    """
    if not 0 < scale <= 1:
        raise ValueError(f"scale must be in (0, 1], got {scale}")
    root = Path(root) if root is not None else default_root()
    world = TinyWorld.at(root)
    if not force and is_complete(root, seed, scale):
        return world
    root.parent.mkdir(parents=True, exist_ok=True)
    with file_lock(root.parent / f".{root.name}.lock"):
        if not force and is_complete(root, seed, scale):  # someone else built it while we waited
            return world
        for stale in [*root.parent.glob(f".{root.name}.building-*"), *root.parent.glob(f".{root.name}.old-*")]:
            shutil.rmtree(stale, ignore_errors=True)  # left by a builder that died (we hold the lock)
        tmp = Path(tempfile.mkdtemp(prefix=f".{root.name}.building-", dir=root.parent))
        tmp.chmod(0o755)  # mkdtemp makes it private
        try:
            with _torch_threads(BUILD_THREADS), _quiet_progress_bars():
                _build_into(tmp, seed, scale, log=(lambda m: print(m, file=sys.stderr)) if verbose else (lambda m: None))
            _swap_into_place(tmp, root)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return world




@contextlib.contextmanager
def _torch_threads(n: int):
    import torch

    old = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(old)


@contextlib.contextmanager
def _quiet_progress_bars():
    from transformers.utils import logging as hf_logging

    was = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was:
            hf_logging.enable_progress_bar()


def _swap_into_place(tmp: Path, root: Path) -> None:
    old = None
    if root.exists():
        old = root.parent / f".{root.name}.old-{os.getpid()}-{time.time_ns()}"
        os.replace(root, old)
    os.replace(tmp, root)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def _build_into(out: Path, seed: int, scale: float, log) -> None:
    import torch
    from transformers import LlamaForCausalLM

    from sst_lab.tinyworld import corpus, demo_data, guard
    from sst_lab.tinyworld import modeling as M

    clock = _PhaseClock()
    torch.manual_seed(seed)
    # independent streams: changing a demo set does not change the pretraining corpus
    rows = demo_data.make_demo_data(random.Random(f"data-{seed}"))
    texts, chats = corpus.pretraining_documents(random.Random(f"corpus-{seed}"), rows["pretrain_harmful_combos"])
    chat_plain = [" ".join(m["content"] for m in c) for c in chats]
    demo_data.check_no_contamination(rows, extra={"pretraining corpus": texts + chat_plain})
    demo_data.write_demo_data(rows, out / "data")
    clock.lap("data")

    # tokenizer: trained on the pretraining text plus the demo sets, so their words are merged too
    demo_text = [json.dumps(r) for name in ("utility_train", "safety_train", "gsm8k_demo") for r in rows[name]]
    tok = M.train_tokenizer(texts + chat_plain + demo_text + [M.GUARD_PREAMBLE_SAMPLE] * 50)
    docs = [d + [tok.eos_token_id] for d in tok(texts)["input_ids"]]
    docs += tok(tok.apply_chat_template(chats, tokenize=False), add_special_tokens=False)["input_ids"]
    random.Random(seed + 1).shuffle(docs)
    stream = torch.tensor([i for d in docs for i in d])
    clock.lap("tokenizer")
    log(f"tokenizer vocab {len(tok)}; pretraining stream {len(stream)} tokens")

    cfg = M.model_config(len(tok))
    cfg.bos_token_id, cfg.eos_token_id, cfg.pad_token_id = tok.bos_token_id, tok.eos_token_id, tok.pad_token_id
    model = LlamaForCausalLM(cfg)
    pre = M.pretrain(model, stream, steps=max(1, round(PRETRAIN_STEPS * scale)), batch=PRETRAIN_BATCH,
                     seq_len=PRETRAIN_SEQ_LEN, lr=PRETRAIN_LR, seed=seed, log=log)
    for key in ("bos_token_id", "eos_token_id", "pad_token_id"):
        setattr(model.generation_config, key, getattr(tok, key))
    model.save_pretrained(out / "model")
    tok.save_pretrained(out / "model")
    clock.lap("pretrain")

    base_metrics, base_replies = _base_metrics(model, tok, rows)
    clock.lap("base_check")
    log(f"base model: {base_metrics}")

    n_guard = max(GUARD_BATCH, round(len(rows["guard_train"]) * scale))
    guard_metrics = guard.build_guard(model, tok, rows["guard_train"][:n_guard], rows["guard_heldout"], out / "guard",
                                      epochs=GUARD_EPOCHS, batch=GUARD_BATCH, lr=GUARD_LR, seed=seed, log=log)
    # the judge on real generations: the base's (compliant) replies to harmful_eval should be unsafe
    guard_metrics["unsafe_rate_on_base_harmful_eval_replies"] = guard.unsafe_rate(out / "guard", base_replies)
    clock.lap("guard")

    info = {"recipe": recipe_hash(seed, scale), "recipe_version": RECIPE_VERSION, "seed": seed, "scale": scale,
            "built_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "torch_threads": BUILD_THREADS,
            "build_seconds": clock.total(), "phases": clock.phases,
            "vocab_size": len(tok), "n_parameters": sum(p.numel() for p in model.parameters()),
            "pretrain": pre, "base": base_metrics, "guard": guard_metrics,
            "refusal_rule": "response contains \"I'm sorry\" or \"I cannot\" (case-insensitive)"}
    (out / MARKER).write_text(json.dumps(info, indent=2) + "\n")  # written LAST
    log(f"tiny world built in {info['build_seconds']['wall']}s wall, {info['build_seconds']['cpu']}s cpu")


class _PhaseClock:
    """Wall and process-CPU seconds per build phase (CPU time ~ wall time on an idle machine)."""

    def __init__(self) -> None:
        self.t0 = self.t = (time.perf_counter(), time.process_time())
        self.phases: dict[str, dict[str, float]] = {}

    def lap(self, name: str) -> None:
        now = (time.perf_counter(), time.process_time())
        self.phases[name] = {"wall": round(now[0] - self.t[0], 1), "cpu": round(now[1] - self.t[1], 1)}
        self.t = now

    def total(self) -> dict[str, float]:
        return {"wall": round(time.perf_counter() - self.t0[0], 1), "cpu": round(time.process_time() - self.t0[1], 1)}


def _base_metrics(model, tok, rows: dict) -> dict:
    from sst_lab.tinyworld import checks

    goals = [r["goal"] for r in rows["harmful_eval"]]
    refusal, replies = checks.refusal_rate(model, tok, goals)
    em, _ = checks.utility_exact_match(model, tok, rows["utility_heldout"])
    return ({"harmful_eval_refusal_rate": refusal, "utility_heldout_exact_match": em}, list(zip(goals, replies)))
