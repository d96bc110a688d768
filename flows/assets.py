"""The store's artifacts as Prefect assets, so Prefect's event feed (and Cloud's asset graph) shows the lineage.

An asset is an artifact *name* in one store: `file:///abs/store/sft-model`, `s3://bucket/prefix/sft-model`. Every
stage task is a Prefect `MaterializingTask` of the names it publishes, depending on the names it reads (data sets
included), so each run that publishes emits `prefect.asset.materialization.succeeded` with the upstream assets as related
resources and the version, ref, digest and cache key as payload. A task that reused its cache emits nothing: it
materialized no new version (Prefect skips the events of a `Cached` state). The store stays the source of truth;
the assets are a view of it.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import Any

from prefect.assets import Asset, AssetProperties, add_asset_metadata
from prefect.tasks import MaterializingTask

from stages.common.redact import redact_credentials

MATERIALIZED_BY = "rlhf-dag"


def asset_key(store_root: str, name: str) -> str:
    """The asset of artifact `name` in the store at `store_root` (a folder becomes a file:// URI); Prefect stores and
    shows the key, so a URI's credentials are masked (`s3://key:***@bucket/prefix/name`)."""
    root = store_root if "://" in store_root else Path(store_root).resolve().as_uri()
    return f"{redact_credentials(root).rstrip('/')}/{name}"


def asset(store_root: str, name: str) -> Asset:
    return Asset(key=asset_key(store_root, name), properties=AssetProperties(name=name))


def materializing(fn, options: dict[str, Any], store_root: str, outputs: Iterable[str],
                  inputs: Iterable[str] = ()) -> MaterializingTask:  # fmt: skip
    """`fn` as a Prefect task (`options` as for `@task`) that materializes `outputs` from `inputs` (artifact names)."""
    deps = sorted(set(inputs))
    return MaterializingTask(
        fn=fn, assets=[asset(store_root, n) for n in outputs], materialized_by=MATERIALIZED_BY,
        asset_deps=[asset(store_root, n) for n in deps] or None, **options,
    )  # fmt: skip


def record(store_root: str, artifacts: Iterable) -> None:
    """Attach each published artifact's version, ref, digest and cache key to its materialization event.

    Called inside the materializing task; a no-op outside one (a stage called directly, as in tests)."""
    from prefect.context import AssetContext

    ctx = AssetContext.get()
    if ctx is None:
        return
    wanted = {a.key for a in ctx.downstream_assets}
    for art in artifacts:
        key = asset_key(store_root, art.name)
        if key in wanted:
            add_asset_metadata(key, {"ref": art.ref, "version": art.version, "digest": art.digest,
                                     "kind": art.kind, "cache_key": art.manifest.get("cache_key", "")})  # fmt: skip


def ref_name(ref: str) -> str:
    """The artifact name of a ref ('sft-model@v3' -> 'sft-model')."""
    return ref.split("@", 1)[0]
