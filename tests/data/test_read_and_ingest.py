"""Data loading: every DataError case says what is wrong in one line; each file type loads; ingest round-trips."""

from __future__ import annotations

import json
from pathlib import Path

import datasets
import huggingface_hub.constants
import pytest

from stages.common.store import ArtifactStore
from stages.data import demo
from stages.data import ingest as data_ingest
from stages.data import read as data_read
from stages.data.demo import DemoConfig
from stages.data.ingest import ingest
from stages.data.read import DataError, load_dataset_artifact, load_source

TINY = DemoConfig(size="tiny")


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def error_of(fn, *args, **kwargs) -> str:
    with pytest.raises(DataError) as info:
        fn(*args, **kwargs)
    message = str(info.value)
    assert "\n" not in message, message
    return message


PREFS = [
    {
        "prompt": f"User: Describe the cat {i}.\nAssistant:",
        "chosen": " The cat is happy.",
        "rejected": " The cat is sad.",
    }
    for i in range(20)
]


# --- errors ---
def test_missing_column_names_missing_and_found(tmp_path: Path) -> None:
    f = write_jsonl(tmp_path / "p.jsonl", [{"prompt": "a", "answer": "b"}])
    msg = error_of(load_source, str(f), "preferences")
    assert str(f) in msg and "missing column(s) chosen, rejected" in msg and "found columns: prompt, answer" in msg


def test_missing_column_with_alternatives(tmp_path: Path) -> None:
    f = write_jsonl(tmp_path / "s.jsonl", [{"text": "hello"}])
    msg = error_of(load_source, str(f), "sft")
    assert "expected prompt, completion or messages" in msg and "found columns: text" in msg


def test_empty_file(tmp_path: Path) -> None:
    f = tmp_path / "empty.jsonl"
    f.write_text("")
    assert "empty data set" in error_of(load_source, str(f), "corpus")


def test_empty_data_set_with_columns(tmp_path: Path) -> None:
    f = tmp_path / "empty.parquet"
    datasets.Dataset.from_dict({"text": []}).to_parquet(str(f))
    msg = error_of(load_source, str(f), "corpus")
    assert str(f) in msg and "empty data set" in msg


def test_chosen_equals_rejected_names_row(tmp_path: Path) -> None:
    rows = [dict(r) for r in PREFS]
    rows[3]["rejected"] = rows[3]["chosen"]
    msg = error_of(load_source, str(write_jsonl(tmp_path / "p.jsonl", rows)), "preferences")
    assert "row 3" in msg and "chosen and rejected are the same" in msg


def test_non_string_values(tmp_path: Path) -> None:
    f = write_jsonl(tmp_path / "c.jsonl", [{"text": 1}, {"text": 2}])
    msg = error_of(load_source, str(f), "corpus")
    assert "row 0" in msg and "'text' must hold strings" in msg and "found 1" in msg
    f = write_jsonl(tmp_path / "n.jsonl", [{"prompt": "a"}, {"prompt": None}])
    assert "row 1" in error_of(load_source, str(f), "prompts")
    f = write_jsonl(tmp_path / "m.jsonl", [{"messages": [{"role": "user"}]}])
    assert "'messages' must hold a list of {role, content}" in error_of(load_source, str(f), "sft")


def test_unreadable_file(tmp_path: Path) -> None:
    f = tmp_path / "bad.jsonl"
    f.write_text('{"text": "fine"}\n{"text": broken\n')
    msg = error_of(load_source, str(f), "corpus")
    assert str(f) in msg and "cannot read as json" in msg


def test_unknown_extension(tmp_path: Path) -> None:
    f = tmp_path / "data.csv"
    f.write_text("text\nhello\n")
    msg = error_of(load_source, str(f), "corpus")
    assert "unknown file type '.csv'" in msg and ".jsonl" in msg


def test_missing_file_and_unknown_format(tmp_path: Path) -> None:
    assert "no such file" in error_of(load_source, str(tmp_path / "nope.jsonl"), "corpus")
    assert "unknown data format 'chat'" in error_of(load_source, "x.jsonl", "chat")


def test_directory_without_train_file(tmp_path: Path) -> None:
    write_jsonl(tmp_path / "test.jsonl", [{"text": "a"}])
    msg = error_of(load_source, str(tmp_path), "corpus")
    assert "no train file" in msg and "test.jsonl" in msg


def test_missing_split(tmp_path: Path) -> None:
    f = write_jsonl(tmp_path / "c.jsonl", [{"text": "a"}])
    assert "no 'test' split (found: train)" in error_of(load_source, str(f), "corpus", split="test")


def test_hub_name_without_network(monkeypatch: pytest.MonkeyPatch) -> None:
    # offline mode makes the hub client fail at once instead of retrying for ~25 s; the path taken is the real one
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    for source in ("hf:someone/no-such-set", "hf:imdb"):
        msg = error_of(load_source, source, "corpus")
        assert source.removeprefix("hf:") in msg and "cannot load from the Hugging Face Hub" in msg
    # a bare name is a local path: not there, it says so and how to name a Hub set, and never asks the Hub
    msg = error_of(load_source, "imdb", "corpus")
    assert "imdb: no such file or directory" in msg and "hf:imdb" in msg and "Hugging Face Hub data set" in msg


# --- each file type loads ---
def test_jsonl_json_parquet_load_the_same_rows(tmp_path: Path) -> None:
    write_jsonl(tmp_path / "p.jsonl", PREFS)
    (tmp_path / "p.json").write_text(json.dumps(PREFS))
    datasets.Dataset.from_list(PREFS).to_parquet(str(tmp_path / "p.parquet"))
    for ext in ("jsonl", "json", "parquet"):
        ds = load_source(str(tmp_path / f"p.{ext}"), "preferences")
        assert ds.column_names == ["prompt", "chosen", "rejected"] and ds.to_list() == PREFS, ext


def test_txt_lines_and_paragraphs(tmp_path: Path) -> None:
    (tmp_path / "lines.txt").write_text("The cat is happy.\nThe dog is sad.\n\n")
    (tmp_path / "paras.txt").write_text("The cat is happy.\nIt sleeps.\n\nThe dog is sad.\n")
    assert load_source(str(tmp_path / "lines.txt"), "corpus")["text"][:] == ["The cat is happy.", "The dog is sad."]
    paras = load_source(str(tmp_path / "paras.txt"), "corpus")["text"][:]
    assert len(paras) == 2 and paras[0].startswith("The cat is happy.") and "It sleeps." in paras[0]


def test_extra_columns_are_dropped_and_messages_accepted(tmp_path: Path) -> None:
    f = write_jsonl(tmp_path / "s.jsonl", [{"prompt": "p", "completion": " c", "id": 7}])
    assert load_source(str(f), "sft").column_names == ["prompt", "completion"]
    chat = [{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}]
    assert load_source(str(write_jsonl(tmp_path / "m.jsonl", chat)), "sft").to_list() == chat


def test_directory_with_splits(tmp_path: Path) -> None:
    demo.write_jsonl_dir(demo.generate(TINY), tmp_path)
    test = load_source(str(tmp_path / "sft"), "sft", split="test")
    assert len(test) == demo.SIZES["tiny"].sft[1]


# --- ingest (needs the real store) ---
def test_ingest_demo_round_trip_and_dedup(tmp_path: Path) -> None:
    store = ArtifactStore(tmp_path / "store")
    art = ingest("demo", "preferences", store, demo_cfg=TINY)
    assert (art.name, art.kind, art.version) == ("preference-data", "dataset", 1)
    assert art.manifest["extra"] == {"format": "preferences", "task": "demo"}
    expected = demo.generate(TINY)["preferences"]
    assert art.metrics == {"train_rows": len(expected["train"]), "test_rows": len(expected["test"])}
    for split in ("train", "test"):
        assert load_dataset_artifact(art, split).to_list() == expected[split]
    again = ingest("demo", "preferences", store, demo_cfg=TINY)
    assert (again.version, again.digest) == (1, art.digest)  # same data, same version
    other = ingest("demo", "preferences", store, demo_cfg=DemoConfig(size="tiny", seed=1))
    assert other.version == 2 and other.digest != art.digest


def test_ingest_written_demo_files_gives_the_same_digest(tmp_path: Path) -> None:
    store = ArtifactStore(tmp_path / "store")
    demo.write_jsonl_dir(demo.generate(TINY), tmp_path / "out")
    from_demo = ingest("demo", "sft", store, demo_cfg=TINY)
    from_files = ingest(str(tmp_path / "out" / "sft"), "sft", store, demo_cfg=TINY)
    assert from_files.digest == from_demo.digest and from_files.version == from_demo.version


def test_ingest_file_seeded_split(tmp_path: Path) -> None:
    store = ArtifactStore(tmp_path / "store")
    f = write_jsonl(tmp_path / "p.jsonl", PREFS)
    art = ingest(str(f), "preferences", store, demo_cfg=TINY, test_fraction=0.25, seed=3)
    assert art.metrics == {"train_rows": 15, "test_rows": 5}
    assert art.manifest["extra"] == {"format": "preferences", "task": None}
    train, test = (load_dataset_artifact(art, s).to_list() for s in ("train", "test"))
    assert sorted(r["prompt"] for r in train + test) == sorted(r["prompt"] for r in PREFS)
    assert not {r["prompt"] for r in train} & {r["prompt"] for r in test}
    assert ingest(str(f), "preferences", store, demo_cfg=TINY, test_fraction=0.25, seed=3).version == 1
    assert ingest(str(f), "preferences", store, demo_cfg=TINY, test_fraction=0.25, seed=4).digest != art.digest


def test_ingest_errors(tmp_path: Path) -> None:
    store = ArtifactStore(tmp_path / "store")
    f = write_jsonl(tmp_path / "one.jsonl", [{"text": "a"}])
    assert "cannot be split" in error_of(ingest, str(f), "corpus", store, demo_cfg=TINY)
    assert "test_fraction" in error_of(ingest, str(f), "corpus", store, demo_cfg=TINY, test_fraction=1.0)
    assert store.list() == []


def test_load_dataset_artifact_rejects_other_kinds(tmp_path: Path) -> None:
    store = ArtifactStore(tmp_path / "store")
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "config.json").write_text("{}")
    model = store.publish(tmp_path / "m", name="base-model", kind="causal-lm", stage="pretrain")
    assert "expected a dataset artifact" in error_of(load_dataset_artifact, model, "train")
    assert set(data_ingest.DATASET_NAMES) == set(data_read.FORMATS)


# --- content checks before publishing (issue 12) ---
USER = {"role": "user", "content": "Describe the cat."}
REPLY = {"role": "assistant", "content": "The cat is calm."}


@pytest.mark.parametrize(
    ("fmt", "rows", "expected"),
    [
        ("corpus", [{"text": "fine"}, {"text": "  "}], "row 1: column 'text' is empty"),
        ("prompts", [{"prompt": ""}], "row 0: column 'prompt' is empty"),
        ("sft", [{"prompt": "p", "completion": " c"}, {"prompt": " ", "completion": " c"}], "row 1: column 'prompt'"),
        ("sft", [{"prompt": "p", "completion": ""}], "row 0: column 'completion' is empty"),
        ("preferences", [{**PREFS[0], "chosen": ""}], "row 0: column 'chosen' is empty"),
        ("preferences", [{**PREFS[0], "rejected": "\n"}], "row 0: column 'rejected' is empty"),
        ("preferences", [PREFS[0], PREFS[1], dict(PREFS[0])], "row 2: the same prompt/chosen/rejected pair as row 0"),
        ("sft", [{"messages": [USER]}], "must end in an assistant reply after at least one turn, found 1 turn"),
        ("sft", [{"messages": [USER, {**REPLY, "content": " "}]}], "the last (assistant) turn is empty"),
        ("sft", [{"prompt": [USER], "completion": " c"}], "row 0: mixes strings and message lists"),
        ("sft", [{"prompt": [USER], "completion": [USER]}], "'completion' must hold assistant turns only"),
        ("prompts", [{"prompt": [USER, REPLY]}], "'prompt' must not end with an assistant turn"),
        ("prompts", [{"prompt": [{**USER, "content": ""}]}], "every turn's content is blank"),
        (
            "preferences",
            [{"prompt": [USER], "chosen": [REPLY], "rejected": [REPLY]}],
            "chosen and rejected are the same",
        ),
    ],
    ids=[
        "corpus-blank",
        "prompt-empty",
        "sft-prompt-blank",
        "completion-empty",
        "chosen-empty",
        "rejected-blank",
        "duplicate-pair",
        "messages-one-turn",
        "messages-empty-reply",
        "mixed-row",
        "completion-user-turn",
        "prompt-ends-assistant",
        "prompt-turns-blank",
        "chat-chosen-equals-rejected",
    ],
)
def test_validation_rejects_what_a_stage_would_refuse(tmp_path: Path, fmt, rows, expected) -> None:
    f = write_jsonl(tmp_path / "d.jsonl", rows)
    msg = error_of(load_source, str(f), fmt)
    assert str(f) in msg and expected in msg, msg
    store = ArtifactStore(tmp_path / "store")
    error_of(ingest, str(f), fmt, store, demo_cfg=TINY)
    assert store.list() == []  # nothing was published


def test_conversational_rows_are_accepted(tmp_path: Path) -> None:
    prefs = [
        {"prompt": [USER], "chosen": [REPLY], "rejected": [{"role": "assistant", "content": f"No {i}."}]}
        for i in range(4)
    ]
    assert load_source(str(write_jsonl(tmp_path / "p.jsonl", prefs)), "preferences").to_list() == prefs
    sft = [{"prompt": [USER], "completion": [REPLY]}]
    assert load_source(str(write_jsonl(tmp_path / "s.jsonl", sft)), "sft").to_list() == sft
    prompts = [{"prompt": [{"role": "system", "content": "Be brief."}, USER]}]
    assert load_source(str(write_jsonl(tmp_path / "q.jsonl", prompts)), "prompts").to_list() == prompts


# --- column map ---
def test_column_map_renames_before_validation_and_enters_the_config(tmp_path: Path) -> None:
    store = ArtifactStore(tmp_path / "store")
    renamed = [
        {"question": r["prompt"], "better": r["chosen"], "worse": r["rejected"], "id": i} for i, r in enumerate(PREFS)
    ]
    f = write_jsonl(tmp_path / "p.jsonl", renamed)
    columns = {"prompt": "question", "chosen": "better", "rejected": "worse"}
    art = ingest(str(f), "preferences", store, demo_cfg=TINY, columns=columns)
    assert art.manifest["config"]["columns"] == {"chosen": "better", "prompt": "question", "rejected": "worse"}
    rows = load_dataset_artifact(art, "train").to_list() + load_dataset_artifact(art, "test").to_list()
    assert sorted(rows, key=lambda r: r["prompt"]) == sorted(PREFS, key=lambda r: r["prompt"])
    plain = ingest(str(write_jsonl(tmp_path / "plain.jsonl", PREFS)), "preferences", store, demo_cfg=TINY)
    assert (plain.digest, plain.version) == (art.digest, art.version)  # the same rows: the same files and version
    # A file that has both `chosen` and the mapped column: the mapped one is what the map asks for.
    both = [{**r, "better": r["rejected"] + " (better)"} for r in PREFS]
    art2 = ingest(
        str(write_jsonl(tmp_path / "both.jsonl", both)),
        "preferences",
        store,
        demo_cfg=TINY,
        columns={"chosen": "better"},
    )
    assert all(r["chosen"].endswith("(better)") for r in load_dataset_artifact(art2, "train").to_list())


def test_column_map_errors_name_the_problem(tmp_path: Path) -> None:
    store = ArtifactStore(tmp_path / "store")
    f = write_jsonl(tmp_path / "p.jsonl", [{"prompt": "p", "better": "a", "worse": "b"}] * 2)
    msg = error_of(ingest, str(f), "preferences", store, demo_cfg=TINY, columns={"winner": "better"})
    assert "names unknown column(s) winner" in msg and "expected keys among chosen, prompt, rejected" in msg
    msg = error_of(ingest, str(f), "preferences", store, demo_cfg=TINY, columns={"chosen": "best", "rejected": "worse"})
    assert "column map chosen <- best: no such column" in msg and "found columns: prompt, better, worse" in msg
    msg = error_of(ingest, str(f), "preferences", store, demo_cfg=TINY, columns={"chosen": "better"})
    assert "missing column(s) rejected" in msg  # the map renames; validation still checks the result
    assert "not to the generated demo data" in error_of(
        ingest, "demo", "sft", store, demo_cfg=TINY, columns={"prompt": "q"}
    )
    assert store.list() == []
