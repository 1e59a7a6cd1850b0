"""Items a train run (or a merge's Fisher draw) must not use: the declared split of an evaluation suite.

``exclude_items_of: [<suite name or YAML path>:<validation|test>]`` (train config) loads that split
of the suite exactly as the evaluate stage does (evaluate/splits.py) and removes every candidate
training row whose id or prompt_sha (the keys of evaluate's training-overlap check) it holds, before
the seeded sample is drawn. SST-2 example: suite ``sst2-heldout`` carves its validation from SST-2
train (ids ``sst2/train/<row>``); a utility adapter trained with ``exclude_items_of:
[sst2-heldout:validation]`` never sees those rows (nor their duplicates elsewhere in train), so the
validation split is held out and evaluate's overlap check passes without dropping anything. The
merge stage's ``fisher_exclude_items_of`` does the same for its Fisher examples (they join the merged
adapter's ``training_items.json``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from sst_lab.config import ConfigError

SPLITS = ("validation", "test")
HELD_OUT_FILE = "held_out_items.json"  # beside the adapter's training_items.json: what was excluded, why


@dataclass(frozen=True)
class HeldOut:
    """The union of the declared suite splits' item ids and prompt_shas, with their provenance."""

    ids: frozenset[str] = frozenset()
    shas: frozenset[str] = frozenset()
    sources: dict[str, dict[str, Any]] = field(default_factory=dict, hash=False)  # ref -> suite, split, n_items


def parse_ref(ref: str, field_name: str = "exclude_items_of") -> tuple[str, str]:
    """``<suite>:<split>`` -> (suite, split); an error naming the field otherwise."""
    suite, sep, split = str(ref).rpartition(":")
    if not sep or not suite or split not in SPLITS:
        raise ConfigError(f"{field_name}: {ref!r} must be '<suite name or YAML path>:<split>' with split one "
                          f"of {SPLITS} (e.g. sst2-heldout:validation)")
    return suite, split


def check_refs(refs: Any, field_name: str) -> None:
    """A config field of suite-split references: a non-empty list whose every entry parses."""
    if isinstance(refs, str) or not refs:
        raise ConfigError(f"{field_name} must be a non-empty list of '<suite>:<split>', got {refs!r}")
    for ref in refs:
        parse_ref(ref, field_name)


def held_out_items(refs: list[str], field_name: str = "exclude_items_of") -> HeldOut:
    """Load every ``<suite>:<split>`` of ``refs``; a missing suite or data file fails naming it."""
    from sst_lab.evaluate.splits import SplitError, load_split
    from sst_lab.evaluate.suites import SuiteError, load_items, load_suite

    ids: set[str] = set()
    shas: set[str] = set()
    sources: dict[str, dict[str, Any]] = {}
    for ref in refs:
        name, split = parse_ref(ref, field_name)
        try:
            spec = load_suite(name)
            loaded, record = load_split(spec, split, None, load_items)
        except (SuiteError, SplitError, FileNotFoundError) as exc:
            raise ConfigError(f"{field_name}: {ref!r}: {exc}") from exc
        ids.update(it.id for it in loaded.items)
        shas.update(it.prompt_sha for it in loaded.items)
        sources[ref] = {"suite": spec.label, "source": spec.source, "split": split, "rule": record.rule,
                        "n_items": len(loaded.items), "data_sha256": loaded.data_sha256}
    return HeldOut(frozenset(ids), frozenset(shas), sources)


def drop_held_out(records: list[dict[str, Any]], held: HeldOut) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """(kept, dropped): a record is dropped when its id or its prompt_sha is held out."""
    kept, dropped = [], []
    for r in records:
        (dropped if r["id"] in held.ids or r["prompt_sha"] in held.shas else kept).append(r)
    return kept, dropped


def exclude_held_out(records: list[dict[str, Any]], refs: list[str], source: str,
                     field_name: str = "exclude_items_of") -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """(the rows ``refs`` do not hold, the record of ``held_out_items.json``). A split none of whose
    items is among the rows is recorded with ``n_excluded`` 0, not refused (a suite of another data set)."""
    held = held_out_items(refs, field_name)
    kept, dropped = drop_held_out(records, held)
    if not kept:
        raise ConfigError(f"{field_name} {refs}: every row of {source} is held out; nothing is left to train on")
    print(f"{field_name} {refs}: {len(dropped)} of {len(records)} rows of {source} held out "
          f"(suite items: {sum(s['n_items'] for s in held.sources.values())})", flush=True)
    return kept, {field_name: list(refs), "sources": held.sources, "n_candidates": len(records),
                  "n_excluded": len(dropped), "excluded_ids": [r["id"] for r in dropped]}
