"""Reading and validating data sets with `datasets`: a user's source, or one split of a dataset artifact.

A source is a local file (.jsonl, .json, .parquet, .txt), a local directory holding train/test files, or a Hugging
Face dataset name (`hf:NAME`: the prefix is required, so a mistyped or missing local path is an error, not a Hub
lookup under that name, which is what a Ray job whose upload left the data folder out would silently do). Every problem with the data is a `DataError` whose message is one line naming
the source, what was expected and what was found. ingest.py turns what is read here into dataset artifacts.
"""

from __future__ import annotations

import json
import logging
import math
import random
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # datasets is heavy; import it only when data is actually loaded
    import datasets

    from stages.common.store import Artifact

# Required columns per format; any one alternative is enough (TRL accepts both SFT shapes).
FORMATS: dict[str, tuple[list[str], ...]] = {
    "corpus": (["text"],),
    "sft": (["prompt", "completion"], ["messages"]),
    "preferences": (["prompt", "chosen", "rejected"],),
    "prompts": (["prompt"],),
}
SPLITS = ("train", "test")
_BUILDERS = {".jsonl": "json", ".json": "json", ".parquet": "parquet", ".txt": "text"}


class DataError(ValueError):
    """A data set a user pointed at is missing, unreadable or not in the expected format (one-line message)."""


def _check_format(fmt: str) -> tuple[list[str], ...]:
    if fmt not in FORMATS:
        raise DataError(f"unknown data format {fmt!r} (expected one of {', '.join(FORMATS)})")
    return FORMATS[fmt]


def _first_line(exc: BaseException) -> str:
    """The most specific one-line reason from an exception chain (datasets wraps the real cause)."""
    while exc.__cause__ is not None or exc.__context__ is not None:
        exc = exc.__cause__ or exc.__context__  # type: ignore[assignment]
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0]}" if text else type(exc).__name__


def _read_file(path: Path) -> datasets.Dataset:
    import datasets

    builder = _BUILDERS.get(path.suffix.lower())
    if builder is None:
        raise DataError(
            f"{path}: unknown file type {path.suffix or '(none)'!r} (expected one of {', '.join(_BUILDERS)})"
        )
    if path.stat().st_size == 0:
        raise DataError(f"{path}: empty data set (the file is empty)")
    kwargs: dict[str, Any] = {}
    if builder == "text":  # blank lines separate paragraphs when there are any; otherwise one row per line
        with path.open("rb") as f:
            head = f.read(1 << 20).replace(b"\r\n", b"\n").strip()
        kwargs["sample_by"] = "paragraph" if b"\n\n" in head else "line"
    # datasets logs its own "Failed to load JSON ..." line (ERROR) before raising; the DataError below says it once
    library_log = logging.getLogger("datasets")
    level = library_log.level
    library_log.setLevel(logging.CRITICAL)
    try:
        ds = datasets.load_dataset(builder, data_files={"train": str(path)}, split="train", **kwargs)
    except Exception as e:  # a broken file surfaces as one of many library errors; all mean "cannot read it"
        if "corresponds to no data" in str(e):  # how `datasets` reports a well-formed file with zero rows
            raise DataError(f"{path}: empty data set (no rows)") from None
        raise DataError(f"{path}: cannot read as {builder} ({_first_line(e)})") from None
    finally:
        library_log.setLevel(level)
    if builder == "text":
        ds = ds.filter(lambda row: row["text"].strip() != "")
    return ds


def _read_dir(path: Path) -> dict[str, datasets.Dataset]:
    found: dict[str, datasets.Dataset] = {}
    for split in SPLITS:
        files = sorted(p for p in path.iterdir() if p.stem == split and p.suffix.lower() in _BUILDERS)
        if len(files) > 1:
            raise DataError(f"{path}: more than one {split} file ({', '.join(p.name for p in files)})")
        if files:
            found[split] = _read_file(files[0])
    if "train" not in found:
        names = ", ".join(sorted(p.name for p in path.iterdir())) or "nothing"
        raise DataError(f"{path}: no train file (expected train.jsonl/.json/.parquet/.txt; found {names})")
    return found


def _read_hub(name: str) -> dict[str, datasets.Dataset]:
    import datasets

    try:
        loaded = datasets.load_dataset(name)
    except Exception as e:  # no network, unknown name, gated repo: the user needs the reason, not the traceback
        raise DataError(
            f"{name}: cannot load from the Hugging Face Hub (no network or no such data set?): {_first_line(e)}"
        ) from None
    return dict(loaded)


def _is_saved_dataset(path: Path) -> bool:
    """A folder written by `Dataset.save_to_disk` (state.json) or `DatasetDict.save_to_disk` (dataset_dict.json)."""
    return (path / "dataset_dict.json").is_file() or (path / "state.json").is_file()


def _read_saved(path: Path) -> dict[str, datasets.Dataset]:
    import datasets

    try:
        loaded = datasets.load_from_disk(str(path))
    except Exception as e:  # a damaged or partial save surfaces as many library errors; all mean "cannot read it"
        raise DataError(f"{path}: cannot read as a save_to_disk data set ({_first_line(e)})") from None
    splits = dict(loaded) if isinstance(loaded, datasets.DatasetDict) else {"train": loaded}
    if "train" not in splits:
        raise DataError(f"{path}: no train split in the saved data set (found: {', '.join(splits) or 'none'})")
    return splits


def read_splits(source: str) -> dict[str, datasets.Dataset]:
    """Every split a source has, unvalidated: {"train": ...} for a file, train/test for a directory or a hub set."""
    if source == "demo":
        raise DataError("'demo' is generated, not read: use ingest('demo', ...)")
    if source.startswith("hf:"):
        return _read_hub(source[3:])
    path = Path(source).expanduser()
    if path.is_dir():
        return _read_saved(path) if _is_saved_dataset(path) else _read_dir(path)
    if path.is_file():
        return {"train": _read_file(path)}
    raise DataError(f"{source}: no such file or directory{_cwd_hint(source)} (a Hugging Face Hub data set is named "
                    f"hf:{source})")


def _cwd_hint(source: str) -> str:
    """Where a relative path was looked for: under `ray job submit` that is the job's uploaded working dir."""
    return "" if Path(source).expanduser().is_absolute() else f" under {Path.cwd()}"


# Columns that may hold TRL's conversational form (a list of {role, content} turns) instead of a string; a row is
# all strings or all conversational. Completion-side columns hold the assistant's turns only.
CONVERSATIONAL = {"prompt", "completion", "chosen", "rejected"}
REPLY_COLUMNS = {"completion", "chosen", "rejected"}


def validate(ds: datasets.Dataset, fmt: str, source: str) -> datasets.Dataset:
    """Check rows, required columns, types and content for `fmt`; returns `ds` with only the required columns, except
    for prompts, which keep their other columns (an `answer`, ...): the RL stages pass them to reward functions as
    keyword arguments, as TRL's GRPOTrainer does, so each must hold JSON scalars or lists of them.

    Everything a stage would refuse is refused here, before the data is published as a dataset version: empty
    texts, prompts or replies, a messages row that does not end in an assistant reply, chosen == rejected and a
    preference pair given twice. Each error names the row.
    """
    alternatives = _check_format(fmt)
    found = list(ds.column_names)
    columns = next((alt for alt in alternatives if all(c in found for c in alt)), None)
    if columns is None:
        expected = " or ".join(", ".join(alt) for alt in alternatives)
        missing = ", ".join(c for c in alternatives[0] if c not in found)
        missing_note = f"missing column(s) {missing}" if len(alternatives) == 1 else "missing columns"
        raise DataError(
            f"{source}: {missing_note} for format {fmt!r} (expected {expected}; "
            f"found columns: {', '.join(found) or 'none'})"
        )
    if len(ds) == 0:
        raise DataError(f"{source}: empty data set")
    keywords = [c for c in found if c not in columns] if fmt == "prompts" else []
    ds = ds.select_columns(columns + keywords)
    values = {col: ds[col] for col in columns}
    for col in columns:
        for i, value in enumerate(values[col]):
            _check_value(value, col, f"{source}: row {i}")
    for col in keywords:
        for i, value in enumerate(ds[col]):
            _check_keyword_value(value, col, f"{source}: row {i}")
    conversational = [col for col in columns if col in CONVERSATIONAL]
    for i in range(len(ds)):
        kinds = {col: isinstance(values[col][i], list) for col in conversational}
        if len(set(kinds.values())) > 1:
            found = ", ".join(f"{c}={'messages' if k else 'string'}" for c, k in kinds.items())
            raise DataError(f"{source}: row {i}: mixes strings and message lists ({found}); use one form per row")
    if fmt == "preferences":
        seen: dict[str, int] = {}
        for i, (p, c, r) in enumerate(zip(values["prompt"], values["chosen"], values["rejected"], strict=True)):
            if c == r:
                raise DataError(f"{source}: row {i}: chosen and rejected are the same text")
            key = json.dumps([p, c, r], sort_keys=True)
            if key in seen:
                raise DataError(f"{source}: row {i}: the same prompt/chosen/rejected pair as row {seen[key]}")
            seen[key] = i
    return ds


def _check_value(value: Any, col: str, where: str) -> None:
    """One cell: the right type for its column and not empty (an empty prompt or reply teaches nothing)."""
    if isinstance(value, str) or col not in CONVERSATIONAL | {"messages"}:
        if not isinstance(value, str):
            raise DataError(f"{where}: column {col!r} must hold strings, found {value!r:.60}")
        if not value.strip():
            raise DataError(f"{where}: column {col!r} is empty")
        return
    if not _is_messages(value):
        what = "a list of {role, content} strings" if col == "messages" else "strings or a list of {role, content}"
        raise DataError(f"{where}: column {col!r} must hold {what}, found {value!r:.60}")
    if col == "messages":
        if len(value) < 2 or value[-1]["role"] != "assistant":
            raise DataError(
                f"{where}: column 'messages' must end in an assistant reply after at least one turn, "
                f"found {len(value)} turn(s) ending with role {value[-1]['role']!r}"
            )
        if not value[-1]["content"].strip():
            raise DataError(f"{where}: column 'messages': the last (assistant) turn is empty")
        return
    if col in REPLY_COLUMNS and any(m["role"] != "assistant" for m in value):
        roles = ", ".join(m["role"] for m in value)
        raise DataError(f"{where}: column {col!r} must hold assistant turns only, found roles {roles}")
    if col == "prompt" and value[-1]["role"] == "assistant":
        raise DataError(f"{where}: column 'prompt' must not end with an assistant turn (that is the reply)")
    if not any(m["content"].strip() for m in value):
        raise DataError(f"{where}: column {col!r} is empty (every turn's content is blank)")


def _is_json_value(value: Any) -> bool:
    """A string, finite number, bool or null, or a list of such (nested lists too). Dicts are refused: Arrow turns
    them into structs that fill a row's missing keys with nulls, so they would not come back from the jsonl as given."""
    if isinstance(value, list):
        return all(_is_json_value(v) for v in value)
    if isinstance(value, float):
        return math.isfinite(value)  # NaN and inf are not JSON
    return value is None or isinstance(value, (str, int, bool))


def _check_keyword_value(value: Any, col: str, where: str) -> None:
    """One cell of a prompt set's extra column: it is written to jsonl and handed to reward functions as is."""
    if not _is_json_value(value):
        raise DataError(
            f"{where}: column {col!r} (passed to reward functions) must hold strings, numbers, booleans or nulls, or "
            f"lists of them; found {type(value).__name__} {value!r:.60}"
        )


def _is_messages(value: Any) -> bool:
    return (
        isinstance(value, list)
        and bool(value)
        and all(
            isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str) for m in value
        )
    )


def load_source(source: str, fmt: str, *, split: str = "train") -> datasets.Dataset:
    """Load one split of a file, directory or hub data set and validate it for `fmt`."""
    _check_format(fmt)
    splits = read_splits(source)
    if split not in splits:
        raise DataError(f"{source}: no {split!r} split (found: {', '.join(splits)})")
    return validate(splits[split], fmt, f"{source} [{split}]" if len(splits) > 1 else source)


def _seeded_split(ds: datasets.Dataset, test_fraction: float, seed: int, source: str) -> dict[str, datasets.Dataset]:
    """Hold out round(n * test_fraction) rows (at least one) chosen by `seed`; the rest is train."""
    n = len(ds)
    if n < 2:
        raise DataError(f"{source}: {n} row(s) cannot be split into train and test (need at least 2)")
    order = list(range(n))
    random.Random(seed).shuffle(order)
    n_test = min(n - 1, max(1, round(n * test_fraction)))
    return {"train": ds.select(sorted(order[n_test:])), "test": ds.select(sorted(order[:n_test]))}


def _rows(ds: datasets.Dataset) -> list[dict]:
    return [dict(row) for row in ds]


def rename_columns(ds: datasets.Dataset, fmt: str, columns: dict[str, str], source: str) -> datasets.Dataset:
    """Rename a file's columns to the canonical names of `fmt`; `columns` maps canonical name -> the file's column.

    E.g. {"chosen": "better", "rejected": "worse"} for preference pairs stored as prompt/better/worse.
    """
    canonical = sorted({c for alt in _check_format(fmt) for c in alt})
    unknown = sorted(set(columns) - set(canonical))
    if unknown:
        raise DataError(
            f"{source}: column map for format {fmt!r} names unknown column(s) {', '.join(unknown)} "
            f"(expected keys among {', '.join(canonical)})"
        )
    found = list(ds.column_names)
    missing = sorted(f"{want} <- {have}" for want, have in columns.items() if have not in found)
    if missing:
        raise DataError(
            f"{source}: column map {', '.join(missing)}: no such column in the file (found columns: "
            f"{', '.join(found) or 'none'})"
        )
    sources = list(columns.values())
    if len(set(sources)) != len(sources):
        raise DataError(f"{source}: column map uses one file column for two names ({columns})")
    renames = {have: want for want, have in columns.items() if have != want}
    # A canonical name already in the file that another column is renamed to would clash: the mapped column wins.
    clashing = [want for have, want in renames.items() if want in found and want not in renames]
    return ds.remove_columns(clashing).rename_columns(renames) if renames else ds


def load_dataset_artifact(artifact: Artifact, split: str) -> datasets.Dataset:
    """One split of a dataset artifact as a `datasets.Dataset`, validated against the artifact's format."""
    import datasets

    if artifact.kind != "dataset":
        raise DataError(f"{artifact.ref}: expected a dataset artifact, found kind {artifact.kind!r}")
    if split not in SPLITS:
        raise DataError(f"{artifact.ref}: unknown split {split!r} (expected train or test)")
    path = Path(artifact.path) / f"{split}.jsonl"
    fmt = (artifact.manifest.get("extra") or {}).get("format")
    rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line]
    # from_list keeps the rows exactly as written and needs no cache dir (Ray workers read this concurrently)
    ds = datasets.Dataset.from_list(rows)
    return validate(ds, fmt, f"{artifact.ref} [{split}]") if fmt in FORMATS else ds
