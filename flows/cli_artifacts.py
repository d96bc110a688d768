"""`rlhf artifacts` (list, show, lineage, verify, gc, import), and what every command that names a store shares: the store
it names (`named_store`), `--store` (`add_store`), JSON output with credentials masked (`print_json`) and
`UsageError`. flows/cli.py builds the rest of the command line and turns errors into exit codes.
"""

from __future__ import annotations

import argparse
import json
from typing import Any


class UsageError(Exception):
    """Bad command-line usage (exit 2)."""


def named_store(args: argparse.Namespace, *, existing: bool = True):
    """The store the command names. A command that only reads (`existing`) refuses a store that is not there,
    instead of creating an empty one at a mistyped path and answering from it."""
    from flows.plan import check_store_uri, open_store, store_root

    root, where = store_root({"store": args.store})
    if existing:
        import fsspec

        check_store_uri(root, where)
        fs, path = fsspec.core.url_to_fs(str(root))
        if fs.isfile(path):
            raise UsageError(f"{where} {root!r}: expected an artifact store folder, found a file")
        if not fs.isdir(path):
            raise UsageError(f"{where} {root!r}: no artifact store there (a typo? `rlhf run` or `rlhf artifacts "
                             "import` creates one)")
    return open_store(root, where)


def add_store(p: argparse.ArgumentParser) -> None:
    p.add_argument("--store", help="artifact store root: a folder or fsspec URI (default: $RLHF_STORE or ./artifacts)")


def print_json(obj: Any) -> None:
    from stages.common.redact import redact_credentials

    print(redact_credentials(json.dumps(obj, indent=2, sort_keys=True, default=str)))  # a store URI's password too


def _manifest_view(art) -> dict[str, Any]:
    m = dict(art.manifest)
    m["path"] = art.path
    m["ref"] = art.ref
    return m


def cmd_artifacts_list(args: argparse.Namespace) -> int:
    manifests = named_store(args).list()
    if args.json:
        print_json(manifests)
        return 0
    if not manifests:
        print("no artifacts yet")
        return 0
    print(f"{'REF':<28} {'KIND':<13} {'STAGE':<9} {'GATE':<7} {'DIGEST':<14} CREATED")
    for m in manifests:
        ref = f"{m['name']}@v{m['version']}"
        gate = "-" if not isinstance(m.get("gate"), dict) else "passed" if m["gate"].get("passed") else "missed"
        print(f"{ref:<28} {m['kind']:<13} {m['stage']:<9} {gate:<7} {m['digest'][:12]:<14} {m['created_at']}")
    return 0


def _gate_text(art) -> str:
    """`rlhf artifacts show`'s gate line: the verdict recorded at publish time, and what it means for @latest."""
    gate = art.manifest.get("gate")
    if not isinstance(gate, dict):
        return "not recorded"
    if gate.get("passed") is False:
        return f"missed: {'; '.join(gate.get('missed') or ['(no detail)'])}; not {art.name}@latest"
    checks = ", ".join(f"{field} {threshold:g}" for field, threshold in (gate.get("checks") or {}).items())
    return f"passed ({checks})" if checks else "passed (no checks on)"


def cmd_artifacts_show(args: argparse.Namespace) -> int:
    art = named_store(args).get(args.ref)
    view = _manifest_view(art)
    if args.json:
        print_json(view)
        return 0
    print(f"{art.ref}  ({art.kind}, stage {view['stage']})")
    print(f"  digest   {art.digest}")
    print(f"  path     {art.path}")
    print(f"  created  {view['created_at']}")
    print(f"  gate     {_gate_text(art)}")
    for role, inp in sorted(view.get("inputs", {}).items()):
        print(f"  input    {role} = {inp['name']}@v{inp['version']} ({inp['digest'][:12]})")
    for key, value in sorted(view.get("metrics", {}).items()):
        print(f"  metric   {key} = {value}")
    return 0


def _print_tree(node: dict[str, Any], role: str | None, indent: str) -> None:
    label = f"{role}: " if role else ""
    print(f"{indent}{label}{node['ref']} ({node['kind']}, {node['digest'][:12]})")
    for child_role, child in sorted(node.get("inputs", {}).items()):
        _print_tree(child, child_role, indent + "  ")


def cmd_artifacts_lineage(args: argparse.Namespace) -> int:
    tree = named_store(args).lineage(args.ref)
    if args.json:
        print_json(tree)
    else:
        _print_tree(tree, None, "")
    return 0


def cmd_artifacts_verify(args: argparse.Namespace) -> int:
    art = named_store(args).verify(args.ref)
    print(f"ok: {art.ref} ({len(art.manifest['files'])} files, digest {art.digest[:12]})")
    return 0


def cmd_artifacts_import(args: argparse.Namespace) -> int:
    from stages.common.artifact_import import KINDS, ArtifactImportError, check_name, import_model
    from stages.data.ingest import import_dataset

    if args.kind not in KINDS:
        raise ArtifactImportError(
            f"import {args.path}: unknown kind {args.kind!r} (expected one of {', '.join(KINDS)})"
        )
    if args.format is not None and args.kind != "dataset":
        raise ArtifactImportError(
            f"import {args.path}: --format applies to --kind dataset only, found --kind {args.kind}"
        )
    store = named_store(args, existing=False)  # an import may start a store
    check_name(args.name)
    known = {m["digest"] for m in store.list(args.name)}
    if args.kind == "dataset":
        art = import_dataset(store, args.path, args.name, args.format)
    else:
        art = import_model(store, args.path, args.kind, args.name)
    existed = art.digest in known
    if existed:
        print(f"already in the store as {art.ref} (digest {art.digest[:12]})")
        return 0
    facts = ", ".join(f"{k} {v}" for k, v in sorted(art.metrics.items()))
    print(
        f"imported {args.path} as {art.ref} ({art.kind}, {len(art.manifest['files'])} files, digest "
        f"{art.digest[:12]}{', ' + facts if facts else ''})"
    )
    print(f"  path     {art.path}")
    return 0


_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}


def parse_duration(text: str, where: str) -> float:
    """'90s', '30m', '1h', '2d' or plain seconds -> seconds; a bad one is a UsageError naming where."""
    t = str(text).strip().lower()
    number, unit = (t[:-1], t[-1]) if t and t[-1] in _UNITS else (t, "s")
    try:
        value = float(number)
    except ValueError:
        value = -1.0
    if not (value >= 0 and value != float("inf")):
        raise UsageError(f"{where} {text!r}: expected a duration like 90s, 30m, 1h or 2d (0 or more)")
    return value * _UNITS[unit]


def _size(n: int) -> str:
    return f"{n / (1 << 20):.1f} MiB" if n >= 1 << 20 else f"{n / 1024:.1f} KiB"


def cmd_artifacts_gc(args: argparse.Namespace) -> int:
    from stages.common.store_gc import find_orphans, remove

    grace = parse_duration(args.older_than, "--older-than")
    store = named_store(args)
    old, young = find_orphans(store, grace)
    items = remove(store, old, grace) if args.yes else old
    total = sum(i.bytes for i in items)
    if args.json:
        print_json({"dry_run": not args.yes, "older_than_s": grace, "items": [i.as_dict() for i in items],
                    "count": len(items), "bytes": total, "kept_young": [i.as_dict() for i in young]})  # fmt: skip
        return 0
    for i in items:
        print(f"{'removed' if args.yes else 'orphan '}  {i.kind:<6}  {i.path}  {_size(i.bytes)}  age "
              f"{i.age_s / 3600:.1f}h  ({i.reason})")
    verb = "removed" if args.yes else "would remove"
    tail = "" if args.yes else "; dry run, --yes deletes them"
    young_text = f"; kept {len(young)} younger than {args.older_than} (a publish may still need them)" if young else ""
    print(f"{verb} {len(items)} orphan{'s' if len(items) != 1 else ''}, {_size(total)}{young_text}{tail}")
    return 0


def add_artifacts_commands(sub) -> None:
    """`rlhf artifacts ACTION` under the command line's subparsers `sub`."""
    art = sub.add_parser("artifacts", help="list, show, trace, verify and import artifacts").add_subparsers(
        dest="artifacts_command", required=True, metavar="ACTION"
    )
    p = art.add_parser("list", help="every artifact version in the store")
    add_store(p)
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_artifacts_list)
    for name, func, text in (
        ("show", cmd_artifacts_show, "an artifact's manifest"),
        ("lineage", cmd_artifacts_lineage, "the tree of inputs back to the data"),
        ("verify", cmd_artifacts_verify, "re-hash every file (exit 1 when corrupted)"),
    ):
        p = art.add_parser(name, help=text)
        p.add_argument("ref", help="name, name@latest, name@vN, name@ALIAS (e.g. @best) or a digest prefix")
        add_store(p)
        if name != "verify":
            p.add_argument("--json", action="store_true")
        p.set_defaults(func=func)
    p = art.add_parser("gc", help="list (and with --yes remove) orphans: killed publishes' temp folders, objects "
                                  "no manifest references; never a referenced object or a recent entry")
    p.add_argument("--older-than", default="1h", help="grace period: spare anything younger (default 1h; 90s, 30m, 2d)")
    p.add_argument("--yes", action="store_true", help="delete them (default: a dry run that only lists)")
    p.add_argument("--json", action="store_true")
    add_store(p)
    p.set_defaults(func=cmd_artifacts_gc)
    p = art.add_parser("import", help="bring a local HF model or tokenizer directory, or a data set, into the store")
    p.add_argument(
        "path", help="a HF directory (safetensors), or a data file/folder (jsonl, json, parquet, txt, save_to_disk)"
    )
    p.add_argument("--kind", required=True, choices=["causal-lm", "reward-model", "tokenizer", "dataset"])
    p.add_argument("--name", required=True, help="artifact name, e.g. base-model")
    p.add_argument(
        "--format",
        choices=["corpus", "sft", "preferences", "prompts"],
        help="data format of a dataset (default: inferred from its columns)",
    )
    add_store(p)
    p.set_defaults(func=cmd_artifacts_import)
