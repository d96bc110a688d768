"""Bring your own model: an imported tiny random Llama (no pad token) starts sft -> reward -> ppo -> eval.

Qwen2 and GPT-NeoX (and GPT-2) go through the same code at the unit level: the import in test_import.py, the PPO
roles' backbone, score head and sampling in test_ppo_architectures.py; each further whole flow here costs CI more
than a minute (Qwen2 ran here until the suite neared its 20-minute budget).

Runs the real flow (Prefect, Ray Train, DeepSpeed-free DDP on CPU, the PPO actors) on the tiny preset with a few
steps per stage; the quality gates are tested elsewhere, so the reward gate is off here (a few steps on a random
model cannot beat chance).
"""

from __future__ import annotations

import shutil

import pytest

from flows.cached import all_cached
from flows.cli import main as cli
from flows.config import load_config
from flows.pipeline import rlhf
from flows.plan import plan_run, stage_cache_key
from stages.common.store import ArtifactStore
from stages.data.demo import DemoConfig, generate
from tests.tiny_models import save_tiny_model_dir

pytestmark = pytest.mark.slow

FEW_STEPS = [
    "sft.max_steps=8", "sft.save_steps=8", "sft.logging_steps=4", "sft.eval_prompts=4",
    "reward.max_steps=8", "reward.save_steps=8", "reward.logging_steps=4", "reward.gate.min_eval_accuracy=null",
    "ppo.iterations=2", "ppo.checkpoint_every=2", "ppo.eval_prompts=8",
]  # fmt: skip


@pytest.fixture(scope="module")
def llama_run(tmp_path_factory, prefect_api, local_ray):
    """The chain on a Llama (GPT-2 is the main pipeline's), whose tokenizer has no pad token."""
    arch = "llama"
    root = tmp_path_factory.mktemp(f"byo-{arch}")
    texts = [row["text"] for row in generate(DemoConfig(size="tiny"))["corpus"]["train"]]
    model_dir = save_tiny_model_dir(arch, texts, root / "my-llama", pad_token=False)
    store = root / "artifacts"
    assert cli(["artifacts", "import", str(model_dir), "--kind", "causal-lm", "--name", "my-llama",
                "--store", str(store)]) == 0  # fmt: skip
    overrides = [f"run.work_dir={root / 'runs'}", "sft.base_model=my-llama@latest", *FEW_STEPS]
    summary = rlhf(preset="tiny", store=str(store), overrides=overrides)
    return {"root": root, "model_dir": model_dir, "store": ArtifactStore(str(store)), "summary": summary,
            "overrides": overrides, "texts": texts, "arch": arch}  # fmt: skip


def test_pipeline_starts_at_sft_from_the_imported_model(llama_run):
    summary = llama_run["summary"]
    assert list(summary["stages"]) == ["sft", "reward", "ppo", "eval"]
    assert summary["skipped"] == {"pretrain": "sft.base_model = my-llama@latest"}
    assert {i["state"] for i in summary["stages"].values()} == {"Completed"}


def test_policy_loads_in_transformers_and_its_lineage_names_the_import(llama_run):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    store = llama_run["store"]
    imported = store.get("my-llama@v1")
    policy = store.get("policy@latest")
    model = AutoModelForCausalLM.from_pretrained(policy.path)
    assert model.config.model_type == llama_run["arch"]
    tokenizer = AutoTokenizer.from_pretrained(policy.path)
    source = AutoTokenizer.from_pretrained(llama_run["model_dir"])
    assert tokenizer.get_vocab() == source.get_vocab()  # the tokenizer is the one in the imported directory
    tree = store.lineage(policy.ref)
    assert tree["inputs"]["sft_model"]["inputs"]["base_model"]["digest"] == imported.digest
    assert tree["inputs"]["reward_model"]["inputs"]["sft_model"]["inputs"]["base_model"]["digest"] == imported.digest


def test_a_local_directory_is_content_hashed_and_changed_files_rerun_sft(llama_run, tmp_path):
    """Naming the directory instead of the artifact: same content -> same keys (all cached); new weights -> rerun."""
    model_dir = tmp_path / "local-llama"
    shutil.copytree(llama_run["model_dir"], model_dir)
    overrides = [o for o in llama_run["overrides"] if not o.startswith("sft.base_model=")]
    params = dict(preset="tiny", overrides=[*overrides, f"sft.base_model={model_dir}"], store=llama_run["store"].root)
    cfg = load_config("tiny", overrides=params["overrides"])
    store = llama_run["store"]
    summary = all_cached(plan_run(params))
    assert summary is not None and {i["state"] for i in summary["stages"].values()} == {"Cached"}
    first = store.get("local-llama@latest")
    assert first.digest == store.get("my-llama@v1").digest

    save_tiny_model_dir(llama_run["arch"], llama_run["texts"], model_dir, pad_token=False,
                        seed=1)  # same path, new weights
    assert all_cached(plan_run(params)) is None  # sft (and so everything after it) must run again
    changed = store.get("local-llama@latest")
    assert changed.digest != first.digest and changed.version == first.version + 1
    data = store.get("sft-data@latest")
    assert stage_cache_key("sft", cfg, {"base_model": changed, "data": data}) != stage_cache_key(
        "sft", cfg, {"base_model": first, "data": data}
    )
