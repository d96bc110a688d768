"""Quality gates: the metrics that show a stage did its job, with thresholds the user can change or turn off.

Each stage's config holds a `gate` section, a `Gate` subclass whose fields are named `min_<metric>` or
`max_<metric>` (None turns a check off). The flow checks the gate on the stage's published metrics, whether the
stage ran or was reused: a stage that misses its gate has published its artifact (so it can be inspected), but the
flow stops before the next stage. Gates are not part of the cache key, so changing a threshold and rerunning reuses
the artifact and only re-checks it.

Some gated metrics are ratios of published ones (`DERIVED`), so a stage need not publish every ratio itself.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from stages.common.config import Section


def _ratio(numerator: str, denominator: str) -> Callable[[dict[str, Any]], float | None]:
    def compute(metrics: dict[str, Any]) -> float | None:
        top, bottom = metrics.get(numerator), metrics.get(denominator)
        if not isinstance(top, int | float) or not isinstance(bottom, int | float) or bottom == 0:
            return None
        return float(top) / float(bottom)

    return compute


# metric name -> how to compute it from the published metrics (when the stage does not publish it itself)
DERIVED: dict[str, Callable[[dict[str, Any]], float | None]] = {
    "perplexity_vs_unigram": _ratio("val_perplexity", "unigram_perplexity"),
    "loss_vs_first": _ratio("last_logged_loss", "first_logged_loss"),
}


class Gate(Section):
    """Base of every stage's gate section: fields `min_<metric>` / `max_<metric>`, None = that check is off."""

    def checks(self) -> list[tuple[str, str, float]]:
        """(metric, "min" | "max", threshold) for every check that is on."""
        out = []
        for field, threshold in self.model_dump().items():
            if threshold is None:
                continue
            bound, _, metric = field.partition("_")
            if bound not in ("min", "max") or not metric:
                raise ValueError(f"{type(self).__name__}.{field}: gate fields must be named min_<metric> or max_<metric>")
            out.append((metric, bound, float(threshold)))
        return out


@dataclass(frozen=True)
class GateMiss:
    """One failed check, phrased for the one-line error."""

    stage: str
    metric: str
    bound: str
    threshold: float
    value: float | None

    def __str__(self) -> str:
        want = f"at least {self.threshold:g}" if self.bound == "min" else f"at most {self.threshold:g}"
        found = "missing" if self.value is None else f"{self.value:.4g}"
        field = f"{self.stage}.gate.{self.bound}_{self.metric}"
        return f"{self.stage}: quality gate missed: {self.metric} = {found}, expected {want} ({field})"


def metric_value(metrics: dict[str, Any], metric: str) -> float | None:
    """A published metric, or a derived one; None when neither exists or it is not a number."""
    if metric in metrics:
        value = metrics[metric]
        return float(value) if isinstance(value, int | float) and not isinstance(value, bool) else None
    derive = DERIVED.get(metric)
    return derive(metrics) if derive else None


def check(stage: str, gate: Gate | None, metrics: dict[str, Any]) -> list[GateMiss]:
    """Every check of `gate` that `metrics` fails; a missing or non-finite value fails its check."""
    if gate is None:
        return []
    misses = []
    for metric, bound, threshold in gate.checks():
        value = metric_value(metrics, metric)
        ok = value is not None and math.isfinite(value) and (value >= threshold if bound == "min" else value <= threshold)
        if not ok:
            misses.append(GateMiss(stage, metric, bound, threshold, value))
    return misses


def verdict(stage: str, gate: Gate | None, metrics: dict[str, Any]) -> dict[str, Any] | None:
    """What a manifest records about its stage's gate at publish time (`gate`): passed, the checks that were on
    (field -> threshold) and each miss as its one-line text; None when the stage has no gate. `NAME@latest` skips a
    version whose record says it missed (ArtifactStore._resolve); the flow still re-checks with the thresholds of
    the day, since gates are not part of the cache key."""
    if gate is None:
        return None
    misses = check(stage, gate, metrics)
    return {
        "passed": not misses,
        "checks": {f"{bound}_{metric}": threshold for metric, bound, threshold in gate.checks()},
        "missed": [str(m) for m in misses],
    }


def passed(manifest: dict[str, Any]) -> bool:
    """False only for a manifest whose recorded gate was missed; one with no record (older, or a stage without a
    gate: imports, data, eval) counts as passed."""
    gate = manifest.get("gate")
    return not (isinstance(gate, dict) and gate.get("passed") is False)


class GateFailed(ValueError):
    """A stage's output missed its quality gate; the message names the metric, its value and the threshold."""


def check_gate(stage: str, gate: Gate | None, outputs: dict[str, Any]) -> None:
    """Raise GateFailed if the stage's published artifacts (name -> Artifact) miss `gate`; the artifacts stay."""
    metrics: dict[str, Any] = {}
    for artifact in outputs.values():
        metrics.update(artifact.metrics)
    misses = check(stage, gate, metrics)
    if misses:
        refs = ", ".join(a.ref for a in outputs.values())
        raise GateFailed(f"{misses[0]}; {refs} is published for inspection, the next stages did not run")
