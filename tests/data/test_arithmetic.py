"""The arithmetic task: determinism, held-out problems, the exact-match gold scorer, and ingest keeping `answer`."""

from __future__ import annotations

import datetime
import json
import re
from functools import cache
from pathlib import Path

import datasets
import pytest

from flows.config import load_config
from stages.common.config import ConfigError
from stages.common.hf import EOS_TOKEN
from stages.common.store import ArtifactStore
from stages.data import arithmetic, demo
from stages.data.arithmetic import gold_score, parse_problem
from stages.data.demo import DemoConfig
from stages.data.ingest import ingest, task_gold_scorer
from stages.data.read import DataError, load_dataset_artifact, load_source

TINY = DemoConfig(size="tiny")
PROMPT = "User: What is 12 + 7?\nAssistant:"


@cache
def tiny(seed: int = 0) -> dict:
    return arithmetic.generate(DemoConfig(size="tiny", seed=seed))


def _problem_key(prompt: str) -> frozenset[int]:
    """{a, b}: the same problem whichever way round it is asked."""
    problem = parse_problem(prompt)
    assert problem is not None, prompt
    return frozenset(problem)


def _prompts(rows: list[dict]) -> list[str]:
    return [r["prompt"] for r in rows]


# --- the generator ---
def test_same_seed_same_rows_other_seed_other_rows() -> None:
    again = arithmetic.generate(DemoConfig(size="tiny", seed=0))
    assert again == tiny(0)
    assert tiny(1)["prompts"] != tiny(0)["prompts"]


def test_sizes_follow_the_demo_task() -> None:
    spec, sets = demo.SIZES["tiny"], tiny()
    for name in ("sft", "preferences", "prompts"):
        assert (len(sets[name]["train"]), len(sets[name]["test"])) == getattr(spec, name)
    assert len(sets["corpus"]["test"]) == spec.corpus_test_rows
    size = sum(len(r["text"].encode()) + 1 for r in sets["corpus"]["train"])
    assert spec.corpus_train_bytes <= size < spec.corpus_train_bytes + 1_000


def test_train_and_test_problems_are_disjoint_in_every_set() -> None:
    sets = tiny()
    train = {_problem_key(p) for name in ("sft", "preferences", "prompts") for p in _prompts(sets[name]["train"])}
    test = {_problem_key(p) for name in ("sft", "preferences", "prompts") for p in _prompts(sets[name]["test"])}
    assert train and test and not train & test
    # the pretraining corpus states train problems only
    sums = {frozenset(map(int, m)) for r in sets["corpus"]["train"] for m in _sums_stated(r["text"])}
    assert sums and not sums & test


def _sums_stated(text: str) -> list[tuple[str, str]]:
    """The operands of every sum a corpus paragraph states ("3 + 4", "3 plus 4", "sum of 3 and 4", "Add 3 and 4")."""
    return re.findall(r"(\d+) (?:\+|plus|and) (\d+)", text)


def test_every_reply_is_in_the_prompt_form_and_scored_by_gold() -> None:
    sets = tiny()
    for split in ("train", "test"):
        for r in sets["sft"][split]:
            assert r["completion"].startswith(" ") and gold_score(r["prompt"], r["completion"]) == 1.0
        for r in sets["prompts"][split]:
            assert gold_score(r["prompt"], r["answer"]) == 1.0 and r["answer"] == r["answer"].strip()
        for r in sets["preferences"][split]:
            assert gold_score(r["prompt"], r["chosen"]) == 1.0 and gold_score(r["prompt"], r["rejected"]) == 0.0
        keys = [json.dumps(r) for r in sets["preferences"][split]]
        assert len(set(keys)) == len(keys)  # validate refuses a pair given twice


@pytest.mark.parametrize(
    "response, score",
    [
        (" 19", 1.0),
        ("19", 1.0),
        (f" 19{EOS_TOKEN}", 1.0),
        (" 19 \n", 1.0),
        (" 18", 0.0),
        (" 20", 0.0),
        (" 019", 0.0),  # exact match: the number as written, no leading zero
        (" 19.", 0.0),
        (" The answer is 19.", 0.0),
        (" 19 19", 0.0),
        (" -19", 0.0),
        ("", 0.0),
    ],
)
def test_gold_score_hand_scored(response: str, score: float) -> None:
    assert gold_score(PROMPT, response) == score


@pytest.mark.parametrize(
    "prompt, problem",
    [
        ("User: Hi! What is the sum of 3 and 99?\nAssistant:", (3, 99)),
        ("User: Quick question. Add 0 and 0.\nAssistant:", (0, 0)),
        ("User: What is 12 + 7?\nAssistant: ", (12, 7)),
        ("User: What is 12 - 7?\nAssistant:", None),  # not a problem of this task
        ("User: What is 12 + 7?", None),  # no "Assistant:"
        ("User: Describe the cat.\nAssistant:", None),
        ("What is 12 + 7?", None),
    ],
)
def test_prompts_parse_back_and_malformed_ones_score_zero(prompt: str, problem) -> None:
    assert parse_problem(prompt) == problem
    if problem is None:
        assert gold_score(prompt, " 19") == 0.0 and not arithmetic.follows_format(prompt, " 19")


# --- ingest ---
def test_ingest_arithmetic_keeps_answer_and_records_the_task(tmp_path: Path) -> None:
    store = ArtifactStore(tmp_path / "store")
    art = ingest("demo", "prompts", store, demo_cfg=TINY, task="arithmetic")
    assert art.manifest["extra"] == {"format": "prompts", "task": "arithmetic"}
    assert art.manifest["config"]["task"] == "arithmetic"
    for split in ("train", "test"):
        rows = load_dataset_artifact(art, split)
        assert rows.column_names == ["prompt", "answer"] and rows.to_list() == tiny()["prompts"][split]
    assert task_gold_scorer(art) is arithmetic.gold_score
    prefs = ingest("demo", "preferences", store, demo_cfg=TINY, task="arithmetic")  # validation accepts every pair
    assert prefs.metrics == {"train_rows": 800, "test_rows": 100}


def test_the_default_task_is_still_demo(tmp_path: Path) -> None:
    store = ArtifactStore(tmp_path / "store")
    art = ingest("demo", "prompts", store, demo_cfg=TINY)
    assert art.manifest["extra"]["task"] == "demo" and task_gold_scorer(art) is demo.gold_score
    assert load_dataset_artifact(art, "train").to_list() == demo.generate(TINY)["prompts"]["train"]
    with pytest.raises(DataError, match="unknown data task 'algebra'"):
        ingest("demo", "prompts", store, demo_cfg=TINY, task="algebra")


def _write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def test_a_prompt_file_keeps_its_answer_column(tmp_path: Path) -> None:
    store = ArtifactStore(tmp_path / "store")
    rows = [{"id": i, "prompt": f"User: What is {i} + 1?\nAssistant:", "answer": str(i + 1), "tags": ["add"]}
            for i in range(10)]  # fmt: skip
    art = ingest(str(_write_jsonl(tmp_path / "p.jsonl", rows)), "prompts", store, demo_cfg=TINY, task="arithmetic")
    assert art.manifest["extra"] == {"format": "prompts", "task": None}  # a user's file, whatever data.task says
    assert task_gold_scorer(art) is None
    loaded = load_dataset_artifact(art, "train").to_list() + load_dataset_artifact(art, "test").to_list()
    assert sorted(loaded, key=lambda r: r["id"]) == [{"prompt": r["prompt"], "id": r["id"], "answer": r["answer"],
                                                      "tags": r["tags"]} for r in rows]  # fmt: skip
    sft = [{"prompt": "p", "completion": " c", "answer": "x"}]  # other formats still drop extra columns
    assert load_source(str(_write_jsonl(tmp_path / "s.jsonl", sft)), "sft").column_names == ["prompt", "completion"]


def _one_line_error(source: str) -> str:
    with pytest.raises(DataError) as info:
        load_source(source, "prompts")
    assert "\n" not in str(info.value)
    return str(info.value)


def test_a_prompt_column_that_is_not_json_names_row_and_column(tmp_path: Path) -> None:
    when = [datetime.datetime(2024, 1, 1), datetime.datetime(2024, 1, 2)]  # parquet timestamps come back as datetime
    f = tmp_path / "p.parquet"
    datasets.Dataset.from_dict({"prompt": ["a", "b"], "when": when}).to_parquet(str(f))
    msg = _one_line_error(str(f))
    assert msg.startswith(f"{f}: row 0: column 'when' (passed to reward functions) must hold strings")
    assert "datetime" in msg
    nested = _write_jsonl(tmp_path / "d.jsonl", [{"prompt": "a", "meta": {"k": 1}}, {"prompt": "b", "meta": {"j": 2}}])
    assert "row 0: column 'meta'" in _one_line_error(str(nested))  # a struct would come back with null-filled keys


# --- the config key ---
def test_data_task_parses_and_an_unknown_one_is_one_line() -> None:
    assert load_config("tiny").data.task == "demo"
    assert load_config("tiny", overrides=["data.task=arithmetic"]).data.task == "arithmetic"
    with pytest.raises(ConfigError) as info:
        load_config("tiny", overrides=["data.task=foo"])
    msg = str(info.value)
    assert "\n" not in msg and msg.startswith("config error in --set data.task=foo: data.task: expected one of")
    assert "'arithmetic'" in msg and "'foo'" in msg
