"""What each Ray Train worker runs: a DeepSpeed engine over a GPT-2, its own data shard, eval, checkpoints, resume.

Checkpoints (`ckpt/` = DeepSpeed's model/optimizer/LR-scheduler state, one optimizer shard per rank, plus our
`trainer_state.json` and `metrics.jsonl`) are written every `checkpoint_interval` steps and at the end; the final one
also holds `hf_model/` (safetensors) for the driver to publish. The data position is the step counter (blocks.py).
DeepSpeed's own state files are torch pickles: they stay inside the run's work_dir and are never published.
"""

from __future__ import annotations

import json
import math
import resource
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from stages.common import ray_train as rt
from stages.pretrain.blocks import batch_rows, read_shard
from stages.pretrain.metrics import gpt_flops_per_token, matmul_peak_flops, mfu

DS_TAG = "state"


def _all_reduce(values: list[float], op: str = "sum") -> list[float]:
    import torch
    import torch.distributed as dist

    t = torch.tensor(values, dtype=torch.float64)
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(t, op=dist.ReduceOp.MAX if op == "max" else dist.ReduceOp.SUM)
    return t.tolist()


def _build_model(cfg: dict):
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(cfg["seed"])  # identical init on every rank
    if cfg["init_from"]:
        return GPT2LMHeadModel.from_pretrained(cfg["init_from"], torch_dtype=torch.float32)
    return GPT2LMHeadModel(GPT2Config(**cfg["model"]))


def _evaluate(engine, val: np.ndarray, micro_batch_size: int) -> float:
    """Mean next-token NLL over every rank's validation rows (all ranks run the same number of batches)."""
    import torch

    engine.eval()
    nll_sum, count = 0.0, 0.0
    with torch.no_grad():
        for start in range(0, len(val), micro_batch_size):
            x = torch.from_numpy(val[start : start + micro_batch_size]).to(engine.device)
            loss = engine(input_ids=x, labels=x).loss.float().item()
            n_targets = x.shape[0] * (x.shape[1] - 1)
            nll_sum += loss * n_targets
            count += n_targets
    engine.train()
    nll_sum, count = _all_reduce([nll_sum, count])
    return nll_sum / max(count, 1.0)


def _full_state_dict(engine, zero_stage: int) -> dict | None:
    """Full weights on rank 0 (ZeRO-3 gathers its partitions; every rank must call this)."""
    if zero_stage == 3:
        return engine._zero3_consolidated_16bit_state_dict()
    return engine.module.state_dict() if rt.world_rank() == 0 else None


def _save_checkpoint(engine, out: Path, state: dict, history: list[dict]) -> None:
    """DeepSpeed state on every rank (each writes its own optimizer shard) + our JSON state on rank 0."""
    engine.save_checkpoint(str(out), tag=DS_TAG, client_state={"step": state["step"]})
    if rt.world_rank() == 0:
        (out / "trainer_state.json").write_text(json.dumps(state, indent=1))
        (out / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in history))


def _report(
    engine, metrics: dict, state: dict, history: list[dict], hf_weights: dict | None = None, model_config=None
) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp)
        _save_checkpoint(engine, out, state, history)
        if hf_weights is not None:
            _save_hf_model(hf_weights, model_config, out / "hf_model")
        rt.report(metrics, out if any(out.iterdir()) else None)


def _save_hf_model(weights: dict, model_config, out: Path) -> None:
    """A plain fp32 GPT2LMHeadModel in safetensors, loadable with AutoModelForCausalLM.from_pretrained."""
    import torch
    from transformers import GPT2LMHeadModel

    model = GPT2LMHeadModel(model_config)
    missing, unexpected = model.load_state_dict(
        {k: v.detach().to(torch.float32).cpu() for k, v in weights.items()}, strict=False)
    missing = [k for k in missing if k != "lm_head.weight"]  # tied to the token embedding, which is loaded
    if missing or unexpected:
        raise RuntimeError(f"final weights do not fit GPT2LMHeadModel: missing {missing}, unexpected {unexpected}")
    model.save_pretrained(out, safe_serialization=True)


def train_loop(cfg: dict[str, Any]) -> dict[str, Any]:
    """Train for cfg["max_steps"] optimizer steps from the latest checkpoint (or step 0); rank 0 returns a summary."""
    import deepspeed
    import torch

    from stages.pretrain.deepspeed_setup import param_groups

    threads = rt.set_torch_threads(cfg["cpus_per_worker"])
    rank, world = rt.world_rank(), rt.world_size()
    ds_config = cfg["deepspeed"]
    precision_dtype = (
        torch.bfloat16
        if ds_config["bf16"]["enabled"]
        else (torch.float16 if ds_config["fp16"]["enabled"] else torch.float32)
    )
    device = "cuda" if cfg["use_gpu"] else "cpu"

    # The practical peak of this worker group, measured where it runs (all ranks at once, as in training).
    peak = cfg["peak_flops"] or matmul_peak_flops(precision_dtype, device=device)
    (group_peak,) = _all_reduce([peak])

    model = _build_model(cfg)
    model_config = model.config
    n_params = sum(p.numel() for p in model.parameters())
    engine, _, _, scheduler = deepspeed.initialize(
        model=model, model_parameters=param_groups(model, cfg["weight_decay"]), config=ds_config
    )
    train = read_shard(cfg["train_path"], rank, world)
    val = read_shard(cfg["val_path"], rank, world)
    context = train.shape[1]
    flops_per_token = gpt_flops_per_token(n_params, model_config.n_layer, model_config.n_embd, context)
    mb, accum, max_steps = (
        ds_config["train_micro_batch_size_per_gpu"],
        ds_config["gradient_accumulation_steps"],
        cfg["max_steps"],
    )
    tokens_per_step = world * accum * mb * context

    state = {"step": 0, "train_seconds": 0.0, "train_cpu_seconds": 0.0, "train_tokens": 0, "resumes": 0}
    history: list[dict] = []
    with rt.resume_dir() as resume:
        if resume:
            engine.load_checkpoint(resume, tag=DS_TAG)  # weights, optimizer moments and the LR schedule
            state = json.loads((Path(resume) / "trainer_state.json").read_text())
            history = [json.loads(line) for line in (Path(resume) / "metrics.jsonl").read_text().splitlines() if line]
            state["resumes"] += 1
    start_step = state["step"]
    if start_step:
        resume_val = _evaluate(engine, val, mb)
        history.append({"step": start_step, "event": "resume", "val_loss": resume_val})
        rt.log(f"pretrain: resumed at step {start_step}/{max_steps} (val loss {resume_val:.4f})")
    rt.log(
        f"pretrain: {world} worker(s) x {threads} thread(s), {n_params / 1e6:.2f}M params, ZeRO-{ds_config['zero_optimization']['stage']}, "
        f"{len(train)} blocks/worker, peak {group_peak / 1e9:.0f} GFLOP/s"
    )

    first_step_unix = None
    window_tokens, window_seconds = 0, 0.0
    val_loss = None
    step = start_step
    while step < max_steps:
        started, started_cpu = time.perf_counter(), time.process_time()
        loss_sum = 0.0
        for micro in range(accum):
            rows = batch_rows(
                step, micro, shard_size=len(train), micro_batch_size=mb, grad_accum=accum, seed=cfg["seed"], rank=rank
            )
            x = torch.from_numpy(train[rows]).to(engine.device)
            loss = engine(input_ids=x, labels=x).loss
            engine.backward(loss)
            engine.step()
            loss_sum += loss.float().item()
        (loss_mean,) = _all_reduce([loss_sum / accum / world])
        elapsed = time.perf_counter() - started
        step += 1
        if first_step_unix is None:
            first_step_unix = time.time()
        if step - start_step > 2:  # the first steps after a (re)start pay one-off warm-up costs
            state["train_seconds"] += elapsed
            # CPU time of all this process's threads: throughput per CPU-second is robust to a busy machine
            state["train_cpu_seconds"] = state.get("train_cpu_seconds", 0.0) + time.process_time() - started_cpu
            state["train_tokens"] += tokens_per_step
        window_tokens += tokens_per_step
        window_seconds += elapsed
        state["step"] = step
        record = {"step": step, "loss": loss_mean, "lr": scheduler.get_lr()[0], "step_seconds": elapsed}

        if step % cfg["eval_interval"] == 0 or step == max_steps:
            val_loss = _evaluate(engine, val, mb)
            record["val_loss"] = val_loss
        history.append(record)
        if step % cfg["log_interval"] == 0 or step == max_steps or step == start_step + 1:
            tps = window_tokens / max(window_seconds, 1e-9)
            eta = (max_steps - step) * tokens_per_step / max(tps, 1e-9)
            extra = f" val {val_loss:.4f}" if "val_loss" in record else ""
            rt.log(
                f"pretrain: step {step}/{max_steps} loss {loss_mean:.4f}{extra} lr {record['lr']:.2e} "
                f"tok/s {tps:.0f} mfu {mfu(tps, flops_per_token, group_peak):.1%} eta {eta:.0f}s"
            )
            window_tokens, window_seconds = 0, 0.0
        if step % cfg["checkpoint_interval"] == 0 and step < max_steps:
            _report(engine, {"step": step, "loss": loss_mean}, state, history)
            if cfg.get("crash_after_step") == step and state["resumes"] == 0:
                raise RuntimeError(f"simulated crash after step {step} (crash_after_step test hook)")

    if val_loss is None or history[-1].get("val_loss") is None:  # resumed at the end: evaluate once more
        val_loss = _evaluate(engine, val, mb)
    tokens_per_second = state["train_tokens"] / state["train_seconds"] if state["train_seconds"] else 0.0
    (peak_rss_kb,) = _all_reduce([resource.getrusage(resource.RUSAGE_SELF).ru_maxrss], op="max")
    (cpu_seconds,) = _all_reduce([state.get("train_cpu_seconds", 0.0)])
    summary = {
        "val_loss": val_loss,
        "val_perplexity": math.exp(val_loss) if val_loss < 700 else math.inf,
        "tokens_per_second": tokens_per_second,
        "mfu": mfu(tokens_per_second, flops_per_token, group_peak),
        "tokens_per_cpu_second": state["train_tokens"] / cpu_seconds if cpu_seconds else 0.0,
        "train_steps": step,
        "resumed_from_step": start_step,
        "first_step_unix": first_step_unix,
        "peak_flops": group_peak,
        "peak_rss_mb_per_worker": peak_rss_kb / 1024.0,
        "n_params": n_params,
        "flops_per_token": flops_per_token,
    }
    weights = _full_state_dict(engine, ds_config["zero_optimization"]["stage"])
    _report(engine, {"step": step, "val_loss": val_loss}, state, history, weights if rank == 0 else None, model_config)
    return summary
