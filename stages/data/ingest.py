"""Dataset artifacts: a source (a user's file, a hub data set, or a built-in task's generated rows) validated, split
and published as train.jsonl + test.jsonl; same rows give the same version. Also `rlhf artifacts import` for data.

"demo" as a source means the built-in task of TASKS named by `task` (config data.task) generates the rows; the
artifact records the task in extra.task, which is how later stages find its gold scorer (`task_of`).
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING, Any

from stages.common.artifact_import import ArtifactImportError, check_name
from stages.data import arithmetic, demo
from stages.data.demo import DemoConfig
from stages.data.read import (
    FORMATS,
    SPLITS,
    DataError,
    _check_format,
    _rows,
    _seeded_split,
    read_splits,
    rename_columns,
    validate,
)

if TYPE_CHECKING:
    import datasets

    from stages.common.store import Artifact, ArtifactStore

DATASET_NAMES = {"corpus": "corpus", "sft": "sft-data", "preferences": "preference-data", "prompts": "prompt-data"}
# The built-in tasks behind source "demo" (config data.task): each module has generate(DemoConfig) and
# gold_score(prompt, response). A generated data set records its task in the manifest's extra.task.
TASKS: dict[str, ModuleType] = {"demo": demo, "arithmetic": arithmetic}


class UnpublishedDataset:
    """Rows staged as train.jsonl/test.jsonl in a folder, not yet in the store: what a stage's input checks read
    (`kind`, `path`, `manifest`, `ref`, as an `Artifact`), named by the user's source in their error messages."""

    kind, version, digest = "dataset", 0, ""

    def __init__(self, source: str, name: str, path: str, manifest: dict[str, Any]):
        self.source, self.name, self.path, self.manifest = source, name, path, manifest

    @property
    def ref(self) -> str:
        return self.source

    @property
    def metrics(self) -> dict:
        return {}


def _read_validated(source: str, fmt: str, columns: dict[str, str] | None, test_fraction: float,
                    seed: int) -> tuple[dict[str, datasets.Dataset], bool]:  # fmt: skip
    """A user's source read, its columns mapped, validated and split as `ingest` publishes it; (splits, test given)."""
    loaded = read_splits(source)
    if columns:
        loaded = {
            split: rename_columns(ds, fmt, columns, f"{source} [{split}]" if len(loaded) > 1 else source)
            for split, ds in loaded.items()
        }
    if "test" in loaded:
        return {s: validate(loaded[s], fmt, f"{source} [{s}]") for s in SPLITS}, True
    return _seeded_split(validate(loaded["train"], fmt, source), test_fraction, seed, source), False


def check_source(source: str, fmt: str, *, columns: dict[str, str] | None = None, test_fraction: float = 0.1,
                 seed: int = 0) -> None:  # fmt: skip
    """Every check `ingest` makes of a local source, publishing nothing.

    `rlhf run` calls it for each data set before anything starts, so a bad file fails in seconds rather than after
    the stages before its own have run (and published). The demo data is generated, hub data sets are downloaded by
    `ingest` itself: both are left to it."""
    _check_format(fmt)
    if source == "demo":
        if columns:
            raise DataError(f"demo: a column map ({columns}) applies to a user's file, not to the generated demo data")
        return
    if source.startswith("hf:"):  # downloaded by ingest itself
        return
    if not 0.0 < test_fraction < 1.0:
        raise DataError(f"test_fraction must be in (0, 1), found {test_fraction}")
    _read_validated(source, fmt, columns, test_fraction, seed)


def ingest(
    source: str,
    fmt: str,
    store: ArtifactStore,
    *,
    demo_cfg: DemoConfig,
    task: str = "demo",
    test_fraction: float = 0.1,
    seed: int = 0,
    columns: dict[str, str] | None = None,
    name: str | None = None,
    check: Callable[[UnpublishedDataset], None] | None = None,
) -> Artifact:
    """Materialise a source as a dataset artifact (train.jsonl + test.jsonl); same rows give the same version.

    `task` (a key of TASKS) is the built-in task that generates the data when `source` is "demo"; it is recorded in the
    artifact's config and extra.task (None for a user's data), which is how later stages find its gold scorer.
    `columns` (canonical name -> the file's column) renames the file's columns before validation; it is recorded in
    the artifact's config. `name` publishes under another name than the format's default (`rlhf artifacts import`).
    `check` is the consuming stage's own input check (rows longer than its model's context, ...), run on the staged
    rows before they are published, so data the stage would refuse never becomes a dataset version; it is skipped
    when the store already holds these exact rows (nothing new would be published, and reruns stay fast).
    """
    _check_format(fmt)
    if not 0.0 < test_fraction < 1.0:
        raise DataError(f"test_fraction must be in (0, 1), found {test_fraction}")
    is_demo = source == "demo"
    if is_demo and columns:
        raise DataError(f"demo: a column map ({columns}) applies to a user's file, not to the generated demo data")
    if is_demo:
        splits = _task_module(task).generate(demo_cfg)[fmt]
        config: dict[str, Any] = {"source": source, "format": fmt, "task": task, "demo": demo_cfg.to_dict()}
    else:
        parts, test_given = _read_validated(source, fmt, columns, test_fraction, seed)
        splits = {s: _rows(parts[s]) for s in SPLITS}
        config = {
            "source": source,
            "format": fmt,
            "test_fraction": test_fraction,
            "seed": seed,
            "test_split": "given" if test_given else "seeded",
        }
        if columns:
            config["columns"] = dict(sorted(columns.items()))
    with tempfile.TemporaryDirectory(prefix="rlhf-data-") as tmp:
        for split in SPLITS:
            (Path(tmp) / f"{split}.jsonl").write_text(demo.to_jsonl(splits[split]), encoding="utf-8")
        name = name or DATASET_NAMES[fmt]
        extra = {"format": fmt, "task": task if is_demo else None}
        if check is not None:
            if store.find_identical(name, tmp) is None:
                check(UnpublishedDataset(source, name, tmp, {"config": config, "extra": extra}))
        return store.publish(
            tmp,
            name=name,
            kind="dataset",
            stage="data",
            config=config,
            metrics={"train_rows": len(splits["train"]), "test_rows": len(splits["test"])},
            extra=extra,
        )


def _task_module(task: str) -> ModuleType:
    if task not in TASKS:
        raise DataError(f"unknown data task {task!r} (expected one of {', '.join(TASKS)})")
    return TASKS[task]


def task_gold_scorer(artifact: Artifact | UnpublishedDataset) -> Callable[[str, str], float] | None:
    """The gold scorer (prompt, response) -> float of the built-in task that generated a dataset artifact, read from
    its manifest's extra.task; None for a user's data (or a task this version does not know)."""
    module = task_of(artifact)
    return module.gold_score if module is not None else None


def task_of(artifact: Artifact | UnpublishedDataset):
    """The built-in task module (`demo`, `arithmetic`: gold_score, follows_format) that generated a dataset
    artifact, from its manifest's extra.task; None for a user's data."""
    task = (artifact.manifest.get("extra") or {}).get("task")
    return TASKS.get(task) if isinstance(task, str) else None


def import_dataset(
    store: ArtifactStore,
    path: str | os.PathLike,
    name: str,
    fmt: str | None = None,
    *,
    test_fraction: float = 0.1,
    seed: int = 0,
) -> Artifact:
    """Ingest a local data file or folder (jsonl/json/parquet/txt, train/test files, `save_to_disk` output) as `name`,
    in the layout the stages read (train.jsonl + test.jsonl, extra.format); `fmt` None infers it from the columns."""
    import datasets.utils

    check_name(name)
    source = Path(path).expanduser()
    if not source.exists():  # a bare word would otherwise be looked up on the Hugging Face Hub
        raise ArtifactImportError(f"import {path}: no such file or directory")
    source = source.resolve()
    bars_were_on = not datasets.utils.are_progress_bars_disabled()
    datasets.utils.disable_progress_bars()  # a local read takes a moment; its bars would bury a one-line error
    try:
        if fmt is None:
            splits = read_splits(str(source))
            fmt = infer_format(splits["train"].column_names, str(source))
        return ingest(str(source), fmt, store, demo_cfg=DemoConfig(), test_fraction=test_fraction, seed=seed, name=name)
    finally:
        if bars_were_on:
            datasets.utils.enable_progress_bars()


def infer_format(columns: list[str], source: str) -> str:
    """The data format whose columns the data set has, preferring the most specific: prompt/chosen/rejected is
    `preferences`, not `prompts`. Two unrelated matches (text and prompt/completion) are ambiguous."""
    found = set(columns)
    matches = {}  # format -> the columns it would keep
    for fmt, alternatives in FORMATS.items():
        cols = next((set(alt) for alt in alternatives if set(alt) <= found), None)
        if cols is not None:
            matches[fmt] = cols
    best = [f for f, cols in matches.items() if not any(cols < other for other in matches.values())]
    if len(best) == 1:
        return best[0]
    expected = "; ".join(f"{fmt}: " + " or ".join("/".join(alt) for alt in alts) for fmt, alts in FORMATS.items())
    if not best:
        raise ArtifactImportError(
            f"import {source}: columns {', '.join(columns) or 'none'} match no data format ({expected})"
        )
    raise ArtifactImportError(
        f"import {source}: columns {', '.join(columns)} fit more than one format ({', '.join(best)}); pass --format"
    )
