"""Stage code fingerprints and cache keys: the basis of staleness detection (docs/ARCHITECTURE.md).

A stage's fingerprint covers exactly the project code it runs: every module of its own package and every module
under `stages/` those import, directly or through others, read from the source with `ast` (imports inside
functions count too). No list to keep up to date: a new shared module is covered the day a stage imports it.
"""

from __future__ import annotations

import ast
import hashlib
import json
from functools import lru_cache
from pathlib import Path
from typing import Any

_PROJECT_ROOT = Path(__file__).resolve().parents[2]  # the folder holding the `stages` package

# Modules that cannot change what a stage computes or measures, so editing one must not rerun every stage: the
# artifact store and import (they move and verify bytes), config parsing and errors (a changed message or check
# is not a changed result), gates (checked after the fact, outside the key), plots (reports beside an artifact,
# outside its digest), the stage context (plain data) and this file.
NOT_RESULT_SHAPING = frozenset({
    "stages.common.artifact_import", "stages.common.config", "stages.common.context", "stages.common.errors",
    "stages.common.fingerprint", "stages.common.gates", "stages.common.plots", "stages.common.store",
    "stages.common.store_cache", "stages.common.store_files", "stages.common.store_local",
    "stages.common.store_remote",
})  # fmt: skip


def _module_path(root: Path, name: str) -> Path | None:
    """The source file of project module `name` (a module file or a package's __init__.py), or None."""
    base = root.joinpath(*name.split("."))
    for candidate in (base.with_suffix(".py"), base / "__init__.py"):
        if candidate.is_file():
            return candidate
    return None


def _module_name(root: Path, path: Path) -> str:
    rel = path.relative_to(root).with_suffix("")
    parts = rel.parts[:-1] if rel.name == "__init__" else rel.parts
    return ".".join(parts)


def _imported_names(path: Path, module: str) -> frozenset[str]:
    """Every module name `path` (module `module`) may import: `import a.b`, `from a import b` (a or a.b)."""
    stat = path.stat()
    return _parse_imports(path, module, stat.st_mtime_ns, stat.st_size)


@lru_cache(maxsize=1024)
def _parse_imports(path: Path, module: str, mtime_ns: int, size: int) -> frozenset[str]:
    """`_imported_names`, memoised on the file's stat: a file is parsed again only after it changed."""
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_bytes(), filename=str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: from the file's own package, `level - 1` packages up
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([node.module] if node.module else []))
            else:
                base = node.module or ""
            names.add(base)
            names.update(f"{base}.{alias.name}" for alias in node.names)
    return frozenset(names)


def fingerprint_files(stage: str, root: Path | None = None) -> list[Path]:
    """The source files a stage's fingerprint covers: its package, and the project modules it imports (transitively),
    less the `NOT_RESULT_SHAPING` ones."""
    root = Path(root or _PROJECT_ROOT)
    todo = sorted((root / "stages" / stage).rglob("*.py"))
    seen: set[Path] = set()
    while todo:
        path = todo.pop()
        if path in seen:
            continue
        seen.add(path)
        for name in _imported_names(path, _module_name(root, path)):
            if not name.startswith("stages.") or name in NOT_RESULT_SHAPING:
                continue
            dep = _module_path(root, name)
            if dep is not None and dep not in seen:
                todo.append(dep)
    return sorted(seen)


def code_fingerprint(stage: str, root: Path | None = None) -> str:
    """sha256 over the source files `fingerprint_files` names, with their paths (16 hex chars).

    Editing a stage's code, or any project code it imports that shapes results, changes the fingerprint, so the
    stage reruns."""
    root = Path(root or _PROJECT_ROOT)
    stamp = tuple((str(p), p.stat().st_mtime_ns, p.stat().st_size) for p in sorted((root / "stages").rglob("*.py")))
    return _fingerprint(stage, root, stamp)


@lru_cache(maxsize=64)
def _fingerprint(stage: str, root: Path, stamp: tuple) -> str:
    """Memoised on the stat of every source file (`stamp`): planning a run asks once per node."""
    h = hashlib.sha256()
    for f in fingerprint_files(stage, root):
        h.update(str(f.relative_to(root)).encode())
        h.update(b"\0")
        h.update(f.read_bytes())
        h.update(b"\0")
    return h.hexdigest()[:16]


def canonical_json(obj: Any) -> str:
    """Key-sorted, whitespace-free JSON: equal configs give equal strings."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), default=str)


def cache_key(stage: str, fingerprint: str, config: dict[str, Any], input_digests: dict[str, str]) -> str:
    """hash(stage name, code fingerprint, canonical resolved config, sorted input digests)."""
    payload = {"stage": stage, "code": fingerprint, "config": config, "inputs": dict(sorted(input_digests.items()))}
    return hashlib.sha256(canonical_json(payload).encode()).hexdigest()
