"""Benchmark loaders: files exactly as their authors publish them in, ``list[Item]`` out.

No conversion step and no re-saved copies: each loader reads the published layout directly and
fails with :class:`DataFormatError` (a ``ValueError``) naming the file and the missing or bad
column/line. A missing file raises ``FileNotFoundError`` naming it.

Formats (``load_prompts_auto`` detects them from the header/columns):

=============  ===========================================================================
advbench       ``harmful_behaviors.csv``: ``goal,target`` (llm-attacks/llm-attacks)
harmbench      ``Behavior,FunctionalCategory,SemanticCategory,Tags,ContextString,BehaviorID``
               (centerforaisafety/HarmBench ``data/behavior_datasets/*.csv``); contextual
               behaviours become ``f"{context}\\n\\n---\\n\\n{behavior}"`` as HarmBench's own
               ``DirectRequest`` baseline builds its test cases.
jbb            JBB-Behaviors ``harmful-behaviors.csv`` / ``benign-behaviors.csv``:
               ``Index,Goal,Target,Behavior,Category,Source`` (earlier revisions: unnamed first
               column, no ``Source`` in the benign file; the old package CSV used ``Identifier``)
strongreject   ``strongreject_dataset.csv`` / ``strongreject_small_dataset.csv``:
               ``category,source,forbidden_prompt``
xstest         ``xstest_prompts.csv``: ``id,prompt,type,label,focus,note`` (label safe/unsafe)
mmlu           original hendrycks folder ``[data/]{test,dev,val}/<subject>_<split>.csv``, no
               header: ``question,A,B,C,D,answer-letter``
mmlu_hf        Hugging Face ``cais/mmlu`` columns ``question,subject,choices,answer`` (answer
               index 0-3) in parquet/jsonl/json/csv
gsm8k          ``{train,test}.jsonl``: ``question,answer`` ending in ``#### N``
stl            safety-tuned-LLaMAs evaluation files ``data/evaluation/<name>.json``:
               ``{"instructions": [...], "inputs": [...]}`` (``inputs`` empty or one per
               instruction; a non-empty input is appended after a blank line). Label ``unsafe``
               for I-MaliciousInstructions, Q-Harm, I-CoNa, I-Controversial,
               I-PhysicalSafetyUnsafe; ``safe`` for I-Alpaca, I-PhysicalSafetySafe; other names
               need ``label`` (a benign set with ``label: safe`` is an over-refusal suite)
sst2           GLUE SST-2 ``{train,dev}.tsv``: ``sentence\tlabel`` (0/1), no quoting; the prompt is
               ``sst_lab.data.sst2_prompt`` of the sentence (byte-for-byte), the answer
               ``negative``/``positive``; ids ``sst2/<file stem>/<row>``
=============  ===========================================================================

Item ids are ``"<suite>/<given id or 0-based row>"`` (MMLU: ``mmlu/<split>/<subject>/<row>``,
identical for both MMLU layouts). :func:`prompt_sha` fingerprints a prompt independently of
whitespace, to prove no evaluation prompt was trained on.
"""


from __future__ import annotations

import ast
import csv
import difflib
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Collection

from sst_lab.data import ENCODING, prompt_sha  # one definition each, shared with the train stage

MMLU_SPLITS = ("test", "dev", "val")
HARMBENCH_FUNCTIONAL = ("standard", "contextual", "copyright")
LETTERS = ("A", "B", "C", "D")


class DataFormatError(ValueError):
    """A benchmark file does not have its published format (message names file and column)."""


@dataclass(frozen=True)
class Item:
    id: str  # stable: "<benchmark>/<row or given id>"
    prompt: str  # the text sent to the model (for MC: the question stem only; see choices)
    suite: str  # benchmark name, e.g. "advbench"
    label: str | None = None  # e.g. XSTest "safe"/"unsafe", HarmBench category ...
    choices: tuple[str, ...] | None = None  # MC options in order (A, B, C, D)
    answer: str | None = None  # MC letter "A".."D"; GSM8K final number; demo: reference answer
    meta: dict = field(default_factory=dict, hash=False, compare=False)  # other published columns



# --------------------------------------------------------------------------- readers


def _file(path: str | Path, fmt: str) -> Path:
    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(f"{p}: no such file (expected a {fmt} file)")
    if p.is_dir():
        raise DataFormatError(f"{p}: is a directory, expected a {fmt} file")
    if p.stat().st_size == 0:
        raise DataFormatError(f"{p}: empty file (expected a {fmt} file)")
    return p


Row = tuple[int, dict[str, Any]]  # (line or record number, record)


def _read_csv(path: Path, required: Collection[str], fmt: str) -> list[Row]:
    try:
        with path.open(encoding=ENCODING, newline="") as fh:
            reader = csv.DictReader(fh)
            header = reader.fieldnames
            if not header:
                raise DataFormatError(f"{path}: empty file (expected a {fmt} CSV header)")
            _require(path, header, required, fmt)
            rows: list[Row] = []
            for row in reader:
                if None in row or any(v is None for v in row.values()):
                    raise DataFormatError(f"{path}: line {reader.line_num} has "
                                          f"{'more' if None in row else 'fewer'} fields than "
                                          f"the header {header}")
                rows.append((reader.line_num, row))
    except (UnicodeDecodeError, csv.Error) as exc:
        raise DataFormatError(f"{path}: not a readable UTF-8 CSV ({exc})") from exc
    if not rows:
        raise DataFormatError(f"{path}: {fmt} CSV has a header but no data rows")
    return rows


def _read_records(path: Path, required: Collection[str], fmt: str) -> list[Row]:
    """Records from .csv, .jsonl, .json (a list of objects) or .parquet (needs pyarrow)."""
    suffix = path.suffix.lower()
    if suffix == ".csv":
        return _read_csv(path, required, fmt)
    rows: list[Row] = []
    if suffix == ".jsonl":
        with path.open(encoding=ENCODING) as fh:
            for line_no, line in enumerate(fh, start=1):
                if line.strip():
                    rows.append((line_no, _json_object(path, line, f"line {line_no}")))
    elif suffix == ".json":
        try:
            data = json.loads(path.read_text(encoding=ENCODING))
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise DataFormatError(f"{path}: not valid UTF-8 JSON ({exc})") from exc
        if not isinstance(data, list):
            raise DataFormatError(f"{path}: expected a JSON list of {fmt} records")
        rows = [(i + 1, _json_object(path, rec, f"record {i + 1}")) for i, rec in enumerate(data)]
    elif suffix == ".parquet":
        try:
            import pyarrow.parquet as pq
        except ImportError as exc:
            raise DataFormatError(f"{path}: reading parquet needs pyarrow installed") from exc
        rows = [(i + 1, rec) for i, rec in enumerate(pq.read_table(path).to_pylist())]
    else:
        raise DataFormatError(f"{path}: unknown extension {suffix!r} for {fmt} "
                              "(known: .csv, .jsonl, .json, .parquet)")
    if not rows:
        raise DataFormatError(f"{path}: no {fmt} records")
    _require(path, list(rows[0][1]), required, fmt)
    for number, rec in rows:
        missing = [c for c in required if c not in rec]
        if missing:
            raise DataFormatError(f"{path}: record at line/record {number} lacks {missing}")
    return rows


def _json_object(path: Path, raw: Any, where: str) -> dict[str, Any]:
    try:
        obj = json.loads(raw) if isinstance(raw, str) else raw
    except json.JSONDecodeError as exc:
        raise DataFormatError(f"{path}: {where} is not valid JSON ({exc})") from exc
    if not isinstance(obj, dict):
        raise DataFormatError(f"{path}: {where} is not a JSON object")
    return obj


def _require(path: Path, columns: Collection[str], required: Collection[str], fmt: str) -> None:
    missing = [c for c in required if c not in columns]
    if missing:
        raise DataFormatError(f"{path}: missing column(s) {', '.join(map(repr, missing))} for "
                              f"{fmt}; found {_short(list(columns))}")


def _short(value: Any, limit: int = 200) -> str:
    """A bounded repr for error messages (a JSON file read as CSV must not dump itself into a tag)."""
    text = repr(value)
    return text if len(text) <= limit else f"{text[:limit]}... ({len(text)} characters)"


def _text(path: Path, line: int, row: dict[str, Any], column: str) -> str:
    value = row[column]
    if not isinstance(value, str) or not value.strip():
        raise DataFormatError(f"{path}: line {line}: column {column!r} is empty or not text")
    return value


def _unique(path: Path, items: list[Item]) -> list[Item]:
    seen: set[str] = set()
    for item in items:
        if item.id in seen:
            raise DataFormatError(f"{path}: duplicate item id {item.id!r}")
        seen.add(item.id)
    return items


# --------------------------------------------------------------------------- safety sets


def load_advbench(path: str | Path) -> list[Item]:
    """AdvBench ``harmful_behaviors.csv``; id ``advbench/<0-based row>``, meta ``target``."""
    p = _file(path, "advbench")
    return [Item(id=f"advbench/{i}", prompt=_text(p, line, row, "goal"), suite="advbench",
                 meta={"target": row["target"]})
            for i, (line, row) in enumerate(_read_csv(p, ("goal", "target"), "advbench"))]


def load_harmbench(path: str | Path, *, functional_categories: Collection[str] | None = None,
                   exclude_functional: Collection[str] = ()) -> list[Item]:
    """HarmBench behaviours CSV; label = SemanticCategory, id ``harmbench/<BehaviorID>``.

    ``functional_categories`` keeps only those FunctionalCategory values, ``exclude_functional``
    drops some (e.g. ``("copyright",)``, which needs HarmBench's hash-based judge).
    """
    for name in [*(functional_categories or ()), *exclude_functional]:
        if name not in HARMBENCH_FUNCTIONAL:
            raise ValueError(f"unknown HarmBench FunctionalCategory {name!r}; "
                             f"known: {', '.join(HARMBENCH_FUNCTIONAL)}")
    p = _file(path, "harmbench")
    columns = ("Behavior", "FunctionalCategory", "SemanticCategory", "Tags", "ContextString",
               "BehaviorID")
    items = []
    for line, row in _read_csv(p, columns, "harmbench"):
        functional = row["FunctionalCategory"]
        if functional in exclude_functional or (
                functional_categories is not None and functional not in functional_categories):
            continue
        behavior, context = _text(p, line, row, "Behavior"), row["ContextString"]
        items.append(Item(
            id=f"harmbench/{_text(p, line, row, 'BehaviorID')}",
            prompt=f"{context}\n\n---\n\n{behavior}" if context else behavior,
            suite="harmbench", label=row["SemanticCategory"],
            meta={"behavior": behavior, "context": context, "functional_category": functional,
                  "tags": row["Tags"], "behavior_id": row["BehaviorID"]}))
    if not items:
        raise DataFormatError(f"{p}: no HarmBench rows left after the FunctionalCategory filter")
    return _unique(p, items)


def load_jbb(path: str | Path, *, split: str | None = None) -> list[Item]:
    """JBB-Behaviors CSV; suite ``jbb_harmful``/``jbb_benign`` (``split``, default from the file
    name), label = Category, id ``<suite>/<Index>`` (0-based row when no index column)."""
    p = _file(path, "jbb")
    split = split or ("benign" if "benign" in p.name.lower() else "harmful")
    if split not in ("harmful", "benign"):
        raise ValueError(f"JBB split must be 'harmful' or 'benign', got {split!r}")
    rows = _read_csv(p, ("Goal", "Target", "Category"), "jbb")
    header = list(rows[0][1])
    behavior_col = next((c for c in ("Behavior", "Identifier") if c in header), None)
    if behavior_col is None:
        raise DataFormatError(f"{p}: missing column 'Behavior' for jbb; found {header}")
    index_col = next((c for c in ("Index", "") if c in header), None)
    suite = f"jbb_{split}"
    return _unique(p, [
        Item(id=f"{suite}/{row[index_col] if index_col is not None else i}",
             prompt=_text(p, line, row, "Goal"), suite=suite, label=row["Category"],
             meta={"target": row["Target"], "behavior": row[behavior_col],
                   "source": row.get("Source"), "split": split})
        for i, (line, row) in enumerate(rows)])


def load_strongreject(path: str | Path) -> list[Item]:
    """StrongREJECT CSV; label = category, id ``strongreject/<0-based row>``, meta ``source``."""
    p = _file(path, "strongreject")
    rows = _read_csv(p, ("category", "source", "forbidden_prompt"), "strongreject")
    return [Item(id=f"strongreject/{i}", prompt=_text(p, line, row, "forbidden_prompt"),
                 suite="strongreject", label=row["category"], meta={"source": row["source"]})
            for i, (line, row) in enumerate(rows)]


def load_xstest(path: str | Path) -> list[Item]:
    """XSTest ``xstest_prompts.csv``; label "safe"/"unsafe", id ``xstest/<id>``."""
    p = _file(path, "xstest")
    items = []
    for line, row in _read_csv(p, ("id", "prompt", "type", "label", "focus", "note"), "xstest"):
        if row["label"] not in ("safe", "unsafe"):
            raise DataFormatError(f"{p}: line {line}: column 'label' is {row['label']!r}, "
                                  "expected 'safe' or 'unsafe'")
        items.append(Item(id=f"xstest/{_text(p, line, row, 'id')}",
                          prompt=_text(p, line, row, "prompt"), suite="xstest",
                          label=row["label"],
                          meta={"type": row["type"], "focus": row["focus"], "note": row["note"]}))
    return _unique(p, items)


STL_UNSAFE = ("I-MaliciousInstructions", "Q-Harm", "I-CoNa", "I-Controversial", "I-PhysicalSafetyUnsafe")
STL_SAFE = ("I-Alpaca", "I-PhysicalSafetySafe")


def _stl_data(path: Path) -> dict[str, Any] | None:
    try:
        data = json.loads(path.read_text(encoding=ENCODING))
    except (json.JSONDecodeError, UnicodeDecodeError):
        return None
    return data if isinstance(data, dict) and "instructions" in data else None


def load_stl(path: str | Path, *, label: str | None = None) -> list[Item]:
    """A safety-tuned-LLaMAs evaluation file; id ``stl/<file stem>/<0-based index>``, meta ``type`` =
    the file stem, label from the published file name or ``label`` (``safe`` / ``unsafe``)."""
    p = _file(path, "stl")
    data = _stl_data(p)
    if data is None:
        raise DataFormatError(f"{p}: expected a JSON object with 'instructions' (and 'inputs') as in "
                              "safety-tuned-LLaMAs data/evaluation/")
    instructions, inputs = data["instructions"], data.get("inputs") or []
    if not isinstance(instructions, list) or not instructions:
        raise DataFormatError(f"{p}: 'instructions' must be a non-empty list of strings")
    if inputs and len(inputs) != len(instructions):
        raise DataFormatError(f"{p}: {len(instructions)} instructions but {len(inputs)} inputs (expected none "
                              "or one per instruction)")
    label = label or ("unsafe" if p.stem in STL_UNSAFE else "safe" if p.stem in STL_SAFE else None)
    if label not in ("safe", "unsafe"):
        raise DataFormatError(f"{p}: unknown safety-tuned-LLaMAs file {p.stem!r}; declare data.options.label "
                              f"(safe or unsafe), got {label!r}")
    items = []
    for i, text in enumerate(instructions):
        if not isinstance(text, str) or not text.strip():
            raise DataFormatError(f"{p}: instruction {i} is empty or not text")
        extra = inputs[i] if inputs else ""
        if not isinstance(extra, str):
            raise DataFormatError(f"{p}: input {i} is not text")
        items.append(Item(id=f"stl/{p.stem}/{i}", prompt=f"{text}\n\n{extra}" if extra.strip() else text,
                          suite="stl", label=label, meta={"type": p.stem}))
    return _unique(p, items)


# --------------------------------------------------------------------------- utility sets


def _mmlu_item(split: str, subject: str, row_no: int, question: str,
               choices: list[str], answer: str) -> Item:
    return Item(id=f"mmlu/{split}/{subject}/{row_no}", prompt=question, suite="mmlu",
                choices=tuple(choices), answer=answer, meta={"subject": subject, "split": split})


def _mmlu_split_dir(root: Path, split: str) -> Path:
    if split not in MMLU_SPLITS:
        raise ValueError(f"MMLU split must be one of {MMLU_SPLITS}, got {split!r}")
    for candidate in (root / split, root / "data" / split):
        if candidate.is_dir():
            return candidate
    raise FileNotFoundError(f"{root}: no MMLU folder {split}/ or data/{split}/ "
                            "(expected the original hendrycks layout)")


def _pick_subjects(where: Path, available: list[str], subjects: Collection[str] | None
                   ) -> list[str]:
    if subjects is None:
        return available
    for s in subjects:
        if s not in available:
            close = difflib.get_close_matches(s, available, n=3)
            raise ValueError(f"{where}: unknown MMLU subject {s!r}"
                             + (f"; did you mean {', '.join(close)}?" if close else ""))
    return [s for s in available if s in set(subjects)]


def load_mmlu(root: str | Path, split: str = "test",
              subjects: Collection[str] | None = None) -> list[Item]:
    """MMLU, original layout (a folder) or Hugging Face layout (a file, see load_mmlu_hf)."""
    root = Path(root)
    if root.is_file():
        return load_mmlu_hf(root, split=split, subjects=subjects)
    if not root.exists():
        raise FileNotFoundError(f"{root}: no such MMLU folder or file")
    folder = _mmlu_split_dir(root, split)
    suffix = f"_{split}.csv"
    files = {f.name[:-len(suffix)]: f for f in sorted(folder.glob(f"*{suffix}"))}
    if not files:
        raise DataFormatError(f"{folder}: no <subject>{suffix} files")
    items: list[Item] = []
    for subject in _pick_subjects(folder, list(files), subjects):
        path = _file(files[subject], "mmlu")
        with path.open(encoding=ENCODING, newline="") as fh:
            reader = csv.reader(fh)
            for row_no, row in enumerate(reader):
                if len(row) != 6 or row[5] not in LETTERS:
                    raise DataFormatError(f"{path}: line {reader.line_num}: expected 6 fields "
                                          "question,A,B,C,D,answer-letter (A-D), got "
                                          f"{len(row)} fields ending {row[-1:]!r}")
                items.append(_mmlu_item(split, subject, row_no, row[0], row[1:5], row[5]))
    return items


def load_mmlu_dev(root: str | Path, subject: str, k: int) -> list[Item]:
    """The first ``k`` dev-split examples of ``subject`` (the k-shot exemplars)."""
    items = load_mmlu(root, "dev", [subject])
    if not 0 <= k <= len(items):
        raise ValueError(f"{root}: k={k} shots requested, the {subject} dev split has "
                         f"{len(items)}")
    return items[:k]


def _parse_choices(path: Path, number: int, value: Any) -> list[str]:
    if isinstance(value, str):  # a list written into CSV by pandas (repr) or as JSON
        try:
            value = json.loads(value)
        except json.JSONDecodeError:
            try:
                value = ast.literal_eval(value)
            except (ValueError, SyntaxError):
                value = None
    if not isinstance(value, (list, tuple)) or len(value) != 4 or \
            not all(isinstance(v, str) for v in value):
        raise DataFormatError(f"{path}: record {number}: column 'choices' must be a list of 4 "
                              f"strings, got {str(value)[:80]!r}")
    return list(value)


def _parse_answer(path: Path, number: int, value: Any) -> str:
    if isinstance(value, str) and value in LETTERS:
        return value
    if isinstance(value, str) and value.strip().isdigit():
        value = int(value)
    if isinstance(value, int) and not isinstance(value, bool) and 0 <= value <= 3:
        return LETTERS[value]
    raise DataFormatError(f"{path}: record {number}: column 'answer' must be an index 0-3, "
                          f"got {value!r}")


def load_mmlu_hf(path: str | Path, split: str = "test",
                 subjects: Collection[str] | None = None) -> list[Item]:
    """MMLU in the Hugging Face layout (``cais/mmlu``); ids as in the original layout."""
    p = _file(path, "mmlu_hf")
    rows = _read_records(p, ("question", "subject", "choices", "answer"), "mmlu_hf")
    keep = set(_pick_subjects(p, sorted({r["subject"] for _, r in rows}), subjects))
    counters: dict[str, int] = {}
    items = []
    for number, rec in rows:
        subject = rec["subject"]
        if subject not in keep:
            continue
        row_no = counters[subject] = counters.get(subject, -1) + 1
        items.append(_mmlu_item(split, subject, row_no, _text(p, number, rec, "question"),
                                _parse_choices(p, number, rec["choices"]),
                                _parse_answer(p, number, rec["answer"])))
    return items


_NUMBER = re.compile(r"-?\d{1,3}(?:,\d{3})+(?![\d,])(?:\.\d+)?|-?\d+(?:\.\d+)?|-?\.\d+")


def _normalise_number(text: str) -> str:
    text = text.replace(",", "")
    if "." in text:
        text = text.rstrip("0").rstrip(".")
    if text.startswith(("-.", ".")):
        text = text.replace(".", "0.", 1)
    return "0" if text in ("-0", "", "-") else text


def extract_final_number(text: str) -> str | None:
    """GSM8K convention: the number after the last ``####`` if any, else the last number.

    Normalised: thousands commas removed, trailing decimal zeros dropped ("1,000.50" -> "1000.5").
    """
    if "####" in text:
        match = _NUMBER.search(text.rsplit("####", 1)[1])
        if match:
            return _normalise_number(match.group())
    numbers = _NUMBER.findall(text)
    return _normalise_number(numbers[-1]) if numbers else None


def load_gsm8k(path: str | Path, *, split: str | None = None) -> list[Item]:
    """GSM8K jsonl (also HF parquet/json); answer = final number, meta ``solution`` = full text.

    Ids are ``gsm8k/<split>/<0-based row>``, split defaulting to the file stem ("test").
    """
    p = _file(path, "gsm8k")
    split = split or p.stem.split("-")[0]
    items = []
    for i, (number, rec) in enumerate(_read_records(p, ("question", "answer"), "gsm8k")):
        solution = _text(p, number, rec, "answer")
        tail = solution.rsplit("####", 1)[1] if "####" in solution else ""
        match = _NUMBER.fullmatch(tail.strip())
        if match is None:
            raise DataFormatError(f"{p}: line {number}: column 'answer' must end in '#### N', "
                                  f"got ...{solution[-40:]!r}")
        items.append(Item(id=f"gsm8k/{split}/{i}", prompt=_text(p, number, rec, "question"),
                          suite="gsm8k", answer=_normalise_number(match.group()),
                          meta={"solution": solution}))
    return items


def load_sst2(path: str | Path) -> list[Item]:
    """GLUE SST-2 TSV as a two-label classification task (the training format's twin)."""
    from sst_lab.data import SST2_LABELS, sst2_prompt

    p = _file(path, "sst2")
    with p.open(encoding=ENCODING, newline="") as fh:
        reader = csv.DictReader(fh, delimiter="\t", quoting=csv.QUOTE_NONE)
        _require(p, reader.fieldnames or [], ("sentence", "label"), "sst2")
        items = []
        for i, row in enumerate(reader):
            if row.get("label") not in ("0", "1") or row.get("sentence") is None:
                raise DataFormatError(f"{p}: line {reader.line_num}: label must be 0 or 1 and sentence "
                                      f"present (sst2 TSV), got {row}")
            items.append(Item(id=f"sst2/{p.stem}/{i}", prompt=sst2_prompt(row["sentence"]), suite="sst2",
                              answer=SST2_LABELS[int(row["label"])], choices=SST2_LABELS,
                              meta={"sentence": row["sentence"]}))
    if not items:
        raise DataFormatError(f"{p}: sst2 TSV has a header but no data rows")
    return items


# --------------------------------------------------------------------------- dispatch

LOADERS: dict[str, Callable[..., list[Item]]] = {
    "advbench": load_advbench, "harmbench": load_harmbench, "jbb": load_jbb,
    "strongreject": load_strongreject, "xstest": load_xstest, "mmlu": load_mmlu,
    "mmlu_hf": load_mmlu_hf, "gsm8k": load_gsm8k, "stl": load_stl, "sst2": load_sst2,
}
# most specific first: the first whose columns are all present wins
_SIGNATURES: tuple[tuple[str, frozenset[str]], ...] = tuple(
    (name, frozenset(cols)) for name, cols in (
        ("harmbench", ("Behavior", "FunctionalCategory", "SemanticCategory", "BehaviorID")),
        ("jbb", ("Goal", "Target", "Category")),
        ("xstest", ("id", "prompt", "type", "label")),
        ("strongreject", ("category", "source", "forbidden_prompt")),
        ("advbench", ("goal", "target")),
        ("mmlu_hf", ("question", "subject", "choices", "answer")),
        ("gsm8k", ("question", "answer")),
    ))


def _columns(path: Path) -> list[str]:
    suffix = path.suffix.lower()
    if suffix == ".csv":
        with path.open(encoding=ENCODING, newline="") as fh:
            return next(csv.reader(fh), [])
    if suffix == ".parquet":
        try:
            import pyarrow.parquet as pq
        except ImportError as exc:
            raise DataFormatError(f"{path}: reading parquet needs pyarrow installed") from exc
        return list(pq.read_schema(path).names)
    if suffix in (".jsonl", ".json"):
        rows = _read_records(path, (), "auto-detected")
        return list(rows[0][1])
    return []


def detect_format(path: str | Path) -> str:
    """Name of the published format of ``path`` (a folder is the original MMLU layout)."""
    p = Path(path)
    if p.is_dir():
        if any((p / s).is_dir() or (p / "data" / s).is_dir() for s in MMLU_SPLITS):
            return "mmlu"
        raise DataFormatError(f"{p}: a folder that is not an MMLU layout (no test/, dev/, val/); "
                              f"known formats: {', '.join(LOADERS)}")
    if p.suffix.lower() == ".json" and _stl_data(_file(p, "benchmark")) is not None:
        return "stl"
    columns = set(_columns(_file(p, "benchmark")))
    for name, required in _SIGNATURES:
        if required <= columns:
            return name
    raise DataFormatError(f"{p}: cannot tell the format from columns {_short(sorted(columns))}; "
                          f"known formats: {', '.join(LOADERS)} (pass fmt=...)")


def load_prompts_auto(path: str | Path, fmt: str = "auto") -> list[Item]:
    """Load any supported benchmark file, detecting its format unless ``fmt`` names one."""
    if fmt == "auto":
        fmt = detect_format(path)
    if fmt not in LOADERS:
        close = difflib.get_close_matches(fmt, list(LOADERS), n=1)
        raise ValueError(f"unknown benchmark format {fmt!r} for {path}"
                         + (f" (did you mean {close[0]!r}?)" if close else "")
                         + f"; known formats: {', '.join(LOADERS)}")
    return LOADERS[fmt](path)
