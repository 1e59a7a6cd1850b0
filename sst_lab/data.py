"""Training-style data: load, detect the format, normalise, sample, identify.

Sources (``dataset_name``): a local ``.jsonl``/``.json``/``.csv``/``.parquet``/``.tsv`` file, a folder
of such files, ``data:<path>`` (a public benchmark file under the data root, see
:func:`resolve_data_ref`), ``tiny-world:<file>``, or a Hugging Face dataset name
(``datasets.load_dataset``; needs a reachable hub).

Formats (``dataset_format``, detected from the columns when ``auto``):

* ``messages``: ``messages`` = list of ``{role, content}``; the last turn must be the assistant's
  (the loss is on that turn; earlier turns are context);
* ``alpaca``: ``instruction``, optional ``input``, ``output``;
* ``prompt_completion``: ``prompt`` and ``completion``, each a string or a list of messages;
* ``sst2``: GLUE SST-2 ``sentence``, ``label`` (0/1) TSV as an instruction task: the user turn is
  :func:`sst2_prompt` of the sentence (kept byte-for-byte, GLUE's trailing space included), the
  answer ``negative``/``positive``; ids ``sst2/<file stem>/<row>`` (the evaluation suite's dev ids
  have the same shape, so train and dev ids can never coincide).

Every record becomes conversational prompt/completion (``prompt``: list of messages,
``completion``: ``[assistant message]``) with an ``id`` (the data set's own ``id`` column when
present, else ``sha:<prompt_sha>``, ``sha:<prompt_sha>:<k>`` for its k-th repeat) and a ``prompt_sha``: sha256 of the whitespace-normalised,
lower-cased text of the last user turn. Evaluation compares both with the training items a train
run recorded, so no evaluated prompt can have been trained on.
"""

from __future__ import annotations

import csv
import hashlib
import json
import os
import random
from collections.abc import Sequence
from pathlib import Path
from typing import Any

FORMATS = ("messages", "alpaca", "prompt_completion", "sst2")
ENCODING = "utf-8-sig"  # every text data file (train, Fisher, evaluate): UTF-8, a leading BOM dropped
FILE_SUFFIXES = (".jsonl", ".json", ".csv", ".parquet", ".tsv")
SST2_LABELS = ("negative", "positive")  # GLUE label 0, 1
DATA_ROOT_ENV = "SST_LAB_DATA_ROOT"
DEFAULT_DATA_ROOT = "../shared/data"  # relative to the working directory (the repo root)
# public source of each benchmark folder under the data root (for the error on a missing file)
DATA_SOURCES = {
    "advbench": "llm-attacks/llm-attacks data/advbench/harmful_behaviors.csv (or hub walledai/AdvBench)",
    "xstest": "paul-rottger/exaggerated-safety xstest_prompts.csv (or hub walledai/XSTest)",
    "xstest_completions": "paul-rottger/exaggerated-safety model_completions/",
    "mmlu": "the original MMLU data.tar (people.eecs.berkeley.edu/~hendrycks/data.tar; or hub cais/mmlu)",
    "gsm8k": "openai/grade-school-math grade_school_math/data/ (or hub openai/gsm8k)",
    "safety_tuned_llamas": "vinid/safety-tuned-llamas data/training/ (Bianchi et al., ICLR 2024)",
    "alpaca": "hiyouga/LLaMA-Factory data/alpaca_en_demo.json",
    "sst2": "GLUE SST-2 train.tsv/dev.tsv (gluebenchmark.com; or hub nyu-mll/glue, config sst2)",
}


class DataError(ValueError):
    """Bad data: the message names the file (or data set), the row and the field."""


def prompt_sha(text: str) -> str:
    """Identity of a prompt for leakage checks: sha256 of normalised text, 16 hex chars."""
    norm = " ".join(str(text).split()).lower()
    return hashlib.sha256(norm.encode("utf-8")).hexdigest()[:16]


# ------------------------------------------------------------------------------ where data lives
def data_root() -> Path:
    """``$SST_LAB_DATA_ROOT``, else ``../shared/data`` (relative to the working directory)."""
    return Path(os.environ.get(DATA_ROOT_ENV) or DEFAULT_DATA_ROOT).expanduser()


def resolve_data_ref(ref: str) -> str:
    """``data:<path>`` -> ``<data root>/<path>`` (an error naming the expected path and the public
    source when missing); ``tiny-world:<file>`` -> the tiny world's data file; anything else as is."""
    if ref.startswith("data:"):
        rel = ref.split(":", 1)[1].lstrip("/")
        path = data_root() / rel
        if not path.exists():
            source = DATA_SOURCES.get(Path(rel).parts[0] if rel else "", "its public release")
            raise FileNotFoundError(f"{ref}: expected {path} (data root {data_root()}, set by "
                                    f"${DATA_ROOT_ENV}, default {DEFAULT_DATA_ROOT}); get it from {source}")
        return str(path)
    if ref.startswith("tiny-world:"):
        from sst_lab.tinyworld import build_tiny_world

        return str(build_tiny_world().data / ref.split(":", 1)[1])
    return ref


def sst2_prompt(sentence: str) -> str:
    """The SST-2 instruction (one definition: training records and the evaluation suite)."""
    return ("Is the sentiment of this movie review sentence positive or negative? "
            f"Answer with one word.\n\nSentence: {sentence}")


# ------------------------------------------------------------------------------ loading
def _is_local(name: str) -> bool:
    return (Path(name).exists() or name.endswith(FILE_SUFFIXES)
            or name.startswith(("/", "./", "../", "~")))


def _read_file(path: Path) -> list[dict[str, Any]]:
    suffix = path.suffix.lower()
    if suffix == ".jsonl":
        rows = []
        with path.open(encoding=ENCODING) as fh:
            for n, line in enumerate(fh, 1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as exc:
                    raise DataError(f"{path}: line {n} is not valid JSON ({exc.msg})") from None
                if not isinstance(row, dict):
                    raise DataError(f"{path}: line {n} is not a JSON object")
                rows.append(row)
        return rows
    if suffix == ".json":
        try:
            data = json.loads(path.read_text(encoding=ENCODING))
        except json.JSONDecodeError as exc:
            raise DataError(f"{path}: not valid JSON ({exc.msg} at line {exc.lineno})") from None
        if not isinstance(data, list) or not all(isinstance(r, dict) for r in data):
            raise DataError(f"{path}: a .json data set must be a list of objects")
        return data
    if suffix == ".csv":
        with path.open(encoding=ENCODING, newline="") as fh:
            return [dict(r) for r in csv.DictReader(fh)]
    if suffix == ".tsv":  # GLUE layout: no quoting at all (sentences contain quotes)
        with path.open(encoding=ENCODING, newline="") as fh:
            return [dict(r) for r in csv.DictReader(fh, delimiter="\t", quoting=csv.QUOTE_NONE)]
    if suffix == ".parquet":
        import pandas as pd

        return pd.read_parquet(path).to_dict(orient="records")
    raise DataError(f"{path}: unsupported file type {suffix!r}; use one of {', '.join(FILE_SUFFIXES)}")


def load_rows(name: str, *, split: str = "train", config: str | None = None) -> list[dict[str, Any]]:
    """Rows of a local file/folder or a hub data set, as plain dicts (no format handling)."""
    if _is_local(name):
        path = Path(name).expanduser()
        if not path.exists():
            raise DataError(f"dataset_name: file or folder {path} does not exist")
        if path.is_dir():
            files = sorted(p for p in path.iterdir() if p.suffix.lower() in FILE_SUFFIXES)
            if not files:
                raise DataError(f"dataset_name: folder {path} holds no {'/'.join(FILE_SUFFIXES)} files")
            rows = [r for f in files for r in _read_file(f)]
        else:
            rows = _read_file(path)
    else:
        import datasets

        try:
            rows = list(datasets.load_dataset(name, config, split=split))
        except Exception as exc:  # the hub client raises many types; re-raise with the culprit named
            raise DataError(f"dataset_name {name!r} is not a local file and could not be loaded from "
                            f"the Hugging Face hub (split {split!r}): {type(exc).__name__}: {exc}") from exc
    if not rows:
        raise DataError(f"dataset_name {name}: the data set is empty")
    return rows


# ------------------------------------------------------------------------------ formats
def detect_format(columns: Sequence[str], source: str) -> str:
    cols = set(columns)
    if "messages" in cols:
        return "messages"
    if {"instruction", "output"} <= cols:
        return "alpaca"
    if {"prompt", "completion"} <= cols:
        return "prompt_completion"
    if {"sentence", "label"} <= cols:
        return "sst2"
    raise DataError(f"{source}: cannot detect the data format from columns {sorted(cols)}; expected "
                    "'messages', or 'instruction'+'output' (alpaca), or 'prompt'+'completion', "
                    "or 'sentence'+'label' (sst2)")


_REQUIRED = {"messages": ("messages",), "alpaca": ("instruction", "output"),
             "prompt_completion": ("prompt", "completion"), "sst2": ("sentence", "label")}


def _as_messages(value: Any, role: str, where: str) -> list[dict[str, str]]:
    if isinstance(value, str):
        return [{"role": role, "content": value}]
    if isinstance(value, list) and value and all(isinstance(m, dict) and "role" in m and "content" in m
                                                 for m in value):
        return [{"role": str(m["role"]), "content": str(m["content"])} for m in value]
    raise DataError(f"{where}: expected a string or a list of {{role, content}} messages")


def normalise(rows: list[dict[str, Any]], fmt: str, source: str) -> list[dict[str, Any]]:
    """Rows -> conversational prompt/completion records with ``id`` and ``prompt_sha``."""
    if fmt == "auto":
        fmt = detect_format(rows[0].keys(), source)
    if fmt not in FORMATS:
        raise DataError(f"dataset_format {fmt!r} is unknown; use auto or one of {', '.join(FORMATS)}")
    out, seen = [], set()
    for i, row in enumerate(rows):
        where = f"{source}: row {i}"
        missing = [c for c in _REQUIRED[fmt] if c not in row or row[c] is None]
        if missing:
            raise DataError(f"{where}: missing column(s) {missing} required by format {fmt!r}")
        if fmt == "messages":
            msgs = _as_messages(row["messages"], "user", f"{where}, field 'messages'")
            if msgs[-1]["role"] != "assistant" or len(msgs) < 2:
                raise DataError(f"{where}, field 'messages': the last turn must be the assistant's, after a prompt")
            prompt, completion = msgs[:-1], msgs[-1:]
        elif fmt == "alpaca":
            text = str(row["instruction"])
            if row.get("input"):
                text = f"{text}\n\n{row['input']}"
            prompt = [{"role": "user", "content": text}]
            completion = [{"role": "assistant", "content": str(row["output"])}]
        elif fmt == "sst2":
            if str(row["label"]) not in ("0", "1"):
                raise DataError(f"{where}: field 'label' must be 0 or 1 (GLUE SST-2), got {row['label']!r}")
            prompt = [{"role": "user", "content": sst2_prompt(str(row["sentence"]))}]
            completion = [{"role": "assistant", "content": SST2_LABELS[int(row["label"])]}]
            row = {**row, "id": row.get("id") or f"sst2/{Path(source).stem}/{i}"}
        else:
            prompt = _as_messages(row["prompt"], "user", f"{where}, field 'prompt'")
            completion = _as_messages(row["completion"], "assistant", f"{where}, field 'completion'")
        users = [m["content"] for m in prompt if m["role"] == "user"]
        if not users or not users[-1].strip():
            raise DataError(f"{where}: the prompt has no non-empty user turn")
        if not completion[-1]["content"].strip():
            raise DataError(f"{where}: the completion is empty")
        sha = prompt_sha(users[-1])
        if row.get("id") not in (None, ""):
            item_id = str(row["id"])
            if item_id in seen:
                raise DataError(f"{where}: duplicate id {item_id!r}")
        else:  # a prompt repeated with another answer (safety-tuned-llamas has 4) is another example
            item_id, k = f"sha:{sha}", 1
            while item_id in seen:
                k += 1
                item_id = f"sha:{sha}:{k}"
        seen.add(item_id)
        out.append({"id": item_id, "prompt_sha": sha, "prompt": prompt, "completion": completion})
    return out


def sample(records: list[dict[str, Any]], sample_size: int | None, seed: int, source: str) -> list[dict[str, Any]]:
    """A deterministic subset of ``sample_size`` records drawn with ``seed`` (all when None)."""
    if sample_size is None:
        return list(records)
    if sample_size <= 0:
        raise DataError(f"sample_size must be positive, got {sample_size}")
    if sample_size > len(records):
        raise DataError(f"sample_size {sample_size} is larger than {source}, which has {len(records)} rows")
    idx = sorted(random.Random(seed).sample(range(len(records)), sample_size))
    return [records[i] for i in idx]


def load_training_records(name: str, *, fmt: str = "auto", split: str = "train", config: str | None = None,
                          sample_size: int | None = None, seed: int = 0) -> list[dict[str, Any]]:
    """Load, normalise and sample a training-style data set (train stage and Fisher data)."""
    return sample(normalise(load_rows(name, split=split, config=config), fmt, name), sample_size, seed, name)


def training_items(records: list[dict[str, Any]]) -> list[dict[str, str]]:
    """The identities a train run records (``training_items.json``)."""
    return [{"id": r["id"], "prompt_sha": r["prompt_sha"]} for r in records]
