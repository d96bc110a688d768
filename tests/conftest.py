"""Session fixtures shared by the flow and system tests: a real Prefect API, a real local Ray, one tiny pipeline run."""

from __future__ import annotations

import atexit
import importlib.util
import os
import shutil
import tempfile
from pathlib import Path

import pytest

os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

# Every Ray the tests start stays on 127.0.0.1. The product's local Ray does so by itself (init_ray); the session's
# Ray below and the multi-node clusters (`ray start` raylets, which Ray's one-machine switch would refuse) keep the
# loopback address Ray would swap for the machine's interface address (tests/system/loopback/sitecustomize.py) in
# this process and in every process it starts, and are started with 127.0.0.1 as their node address.
_LOOPBACK = str(Path(__file__).with_name("system") / "loopback")
os.environ["RLHF_RAY_LOOPBACK"] = "1"
os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (_LOOPBACK, os.environ.get("PYTHONPATH")) if p)
# this process started before PYTHONPATH named the folder: run the file here, under a name of its own
_spec = importlib.util.spec_from_file_location("rlhf_test_loopback", os.path.join(_LOOPBACK, "sitecustomize.py"))
_spec.loader.exec_module(importlib.util.module_from_spec(_spec))


# Under pytest-xdist (scripts/test.sh: -n 2) each worker keeps its own Prefect home, so the temporary
# Prefect APIs that `rlhf run` subprocesses start never share one SQLite database across workers.
if os.environ.get("PYTEST_XDIST_WORKER") and "PREFECT_HOME" not in os.environ:
    os.environ["PREFECT_HOME"] = tempfile.mkdtemp(prefix="rlhf-tests-prefect-")
    atexit.register(shutil.rmtree, os.environ["PREFECT_HOME"], ignore_errors=True)

# Under xdist a worker runs whole groups (`pytest_xdist_make_scheduler`): a module, so its module fixtures are built
# once, and every module of the one tiny pipeline (a session fixture of about 2 minutes), listed here because the
# scheduler sees test ids only. xdist's own `xdist_group` marks are not used: with pytest 9 they no longer reach the
# test ids that xdist 3.8 schedules by.
TINY_PIPELINE_FILES = ("tests/flows/test_flow.py", "tests/flows/test_work_dir_lease.py", "tests/system/test_sweep.py",
                       "tests/system/test_system.py")  # fmt: skip
# The two longest groups (about 12 minutes each on 2 busy cores): scheduled first, so that they run side by side.
FIRST_GROUPS = ("tests/system/test_multinode.py", "tiny-pipeline")


def _path(nodeid: str) -> str:
    return nodeid.split("::")[0]


def _group(nodeid: str) -> str:
    return "tiny-pipeline" if _path(nodeid) in TINY_PIPELINE_FILES else _path(nodeid)


@pytest.hookimpl(optionalhook=True)  # a hook of pytest-xdist's: unknown to pytest without it
def pytest_xdist_make_scheduler(config, log):
    from xdist.scheduler import LoadScopeScheduling

    class ByGroup(LoadScopeScheduling):
        def _split_scope(self, nodeid: str) -> str:
            return _group(nodeid)

    return ByGroup(config, log)


def pytest_collection_modifyitems(config, items):
    strays = sorted({_path(i.nodeid) for i in items if "tiny_pipeline" in i.fixturenames} - {*TINY_PIPELINE_FILES})
    if strays:
        raise pytest.UsageError(f"tests/conftest.py: {', '.join(strays)} use the tiny_pipeline fixture; add them to "
                                "TINY_PIPELINE_FILES so that one worker runs every test that needs that pipeline")
    rank = {g: i for i, g in enumerate(FIRST_GROUPS)}
    items.sort(key=lambda item: rank.get(_group(item.nodeid), len(FIRST_GROUPS)))  # stable: the rest keep their order


@pytest.fixture(scope="session")
def prefect_api():
    """A temporary Prefect server (SQLite in a temp dir) for the whole session."""
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=60):
        yield


@pytest.fixture(scope="session")
def local_ray():
    """One local Ray for the session; flows see it initialised and leave it running."""
    import ray

    started = not ray.is_initialized()
    if started:
        ray.init(num_cpus=2, include_dashboard=True, dashboard_host="127.0.0.1", log_to_driver=True,
                 _node_ip_address="127.0.0.1")
    yield
    if started:
        ray.shutdown()


@pytest.fixture(scope="session")
def tiny_pipeline(tmp_path_factory, prefect_api, local_ray):
    """The whole tiny pipeline, run once through the Prefect flow; tests copy its store before changing anything."""
    from flows.pipeline import rlhf

    root = tmp_path_factory.mktemp("tiny-pipeline")
    store, work = root / "artifacts", root / "runs"
    summary = rlhf(preset="tiny", store=str(store), overrides=[f"run.work_dir={work}"])
    return {"store": store, "work_dir": work, "summary": summary}


@pytest.fixture
def pipeline_copy(tiny_pipeline, tmp_path):
    """A private copy of the tiny pipeline's store and checkpoints, for tests that rerun stages."""
    store, work = tmp_path / "artifacts", tmp_path / "runs"
    shutil.copytree(tiny_pipeline["store"], store, symlinks=True)
    shutil.copytree(tiny_pipeline["work_dir"], work, symlinks=True)
    return {"store": Path(store), "work_dir": Path(work)}
