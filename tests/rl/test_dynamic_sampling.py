"""DAPO's dynamic sampling (stages/rl/dynamic_sampling.py and RLLoop): the pieces it cuts and joins, by hand, and a
real tiny GRPO run whose reward function makes groups flat."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from stages.rl import algorithm as A
from stages.rl import dynamic_sampling as DS
from stages.rl.config import GRPOConfig


def _batch(prompt_rows: list[list[int]], reply_rows: list[list[int]], pad: int = 0) -> dict:
    """A rollout batch in the loop's layout: prompts left-padded to the round's longest, replies of width T."""
    width = max(len(p) for p in prompt_rows)
    tokens = [[pad] * (width - len(p)) + p + r for p, r in zip(prompt_rows, reply_rows, strict=True)]
    attention = [[0] * (width - len(p)) + [1] * (len(p) + len(r)) for p, r in zip(prompt_rows, reply_rows,
                                                                                  strict=True)]  # fmt: skip
    return {"tokens": torch.tensor(tokens), "attention_mask": torch.tensor(attention),
            "reply_mask": torch.ones(len(reply_rows), len(reply_rows[0])),
            "logprobs": torch.tensor([[-0.5] * len(r) for r in reply_rows]),
            "ended": torch.tensor([True] * len(reply_rows)), "prompt_len": width}  # fmt: skip


def test_rollouts_of_different_prompt_widths_join_left_padded():
    one = _batch([[5, 6], [7, 8]], [[1, 2], [3, 4]])  # prompt width 2
    two = _batch([[9, 10, 11]], [[12, 13]])  # prompt width 3
    joined = DS.join_rollouts([one, two], pad_id=0)
    assert joined["prompt_len"] == 3
    assert joined["tokens"].tolist() == [[0, 5, 6, 1, 2], [0, 7, 8, 3, 4], [9, 10, 11, 12, 13]]
    assert joined["attention_mask"].tolist() == [[0, 1, 1, 1, 1], [0, 1, 1, 1, 1], [1, 1, 1, 1, 1]]
    assert joined["reply_mask"].shape == (3, 2) and joined["logprobs"].shape == (3, 2)
    assert joined["ended"].tolist() == [True, True, True]


def test_rows_are_taken_and_joined_field_by_field():
    from stages.rl.rl_loop import Scored

    scored = Scored(ref_logprobs=torch.arange(8.0).reshape(4, 2), reward=torch.tensor([1.0, 1.0, 0.0, 1.0]),
                    rm_scores=None, functions={"f": [1.0, 1.0, 0.0, None]}, values=None,
                    texts=["a", "b", "c", "d"], gold=None)  # fmt: skip
    rows = A.informative_rows(scored.reward, group_size=2).nonzero().flatten().tolist()
    assert rows == [2, 3]  # the first group is flat (1, 1), the second is not (0, 1)
    kept = DS.take_rows(scored, rows)
    assert kept.ref_logprobs.tolist() == [[4.0, 5.0], [6.0, 7.0]]
    assert kept.functions == {"f": [0.0, None]} and kept.texts == ["c", "d"] and kept.rm_scores is None
    both = DS.join_rows([kept, DS.take_rows(scored, [0, 1])])
    assert both.texts == ["c", "d", "a", "b"] and both.reward.tolist() == [0.0, 1.0, 1.0, 1.0]


@pytest.mark.parametrize(("found", "target", "actors", "kept"), [(5, 4, 1, 4), (3, 4, 1, 3), (3, 4, 2, 2),
                                                                  (1, 4, 2, 0), (0, 4, 1, 0)])  # fmt: skip
def test_kept_groups_are_capped_and_shared_evenly(found, target, actors, kept):
    assert DS.kept_groups(found, target, actors) == kept


def test_dynamic_sampling_is_off_by_default_and_a_group_method_knob():
    assert GRPOConfig().dynamic_sampling is False and GRPOConfig().max_sampling_rounds == 3
    from stages.rl.config import PPOConfig

    assert "dynamic_sampling" not in PPOConfig.model_fields  # PPO has no groups


# -------------------------------------------------------------------------------------------------- real runs
CONSTANT = "def constant(completions, **kwargs):\n    return [1.0 for _ in completions]\n"
PARITY = "def parity(completions, **kwargs):\n    return [float(len(c) % 2) for c in completions]\n"


def _run(tiny_inputs, tmp_path: Path, name: str, source: str):
    from stages import rl
    from stages.common.context import Scaling, StageContext
    from stages.reward_functions.artifact import import_function
    from stages.reward_functions.config import FunctionSpec
    from tests.rl.test_group_methods import TINY_GROUP

    path = tmp_path / f"{name}.py"
    path.write_text(source)
    spec = FunctionSpec(name=name, path=str(path))
    artifact = import_function(tiny_inputs["store"], spec, "test")
    config = GRPOConfig(**{**TINY_GROUP, "group_size": 2, "rollout_batch_size": 4, "mini_batch_size": 4},
                        dynamic_sampling=True, max_sampling_rounds=3,
                        reward={"model": None, "functions": [spec.model_dump()]})  # fmt: skip
    ctx = StageContext(work_dir=str(tmp_path / "work"), cache_key="test", seed=0, log=lambda _: None,
                       scaling=Scaling(num_workers=1, cpus_per_worker=0.5))  # fmt: skip
    out = rl.run(config, store=tiny_inputs["store"], ctx=ctx, sft_model=tiny_inputs["sft"],
                 prompts=tiny_inputs["prompts"], reward_fns={name: artifact})  # fmt: skip
    policy = out["policy"]
    return [json.loads(x) for x in (Path(policy.reports_path) / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.slow
def test_flat_groups_are_refilled_then_the_first_rollout_trains(tiny_inputs, local_ray, tmp_path):
    """Every group is flat under a constant reward: each iteration samples max_sampling_rounds rollouts, finds no
    informative group, and trains on its first rollout (the policy is still published)."""
    history = _run(tiny_inputs, tmp_path, "constant", CONSTANT)
    assert [(h["sampling_rounds"], h["informative_groups"], h["trained_groups"]) for h in history] == [(3, 0, 4)] * 2
    assert all(h["flat_group_frac"] == 1.0 and h["fn/constant"] == 1.0 for h in history)


@pytest.mark.slow
def test_informative_groups_from_several_rounds_train_together(tiny_inputs, local_ray, tmp_path):
    history = _run(tiny_inputs, tmp_path, "parity", PARITY)
    for h in history:
        assert 1 <= h["sampling_rounds"] <= 3 and h["trained_groups"] <= 4
        assert h["seconds_training"] > 0 and h["samples_per_second"] > 0
    # (seeded) some iteration found too few informative groups in its first rollout and trained on groups joined
    # from several rounds, of different prompt widths
    joined = [h for h in history if h["sampling_rounds"] > 1 and h["trained_groups"] == min(4, h["informative_groups"])
              and h["trained_groups"] * 2 >= 4]  # fmt: skip
    assert joined, history
    assert all(h["flat_group_frac"] > 0 for h in joined)  # their first rollout had flat groups
