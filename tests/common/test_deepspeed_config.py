"""The one DeepSpeed config builder: bf16 without DeepSpeed's per-step overflow scan unless asked (issue 27 item 13),
read back by DeepSpeed's own config parser; the loss check that replaces it."""

from __future__ import annotations

import math

import pytest
from deepspeed.runtime.precision_config import get_bfloat16_config

from stages.common import deepspeed_config as ds
from stages.common.errors import TrainingDiverged
from stages.pretrain.train_loop import check_finite


def _build(precision: str, **kw):
    return ds.build(zero_stage=2, precision=precision, use_gpu=True, micro_batch_size=4, **kw)


def test_bf16_skips_the_per_step_overflow_scan_by_default():
    config = _build("bf16")
    assert config["bf16"] == {"enabled": True, "check_grad_overflow": False}
    parsed = get_bfloat16_config(config)  # DeepSpeed reads the key we write (a typo would be refused or default True)
    assert parsed.enabled and parsed.check_grad_overflow is False


def test_the_overflow_scan_can_be_asked_for():
    assert get_bfloat16_config(_build("bf16", check_grad_overflow=True)).check_grad_overflow is True


@pytest.mark.parametrize("precision", ["fp32", "fp16"])
def test_other_precisions_are_left_as_deepspeed_has_them(precision):
    # fp16's loss scale needs the scan, DeepSpeed always does it; fp32 never
    assert "check_grad_overflow" not in _build(precision)["bf16"]


def test_a_non_finite_logged_loss_stops_pretraining_naming_the_step():
    check_finite([{"step": 1, "loss": 3.2}, {"step": 2, "loss": 2.9}])
    for bad in (math.nan, math.inf):
        with pytest.raises(TrainingDiverged, match=r"pretrain: the training loss is (nan|inf) at step 7: training diverged"):
            check_finite([{"step": 6, "loss": 3.0}, {"step": 7, "loss": bad}])


def test_the_trl_stages_stop_when_a_logged_loss_is_not_finite():
    from types import SimpleNamespace

    from stages.trl.worker import progress_callback

    callback = progress_callback("dpo", max_steps=10, timing={})
    state = SimpleNamespace(global_step=4)
    with pytest.raises(TrainingDiverged, match=r"^dpo: the training loss is nan at step 4: training diverged"):
        callback.on_log(None, state, None, logs={"loss": math.nan})
