"""A node's cache key and the parts it is computed from, and why a node would run: which part differs from the
node's latest cache record (the dry run's reasons).

The key is hash(node name, code fingerprint, resolved config section less gates and input references, run-level
knobs that change results, input digests). The store records the parts beside the key (`KeyParts.to_record`), so a
later plan can compare: a different fingerprint is a code change, a different config digest a config change, a
different input digest an input change.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from typing import Any

from flows import dag
from flows.config import PipelineConfig
from stages.common.fingerprint import cache_key, canonical_json, code_fingerprint

# Config fields that do not change what a stage computes: gate thresholds (checked after the fact, so changing one
# reuses the artifact) and references to inputs (their artifact digests are in the key instead).
NOT_IN_CACHE_KEY = ("gate", "base_model", "init_from", "tokenizer")


@dataclass(frozen=True)
class KeyParts:
    """What a node's cache key is computed from. An input digest is None while it is unknown (its upstream node
    would run first, or a config-named model is not imported yet); the key is then unknown too."""

    node: str
    code: str  # the stage's code fingerprint
    config: dict[str, Any]  # the node's section (less NOT_IN_CACHE_KEY) and the run-level knobs
    inputs: dict[str, str | None] = field(default_factory=dict)  # role -> artifact digest

    @property
    def config_digest(self) -> str:
        return hashlib.sha256(canonical_json(self.config).encode()).hexdigest()

    @property
    def key(self) -> str | None:
        if any(d is None for d in self.inputs.values()):
            return None
        return cache_key(self.node, self.code, self.config, dict(self.inputs))

    def to_record(self) -> dict[str, Any]:
        """The parts as the cache record keeps them (stages/common/store.py `record_cache`)."""
        return {"node": self.node, "code": self.code, "config": self.config_digest, "inputs": dict(self.inputs)}


def key_parts(name: str, cfg: PipelineConfig, inputs: dict[str, Any], stage: str | None = None) -> KeyParts:
    """The parts of node `name`'s key: its stage's code, its own config plus the run-level knobs that change results,
    its inputs (role -> Artifact, or None while unknown). `stage`: the node's stage package, when the caller has
    the node at hand (else read from the DAG)."""
    if stage is None:
        from flows.nodes import node_named

        stage = node_named(cfg, name).stage if name in dag.ALL_NODE_NAMES else name
    run = cfg.run
    stage_config = {k: v for k, v in cfg.stage_config(name).to_dict().items() if k not in NOT_IN_CACHE_KEY}
    # a reward function's file is in the key by its artifact's digest (an input), not by where it lies
    if isinstance(stage_config.get("reward"), dict):  # an RL section's reward sources
        stage_config["reward"] = {**stage_config["reward"], "functions": _without_paths(stage_config["reward"]["functions"])}
    if "reward_functions" in stage_config:  # the eval's
        stage_config["reward_functions"] = _without_paths(stage_config["reward_functions"])
    config = {
        "stage": stage_config,
        "run": {"seed": run.seed, "num_workers": run.num_workers, "use_gpu": run.use_gpu},
    }
    digests = {role: (a.digest if a is not None else None) for role, a in inputs.items()}
    return KeyParts(name, code_fingerprint(stage), config, digests)


def stage_cache_key(name: str, cfg: PipelineConfig, inputs: dict[str, Any], stage: str | None = None) -> str:
    """A node's cache key: its stage's code, its own config plus the run-level knobs that change results, its inputs."""
    return key_parts(name, cfg, inputs, stage).key


def _without_paths(functions: list[dict]) -> list[dict]:
    return [{k: v for k, v in f.items() if k != "path"} for f in functions]


def why_run(parts: KeyParts, previous: dict[str, Any] | None, *, forced: str | None = None,
            pending: dict[str, str] | None = None) -> list[str]:  # fmt: skip
    """Why a node whose key has no verified result would run, as short phrases.

    `previous`: the parts of the node's latest cache record (`KeyParts.to_record`'s shape), None when it has none.
    `forced`: how it is forced ("--force", "--from sft"). `pending`: input role -> the upstream node that would run
    first (so that input's digest is not known yet)."""
    pending = pending or {}
    reasons = [f"forced ({forced})"] if forced else []
    if previous is None:
        reasons.append("no earlier result")
    else:
        if parts.code != previous.get("code"):
            reasons.append("code changed")
        if parts.config_digest != previous.get("config"):
            reasons.append("config changed")
        before = previous.get("inputs") or {}
        changed = [r for r in sorted(set(parts.inputs) | set(before)) if r not in pending
                   and parts.inputs.get(r) != before.get(r)]  # fmt: skip
        if changed:
            reasons.append("input changed: " + ", ".join(changed))
    if pending:
        ups = sorted(set(pending.values()))
        reasons.append(f"new inputs from {', '.join(ups)}, which {'runs' if len(ups) == 1 else 'run'} first")
    if not reasons:  # the same key as the record: its artifacts are gone or corrupt
        reasons.append("the earlier result's artifacts are missing or corrupt")
    return reasons
