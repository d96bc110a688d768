"""Which checkpoint folders in the Ray run storage count as whole (stages.trl.driver.checkpoint_complete), built by
hand in the layouts the HF Trainer writes: plain (optimizer.pt) and under DeepSpeed (a `latest` file naming a
`global_step*` folder, no optimizer.pt)."""

from __future__ import annotations

import json
import zipfile
from pathlib import Path

from stages.trl.driver import checkpoint_complete


def _safetensors(path: Path) -> None:
    header = json.dumps({"w": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}).encode()
    path.write_bytes(len(header).to_bytes(8, "little") + header + b"\x00" * 8)


def _zip(path: Path) -> None:
    with zipfile.ZipFile(path, "w") as z:
        z.writestr("data.pkl", b"x")


def _hf_checkpoint(root: Path, *, deepspeed: bool) -> Path:
    hf = root / "checkpoint_000001" / "checkpoint"
    hf.mkdir(parents=True)
    (hf / "trainer_state.json").write_text(json.dumps({"global_step": 4}))
    _safetensors(hf / "model.safetensors")
    _zip(hf / "scheduler.pt")
    if deepspeed:
        step = hf / "global_step4"
        step.mkdir()
        _zip(step / "mp_rank_00_model_states.pt")
        _zip(step / "bf16_zero_pp_rank_0_mp_rank_00_optim_states.pt")
        (hf / "latest").write_text("global_step4")
    else:
        _zip(hf / "optimizer.pt")
    return hf.parent


def test_plain_checkpoint_is_complete(tmp_path):
    assert checkpoint_complete(_hf_checkpoint(tmp_path, deepspeed=False))


def test_deepspeed_checkpoint_is_complete(tmp_path):
    assert checkpoint_complete(_hf_checkpoint(tmp_path, deepspeed=True))


def test_torn_deepspeed_checkpoints_are_not(tmp_path):
    no_latest = _hf_checkpoint(tmp_path / "a", deepspeed=True)
    (no_latest / "checkpoint" / "latest").unlink()  # DeepSpeed writes `latest` after its step folder
    assert not checkpoint_complete(no_latest)
    empty_step = _hf_checkpoint(tmp_path / "b", deepspeed=True)
    for f in (empty_step / "checkpoint" / "global_step4").iterdir():
        f.unlink()
    assert not checkpoint_complete(empty_step)
    wrong_name = _hf_checkpoint(tmp_path / "c", deepspeed=True)
    (wrong_name / "checkpoint" / "latest").write_text("../../elsewhere")  # names no step folder of this checkpoint
    assert not checkpoint_complete(wrong_name)
    torn_state = _hf_checkpoint(tmp_path / "d", deepspeed=True)
    p = torn_state / "checkpoint" / "global_step4" / "mp_rank_00_model_states.pt"
    p.write_bytes(p.read_bytes()[:10])  # half uploaded: not a whole torch.save zip
    assert not checkpoint_complete(torn_state)
