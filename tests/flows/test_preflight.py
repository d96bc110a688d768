"""Runs that cannot fit the hardware are refused before anything starts: pure checks and the real CLI."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from flows.config import load_config
from flows.pipeline import plan_stages, preflight
from flows.preflight import Resources, check_fits
from stages.common.config import ConfigError

ALL = ["pretrain", "sft", "reward", "ppo"]
REPO = Path(__file__).resolve().parents[2]


def _machine(cpus: float, gpus: float) -> Resources:
    return Resources(cpus=cpus, gpus=gpus, gpus_per_node=gpus, where="this machine")


def test_gpu_asked_on_a_machine_without_one():
    cfg = load_config("tiny", overrides=["run.use_gpu=true"])
    with pytest.raises(ConfigError, match=r"run.use_gpu is true but this machine has no GPU"):
        check_fits(cfg, _machine(2, 0), ALL)


def test_training_workers_need_one_gpu_each():
    cfg = load_config("tiny", overrides=["run.use_gpu=true", "run.num_workers=2"])
    with pytest.raises(ConfigError, match=r"run.num_workers = 2 .* has 1; set run.num_workers to at most 1"):
        check_fits(cfg, _machine(16, 1), ["sft"])
    check_fits(cfg, _machine(16, 2), ["sft"])  # two GPUs: fits


def test_training_workers_need_their_cpus():
    cfg = load_config("tiny", overrides=["run.num_workers=4", "run.cpus_per_worker=1.0"])
    with pytest.raises(ConfigError, match=r"4 x 1 = 4 CPUs, but this machine has 2"):
        check_fits(cfg, _machine(2, 0), ["pretrain"])
    check_fits(cfg, _machine(2, 0), [])  # nothing to train: nothing to check


def test_single_gpu_preset_fits_one_gpu():
    cfg = load_config("single-gpu")
    check_fits(cfg, _machine(16, 1), ALL)
    assert cfg.run.num_workers == 1 and cfg.pretrain.precision == "bf16" and cfg.sft.bf16 and cfg.ppo.bf16


@pytest.mark.parametrize(
    "override, key",
    [
        ("pretrain.precision=bf16", "pretrain.precision"),
        ("pretrain.precision=fp16", "pretrain.precision"),
        ("sft.bf16=true", "sft.bf16"),
        ("reward.bf16=true", "reward.bf16"),
        ("ppo.bf16=true", "ppo.bf16"),
    ],
)
def test_half_precision_without_gpu_is_a_config_error(override, key, monkeypatch):
    monkeypatch.setenv("RLHF_CPU_BF16", "0")  # a CPU without native bf16 (ppo.bf16 would run on one with it)
    with pytest.raises(ConfigError, match=rf"--set {override}: {key}: .* needs a GPU, but run.use_gpu is false"):
        load_config("tiny", overrides=[override])


def test_ppo_bf16_on_a_cpu_with_native_bf16_is_accepted(monkeypatch):
    monkeypatch.setenv("RLHF_CPU_BF16", "1")
    assert load_config("tiny", overrides=["ppo.bf16=true"]).ppo.bf16
    with pytest.raises(ConfigError, match=r"sft.bf16: true needs a GPU"):  # the TRL stages stay fp32 on CPU
        load_config("tiny", overrides=["sft.bf16=true"])


def test_half_precision_with_gpu_flag_is_accepted():
    assert load_config("tiny", overrides=["run.use_gpu=true", "pretrain.precision=bf16"]).pretrain.precision == "bf16"


def test_local_preflight_reads_this_machine(monkeypatch):
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    cfg = load_config("tiny", overrides=["run.use_gpu=true"])
    if Resources.of_this_machine().gpus:
        pytest.skip("this machine has a GPU")
    with pytest.raises(ConfigError, match="has no GPU"):
        preflight(cfg, plan_stages(None, None, cfg)[0])


def test_base_model_leaves_pretrain_out_of_the_plan():
    cfg = load_config("tiny", overrides=["sft.base_model=my-llama@latest"])
    assert plan_stages(None, None, cfg) == (["sft", "reward", "ppo", "eval"], set())
    assert plan_stages("reward", None, cfg) == (["sft", "reward", "ppo", "eval"], {"reward", "ppo", "eval"})
    with pytest.raises(ConfigError, match="--from pretrain: sft.base_model is set"):
        plan_stages("pretrain", None, cfg)


@pytest.mark.parametrize("override", ["run.use_gpu=true", "pretrain.precision=bf16", "ppo.bf16=true"])
def test_cli_refuses_in_one_line_with_exit_2(tmp_path, override):
    """Through the real console script: one stderr line, exit 2, no traceback, nothing written to the store."""
    store = tmp_path / "store"
    proc = subprocess.run(
        [str(Path(sys.executable).parent / "rlhf"), "run", "--preset", "tiny", "--set", override, "--store", str(store)],
        capture_output=True, text=True, timeout=120, cwd=tmp_path,
        env={**os.environ, "RLHF_CPU_BF16": "0"},  # a CPU without native bf16, where ppo.bf16 cannot run either
    )  # fmt: skip
    assert proc.returncode == 2, proc.stderr
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr
    assert "Traceback" not in proc.stderr + proc.stdout
    assert not store.exists()


def test_ppo_placement_is_checked_before_anything_starts():
    """Two policy ranks cannot share the one GPU (NCCL refuses duplicate devices): refused up front."""
    cfg = load_config("single-gpu", overrides=["ppo.actors_per_role=2", "ppo.mini_batch_size=16"])
    with pytest.raises(ConfigError, match=r"\(this machine\)$"):
        check_fits(cfg, _machine(16, 1), ["ppo"])
    check_fits(cfg, _machine(16, 2), ["ppo"])  # one GPU per rank: fits


def test_critic_free_branches_are_checked_for_their_three_roles():
    """4 x 0.6 CPUs do not fit 2 cores, GRPO's 3 x 0.6 do: each RL node is checked with its own roles."""
    cfg = load_config("tiny", overrides=["align.methods=[ppo,grpo]", "ppo.cpus_per_actor=0.6"])
    check_fits(cfg, _machine(2, 0), ["grpo"])
    with pytest.raises(ConfigError, match=r"^ppo: 4 actors x ppo.cpus_per_actor 0.6 = 2.4 CPUs"):
        check_fits(cfg, _machine(2, 0), ["ppo"])


# --- per node: what Ray could not place, named by node (issue 26 item 3) ----------------------------------------------

from flows.preflight import NodeResources, unplaceable  # noqa: E402


def _cluster(*nodes: tuple[str, float, float]) -> Resources:
    parts = tuple(NodeResources(*n) for n in nodes)
    return Resources(cpus=sum(n.cpus for n in parts), gpus=sum(n.gpus for n in parts),
                     gpus_per_node=max(n.gpus for n in parts), where="the Ray cluster at X", nodes=parts)  # fmt: skip


HEAD_AND_TWO = (("head", 0.0, 0.0), ("a", 2.0, 0.0), ("b", 2.0, 0.0))


def test_unplaceable_first_fit_by_hand():
    nodes = tuple(NodeResources(*n) for n in HEAD_AND_TWO)
    assert unplaceable([{"CPU": 1.5}] * 2, nodes, "PACK") is None  # one on a, one on b
    # 3 x 1.2 = 3.6 <= 4 CPUs in all, but a node of 2 holds one of them: the third has nowhere to go
    assert unplaceable([{"CPU": 1.2}] * 3, nodes, "SPREAD") == (
        "{unit} 3 of 3 needs 1.2 CPUs; left per node after the others: head 0 CPUs, a 0.8 CPUs, b 0.8 CPUs")
    assert unplaceable([{"CPU": 1.0}] * 2, nodes, "STRICT_PACK") is None  # 2 CPUs on a
    assert "all 3 {unit}s together need 3 CPUs on one node" in unplaceable([{"CPU": 1.0}] * 3, nodes, "STRICT_PACK")
    assert unplaceable([{"CPU": 1.0}] * 2, nodes, "STRICT_SPREAD") is None
    assert "needs 0.5 CPUs on a node of its own" in unplaceable([{"CPU": 0.5}] * 3, nodes, "STRICT_SPREAD")
    gpus = (NodeResources("g1", 8, 1), NodeResources("g2", 8, 1))
    assert unplaceable([{"CPU": 1, "GPU": 1}] * 2, gpus, "PACK") is None
    assert "2 CPUs and 2 GPUs on one node" in unplaceable([{"CPU": 1, "GPU": 1}] * 2, gpus, "STRICT_PACK")


def test_training_workers_that_fit_the_total_but_no_node_are_refused_naming_the_nodes():
    cfg = load_config("tiny", overrides=["run.num_workers=3", "run.cpus_per_worker=1.2"])
    with pytest.raises(ConfigError, match=r"^run.num_workers = 3 training workers x run.cpus_per_worker 1.2 \(PACK\): "
                                          r"worker 3 of 3 needs 1.2 CPUs; left per node after the others: head 0 CPUs, "
                                          r"a 0.8 CPUs, b 0.8 CPUs on the Ray cluster at X$"):  # fmt: skip
        check_fits(cfg, _cluster(*HEAD_AND_TWO), ["sft"])
    check_fits(load_config("tiny", overrides=["run.cpus_per_worker=1.5"]), _cluster(*HEAD_AND_TWO), ["sft"])
    strict = load_config("tiny", overrides=["run.placement_strategy=STRICT_PACK", "run.cpus_per_worker=1.5"])
    with pytest.raises(ConfigError, match=r"\(STRICT_PACK\): all 2 workers together need 3 CPUs on one node"):
        check_fits(strict, _cluster(*HEAD_AND_TWO), ["sft"])


def test_rl_actors_are_placed_per_node_with_their_reward_functions():
    cfg = load_config("tiny", overrides=["ppo.cpus_per_actor=0.7"])  # 4 actors x 0.7 = 2.8 CPUs of 3
    with pytest.raises(ConfigError, match=r"^ppo: 4 actors in 4 bundles \(PACK\): bundle 4 of 4 needs 0.7 CPUs; left "
                                          r"per node after the others: n1 0.3 CPUs, n2 0.3 CPUs, n3 0.3 CPUs"):  # fmt: skip
        check_fits(cfg, _cluster(("n1", 1.0, 0.0), ("n2", 1.0, 0.0), ("n3", 1.0, 0.0)), ["ppo"])
    check_fits(cfg, _cluster(("n1", 1.5, 0.0), ("n2", 1.5, 0.0)), ["ppo"])  # two per node
    functions = load_config("tiny", overrides=["align.methods=[grpo]", "grpo.cpus_per_actor=0.5", "grpo.reward.cpus=0.5",
                                               "grpo.reward.functions=[{name: exact_match, weight: 1.0}]"])  # fmt: skip
    check_fits(functions, _cluster(("n1", 1.0, 0.0), ("n2", 1.0, 0.0)), ["grpo"])  # 3 actors + 1 function: 4 x 0.5
    with pytest.raises(ConfigError, match=r"grpo: 3 actors in 3 bundles \+ 1 reward functions \(PACK\): bundle 4 of 4"):
        check_fits(functions, _cluster(("n1", 1.2, 0.0), ("n2", 0.9, 0.0)), ["grpo"])
