"""A stage's code fingerprint follows its imports: every project module its package imports, directly or not, and
nothing else (less the short deny-list of modules that cannot shape results)."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from stages.common.fingerprint import NOT_RESULT_SHAPING, code_fingerprint, fingerprint_files

REPO = Path(__file__).resolve().parents[2]
STAGES = ("pretrain", "sft", "reward", "dpo", "rl", "eval")


@pytest.fixture(scope="module")
def copy_root(tmp_path_factory) -> Path:
    """A copy of the project's `stages/` to edit."""
    root = tmp_path_factory.mktemp("project")
    shutil.copytree(REPO / "stages", root / "stages", ignore=shutil.ignore_patterns("__pycache__"))
    return root


def _rel(root: Path, stage: str) -> set[str]:
    return {str(p.relative_to(root)) for p in fingerprint_files(stage, root)}


def test_shared_sampling_code_is_covered_wherever_it_is_imported():
    # the stale cache of b175148: sampling.py shapes every reply sampled by RL, eval, SFT and DPO
    for stage in ("rl", "eval", "sft", "dpo"):
        assert "stages/common/sampling.py" in _rel(REPO, stage), stage
    assert "stages/common/sampling.py" not in _rel(REPO, "pretrain")  # pretraining samples nothing


def test_covers_the_stage_package_and_what_it_imports_but_not_the_store_or_other_stages():
    sft = _rel(REPO, "sft")
    assert {"stages/sft/stage.py", "stages/sft/train.py", "stages/trl/driver.py", "stages/trl/worker.py",
            "stages/trl/loop_config.py", "stages/trl/tokens.py", "stages/common/hf.py",
            "stages/data/read.py"} <= sft  # fmt: skip
    assert not {p for p in sft if p.startswith(("stages/rl/", "stages/dpo/", "stages/eval/"))}
    denied = {name.replace(".", "/") + ".py" for name in NOT_RESULT_SHAPING}
    for stage in STAGES:
        assert not _rel(REPO, stage) & denied, stage


@pytest.mark.parametrize("stage", STAGES)
def test_editing_any_imported_module_changes_the_key_and_any_other_module_does_not(copy_root, stage):
    covered = fingerprint_files(stage, copy_root)
    everything = sorted((copy_root / "stages").rglob("*.py"))
    for path in everything:
        before = code_fingerprint(stage, copy_root)
        original = path.read_bytes()
        path.write_bytes(original + b"\n# edited\n")
        try:
            after = code_fingerprint(stage, copy_root)
        finally:
            path.write_bytes(original)
        assert (after != before) == (path in covered), f"{stage}: {path.relative_to(copy_root)}"


def test_a_new_import_brings_its_module_in(copy_root):
    module = copy_root / "stages" / "common" / "brand_new_helper.py"
    module.write_text("SCALE = 2\n")
    stage_py = copy_root / "stages" / "pretrain" / "stage.py"
    original = stage_py.read_text()
    try:
        assert module not in fingerprint_files("pretrain", copy_root)
        stage_py.write_text(original + "\n\ndef _late():\n    from stages.common.brand_new_helper import SCALE\n")
        assert module in fingerprint_files("pretrain", copy_root)
    finally:
        stage_py.write_text(original)
        module.unlink()
