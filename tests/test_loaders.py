"""Tests for sst_lab.evaluate.loaders: the real shared files in place, small files in every other
published format, and every error path naming the file and the column."""

from __future__ import annotations

import csv
import json
import re
from pathlib import Path

import pytest

from sst_lab.evaluate import loaders as L
from sst_lab.evaluate.loaders import DataFormatError, Item

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"


@pytest.fixture(scope="module")
def shared() -> Path:
    if not SHARED.is_dir():
        pytest.skip(f"real benchmark files not available ({SHARED} is absent)")
    return SHARED


def write_csv(path: Path, header: list[str], rows: list[list[str]]) -> Path:
    with path.open("w", encoding="utf-8", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(header)
        writer.writerows(rows)
    return path


# --------------------------------------------------------------------------- real files


def test_real_advbench(shared):
    items = L.load_prompts_auto(shared / "advbench" / "harmful_behaviors.csv")
    assert len(items) == 520 and len({i.id for i in items}) == 520
    assert items[0].id == "advbench/0" and items[0].suite == "advbench"
    assert items[0].prompt.startswith("Write a script that can exploit vulnerabilities")
    assert items[0].meta["target"].startswith("Sure, here is")


def test_real_xstest(shared):
    items = L.load_prompts_auto(shared / "xstest" / "xstest_prompts.csv")
    assert len(items) == 450
    assert sum(i.label == "safe" for i in items) == 250
    assert sum(i.label == "unsafe" for i in items) == 200
    assert items[0].id == "xstest/1" and items[0].meta["type"] == "homonyms"


def test_real_mmlu(shared):
    test = L.load_prompts_auto(shared / "mmlu" / "data")
    assert len(test) == 14042 and len({i.meta["subject"] for i in test}) == 57
    assert all(i.answer in "ABCD" and len(i.choices) == 4 for i in test)
    assert len({i.id for i in test}) == 14042
    assert len(L.load_mmlu(shared / "mmlu", "dev")) == 285
    assert len(L.load_mmlu(shared / "mmlu" / "data", "val")) == 1531
    shots = L.load_mmlu_dev(shared / "mmlu" / "data", "abstract_algebra", 5)
    assert [s.id for s in shots] == [f"mmlu/dev/abstract_algebra/{i}" for i in range(5)]
    with pytest.raises(ValueError, match="k=6"):
        L.load_mmlu_dev(shared / "mmlu" / "data", "abstract_algebra", 6)
    with pytest.raises(ValueError, match="did you mean abstract_algebra"):
        L.load_mmlu(shared / "mmlu" / "data", subjects=["abstract_algebr"])


def test_real_gsm8k(shared):
    test = L.load_prompts_auto(shared / "gsm8k" / "test.jsonl")
    assert len(test) == 1319 and test[0].id == "gsm8k/test/0" and test[0].answer == "18"
    assert all(re.fullmatch(r"-?\d+", i.answer) for i in test)  # "2,125" -> "2125"
    assert all(L.extract_final_number(i.meta["solution"]) == i.answer for i in test)
    assert len(L.load_gsm8k(shared / "gsm8k" / "train.jsonl")) == 7473


def test_mmlu_hf_layout_gives_the_same_items_as_the_original(shared, tmp_path):
    original = L.load_mmlu(shared / "mmlu" / "data", "test", ["anatomy", "astronomy"])
    records = [{"question": i.prompt, "subject": i.meta["subject"], "choices": list(i.choices),
                "answer": "ABCD".index(i.answer)} for i in original]
    (tmp_path / "mmlu.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    assert L.load_prompts_auto(tmp_path / "mmlu.jsonl") == original
    assert L.load_mmlu(tmp_path / "mmlu.jsonl", subjects=["astronomy"]) == \
        [i for i in original if i.meta["subject"] == "astronomy"]


# --------------------------------------------------------------------------- other formats

HARMBENCH_HEADER = ["Behavior", "FunctionalCategory", "SemanticCategory", "Tags",
                    "ContextString", "BehaviorID"]


def test_harmbench_contextual_and_filter(tmp_path):
    path = write_csv(tmp_path / "harmbench_behaviors_text_all.csv", HARMBENCH_HEADER, [
        ["Placeholder standard behaviour", "standard", "illegal", "", "", "std_1"],
        ["Placeholder contextual behaviour", "contextual", "misinformation_disinformation",
         "context", "Line one of context,\n\"quoted\" line two", "ctx_1"],
        ["Placeholder lyrics request", "copyright", "copyright", "lyrics, hash_check", "", "cr_1"],
    ])
    items = L.load_prompts_auto(path)
    assert [i.id for i in items] == ["harmbench/std_1", "harmbench/ctx_1", "harmbench/cr_1"]
    assert items[0].prompt == "Placeholder standard behaviour" and items[0].label == "illegal"
    assert items[1].prompt == ("Line one of context,\n\"quoted\" line two\n\n---\n\n"
                               "Placeholder contextual behaviour")
    assert items[1].meta["behavior"] == "Placeholder contextual behaviour"
    kept = L.load_harmbench(path, exclude_functional=["copyright"])
    assert [i.id for i in kept] == ["harmbench/std_1", "harmbench/ctx_1"]
    assert len(L.load_harmbench(path, functional_categories=["standard"])) == 1
    with pytest.raises(ValueError, match="copyrigth"):
        L.load_harmbench(path, exclude_functional=["copyrigth"])


def test_jbb_current_and_earlier_headers(tmp_path):
    row = ["Placeholder goal", "Sure, here is a placeholder", "Defamation",
           "Harassment/Discrimination", "Original"]
    harmful = write_csv(tmp_path / "harmful-behaviors.csv",
                        ["Index", "Goal", "Target", "Behavior", "Category", "Source"],
                        [["1", *row], ["2", *row]])
    items = L.load_prompts_auto(harmful)
    assert [i.id for i in items] == ["jbb_harmful/1", "jbb_harmful/2"]
    assert items[0].suite == "jbb_harmful" and items[0].label == "Harassment/Discrimination"
    assert items[0].meta["source"] == "Original" and items[0].meta["behavior"] == "Defamation"
    benign = write_csv(tmp_path / "benign-behaviors.csv",  # unnamed index, no Source column
                       ["", "Goal", "Target", "Behavior", "Category"], [["0", *row[:4]]])
    items = L.load_jbb(benign)
    assert items[0].id == "jbb_benign/0" and items[0].meta["source"] is None


def test_strongreject(tmp_path):
    path = write_csv(tmp_path / "strongreject_small_dataset.csv",
                     ["category", "source", "forbidden_prompt"],
                     [["Disinformation and deception", "custom", "Placeholder prompt one"],
                      ["Violence", "DAN", "Placeholder prompt two"]])
    items = L.load_prompts_auto(path)
    assert [(i.id, i.label, i.meta["source"]) for i in items] == [
        ("strongreject/0", "Disinformation and deception", "custom"),
        ("strongreject/1", "Violence", "DAN")]


def test_mmlu_hf_layout_formats(tmp_path):
    records = [{"question": "Q1?", "subject": "anatomy", "choices": ["a", "b", "c", "d"],
                "answer": 2},
               {"question": "Q2?", "subject": "anatomy", "choices": ["e", "f", "g", "h"],
                "answer": 0}]
    (tmp_path / "m.json").write_text(json.dumps(records))
    write_csv(tmp_path / "m.csv", ["question", "subject", "choices", "answer"],  # pandas repr
              [[r["question"], r["subject"], repr(r["choices"]), str(r["answer"])]
               for r in records])
    expected = [Item(id="mmlu/test/anatomy/0", prompt="Q1?", suite="mmlu",
                     choices=("a", "b", "c", "d"), answer="C"),
                Item(id="mmlu/test/anatomy/1", prompt="Q2?", suite="mmlu",
                     choices=("e", "f", "g", "h"), answer="A")]
    assert L.load_prompts_auto(tmp_path / "m.json") == expected
    assert L.load_prompts_auto(tmp_path / "m.csv") == expected
    pq = pytest.importorskip("pyarrow.parquet")
    import pyarrow as pa
    pq.write_table(pa.Table.from_pylist(records), tmp_path / "test-00000-of-00001.parquet")
    assert L.load_prompts_auto(tmp_path / "test-00000-of-00001.parquet") == expected


def test_extract_final_number_and_prompt_sha():
    assert L.extract_final_number("so 3 + 4 = 7\n#### 1,234") == "1234"
    assert L.extract_final_number("The answer is $1,000.50.") == "1000.5"
    assert L.extract_final_number("18.00 dollars, i.e. 18") == "18"
    assert L.extract_final_number("It is -3") == "-3"
    assert L.extract_final_number("#### no number, but 42 earlier") == "42"
    assert L.extract_final_number("no digits here") is None
    sha = L.prompt_sha("How do I\n  kill a  Python process?")
    assert sha == L.prompt_sha(" How do I kill a Python process? ")
    assert re.fullmatch(r"[0-9a-f]{16}", sha) and sha != L.prompt_sha("How do I kill a process?")


# --------------------------------------------------------------------------- errors


def test_missing_file_and_empty_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="nowhere.csv"):
        L.load_advbench(tmp_path / "nowhere.csv")
    empty = tmp_path / "empty.csv"
    empty.write_text("")
    for loader in (L.load_advbench, L.load_xstest, L.load_prompts_auto, L.load_gsm8k):
        with pytest.raises(DataFormatError, match=r"empty\.csv.*empty"):
            loader(empty)
    header_only = tmp_path / "header_only.csv"
    header_only.write_text("goal,target\n")
    with pytest.raises(DataFormatError, match=r"header_only\.csv.*no data rows"):
        L.load_advbench(header_only)


def test_missing_column_names_file_and_column(tmp_path):
    path = write_csv(tmp_path / "xs.csv", ["id", "prompt", "type", "focus", "note"],
                     [["1", "p", "homonyms", "kill", ""]])
    with pytest.raises(DataFormatError, match=r"xs\.csv.*missing column\(s\) 'label'"):
        L.load_xstest(path)
    path = write_csv(tmp_path / "hb.csv", HARMBENCH_HEADER[:-1], [["b", "standard", "x", "", ""]])
    with pytest.raises(DataFormatError, match=r"hb\.csv.*'BehaviorID'"):
        L.load_harmbench(path)
    path = tmp_path / "g.jsonl"
    path.write_text(json.dumps({"question": "q?"}) + "\n")
    with pytest.raises(DataFormatError, match=r"g\.jsonl.*'answer'"):
        L.load_gsm8k(path)


def test_bad_lines_name_file_and_line(tmp_path):
    path = tmp_path / "adv.csv"
    path.write_text("goal,target\nPlaceholder goal,Sure,extra field\n")
    with pytest.raises(DataFormatError, match=r"adv\.csv: line 2 has more fields"):
        L.load_advbench(path)
    path = write_csv(tmp_path / "xs.csv", ["id", "prompt", "type", "label", "focus", "note"],
                     [["1", "p", "homonyms", "maybe", "kill", ""]])
    with pytest.raises(DataFormatError, match=r"xs\.csv: line 2: column 'label'"):
        L.load_xstest(path)
    path = tmp_path / "test.jsonl"
    path.write_text(json.dumps({"question": "q?", "answer": "no final marker"}) + "\n")
    with pytest.raises(DataFormatError, match=r"test\.jsonl: line 1: column 'answer'"):
        L.load_gsm8k(path)
    (tmp_path / "data" / "test").mkdir(parents=True)
    bad = tmp_path / "data" / "test" / "anatomy_test.csv"
    bad.write_text("Q?,a,b,c,d,E\n")
    with pytest.raises(DataFormatError, match=r"anatomy_test\.csv: line 1"):
        L.load_mmlu(tmp_path)
    path = tmp_path / "m.json"
    path.write_text(json.dumps([{"question": "Q?", "subject": "s", "choices": ["a", "b"],
                                 "answer": 1}]))
    with pytest.raises(DataFormatError, match=r"m\.json: record 1: column 'choices'"):
        L.load_mmlu_hf(path)


def test_unknown_format(tmp_path):
    path = write_csv(tmp_path / "mystery.csv", ["text", "score"], [["hello", "1"]])
    with pytest.raises(DataFormatError, match=r"mystery\.csv.*known formats: advbench"):
        L.load_prompts_auto(path)
    with pytest.raises(ValueError, match=r"did you mean 'xstest'.*known formats"):
        L.load_prompts_auto(path, fmt="xtest")
    (tmp_path / "folder").mkdir()
    with pytest.raises(DataFormatError, match="folder.*not an MMLU layout"):
        L.load_prompts_auto(tmp_path / "folder")
    with pytest.raises(DataFormatError, match=r"prompts\.txt.*unknown extension"):
        (tmp_path / "prompts.txt").write_text("hello\n")
        L.load_gsm8k(tmp_path / "prompts.txt")
