"""What can be known of a reward function without running it: the file, its syntax, the name, the signature.

The driver never imports user code: these checks read the file with `ast`. `rlhf run` makes them before Prefect or
Ray start (the RL stage's `check_config`), so a typo costs a second, not a pipeline. What only running it shows (it
raises, hangs, returns the wrong length) is checked by `runner.py` on the actors.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

from stages.common.config import ConfigError
from stages.reward_functions.config import FunctionSpec

BUILTIN_FILE = Path(__file__).with_name("builtin.py")
# the keyword arguments every call passes (as TRL's GRPOTrainer does), besides the prompt data's columns
CALL_KEYWORDS = ("prompts", "completions", "completion_ids", "trainer_state", "log_extra", "log_metric")
# what the built-ins need of the prompt data: the column of the answer
ANSWER_COLUMN_BUILTINS = ("exact_match", "math_match")


def source_file(spec: FunctionSpec) -> Path:
    """The file that defines the function: the user's, or `builtin.py`."""
    return BUILTIN_FILE if spec.path is None else Path(spec.path).expanduser()


def read_source(spec: FunctionSpec, where: str) -> bytes:
    """The file's bytes; a ConfigError line when it is missing, not a .py file or unreadable."""
    path = source_file(spec)
    if path.suffix != ".py":
        raise ConfigError(f"{where}.path {spec.path!r}: expected a Python file (.py)")
    if not path.is_file():
        raise ConfigError(f"{where}.path {spec.path!r}: no such file")
    try:
        return path.read_bytes()
    except OSError as e:
        raise ConfigError(f"{where}.path {spec.path!r}: cannot read it ({e.strerror})") from None


def check_function(spec: FunctionSpec, where: str, columns: list[str] | None = None, source: bytes | None = None) -> None:
    """Raise a ConfigError line unless the file parses and defines `spec.name` with a signature we can call.

    `where` is the config key of the entry (`grpo.reward.functions[0]`). `columns`: the prompt data's columns when
    known; then a required parameter that is neither a call keyword nor a column is refused too. `source`: the
    file's bytes when already read (the stage checks its artifact's copy), else read from `spec.path`.
    """
    source = read_source(spec, where) if source is None else source
    shown = spec.path or "built-in"
    try:
        tree = ast.parse(source, filename=str(source_file(spec)))
    except SyntaxError as e:
        raise ConfigError(f"{where}: {shown}: line {e.lineno}: syntax error ({e.msg})") from None
    except ValueError as e:  # null bytes, undecodable text
        raise ConfigError(f"{where}: {shown}: not Python source ({e})") from None
    definition = _top_level(tree, spec.name)
    if definition is None:
        defined = sorted(n.name for n in tree.body if isinstance(n, ast.FunctionDef | ast.AsyncFunctionDef))
        raise ConfigError(
            f"{where}: {shown} defines no top-level {spec.name!r} (its functions: {', '.join(defined) or 'none'})"
        )
    if isinstance(definition, ast.FunctionDef | ast.AsyncFunctionDef):
        _check_signature(definition.args, spec, where, columns)
    if spec.path is None:
        _check_builtin_args(spec, where, columns)


def _top_level(tree: ast.Module, name: str) -> ast.AST | None:
    """The statement binding `name` at module level: a def, an assignment or an import (the last one wins)."""
    found = None
    for node in tree.body:
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef) and node.name == name:
            found = node
        elif isinstance(node, ast.Assign) and any(isinstance(t, ast.Name) and t.id == name for t in node.targets):
            found = node
        elif isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name) and node.target.id == name:
            found = node
        elif isinstance(node, ast.Import | ast.ImportFrom):
            if any((a.asname or a.name.split(".")[0]) == name for a in node.names):
                found = node
    return found


def _check_signature(args: ast.arguments, spec: FunctionSpec, where: str, columns: list[str] | None) -> None:
    """Every call passes keywords only: positional-only parameters without defaults cannot be filled, `completions`
    must be taken, and every required parameter must be one we pass."""
    name = spec.name
    required_posonly = args.posonlyargs[: len(args.posonlyargs) - max(0, len(args.defaults) - len(args.args))]
    if required_posonly:
        raise ConfigError(
            f"{where}: {name}({', '.join(a.arg for a in required_posonly)}, /...): positional-only parameters cannot "
            f"be passed; expected TRL's signature {name}(prompts, completions, **kwargs)"
        )
    named = [a.arg for a in args.args + args.kwonlyargs]
    takes_any = args.kwarg is not None
    if "completions" not in named and not takes_any:
        raise ConfigError(
            f"{where}: {name}({', '.join(named)}) takes no 'completions'; expected TRL's signature "
            f"{name}(prompts, completions, **kwargs)"
        )
    positional_required = args.args[: len(args.args) - len(args.defaults)]
    kwonly_required = [a for a, d in zip(args.kwonlyargs, args.kw_defaults, strict=True) if d is None]
    passed = set(CALL_KEYWORDS) | set(spec.args)
    if columns is not None:
        passed |= set(columns)
    for param in positional_required + kwonly_required:
        if param.arg in passed or param.arg in CALL_KEYWORDS:
            continue
        if columns is not None:
            raise ConfigError(
                f"{where}: {name} requires {param.arg!r}, which is neither a call argument "
                f"({', '.join(CALL_KEYWORDS)}) nor a column of the prompt data ({', '.join(columns)})"
            )
    unknown = [k for k in spec.args if k not in named and not takes_any]
    if unknown:
        raise ConfigError(f"{where}.args: {name} takes no {', '.join(map(repr, unknown))} (its parameters: {', '.join(named)})")


def _check_builtin_args(spec: FunctionSpec, where: str, columns: list[str] | None) -> None:
    if spec.name in ANSWER_COLUMN_BUILTINS:
        column = spec.args.get("column", "answer")
        if columns is not None and column not in columns:
            raise ConfigError(
                f"{where}: {spec.name} compares replies with the prompt data's column {column!r}, which it does not "
                f"have (its columns: {', '.join(columns)}); set args.column, or use data with an answer column "
                "(data.task=arithmetic has one)"
            )
    if spec.name == "format_regex":
        pattern = spec.args.get("pattern")
        if not isinstance(pattern, str):
            raise ConfigError(f"{where}.args.pattern: format_regex needs a regular expression, found {pattern!r}")
        try:
            re.compile(pattern)
        except re.error as e:
            raise ConfigError(f"{where}.args.pattern {pattern!r}: not a regular expression ({e})") from None
