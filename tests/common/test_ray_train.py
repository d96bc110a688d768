"""stages.common.ray_train on a real local Ray: a failing worker is one clear error, a rerun resumes, logs arrive."""

from __future__ import annotations

import json
import re
import sys
import tempfile
from pathlib import Path

import pytest

from stages.common import ray_train as rt
from stages.common.context import Scaling, StageContext

# Ray workers cannot import this test module: ship its functions by value.
ray_cloudpickle = pytest.importorskip("ray.cloudpickle")
ray_cloudpickle.register_pickle_by_value(sys.modules[__name__])


def counting_loop(config: dict) -> dict:
    """Counts steps, checkpointing each one from rank 0; raises at `crash_at` unless it resumed."""
    rt.set_torch_threads(1)
    start = 0
    with rt.resume_dir() as d:
        if d:
            start = json.loads((Path(d) / "state.json").read_text())["step"]
    rt.log(f"start {start} of {rt.world_size()}")
    for step in range(start + 1, config["steps"] + 1):
        if step == config.get("crash_at") and start == 0:
            raise ValueError(f"bad batch at step {step}")
        with tempfile.TemporaryDirectory() as tmp:
            if rt.world_rank() == 0:
                (Path(tmp) / "state.json").write_text(json.dumps({"step": step}))
            rt.report({"step": step}, tmp if rt.world_rank() == 0 else None)
    return {"start": start, "end": config["steps"]}


@pytest.mark.slow
def test_failure_is_one_line_and_a_rerun_resumes(tmp_path, local_ray):
    lines: list[str] = []
    ctx = StageContext(work_dir=str(tmp_path / "work"), scaling=Scaling(num_workers=2), log=lines.append)
    with pytest.raises(rt.TrainingFailed) as err:
        rt.fit(counting_loop, {"steps": 4, "crash_at": 3}, ctx=ctx, run_name="count", max_failures=0)
    # Both ranks raise at step 3; which one Ray reports first is a race, so either rank is right.
    assert re.fullmatch(r"count: training failed on worker rank [01]: ValueError: bad batch at step 3", str(err.value))
    assert err.value.__cause__ is not None
    assert len([p for p in (tmp_path / "work" / "count").glob("checkpoint_*") if p.is_dir()]) == 2  # steps 1 and 2

    result = rt.fit(counting_loop, {"steps": 4}, ctx=ctx, run_name="count", max_failures=0)
    # Ray Train registers reports asynchronously: when the crash lands right after step 2's report, the latest
    # registered checkpoint may still be step 1. Either way the rerun resumes from a checkpoint, not from step 0.
    resumed = result.return_value["start"]
    assert resumed in (1, 2) and result.return_value["end"] == 4
    assert result.metrics["step"] == 4
    # keep-last-2 over the checkpoints Ray registered: resumed from step 2, steps 3 and 4 remain; resumed from step 1,
    # the first run's step-2 folder was never registered (the race above), so it stays beside 3 and 4
    kept = len([p for p in (tmp_path / "work" / "count").glob("checkpoint_*") if p.is_dir()])
    assert kept == (2 if resumed == 2 else 3)
    assert "start 0 of 2" in lines and f"start {resumed} of 2" in lines  # rank 0's lines reach ctx.log
    # every rank of both runs said where it ran; one local node, two worker processes per run
    import ray

    here = ray.get_runtime_context().get_node_id()
    assert sorted(p["rank"] for p in ctx.placements) == [0, 0, 1, 1]
    assert {p["node_id"] for p in ctx.placements} == {here} and len({p["pid"] for p in ctx.placements[-2:]}) == 2
    assert f"count: 2 workers ran on 1 node(s) ({here[:8]}: ranks 0, 1)" in lines


@pytest.mark.slow
def test_failure_config_retries_from_the_latest_checkpoint(tmp_path, local_ray):
    ctx = StageContext(work_dir=str(tmp_path / "work"), scaling=Scaling(num_workers=2), log=lambda line: None)
    result = rt.fit(counting_loop, {"steps": 4, "crash_at": 3}, ctx=ctx, run_name="count", max_failures=1)
    assert result.return_value == {"start": 2, "end": 4}  # the retry started from step 2's checkpoint, not 0
