"""The pretraining stage: pure math and data layout (fast), bad input (fast, no Ray), the tiny preset on 2 Ray
workers with DeepSpeed ZeRO-2 on CPU, killed after its first checkpoint and resumed (slow), and a tiny Llama-style
model from scratch and from a random Llama directory on 1 worker (slow)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

import stages.pretrain as pretrain
from stages.common.context import Scaling, StageContext
from stages.common.errors import StageInputError
from stages.common.store import ArtifactError, ArtifactStore
from stages.pretrain.blocks import batch_rows, pack_blocks, read_shard, shard_rows, write_blocks
from stages.pretrain.deepspeed_setup import deepspeed_config
from stages.pretrain.metrics import gpt_flops_per_token, mfu, unigram_perplexity
from stages.pretrain.stage import STARTUP_PHASES
from tests.tiny_models import publish_rows

PRESETS = Path(__file__).resolve().parents[2] / "flows" / "presets"


def tiny_config(**changes) -> pretrain.Config:
    """The `pretrain:` section of the tiny preset (what the pipeline tests run), with changes."""
    section = yaml.safe_load((PRESETS / "tiny.yaml").read_text())["pretrain"] or {}
    return pretrain.Config(**{**section, **changes})


# ------------------------------------------------------------------------------------------------ pure functions


def test_unigram_perplexity_by_hand():
    # counts over V=3: [2, 1, 0] -> add-one probs [3/6, 2/6, 1/6]; targets [0, 2] -> exp(-(ln 1/2 + ln 1/6) / 2)
    ppl = unigram_perplexity(torch.tensor([0, 0, 1]), torch.tensor([0, 2]), vocab_size=3)
    assert ppl == pytest.approx(math.sqrt(12.0))


def test_flops_and_mfu_by_hand():
    assert gpt_flops_per_token(n_params=10, n_layer=2, n_embd=4, context=8) == 6 * 10 + 12 * 2 * 4 * 8
    assert mfu(tokens_per_second=100.0, flops_per_token=828.0, peak_flops=82_800.0) == pytest.approx(1.0)


def test_pack_blocks_appends_eos_and_drops_the_tail():
    blocks = pack_blocks([[1, 2], [3], [4, 5, 6]], eos_id=0, context=3)
    # stream 1 2 0 3 0 4 5 6 0 -> three full blocks
    assert blocks.tolist() == [[1, 2, 0], [3, 0, 4], [5, 6, 0]]
    assert pack_blocks([[1]], eos_id=0, context=3).shape == (0, 3)


def test_shards_are_disjoint_equal_and_cover_all_but_the_remainder():
    shards = [shard_rows(11, rank, 3) for rank in range(3)]
    assert [len(s) for s in shards] == [3, 3, 3]
    assert sorted(np.concatenate(shards).tolist()) == list(range(9))


def test_read_shard_returns_only_this_workers_rows(tmp_path):
    blocks = np.arange(5 * 4, dtype=np.uint16).reshape(5, 4)
    path = write_blocks(blocks, str(tmp_path / "blocks.npy"))
    assert read_shard(path, 1, 2).tolist() == blocks[[1, 3]].tolist()


def test_batch_order_visits_every_row_once_per_epoch_and_is_a_function_of_step():
    kw = dict(shard_size=12, micro_batch_size=3, grad_accum=2, seed=7, rank=0)
    epoch0 = np.concatenate([batch_rows(s, m, **kw) for s in range(2) for m in range(2)])
    assert sorted(epoch0.tolist()) == list(range(12))
    epoch1 = np.concatenate([batch_rows(s, m, **kw) for s in range(2, 4) for m in range(2)])
    assert sorted(epoch1.tolist()) == list(range(12)) and epoch1.tolist() != epoch0.tolist()
    assert batch_rows(3, 1, **kw).tolist() == batch_rows(3, 1, **kw).tolist()  # resume needs no iterator state
    assert batch_rows(0, 0, **{**kw, "rank": 1}).tolist() != batch_rows(0, 0, **kw).tolist()


def test_deepspeed_config_follows_the_stage_config():
    cfg = pretrain.Config(zero_stage=3, offload_optimizer=True, grad_accum=4, micro_batch_size=2, grad_clip=0.5,
                          max_steps=100, warmup_steps=10, min_lr_ratio=0.2)
    ds = deepspeed_config(cfg, use_gpu=True)
    assert ds["zero_optimization"]["stage"] == 3
    assert ds["zero_optimization"]["offload_optimizer"]["device"] == "cpu"
    assert ds["optimizer"]["params"]["torch_adam"] is True  # never a compiled op, even with offload
    assert (ds["gradient_accumulation_steps"], ds["train_micro_batch_size_per_gpu"], ds["gradient_clipping"]) == (4, 2, 0.5)
    assert ds["bf16"]["enabled"] and not ds["fp16"]["enabled"]  # auto on GPU
    sched = ds["scheduler"]["params"]
    assert (sched["total_num_steps"], sched["warmup_num_steps"], sched["cos_min_ratio"]) == (100, 10, 0.2)
    cpu = deepspeed_config(pretrain.Config(), use_gpu=False)
    assert not cpu["bf16"]["enabled"] and "offload_optimizer" not in cpu["zero_optimization"]
    with pytest.raises(ValueError, match="needs a GPU"):
        deepspeed_config(pretrain.Config(precision="bf16"), use_gpu=False)


def test_config_round_trips_through_its_dict():
    cfg = tiny_config()
    assert pretrain.Config(**cfg.to_dict()) == cfg


# ------------------------------------------------------------------------------------------- bad input, no Ray


@pytest.fixture
def store(tmp_path):
    return ArtifactStore(tmp_path / "artifacts")


def _corpus(store, train_texts, test_texts=("a short test paragraph about the cat.",) * 40):
    return publish_rows(store, "corpus", [{"text": t} for t in train_texts], [{"text": t} for t in test_texts],
                        fmt="corpus", task=None)


def _run_expecting(store, tmp_path, cfg, corpus, match):
    import ray

    was_up = ray.is_initialized()
    ctx = StageContext(work_dir=str(tmp_path / "work"), scaling=Scaling(num_workers=2))
    with pytest.raises((StageInputError, ArtifactError)) as err:
        pretrain.run(cfg, store=store, ctx=ctx, corpus=corpus)
    assert ray.is_initialized() == was_up  # failed before any Ray work
    assert "\n" not in str(err.value)
    assert match in str(err.value), str(err.value)
    return err.value


@pytest.mark.parametrize(
    ("changes", "match"),
    [
        ({"vocab_size": 200}, "pretrain.vocab_size: expected at least 258"),
        ({"n_embd": 64, "n_head": 3}, "pretrain.n_head: expected a divisor of n_embd=64, found 3"),
        ({"context": 256, "n_positions": 128}, "pretrain.context: expected at most n_positions=128, found 256"),
    ],
)
def test_bad_model_config_fails_before_training(store, tmp_path, changes, match):
    corpus = _corpus(store, ["The cat is happy."] * 500)
    _run_expecting(store, tmp_path, tiny_config(**changes), corpus, match)


def test_corpus_smaller_than_one_block_fails_before_training(store, tmp_path):
    corpus = _corpus(store, ["Hi."])
    err = _run_expecting(store, tmp_path, tiny_config(), corpus, "corpus too small")
    assert corpus.ref in str(err)


def test_corpus_smaller_than_one_batch_per_worker_fails_before_training(store, tmp_path):
    corpus = _corpus(store, ["The cat is happy and the dog is warm."] * 40)  # a few blocks, fewer than 2 x 8
    _run_expecting(store, tmp_path, tiny_config(), corpus, "expected at least 16 (micro_batch_size x num_workers)")


def test_unknown_init_from_ref_fails_before_training(store, tmp_path):
    corpus = _corpus(store, ["The cat is happy."] * 2000)
    _run_expecting(store, tmp_path, tiny_config(init_from="no-such-model@v1"), corpus, "no-such-model")


# ------------------------------------------------------------------------------------------------ real training

CRASH_STEP = 40  # the tiny preset's first checkpoint


@pytest.fixture(scope="module")
def resumed_run(tmp_path_factory, local_ray):
    """Tiny preset on 2 workers, ZeRO-2: killed right after its first checkpoint, then started again (same work_dir)."""
    from stages.common.ray_train import TrainingFailed
    from stages.data.demo import DemoConfig, generate

    root = tmp_path_factory.mktemp("pretrain")
    store = ArtifactStore(root / "artifacts")
    sets = generate(DemoConfig(size="tiny"))["corpus"]
    corpus = publish_rows(store, "corpus", sets["train"], sets["test"], fmt="corpus", task="demo")
    cfg = tiny_config(max_failures=0)
    assert cfg.checkpoint_interval == CRASH_STEP and cfg.zero_stage == 2
    lines: list[str] = []
    ctx = StageContext(work_dir=str(root / "work"), scaling=Scaling(num_workers=2, cpus_per_worker=1.0),
                       log=lines.append)
    with pytest.raises(TrainingFailed, match=f"simulated crash after step {CRASH_STEP}") as crash:
        pretrain.run(cfg, store=store, ctx=ctx, corpus=corpus, crash_after_step=CRASH_STEP)
    (checkpoint,) = [p for p in (root / "work" / "pretrain").glob("checkpoint_*") if p.is_dir()]
    before_kill = [json.loads(x) for x in (checkpoint / "metrics.jsonl").read_text().splitlines()]
    outputs = pretrain.run(cfg, store=store, ctx=ctx, corpus=corpus)
    return {"outputs": outputs, "before_kill": before_kill, "corpus": corpus, "cfg": cfg, "lines": lines,
            "crash": crash.value}


@pytest.mark.slow
def test_killed_run_resumes_from_its_checkpoint(resumed_run):
    model = resumed_run["outputs"]["base-model"]
    history = [json.loads(x) for x in (Path(model.reports_path) / "metrics.jsonl").read_text().splitlines()]
    assert "\n" not in str(resumed_run["crash"]) and "worker rank" in str(resumed_run["crash"])
    assert [r["step"] for r in resumed_run["before_kill"]] == list(range(1, CRASH_STEP + 1))
    assert model.metrics["resumed_from_step"] == CRASH_STEP
    # the step counter continues: every step once, none repeated from 0
    steps = [r["step"] for r in history if "loss" in r]
    assert steps == list(range(1, resumed_run["cfg"].max_steps + 1))
    assert model.metrics["train_steps"] == resumed_run["cfg"].max_steps
    # the restored weights score the validation split exactly as they did before the kill
    (resume,) = [r for r in history if r.get("event") == "resume"]
    killed_val = resumed_run["before_kill"][-1]["val_loss"]
    assert resume["step"] == CRASH_STEP and resume["val_loss"] == pytest.approx(killed_val, abs=1e-4)
    # and training continues from there (optimizer state restored: no jump back towards the initial loss)
    first_loss, killed_loss = history[0]["loss"], resumed_run["before_kill"][-1]["loss"]
    after = next(r for r in history if r["step"] == CRASH_STEP + 1 and "loss" in r)
    assert abs(after["loss"] - killed_loss) < 0.25 * (first_loss - killed_loss)
    assert any("resumed at step 40" in line for line in resumed_run["lines"])


@pytest.mark.slow
def test_loss_falls_and_beats_the_unigram_baseline(resumed_run):
    model = resumed_run["outputs"]["base-model"]
    history = [json.loads(x) for x in (Path(model.reports_path) / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in history if "loss" in r]
    assert np.mean(losses[-10:]) < np.mean(losses[:5]) - 1.0
    m = model.metrics
    for key in ("val_loss", "val_perplexity", "unigram_perplexity", "tokens_per_second", "mfu", "train_steps",
                "wall_seconds"):
        assert key in m
    assert m["val_perplexity"] < 0.5 * m["unigram_perplexity"]
    assert m["tokens_per_second"] > 0 and 0 < m["mfu"] < 1
    assert (Path(model.reports_path) / "loss_curve.png").stat().st_size > 1000


@pytest.mark.slow
def test_outputs_record_lineage_and_load_with_plain_transformers(resumed_run):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model_art, tok_art = resumed_run["outputs"]["base-model"], resumed_run["outputs"]["tokenizer"]
    assert (model_art.kind, tok_art.kind) == ("causal-lm", "tokenizer")
    for art in (model_art, tok_art):
        assert art.manifest["inputs"]["corpus"]["digest"] == resumed_run["corpus"].digest
        assert art.manifest["config"] == resumed_run["cfg"].to_dict()
    model = AutoModelForCausalLM.from_pretrained(model_art.path).eval()
    tokenizer = AutoTokenizer.from_pretrained(model_art.path)
    assert model.get_input_embeddings().weight.shape[0] >= len(tokenizer)
    prompt = tokenizer("User: Describe the cat.\nAssistant:", return_tensors="pt")
    with torch.no_grad():
        out = model.generate(**prompt, max_new_tokens=12, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    assert out.shape[1] > prompt["input_ids"].shape[1]
    assert tokenizer.decode(out[0]).startswith("User: Describe the cat.\nAssistant:")


@pytest.mark.slow
def test_tokenizer_round_trips_text(resumed_run):
    from transformers import AutoTokenizer

    from stages.common.hf import EOS_TOKEN, PAD_TOKEN

    tokenizer = AutoTokenizer.from_pretrained(resumed_run["outputs"]["tokenizer"].path)
    assert (tokenizer.eos_token, tokenizer.pad_token) == (EOS_TOKEN, PAD_TOKEN)
    assert len(tokenizer) <= tiny_config().vocab_size
    for text in ["User: Describe the cat.\nAssistant: The cat is happy and warm.", "  odd   spacing\t",
                 "naïve café, 東京 🙂"]:
        ids = tokenizer(text)["input_ids"]
        assert tokenizer.decode(ids) == text
    common = tokenizer("The cat is happy and the dog is warm.")["input_ids"]
    assert len(common) < len("The cat is happy and the dog is warm.") / 2  # merges learned from the corpus


# ------------------------------------------------------------------------------------- Llama-style and init_from

LLAMA = dict(architecture="llama", vocab_size=300, n_layer=1, n_embd=32, n_head=2, context=64, micro_batch_size=8,
             max_steps=12, lr=0.003, warmup_steps=2, eval_interval=12, eval_blocks=8, log_interval=6,
             checkpoint_interval=12, max_failures=0)


def _one_worker_ctx(root: Path, lines: list[str] | None = None) -> StageContext:
    return StageContext(work_dir=str(root / "work"), scaling=Scaling(num_workers=1, cpus_per_worker=1.0),
                        log=(lines.append if lines is not None else (lambda m: None)))


@pytest.fixture(scope="module")
def demo_corpus_store(tmp_path_factory):
    from stages.data.demo import DemoConfig, generate

    root = tmp_path_factory.mktemp("pretrain-llama")
    store = ArtifactStore(root / "artifacts")
    sets = generate(DemoConfig(size="tiny"))["corpus"]
    return root, store, publish_rows(store, "corpus", sets["train"], sets["test"], fmt="corpus", task="demo")


@pytest.mark.slow
def test_llama_from_scratch_publishes_a_plain_llama(demo_corpus_store, local_ray):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    root, store, corpus = demo_corpus_store
    lines: list[str] = []
    outputs = pretrain.run(pretrain.Config(**LLAMA), store=store, ctx=_one_worker_ctx(root / "scratch", lines),
                           corpus=corpus)
    art = outputs["base-model"]
    assert (art.metrics["architecture"], art.metrics["peak_source"], art.metrics["compiled"]) == ("llama", "measured",
                                                                                                 False)
    model = AutoModelForCausalLM.from_pretrained(art.path)
    assert type(model).__name__ == "LlamaForCausalLM" and model.config.model_type == "llama"
    assert model.config.tie_word_embeddings and model.config.intermediate_size == 128  # 8/3 x 32 -> 85 -> 128
    tokenizer = AutoTokenizer.from_pretrained(art.path)
    assert model.config.vocab_size == len(tokenizer)
    history = [json.loads(x) for x in (Path(art.reports_path) / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in history if "loss" in r]
    assert [r["step"] for r in history if "loss" in r] == list(range(1, LLAMA["max_steps"] + 1))
    assert losses[-1] < losses[0] - 0.5
    assert set(art.manifest["timings"]["startup_breakdown"]) == set(STARTUP_PHASES)
    assert any("LlamaForCausalLM" in line for line in lines)


@pytest.mark.slow
def test_init_from_a_random_llama_continues_that_model(demo_corpus_store, local_ray, tmp_path):
    from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

    from stages.data.demo import DemoConfig, generate
    from tests.tiny_models import build_tiny_tokenizer

    root, store, corpus = demo_corpus_store
    texts = [r["text"] for r in generate(DemoConfig(size="tiny"))["corpus"]["train"][:300]]
    tokenizer = build_tiny_tokenizer(texts, 320)
    torch.manual_seed(1)
    start = LlamaForCausalLM(LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=96,
                                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                         max_position_embeddings=64, eos_token_id=tokenizer.eos_token_id,
                                         pad_token_id=tokenizer.pad_token_id))
    start.save_pretrained(tmp_path / "llama")
    tokenizer.save_pretrained(tmp_path / "llama")
    # compiled, as on a GPU: DeepSpeed's engine.compile() must leave checkpoint and final-save names alone
    cfg = pretrain.Config(**{**LLAMA, "architecture": "gpt2", "max_steps": 4, "eval_interval": 4,
                             "checkpoint_interval": 4, "init_from": str(tmp_path / "llama"), "compile": True})
    # as the flow does it: the directory is imported by content and handed over as an artifact (cache key, lineage)
    from stages.common.artifact_import import import_model

    imported = import_model(store, tmp_path / "llama", kind="causal-lm", name="my-llama")
    outputs = pretrain.run(cfg, store=store, ctx=_one_worker_ctx(root / "init"), corpus=corpus, init_model=imported)
    assert outputs["base-model"].manifest["inputs"]["init_model"]["digest"] == imported.digest
    assert outputs["base-model"].manifest["config"]["init_from"] == str(tmp_path / "llama")  # the user's value
    trained = AutoModelForCausalLM.from_pretrained(outputs["base-model"].path)
    assert type(trained).__name__ == "LlamaForCausalLM" and trained.config.num_key_value_heads == 2
    assert outputs["base-model"].metrics["compiled"] is True
    assert outputs["tokenizer"].metrics["vocab_size"] == len(tokenizer)  # the model's own tokenizer, not a new one
    before, after = start.state_dict(), trained.state_dict()
    assert before.keys() == after.keys()
    assert not torch.equal(before["model.layers.0.mlp.up_proj.weight"], after["model.layers.0.mlp.up_proj.weight"])


def test_init_from_checks_the_models_context_and_kind(store, tmp_path):
    from transformers import LlamaConfig, ViTConfig

    corpus = _corpus(store, ["The cat is happy and the dog is warm."] * 2000)
    LlamaConfig(vocab_size=4096, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                max_position_embeddings=64).save_pretrained(tmp_path / "short")
    _run_expecting(store, tmp_path, tiny_config(init_from=str(tmp_path / "short")), corpus,
                   "pretrain.context: expected at most the model's max_position_embeddings=64")
    ViTConfig().save_pretrained(tmp_path / "vit")
    _run_expecting(store, tmp_path, tiny_config(init_from=str(tmp_path / "vit")), corpus,
                   "is a 'vit' model, expected a causal LM")
    LlamaConfig(vocab_size=100, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                max_position_embeddings=512).save_pretrained(tmp_path / "small-vocab")
    _run_expecting(store, tmp_path, tiny_config(init_from=str(tmp_path / "small-vocab")), corpus,
                   "embedding has 100 rows")


def test_llama_needs_an_even_head_size(store, tmp_path):
    corpus = _corpus(store, ["The cat is happy."] * 500)
    _run_expecting(store, tmp_path, tiny_config(architecture="llama", n_embd=66, n_head=2), corpus,
                   "RoPE needs an even head size")
