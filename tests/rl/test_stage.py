"""The PPO stage end to end on tiny random models: bad inputs (fast), a few iterations with Ray actors, resume (slow)."""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import pytest

from stages import rl
from stages.common.context import Scaling, StageContext
from stages.common.errors import StageInputError
from stages.common.store import ArtifactStore
from tests.tiny_models import build_tiny_gpt2, build_tiny_tokenizer, publish_rows, publish_tiny_base_model

TINY = dict(
    iterations=3, rollout_batch_size=8, mini_batch_size=4, ppo_epochs=2, max_new_tokens=8, eval_prompts=8,
    samples_shown=3, checkpoint_every=2,
)  # fmt: skip


def _publish_reward_model(store, model_dir: str, *, num_labels: int = 1, name: str = "reward-model"):
    """The same tiny GPT-2 read as a sequence classifier (random score head): mechanics only."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    model = AutoModelForSequenceClassification.from_pretrained(model_dir, num_labels=num_labels)
    with tempfile.TemporaryDirectory() as d:
        model.save_pretrained(d)
        AutoTokenizer.from_pretrained(model_dir).save_pretrained(d)
        return store.publish(d, name=name, kind="reward-model", stage="tests")


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    from stages.data import demo

    store = ArtifactStore(tmp_path_factory.mktemp("store"))
    data = demo.generate(demo.DemoConfig(size="tiny"))
    texts = [r["text"] for r in data["corpus"]["train"][:1500]]
    sft = publish_tiny_base_model(store, texts, name="sft-model")
    rm = _publish_reward_model(store, sft.path)
    prompts = publish_rows(store, "prompts", data["prompts"]["train"], data["prompts"]["test"], fmt="prompts",
                           task="demo")  # fmt: skip
    return {"store": store, "sft": sft, "rm": rm, "prompts": prompts, "texts": texts}


def _ctx(work_dir, logs: list[str] | None = None) -> StageContext:
    return StageContext(
        work_dir=str(work_dir), cache_key="test", seed=0, scaling=Scaling(num_workers=1, cpus_per_worker=0.5),
        log=(logs.append if logs is not None else print),
    )  # fmt: skip


def _run(setup, work_dir, logs=None, **overrides):
    return rl.run(
        rl.PPOConfig(**{**TINY, **overrides}), store=setup["store"], ctx=_ctx(work_dir, logs),
        sft_model=setup["sft"], reward_model=setup["rm"], prompts=setup["prompts"],
    )  # fmt: skip


# ---------------------------------------------------------------------------------------------- bad inputs
def _expect_input_error(setup, tmp_path, match: str, **inputs):
    import ray

    was_running = ray.is_initialized()
    kwargs = {"sft_model": setup["sft"], "reward_model": setup["rm"], "prompts": setup["prompts"], **inputs}
    with pytest.raises(StageInputError, match=match) as info:
        rl.run(rl.PPOConfig(**TINY), store=setup["store"], ctx=_ctx(tmp_path), **kwargs)
    assert "\n" not in str(info.value)
    assert ray.is_initialized() == was_running  # refused before any actor (or Ray) started


def test_reward_model_with_another_tokenizer_is_refused(setup, tmp_path):
    other_tok = build_tiny_tokenizer(setup["texts"][:300], vocab_size=300)
    with tempfile.TemporaryDirectory() as d:
        from transformers import GPT2ForSequenceClassification

        base = build_tiny_gpt2(other_tok)
        model = GPT2ForSequenceClassification(base.config.__class__(**{**base.config.to_dict(), "num_labels": 1}))
        model.save_pretrained(d)
        other_tok.save_pretrained(d)
        rm = setup["store"].publish(d, name="other-rm", kind="reward-model", stage="tests")
    _expect_input_error(setup, tmp_path, "tokenizer differs from the SFT policy's", reward_model=rm)


def test_reward_model_with_two_outputs_is_refused(setup, tmp_path):
    rm = _publish_reward_model(setup["store"], setup["sft"].path, num_labels=2, name="two-label-rm")
    _expect_input_error(setup, tmp_path, "num_labels: expected 1.*found 2", reward_model=rm)


def test_prompt_longer_than_context_minus_response_is_refused(setup, tmp_path):
    long_prompt = "User: " + "tell me about the cat " * 60 + "\nAssistant:"
    rows = [{"prompt": "User: What is the cat like?\nAssistant:"}, {"prompt": long_prompt}]
    prompts = publish_rows(setup["store"], "long-prompts", rows, rows[:1], fmt="prompts", task="demo")
    _expect_input_error(setup, tmp_path, r"train.jsonl\]: row 1: the prompt is \d+ tokens, expected at most 120",
                        prompts=prompts)  # fmt: skip


def test_bf16_without_a_gpu_is_refused_before_ray_starts(setup, tmp_path, monkeypatch):
    import ray

    monkeypatch.setenv("RLHF_CPU_BF16", "0")  # a CPU without native bf16

    was_running = ray.is_initialized()
    with pytest.raises(StageInputError, match=r"ppo.bf16: true needs a GPU \(run.use_gpu=true\)"):
        rl.run(rl.PPOConfig(**TINY, bf16=True), store=setup["store"], ctx=_ctx(tmp_path), sft_model=setup["sft"],
                reward_model=setup["rm"], prompts=setup["prompts"])  # fmt: skip
    assert ray.is_initialized() == was_running


def test_config_refuses_minibatches_that_do_not_divide():
    from stages.common.config import Section

    assert issubclass(rl.PPOConfig, Section)
    with pytest.raises(ValueError, match="multiple of mini_batch_size"):
        rl.PPOConfig(rollout_batch_size=10, mini_batch_size=4)
    with pytest.raises(ValueError, match="multiple of actors_per_role"):
        rl.PPOConfig(mini_batch_size=5, actors_per_role=2)


# ---------------------------------------------------------------------------------------------- sharding
def test_join_is_told_how_and_averages_int_metrics():
    import torch

    from stages.rl.actor_pool import join

    # an int statistic (a step count) used to fall through to "concatenate tensors" and crash
    assert join([{"steps": 3, "loss": 1.0}, {"steps": 4, "loss": 2.0}], "mean") == {"steps": 3.5, "loss": 1.5}
    rows = join([torch.tensor([1, 2]), torch.tensor([3])], "concat")
    assert torch.equal(rows, torch.tensor([1, 2, 3]))
    joined = join([{"v": torch.zeros(1, 2)}, {"v": torch.ones(2, 2)}], "concat")
    assert joined["v"].shape == (3, 2) and joined["v"][0].sum() == 0
    with pytest.raises(ValueError, match="expected 'concat' or 'mean'"):
        join([{"a": 1}], "sum")


def test_last_eval_chunk_is_padded_to_a_shard_per_actor():
    import torch

    from stages.rl.actor_pool import pad_to_multiple, split_batch

    # one prompt left for four actors: the old padding (chunk + chunk[:3]) gave 2 rows, 4 are needed
    assert pad_to_multiple(["a"], 4) == ["a", "a", "a", "a"]
    assert pad_to_multiple(["a", "b", "c"], 2) == ["a", "b", "c", "a"]
    assert pad_to_multiple(["a", "b", "c"], 4) == ["a", "b", "c", "a"]
    assert pad_to_multiple(["a", "b"], 2) == ["a", "b"]
    with pytest.raises(ValueError, match="at least one"):
        pad_to_multiple([], 2)
    shards = split_batch({"tokens": torch.arange(4).unsqueeze(1), "prompt_len": 1}, 4)
    assert [s["tokens"].item() for s in shards] == [0, 1, 2, 3] and all(s["prompt_len"] == 1 for s in shards)
    with pytest.raises(ValueError, match="'tokens' has 2 rows, expected a multiple of 4 actors"):
        split_batch({"tokens": torch.zeros(2, 1)}, 4)


# --------------------------------------------------------------------------------------------- real runs
def _tensors(path: str) -> dict:
    from safetensors.torch import load_file

    return load_file(str(Path(path) / "model.safetensors"))


@pytest.mark.slow
def test_tiny_ppo_publishes_a_policy_that_loads_with_transformers(setup, local_ray, tmp_path):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    logs: list[str] = []
    out = _run(setup, tmp_path / "work", logs)
    policy = out["policy"]
    assert policy.kind == "causal-lm" and policy.name == "policy"
    assert set(policy.manifest["inputs"]) == {"sft_model", "reward_model", "prompts"}
    m = policy.metrics
    for key in ("rm_score_before", "rm_score_after", "gold_score_before", "gold_score_after", "gold_win_rate", "kl",
                "samples_per_second"):  # fmt: skip
        assert isinstance(m[key], float), key
    assert m["iterations"] == 3 and m["samples_per_second"] > 0 and 0.0 <= m["gold_win_rate"] <= 1.0
    rss = policy.manifest["timings"]["peak_rss_mib"]  # each role's actors' peak RSS and their total
    assert set(rss) == {"policy", "critic", "reference", "reward", "total"} and rss["reward"] > 50
    assert rss["total"] == pytest.approx(sum(v for k, v in rss.items() if k != "total"), abs=0.3)

    model = AutoModelForCausalLM.from_pretrained(policy.path)
    tok = AutoTokenizer.from_pretrained(policy.path)
    ids = tok("User: What is the cat like?\nAssistant:", return_tensors="pt")["input_ids"]
    assert model.generate(ids, max_new_tokens=4, do_sample=False).shape[1] > ids.shape[1]
    before, after = _tensors(setup["sft"].path), _tensors(policy.path)
    assert any(not torch.equal(before[k], after[k]) for k in before)  # PPO changed the weights

    history = [json.loads(line) for line in (Path(policy.reports_path) / "metrics.jsonl").read_text().splitlines()]
    assert [h["iteration"] for h in history] == [1, 2, 3]
    for key in ("rm_score", "gold_score", "kl", "entropy", "clip_frac", "approx_kl", "policy_loss", "value_loss",
                "response_length", "seconds_generation", "seconds_scoring", "seconds_training"):  # fmt: skip
        assert key in history[0], key
    samples = json.loads((Path(policy.reports_path) / "samples.json").read_text())
    assert len(samples) == 3 and {"prompt", "sft_response", "ppo_response"} <= set(samples[0])
    assert (Path(policy.reports_path) / "curves.png").stat().st_size > 1000
    assert sum(line.startswith("ppo iter") for line in logs) == 3
    # the policy actor wrote the weights itself (no bytes through the driver); the actors' output went to the logs
    staged = _tensors(str(tmp_path / "work" / "export" / "policy"))
    assert all(torch.equal(staged[k], after[k]) for k in after)
    assert {p.name for p in (tmp_path / "work" / "logs").glob("*-rank0.log")} == {
        "policy-rank0.log", "critic-rank0.log", "reference-rank0.log", "reward-rank0.log"}
    # DeepSpeed's engines started without compiling an op on the node (its CPU shared-memory allreduce)
    for role in ("policy", "critic"):
        log = (tmp_path / "work" / "logs" / f"{role}-rank0.log").read_text()
        assert "Setting accelerator to CPU" in log and "built successfully" not in log


@pytest.mark.slow
def test_a_restarted_stage_continues_from_its_latest_checkpoint(setup, local_ray, tmp_path):
    # a high learning rate so two iterations move the weights far from the SFT start (a resume that silently
    # started over would then show in the iteration-3 numbers)
    fast = dict(checkpoint_every=2, learning_rate=2e-3, critic_learning_rate=2e-3)
    # reference: 4 iterations straight through
    straight = _run(setup, tmp_path / "straight", iterations=4, **fast)["policy"]
    # "crash" after the checkpoint at iteration 2 (a run that stops there), then restart with the full config
    _run(setup, tmp_path / "work", iterations=2, **fast)
    state = json.loads((tmp_path / "work" / "checkpoints" / "state.json").read_text())
    assert state["iteration"] == 2 and state["tag"] == "iter-000002"
    logs: list[str] = []
    resumed = _run(setup, tmp_path / "work", logs, iterations=4, **fast)["policy"]
    assert any("resuming from the checkpoint after iteration 2" in line for line in logs)
    assert sum(line.startswith("ppo iter") for line in logs) == 2  # only iterations 3 and 4 ran again

    def history(artifact):
        return [json.loads(x) for x in (Path(artifact.reports_path) / "metrics.jsonl").read_text().splitlines()]

    h_straight, h_resumed = history(straight), history(resumed)
    assert [h["iteration"] for h in h_resumed] == [1, 2, 3, 4]
    assert abs(h_straight[2]["kl"]) > 0.01  # by iteration 3 the policy has moved away from the reference
    # iteration 3 starts from the restored weights, optimizer state and KL coefficient: same rollout, same scores
    for key in ("kl", "policy_loss", "value_loss", "rm_score"):
        assert h_resumed[2][key] == pytest.approx(h_straight[2][key], rel=1e-3, abs=1e-4), key


def _publish_tiny_llama(store, texts: list[str]):
    """A tiny random Llama whose tokenizer has no pad token, and the same weights saved as a 1-label classifier."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from tests.tiny_models import save_tiny_model_dir

    with tempfile.TemporaryDirectory() as d:
        save_tiny_model_dir("llama", texts, d, pad_token=False)
        assert AutoTokenizer.from_pretrained(d).pad_token is None
        sft = store.publish(d, name="llama-sft", kind="causal-lm", stage="tests")
    with tempfile.TemporaryDirectory() as d:
        AutoModelForSequenceClassification.from_pretrained(sft.path, num_labels=1).save_pretrained(d)
        AutoTokenizer.from_pretrained(sft.path).save_pretrained(d)
        rm = store.publish(d, name="llama-rm", kind="reward-model", stage="tests")
    return sft, rm


def _check_llama_policy(policy, sft) -> list[dict]:
    """The exported policy is a plain transformers Llama that generates, with weights PPO changed; its history."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(policy.path)
    assert type(model).__name__ == "LlamaForCausalLM"
    tok = AutoTokenizer.from_pretrained(policy.path)
    ids = tok("User: What is the cat like?\nAssistant:", return_tensors="pt")["input_ids"]
    assert model.generate(ids, max_new_tokens=4, do_sample=False, pad_token_id=tok.eos_token_id).shape[1] > ids.shape[1]
    before, after = _tensors(sft.path), _tensors(policy.path)
    assert any(not torch.equal(before[k].to(after[k].dtype), after[k]) for k in before)
    history = [json.loads(x) for x in (Path(policy.reports_path) / "metrics.jsonl").read_text().splitlines()]
    assert [h["iteration"] for h in history] == [1, 2] and all(0 < h["response_length"] <= 8 for h in history)
    return history


@pytest.mark.slow
def test_ppo_on_a_tiny_llama_without_pad_token_publishes_a_loadable_policy(setup, local_ray, tmp_path):
    """Any architecture: a Llama policy whose tokenizer has no pad token (eos serves), its reward model the same
    weights read as a sequence classifier; the exported policy is a plain transformers Llama. Two actors per role
    (gloo groups of two ranks), and 5 eval prompts in chunks of 4: the last chunk holds one prompt for two actors."""
    sft, rm = _publish_tiny_llama(setup["store"], setup["texts"])
    logs: list[str] = []
    out = rl.run(
        rl.PPOConfig(**{**TINY, "iterations": 2, "checkpoint_every": 2, "learning_rate": 1e-3, "actors_per_role": 2,
                      "cpus_per_actor": 0.25, "rollout_batch_size": 4, "eval_prompts": 5}),
        store=setup["store"], ctx=_ctx(tmp_path / "work", logs), sft_model=sft, reward_model=rm,
        prompts=setup["prompts"],
    )  # fmt: skip
    policy = out["policy"]
    assert any("8 actors (2 per role), 0.25 CPU each" in line for line in logs)
    history = _check_llama_policy(policy, sft)
    # the first rollout comes before any update: policy and reference are the same weights in the same dtype
    assert abs(history[0]["kl"]) < 1e-4
    rows = json.loads((Path(policy.reports_path) / "eval.json").read_text())["after"]["rows"]
    assert len(rows) == 5 and all(isinstance(r["rm_score"], float) for r in rows)


@pytest.mark.slow
@pytest.mark.parametrize("zero_stage", [0, 2])
def test_ppo_on_one_gpu_colocates_the_four_roles_in_bf16(setup, local_ray, tmp_path, zero_stage):
    """GPU machines only: the four roles share one GPU (a quarter each), bf16 everywhere, NCCL groups."""
    import torch

    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    sft, rm = _publish_tiny_llama(setup["store"], setup["texts"])
    logs: list[str] = []
    ctx = StageContext(work_dir=str(tmp_path / "work"), cache_key="test", seed=0, log=logs.append,
                       scaling=Scaling(num_workers=1, cpus_per_worker=0.5, use_gpu=True))  # fmt: skip
    policy = rl.run(
        rl.PPOConfig(**{**TINY, "iterations": 2, "checkpoint_every": 2, "learning_rate": 1e-3, "bf16": True,
                      "zero_stage": zero_stage}),
        store=setup["store"], ctx=ctx, sft_model=sft, reward_model=rm, prompts=setup["prompts"],
    )["policy"]  # fmt: skip
    assert any("4 actors (1 per role) on 1 GPU(s), 0.25 GPU" in line for line in logs), logs
    assert all(t.dtype == torch.bfloat16 for t in _tensors(policy.path).values())
    history = _check_llama_policy(policy, sft)
    assert abs(history[0]["kl"]) < 1e-2  # reference and policy in the same dtype: no KL before the first update
