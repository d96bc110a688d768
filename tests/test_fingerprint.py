"""What a stage's code fingerprint covers: its own package and the shared code that shapes its results, nothing else."""

from __future__ import annotations

from stages.common import fingerprint
from stages.common.fingerprint import RESULT_SHAPING_COMMON, code_fingerprint, fingerprint_files


def test_covers_the_stage_package_and_result_shaping_common_code():
    names = {f"{p.parent.name}/{p.name}" for p in fingerprint_files("sft")}
    assert {"sft/stage.py", "sft/train.py", "common/trl_training.py", "common/hf.py", "common/data.py"} <= names
    assert not names & {"common/store.py", "common/artifact_import.py", "common/plots.py", "common/gates.py",
                        "common/fingerprint.py", "ppo/stage.py"}  # fmt: skip
    assert all(any(p.name == n for p in fingerprint_files("ppo")) for n in RESULT_SHAPING_COMMON)


def test_editing_the_store_does_not_change_a_fingerprint_but_editing_shared_training_code_does(tmp_path, monkeypatch):
    root = tmp_path / "stages"
    for rel in ("sft/stage.py", "common/store.py", "common/trl_training.py"):
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text(f"# {rel}\n")
    monkeypatch.setattr(fingerprint, "_STAGES_ROOT", root)
    before = code_fingerprint("sft")
    (root / "common/store.py").write_text("# the store, edited\n")
    assert code_fingerprint("sft") == before
    (root / "common/trl_training.py").write_text("# shared training code, edited\n")
    assert code_fingerprint("sft") != before
