"""A reward function's file as a `reward-fn` artifact: imported by content, like a data file.

The artifact holds one file, `reward.py` (the source, byte for byte). Its digest is in the cache key and the
lineage of every stage that uses it, so an edit reruns exactly those stages; the same bytes at another path are the
same artifact. It is named after the function (`reward-fn-exact_match`): one name, a version per content.
"""

from __future__ import annotations

import hashlib
import tempfile
from pathlib import Path

from stages.common.errors import StageInputError
from stages.reward_functions.config import FunctionSpec
from stages.reward_functions.source_check import read_source

KIND = "reward-fn"
ROLE_PREFIX = "reward_fn_"  # a stage's input role for the function `label`: reward_fn_<label>
SOURCE_FILE = "reward.py"


def artifact_name(spec: FunctionSpec) -> str:
    return f"reward-fn-{spec.name}"


def import_function(store, spec: FunctionSpec, where: str):
    """The entry's file published (or found: identical bytes give the existing version) as a `reward-fn` artifact."""
    source = read_source(spec, where)
    with tempfile.TemporaryDirectory(prefix="rlhf-reward-fn-") as tmp:
        (Path(tmp) / SOURCE_FILE).write_bytes(source)
        return store.publish(
            tmp,
            name=artifact_name(spec),
            kind=KIND,
            stage="import",
            config={"function": spec.name, "source": spec.path or "built-in"},
            extra={"sha256": hashlib.sha256(source).hexdigest()},
        )


def load_functions(specs: list, artifacts: dict, columns: list[str], key: str) -> list:
    """Each reward function's verified source with its entry (`runner.LoadedFunction`), checked against the prompt
    data's columns; a StageInputError line for a missing artifact or a signature the columns cannot fill. `key`
    names the list in messages (`grpo.reward.functions`)."""
    from stages.common.config import ConfigError
    from stages.reward_functions.runner import LoadedFunction
    from stages.reward_functions.source_check import check_function

    loaded = []
    for i, spec in enumerate(specs):
        where = f"{key}[{i}]"
        artifact = artifacts.get(spec.label)
        if artifact is None:
            raise StageInputError(f"{where}: no reward-fn artifact for {spec.label} among the inputs")
        source = read_verified(artifact)
        try:
            check_function(spec, where, ["prompt", *columns], source=source.encode())
        except ConfigError as e:
            raise StageInputError(str(e)) from None
        loaded.append(LoadedFunction(spec, artifact.ref, source))
    return loaded


def read_verified(artifact) -> str:
    """The source text of a `reward-fn` artifact, checked against its manifest (what runs is what the key names)."""
    if artifact.kind != KIND:
        raise StageInputError(f"{artifact.ref}: expected a {KIND!r} artifact, found kind {artifact.kind!r}")
    data = (Path(artifact.path) / SOURCE_FILE).read_bytes()
    expected = artifact.manifest["files"].get(SOURCE_FILE)
    if hashlib.sha256(data).hexdigest() != expected:
        raise StageInputError(f"{artifact.ref}: {SOURCE_FILE} does not match its manifest digest")
    return data.decode("utf-8")
