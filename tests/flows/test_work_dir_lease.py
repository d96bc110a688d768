"""The flow takes the stage's work_dir lease: while another process holds it, `--from ppo` refuses ppo with one
line naming the work_dir and the holder, without calling the stage and without a retry."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest

from flows import pipeline
from flows.pipeline import rlhf
from flows.work_lease import WorkDirBusy
from tests.flows.test_work_lease import _HOLDER

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parents[2]


def test_a_held_work_dir_refuses_the_stage_once(pipeline_copy, tmp_path, monkeypatch):
    from flows.cached import dry_run
    from flows.plan import plan_run

    overrides = [f"run.work_dir={pipeline_copy['work_dir']}"]
    params = dict(preset="tiny", config_file=None, overrides=overrides, store=str(pipeline_copy["store"]),
                  from_stage="ppo", only=None, inputs={}, force=False)  # fmt: skip
    # the key as the run will compute it now (the code fingerprint follows the source, which may have changed)
    key = next(n["cache_key"] for n in dry_run(plan_run(params))["nodes"] if n["name"] == "ppo")
    work_dir = str(pipeline_copy["work_dir"] / "ppo" / key[:16])
    marks = tmp_path / "marks"
    marks.mkdir()
    holder = subprocess.Popen([sys.executable, "-c", _HOLDER, work_dir, str(marks)], cwd=REPO)
    try:
        while not (marks / "held").exists():
            assert holder.poll() is None
            time.sleep(0.05)
        real_run, calls = pipeline.STAGES["rl"].run, []
        monkeypatch.setattr(pipeline.STAGES["rl"], "run", lambda *a, **k: calls.append(1) or real_run(*a, **k))
        with pytest.raises(WorkDirBusy, match=rf"work_dir {work_dir} is in use by pid {holder.pid} on "):
            rlhf(preset="tiny", store=str(pipeline_copy["store"]), from_stage="ppo", overrides=overrides)
        assert calls == []
    finally:
        (marks / "release").write_text("")
        holder.wait(timeout=60)
