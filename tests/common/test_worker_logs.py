"""Where the workers' own output goes (stages/common/ray_train.py): a log file per stage run, not the console."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from stages.common.ray_train import output_to, worker_log_dir

ROOT = Path(__file__).resolve().parents[2]


def test_worker_log_dir_is_under_the_stage_run_and_none_for_a_remote_work_dir(tmp_path):
    assert worker_log_dir(str(tmp_path / "ppo" / "abc")) == str(tmp_path / "ppo" / "abc" / "logs")
    assert worker_log_dir("s3://bucket/runs/ppo/abc") is None


def test_output_to_sends_the_process_output_to_the_log_then_restores_it(tmp_path):
    """In a process of its own, as in a Ray worker: Python's and C's writes go to the log inside the block only."""
    log = tmp_path / "logs" / "eval.log"
    script = f"""
import os, sys
from stages.common.ray_train import output_to
print("before", flush=True)
with output_to({str(log)!r}):
    os.write(1, b"from C: stdout\\n")  # what a library writes below Python's sys.stdout
    os.write(2, b"from C: stderr\\n")
    print("from python")
    sys.stderr.write("warning from python\\n")
print("after", flush=True)
"""
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=ROOT, check=True)
    assert log.read_text().splitlines() == ["from C: stdout", "from C: stderr", "from python", "warning from python"]
    assert proc.stdout.splitlines() == ["before", "after"] and proc.stderr == ""


def test_output_to_none_leaves_the_output_alone(capfd):
    with output_to(None):
        os.write(1, b"verbose\n")
    assert capfd.readouterr().out == "verbose\n"
