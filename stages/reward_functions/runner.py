"""Running reward functions: one CPU Ray actor per function, a per-call timeout, and the checks of what comes back.

The driver never runs user code: `FunctionActor` compiles the source (read from its verified `reward-fn` artifact
by the driver and handed over as text, so every node runs exactly the bytes the cache key names) and calls it.
`RewardFunctions` on the driver submits a batch to every actor at once, so the functions run while the reference
and critic actors compute their forwards, then waits for each until its deadline.

What a function returns is checked on the driver, and any problem is a `RewardFunctionError` line naming the
function, the reason and the first offending row: the stage fails, nothing is published.
"""

from __future__ import annotations

import math
import numbers
import time
from dataclasses import dataclass
from types import SimpleNamespace

from stages.common.errors import StageInputError
from stages.reward_functions.config import FunctionSpec


class RewardFunctionError(StageInputError):
    """A reward function raised, hung past its timeout or returned something that is not one score per reply."""


@dataclass(frozen=True)
class LoadedFunction:
    """What the driver hands an actor: the function's entry, its artifact's ref (for messages) and source text."""

    spec: FunctionSpec
    ref: str
    source: str


def _noop(*args, **kwargs) -> None:
    """TRL passes `log_extra` and `log_metric` callbacks; ours accept and drop what a function logs."""


class FunctionActor:
    """Holds one reward function, imported from its source text; `call` scores one batch of replies."""

    def __init__(self, name: str, module_name: str, source: str, origin: str):
        import sys
        import types

        self.name = name
        module = types.ModuleType(module_name)
        module.__file__ = origin
        sys.modules[module_name] = module  # dataclasses and pickling inside the file look their module up here
        self.error = None
        try:
            exec(compile(source, origin, "exec"), module.__dict__)  # noqa: S102 - the user's reward code, on purpose
            self.fn = getattr(module, name)
            if not callable(self.fn):
                self.error = f"{name} is a {type(self.fn).__name__}, not a function"
        except BaseException as e:  # noqa: BLE001 - any failure of the user's module is reported, not raised here
            self.error = f"importing its file raised {type(e).__name__}: {e}"

    def ready(self) -> str | None:
        """None when the function was imported, else why not."""
        return self.error

    def call(self, kwargs: dict, step: int):
        """`fn(**kwargs)` (awaited when it is a coroutine); ("ok", scores) or ("error", reason)."""
        import asyncio
        import inspect

        try:
            accepted = _accepted(self.fn, kwargs)
            accepted.update({k: v for k, v in (("trainer_state", SimpleNamespace(global_step=step)),
                             ("log_extra", _noop), ("log_metric", _noop)) if _takes(self.fn, k)})  # fmt: skip
            result = self.fn(**accepted)
            if inspect.isawaitable(result):
                result = asyncio.run(_awaited(result))
            return "ok", _plain(result)
        except BaseException as e:  # noqa: BLE001 - the user's error, reported in one line by the driver
            return "error", f"raised {type(e).__name__}: {e}"


async def _awaited(awaitable):
    return await awaitable


def _takes(fn, name: str) -> bool:
    import inspect

    params = inspect.signature(fn).parameters
    return name in params or any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())


def _accepted(fn, kwargs: dict) -> dict:
    """The keyword arguments `fn` takes: all of them with **kwargs, else only those it names (a function written
    as `f(completions, answer)` is called with just those)."""
    return {k: v for k, v in kwargs.items() if _takes(fn, k)}


def _plain(result):
    """Scores as plain Python values (numpy and torch scalars become floats), or the result itself when it is not a
    sequence (the driver reports that)."""
    if hasattr(result, "tolist"):
        result = result.tolist()
    if isinstance(result, tuple):
        result = list(result)
    return result


def check_scores(result, n: int, label: str) -> list[float | None]:
    """One finite number or None per reply, or a RewardFunctionError line naming the first offending row."""
    if not isinstance(result, list):
        raise RewardFunctionError(f"reward function {label}: returned a {type(result).__name__}, expected a list of {n} scores")
    if len(result) != n:
        raise RewardFunctionError(f"reward function {label}: returned {len(result)} scores for {n} replies")
    out: list[float | None] = []
    for row, value in enumerate(result):
        if value is None:
            out.append(None)
            continue
        if isinstance(value, bool) or not isinstance(value, numbers.Real):
            raise RewardFunctionError(f"reward function {label}: row {row}: returned {value!r:.60}, expected a number or None")
        value = float(value)
        if not math.isfinite(value):
            raise RewardFunctionError(f"reward function {label}: row {row}: returned {value}, expected a finite number")
        out.append(value)
    return out


class RewardFunctions:
    """The run's reward functions, one actor each; `submit` a batch, then `collect` the checked scores."""

    def __init__(self, loaded: list[LoadedFunction], *, timeout_s: float, cpus: float, log=print):
        import ray

        self.specs = [f.spec for f in loaded]
        self.timeout_s = timeout_s
        remote = ray.remote(FunctionActor)
        self.actors = [
            # DEFAULT: outside the caller's placement group (a sweep trial's Tune actor captures its children)
            remote.options(num_cpus=cpus, num_gpus=0, max_restarts=0, scheduling_strategy="DEFAULT").remote(
                f.spec.name, f"rlhf_reward_fn_{i}_{f.spec.name}", f.source, f"<{f.ref}: {f.spec.path or 'built-in'}>"
            )
            for i, f in enumerate(loaded)
        ]
        for f, error in zip(loaded, ray.get([a.ready.remote() for a in self.actors]), strict=True):
            if error is not None:
                self.shutdown()
                raise RewardFunctionError(f"reward function {f.spec.label} ({f.ref}): {error}")
        if loaded:
            log(f"reward functions: {', '.join(f'{f.spec.label} ({f.ref}, weight {f.spec.weight:g})' for f in loaded)}")

    def __len__(self) -> int:
        return len(self.actors)

    def submit(self, prompts: list, completions: list, completion_ids: list, columns: dict, step: int) -> list:
        """Start every function on the batch; returns (ref, deadline) pairs for `collect`."""
        kwargs = {"prompts": prompts, "completions": completions, "completion_ids": completion_ids, **columns}
        started = time.monotonic()
        return [(actor.call.remote({**kwargs, **spec.args}, step), started + self.timeout_s)
                for actor, spec in zip(self.actors, self.specs, strict=True)]  # fmt: skip

    def collect(self, pending: list, n: int) -> dict[str, list[float | None]]:
        """{label: scores} for the batch `submit` started; a RewardFunctionError for the first that fails."""
        import ray

        out = {}
        for (ref, deadline), spec in zip(pending, self.specs, strict=True):
            ready, _ = ray.wait([ref], timeout=max(0.0, deadline - time.monotonic()))
            if not ready:
                raise RewardFunctionError(
                    f"reward function {spec.label}: no result within {self.timeout_s:g}s "
                    "(reward.timeout_s); it hung or is too slow for this batch"
                )
            status, value = ray.get(ref)
            if status == "error":
                raise RewardFunctionError(f"reward function {spec.label}: {value}")
            out[spec.label] = check_scores(value, n, spec.label)
        return out

    def shutdown(self) -> None:
        import ray

        for actor in self.actors:
            ray.kill(actor)


def weighted_sum(scores: dict[str, list[float | None]], specs: list[FunctionSpec], n: int) -> list[float]:
    """Per reply, the sum of weight x score over the functions; a None leaves that function out of that reply's sum
    (it counts 0), as TRL's GRPOTrainer does."""
    total = [0.0] * n
    for spec in specs:
        for i, value in enumerate(scores[spec.label]):
            if value is not None:
                total[i] += spec.weight * value
    return total


def pass_rates(scores: dict[str, list[float | None]], threshold: dict[str, float]) -> dict[str, float | None]:
    """Per function, the share of the replies it scored (not None) at or above its threshold (pass@1)."""
    out: dict[str, float | None] = {}
    for label, values in scores.items():
        scored = [v for v in values if v is not None]
        out[label] = sum(v >= threshold[label] for v in scored) / len(scored) if scored else None
    return out
