"""`rlhf eval REF...`: the eval stage on chosen artifacts, outside the flow (a local Ray, or RAY_ADDRESS's cluster).

Every ref is resolved and its kind checked before Ray starts, so a typo or a wrong kind is one line and exit 2.
Rows are named after the artifacts (`policy`, `policy-dpo`); refs sharing a name get `-vN` appended.
"""

from __future__ import annotations

import tempfile

from stages.common.store import Artifact, ArtifactError, ArtifactStore


def row_names(artifacts: list[Artifact]) -> dict[str, Artifact]:
    """{row name: artifact}: the artifact's name, or name-vN where two refs share a name; a ref given twice is refused."""
    names = [a.name for a in artifacts]
    rows: dict[str, Artifact] = {}
    for a in artifacts:
        row = a.name if names.count(a.name) == 1 else f"{a.name}-v{a.version}"
        if row in rows:
            raise ArtifactError(f"rlhf eval: {a.ref} is named twice; give each model once")
        rows[row] = a
    return rows


def evaluate_refs(store: ArtifactStore, refs: list[str], *, sft: str, reward_model: str, prompts: str,
                  log=print) -> tuple[Artifact, dict]:  # fmt: skip
    """Resolve the refs (kinds checked), run the eval stage with its default config; (eval-report, its report.json)."""
    import json
    from pathlib import Path

    from stages import eval as eval_stage
    from stages.common.context import Scaling, StageContext
    from stages.common.fingerprint import cache_key, code_fingerprint

    policies = row_names([store.get(ref, kind="causal-lm") for ref in refs])
    inputs = {
        "sft_model": store.get(sft, kind="causal-lm"),
        "reward_model": store.get(reward_model, kind="reward-model"),
        "prompts": store.get(prompts, kind="dataset"),
    }
    import ray

    from stages.common.ray_train import ensure_ray

    ensure_ray()
    use_gpu = ray.cluster_resources().get("GPU", 0) > 0  # placement follows the cluster: GPUs when it has any
    config = eval_stage.Config()
    digests = {role: a.digest for role, a in inputs.items()} | {f"policy.{m}": a.digest for m, a in policies.items()}
    key = cache_key(eval_stage.NAME, code_fingerprint(eval_stage.NAME), config.to_dict(), digests)
    with tempfile.TemporaryDirectory(prefix="rlhf-eval-") as work_dir:
        ctx = StageContext(work_dir=work_dir, cache_key=key, seed=0, scaling=Scaling(num_workers=1, use_gpu=use_gpu),
                           log=log)  # fmt: skip
        artifact = eval_stage.run(config, store=store, ctx=ctx, policies=policies, **inputs)["eval-report"]
    return artifact, json.loads((Path(artifact.path) / "report.json").read_text())
