"""Issue 27 item 3 on a real SFT run (tiny model, 4 steps, 2 Ray Train workers): a checkpoint in work_dir whose
files differ from what the run recorded is refused with one line naming the file, or passed over and retrained
under run.untrusted_checkpoints=retrain; nothing else is ever unpickled or published."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from stages.common.checkpoint_digests import UntrustedCheckpoint
from stages.common.context import Scaling, StageContext
from stages.common.store import ArtifactStore
from stages.data.demo import DemoConfig, generate
from stages.data.ingest import ingest
from tests.tiny_models import publish_tiny_base_model

DEMO = DemoConfig(size="tiny")


@pytest.fixture(scope="module")
def trained(tmp_path_factory, local_ray):
    """One finished 4-step SFT run: its store, work_dir, inputs and published model."""
    import stages.sft as sft

    root = tmp_path_factory.mktemp("untrusted")
    store = ArtifactStore(root / "store")
    corpus = generate(DEMO)["corpus"]["train"][:2000]
    base = publish_tiny_base_model(store, [r["text"] for r in corpus])
    data = ingest("demo", "sft", store, demo_cfg=DEMO)
    config = sft.Config(max_steps=4, save_steps=2, logging_steps=2, eval_prompts=0)
    work = root / "work"
    ctx = StageContext(work_dir=str(work), cache_key="k", scaling=Scaling(num_workers=2), log=lambda _: None)
    model = sft.run(config, base_model=base, data=data, store=store, ctx=ctx)["sft-model"]
    return {"root": root, "store": store, "base": base, "data": data, "config": config, "work": work, "model": model}


def _copy(trained, name: str) -> Path:
    work = trained["root"] / name
    shutil.copytree(trained["work"], work)
    return work


def _final_checkpoint(work: Path) -> Path:
    found = [p for p in (work / "sft").glob("checkpoint_*") if (p / "result.json").is_file()]
    assert len(found) == 1, found
    return found[0]


def _rerun(trained, work: Path, policy: str, lines: list[str]):
    import stages.sft as sft

    ctx = StageContext(work_dir=str(work), cache_key="k", scaling=Scaling(num_workers=2), log=lines.append,
                       untrusted_checkpoints=policy)
    return sft.run(trained["config"], base_model=trained["base"], data=trained["data"], store=trained["store"],
                   ctx=ctx)["sft-model"]


@pytest.mark.slow
def test_a_checkpoint_as_the_run_left_it_is_reused(trained):
    lines: list[str] = []
    again = _rerun(trained, _copy(trained, "same"), "refuse", lines)
    assert any("already finished" in line for line in lines), lines
    assert again.digest == trained["model"].digest


@pytest.mark.slow
def test_changed_bytes_are_refused_in_one_line_naming_the_file(trained):
    work = _copy(trained, "flipped")
    weights = _final_checkpoint(work) / "final" / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF  # same length: every structural check of checkpoint_complete still passes
    weights.write_bytes(bytes(data))
    listed = trained["store"].list("sft-model")
    with pytest.raises(UntrustedCheckpoint) as e:
        _rerun(trained, work, "refuse", [])
    message = str(e.value)
    assert "\n" not in message and str(weights) in message and "differ" in message, message
    assert trained["store"].list("sft-model") == listed  # nothing published


@pytest.mark.slow
def test_an_added_pickle_is_refused(trained):
    work = _copy(trained, "added")
    hf_checkpoints = sorted((work / "sft").glob("checkpoint_*/checkpoint"))
    assert hf_checkpoints, "the run kept no HF Trainer checkpoint"
    final = _final_checkpoint(work)
    shutil.rmtree(final)  # so the rerun resumes the trainer from the HF checkpoint, which gets the extra pickle
    evil = hf_checkpoints[-1] / "rng_state_9.pth"
    evil.write_bytes(b"\x80\x04K\x01.")  # a pickle: torch.load(weights_only=False) would run what it says
    with pytest.raises(Exception) as e:
        _rerun(trained, work, "refuse", [])
    assert str(evil) in str(e.value) and "no run recorded writing" in str(e.value), str(e.value)


@pytest.mark.slow
def test_retrain_passes_the_tampered_checkpoint_over_and_publishes(trained):
    work = _copy(trained, "retrain")
    final = _final_checkpoint(work)
    (final / "final" / "extra.pkl").write_bytes(b"\x80\x04K\x01.")
    lines: list[str] = []
    model = _rerun(trained, work, "retrain", lines)
    assert not any("already finished" in line for line in lines), lines  # it trained again
    assert not (Path(model.path) / "extra.pkl").exists()
    assert model.ref.startswith("sft-model@")
