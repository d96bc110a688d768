"""The work_dir lease between real processes: the second refuses with one line or waits for the first; a stale
lease (holder killed on this host, or not renewed for the TTL) is taken over with one warning line."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from flows.work_lease import WorkDirBusy, work_dir_lease

REPO = Path(__file__).resolve().parents[2]

# Holds the lease until the file `release` appears, then releases it and writes `released`.
_HOLDER = r"""
import os, sys, time
from pathlib import Path
from flows.work_lease import work_dir_lease
work_dir, marks = sys.argv[1], Path(sys.argv[2])
with work_dir_lease(work_dir):
    (marks / "held").write_text(str(os.getpid()))
    while not (marks / "release").exists():
        time.sleep(0.05)
(marks / "released").write_text("")
"""

# Takes the lease (waiting up to argv[3] s); prints what it saw, or the refusal as one line and exits 2.
_SECOND = r"""
import sys
from pathlib import Path
from flows.work_lease import WorkDirBusy, work_dir_lease
work_dir, marks, wait = sys.argv[1], Path(sys.argv[2]), float(sys.argv[3])
try:
    with work_dir_lease(work_dir, wait_s=wait, poll_s=0.05, log=lambda m: print(m, file=sys.stderr)):
        print("acquired; first released before: " + str((marks / "released").exists()))
except WorkDirBusy as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(2)
"""


def _python(code: str, *args: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", code, *args], cwd=REPO, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)  # fmt: skip


@pytest.fixture
def holder(tmp_path):
    marks = tmp_path / "marks"
    marks.mkdir()
    work_dir = str(tmp_path / "runs" / "sft" / "0123456789abcdef")
    proc = _python(_HOLDER, work_dir, str(marks))
    while not (marks / "held").exists():
        assert proc.poll() is None, proc.stderr.read()
        time.sleep(0.05)
    yield work_dir, marks, proc
    (marks / "release").write_text("")
    proc.wait(timeout=60)


def test_second_run_refuses_with_one_line(holder):
    work_dir, marks, first = holder
    second = _python(_SECOND, work_dir, str(marks), "0")
    out, err = second.communicate(timeout=60)
    assert second.returncode == 2 and out == ""
    assert err.count("\n") == 1 and err.startswith(f"error: work_dir {work_dir} is in use by pid {first.pid} on ")


def test_second_run_waits_until_the_first_releases(holder):
    work_dir, marks, first = holder
    second = _python(_SECOND, work_dir, str(marks), "120")
    for line in second.stderr:  # it says once that it waits, then waits
        assert f"is in use by pid {first.pid}" in line and "waiting up to 120s" in line
        break
    assert second.poll() is None
    (marks / "release").write_text("")
    out, err = second.communicate(timeout=120)
    assert second.returncode == 0 and out.strip() == "acquired; first released before: True", err
    assert not Path(work_dir + ".lease").exists()  # released on exit


def test_a_killed_holders_lease_is_taken_over(holder):
    work_dir, marks, first = holder
    first.send_signal(signal.SIGKILL)
    first.wait(timeout=60)
    assert Path(work_dir + ".lease").exists()  # a kill runs no cleanup
    second = _python(_SECOND, work_dir, str(marks), "0")
    out, err = second.communicate(timeout=60)
    assert second.returncode == 0 and out.startswith("acquired"), err
    assert err.count("\n") == 1 and err.startswith(f"warning: work_dir {work_dir}: took over a stale lease of pid "
                                                f"{first.pid} on ") and err.strip().endswith("(its process is gone)")


def _plant(work_dir: Path, host: str, age_s: float) -> None:
    lease = Path(f"{work_dir}.lease")
    lease.parent.mkdir(parents=True, exist_ok=True)
    lease.write_text(json.dumps({"pid": 1, "host": host, "started_at": time.time() - age_s, "token": "t"}))
    when = time.time() - age_s
    os.utime(lease, (when, when))


def test_a_lease_not_renewed_for_the_ttl_is_taken_over(tmp_path):
    work_dir = tmp_path / "runs" / "rl" / "k"
    _plant(work_dir, "another-host", age_s=3600)
    lines = []
    with work_dir_lease(str(work_dir), ttl_s=600, log=lines.append) as lease:
        assert json.loads(Path(f"{work_dir}.lease").read_text())["token"] == lease.record["token"]
    assert len(lines) == 1 and "took over a stale lease of pid 1 on another-host" in lines[0]
    assert "not renewed for 3600s (ttl 600s)" in lines[0]


def test_a_fresh_lease_of_another_host_is_respected(tmp_path):
    work_dir = tmp_path / "runs" / "rl" / "k"
    _plant(work_dir, "another-host", age_s=5)  # pid 1 is alive here, but it is another host's pid 1 anyway
    with pytest.raises(WorkDirBusy, match=r"is in use by pid 1 on another-host since .* run.work_dir_lease_wait_s"):
        with work_dir_lease(str(work_dir), ttl_s=600):
            pass
    assert json.loads(Path(f"{work_dir}.lease").read_text())["token"] == "t"  # untouched
