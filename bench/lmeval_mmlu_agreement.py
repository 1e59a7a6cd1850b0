"""Per-item agreement of sst-lab's lm-eval MMLU formats with lm-eval's own rendering (a one-off check).

lm-eval is NOT a dependency of sst-lab; this script needs it importable (e.g. installed with
``pip install --no-deps --target /tmp/lmeval_t lm_eval==0.4.13`` plus its small pure-Python
dependencies, then ``PYTHONPATH=/tmp/lmeval_t``). It builds lm-eval's own ``mmlu_<subject>`` task
from its installed template (``tasks/mmlu/default``) over a local copy of the MMLU files in the
Hugging Face layout (written to a temporary folder), asks lm-eval for each test item's context and
request arguments (plain, and chat with few-shot as multi-turn, its default), and compares them
string for string with ``suites.lmeval_mmlu_text`` / ``engine.render_text(lmeval_mmlu_messages)``
and the suites' continuations; then the token split of every (context, continuation) pair with
lm-eval's HFLM-equivalent encoder against ``HFEngine.encode_pair``.

    PYTHONPATH=/tmp/lmeval_t python bench/lmeval_mmlu_agreement.py ../shared/data/mmlu/data MODEL_DIR \\
        --subjects anatomy high_school_biology --shots 0 5
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import yaml


def lmeval_task(subject: str, folder: Path, items, dev):
    import lm_eval
    from lm_eval.api.task import ConfigurableTask

    tasks_dir = Path(lm_eval.__file__).parent / "tasks" / "mmlu" / "default"
    cfg = yaml.safe_load((tasks_dir / "_default_template_yaml").read_text())
    cfg.update(yaml.safe_load((tasks_dir / f"mmlu_{subject}.yaml").read_text()))
    cfg.pop("include", None), cfg.pop("tag", None), cfg.pop("dataset_name", None)
    files = {}
    for split, rows in (("test", items), ("dev", dev)):
        path = folder / f"{subject}_{split}.json"
        path.write_text(json.dumps([{"question": i.prompt, "subject": subject, "choices": list(i.choices),
                                     "answer": "ABCD".index(i.answer)} for i in rows]))
        files[split] = str(path)
    cfg.update(dataset_path="json", dataset_kwargs={"data_files": files})
    return ConfigurableTask(config=cfg)


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("mmlu")
    ap.add_argument("model")
    ap.add_argument("--subjects", nargs="+", default=["anatomy"])
    ap.add_argument("--shots", nargs="+", type=int, default=[0, 5])
    ap.add_argument("--limit", type=int, default=None)
    args = ap.parse_args()

    from transformers import AutoTokenizer

    from sst_lab.evaluate import loaders as L
    from sst_lab.evaluate import suites as S
    from sst_lab.evaluate.engine import HFEngine

    tok = AutoTokenizer.from_pretrained(args.model)
    engine = HFEngine.__new__(HFEngine)  # tokenizer-only use: render_text / encode_pair
    engine.tokenizer, engine.name = tok, args.model
    import lm_eval

    print(f"lm-eval {lm_eval.__version__}, tokenizer {args.model}")
    totals: dict[str, list[int]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for subject in args.subjects:
            items = L.load_mmlu(args.mmlu, "test", [subject])[:args.limit]
            dev = L.load_mmlu(args.mmlu, "dev", [subject])
            task = lmeval_task(subject, Path(tmp), items, dev)
            docs = list(task.test_docs())
            for shots in args.shots:
                task.set_fewshot_seed(1234)
                for mode in ("plain", "chat"):
                    agree = split_agree = 0
                    for item, doc in zip(items, docs):
                        chat = mode == "chat"
                        theirs = task.fewshot_context(doc, shots, apply_chat_template=chat, fewshot_as_multiturn=chat,
                                                      chat_template=_hflm_template(tok) if chat else None)
                        reqs = task.construct_requests(doc, theirs, apply_chat_template=chat)
                        conts = tuple(r.arguments[1] for r in reqs)
                        ours_item = S.mmlu_eval_item(item, dev[:shots], "lm-eval-chat" if chat else "lm-eval-plain")
                        ours = ours_item.context_text if not chat else engine.render_text(ours_item.conversation)
                        same = ours == theirs and conts == ours_item.continuations
                        agree += same
                        if same:
                            split_agree += all(engine.encode_pair(ours, c) == _lmeval_split(tok, ours, c) for c in conts)
                        elif agree == 0:
                            print("first difference:", repr(ours[-200:]), repr(theirs[-200:]), conts)
                    key = f"{mode} {shots}-shot"
                    totals.setdefault(key, [0, 0, 0])
                    totals[key][0] += agree
                    totals[key][1] += split_agree
                    totals[key][2] += len(items)
    for key, (a, s, n) in totals.items():
        print(f"{key}: rendered context + continuations identical {a}/{n}; token split identical {s}/{n}")
    return 0 if all(a == n == s for a, s, n in totals.values()) else 1


def _hflm_template(tok):
    """The callable lm-eval's HFLM passes as ``chat_template`` (its apply_chat_template arguments)."""
    def render(history, add_generation_prompt=True):
        return tok.apply_chat_template(history, tokenize=False, add_generation_prompt=add_generation_prompt,
                                       continue_final_message=not add_generation_prompt)
    return render


def _lmeval_split(tok, context: str, continuation: str):
    """lm-eval's LM._encode_pair with HFLM.tok_encode defaults (add_bos_token unset), called through lm-eval."""
    from lm_eval.api.model import TemplateLM

    class _Enc:
        backend = "causal"

        def tok_encode(self, s, **_):
            from lm_eval.models.utils import _add_special_kwargs

            kw = _add_special_kwargs(None, None)
            if tok.bos_token and s.startswith(tok.bos_token):
                kw["add_special_tokens"] = False
            return tok.encode(s, **kw)

    return tuple(TemplateLM._encode_pair(_Enc(), context, continuation))


if __name__ == "__main__":
    sys.exit(main())
