"""What each Ray Train worker runs: a DeepSpeed engine over a causal LM, its own data shard, eval, checkpoints, resume.

Checkpoints (`ckpt/` = DeepSpeed's model/optimizer/LR-scheduler state, one optimizer shard per rank, plus our
`trainer_state.json` and `metrics.jsonl`) are written every `checkpoint_interval` steps and at the end; the final one
also holds `hf_model/` (safetensors) for the driver to publish. The data position is the step counter (blocks.py).
DeepSpeed's own state files are torch pickles: they stay inside the run's work_dir and are never published.

On a GPU the host never waits for the device inside a step: losses stay on the device and are read (one sync and
one all-reduce for several steps) only at the steps that log, evaluate, checkpoint or end a warm-up window.
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
from stages.common.errors import check_finite_loss
from stages.pretrain.blocks import batch_rows, read_shard

DS_TAG = "state"
WARMUP_STEPS = 2  # the first steps after a (re)start pay one-off costs (allocator, compilation): not timed


def check_finite(records: list[dict]) -> None:
    """Stop at the first logged step whose loss (averaged over ranks) is not finite: without DeepSpeed's per-step
    overflow scan under bf16, this is where a diverged run is caught, at the cost of one read per logging window."""
    for record in records:
        check_finite_loss("pretrain", record["step"], record["loss"])


def _evaluate(engine, val: np.ndarray, micro_batch_size: int) -> float:
    """Mean next-token NLL over every rank's validation rows (all ranks run the same number of batches)."""
    import torch

    from stages.common.collectives import all_reduce_floats

    engine.eval()
    nll_sum = torch.zeros((), dtype=torch.float64, device=engine.device)
    count = 0
    with torch.no_grad():
        for start in range(0, len(val), micro_batch_size):
            x = _to_device(val[start : start + micro_batch_size], engine.device)
            n_targets = x.shape[0] * (x.shape[1] - 1)
            nll_sum += engine(input_ids=x, labels=x).loss.double() * n_targets
            count += n_targets
    engine.train()
    total, total_count = all_reduce_floats([nll_sum.item(), float(count)], device=engine.device)
    return total / max(total_count, 1.0)


def _to_device(rows: np.ndarray, device):
    """A batch of token rows on `device`; from pinned memory on CUDA so the copy does not block the host."""
    import torch

    batch = torch.from_numpy(np.ascontiguousarray(rows))
    if device.type == "cuda":
        return batch.pin_memory().to(device, non_blocking=True)
    return batch.to(device)


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
    from stages.pretrain.model import save_hf_model

    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp)
        _save_checkpoint(engine, out, state, history)
        if hf_weights is not None:
            save_hf_model(hf_weights, model_config, out / "hf_model")
        rt.report(metrics, out if any(out.iterdir()) else None)


def _precision_dtype(ds_config: dict):
    import torch

    if ds_config["bf16"]["enabled"]:
        return torch.bfloat16
    return torch.float16 if ds_config["fp16"]["enabled"] else torch.float32


def train_loop(cfg: dict[str, Any]) -> dict[str, Any]:
    """Train for cfg["max_steps"] optimizer steps from the latest checkpoint (or step 0); rank 0 returns a summary."""
    marks = {"worker_start": time.time()}  # start-up phases (unix times), reported to the driver
    import deepspeed
    import torch

    from stages.common.collectives import all_reduce_floats
    from stages.common.deepspeed_config import forbid_cpu_shm_build
    from stages.pretrain.deepspeed_setup import param_groups
    from stages.pretrain.metrics import mfu, model_flops_per_token, peak_flops
    from stages.pretrain.model import build_model

    marks["imports"] = time.time()
    threads = rt.set_torch_threads(cfg["cpus_per_worker"])
    rank, world = rt.world_rank(), rt.world_size()
    ds_config = cfg["deepspeed"]

    model = build_model(cfg["model"], cfg["seed"])
    model_config = model.config
    n_params = sum(p.numel() for p in model.parameters())
    marks["build_model"] = time.time()
    forbid_cpu_shm_build()
    engine, _, _, scheduler = deepspeed.initialize(
        model=model, model_parameters=param_groups(model, cfg["weight_decay"]), config=ds_config
    )
    if cfg["compile"]:
        engine.compile()  # in place (nn.Module.compile): parameter names, hooks and checkpoints stay as they are
    marks["deepspeed_init"] = time.time()
    device = engine.device

    # Peak of this worker group: the GPU's data-sheet number, or a matmul measured where it runs (CPU, unknown GPU).
    peak, peak_source = peak_flops(_precision_dtype(ds_config), device, cfg["peak_flops"])
    (group_peak,) = all_reduce_floats([peak], device=device)
    device_name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    marks["peak_flops"] = time.time()

    train = read_shard(cfg["train_path"], rank, world)
    val = read_shard(cfg["val_path"], rank, world)
    context = train.shape[1]
    flops_per_token = model_flops_per_token(model_config, n_params, context)
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
    marks["data_and_resume"] = time.time()
    rt.log(
        f"pretrain: {world} worker(s) x {threads} thread(s), {type(model).__name__} {n_params / 1e6:.2f}M params, "
        f"ZeRO-{ds_config['zero_optimization']['stage']}, {'compiled' if cfg['compile'] else 'eager'}, "
        f"{len(train)} blocks/worker, peak {group_peak / 1e12:.3g} TFLOP/s ({peak_source}, {device_name})"
    )

    pending: list[tuple[int, Any, float]] = []  # (step, mean loss over micro-batches as a device tensor, lr)
    window = {"start": time.perf_counter(), "start_cpu": time.process_time()}
    log_window = {"tokens": 0, "seconds": 0.0}

    def flush() -> None:
        """Read the pending losses (the one host-device sync), average them over ranks, time the window."""
        if not pending:
            return
        local = torch.stack([loss for _, loss, _ in pending]).float().cpu().tolist()
        means = all_reduce_floats([v / world for v in local], device=device)
        seconds = time.perf_counter() - window["start"]
        cpu_seconds = time.process_time() - window["start_cpu"]
        for (step_done, _, lr), loss_mean in zip(pending, means, strict=True):
            history.append({"step": step_done, "loss": loss_mean, "lr": lr, "step_seconds": seconds / len(pending)})
        check_finite(history[-len(pending):])  # bf16 has no per-step overflow scan (deepspeed_config.build)
        # windows never straddle the warm-up boundary: either every step in it is timed or none is
        if pending[0][0] - start_step > WARMUP_STEPS:
            state["train_seconds"] += seconds
            # CPU time of all this process's threads: throughput per CPU-second is robust to a busy machine
            state["train_cpu_seconds"] = state.get("train_cpu_seconds", 0.0) + cpu_seconds
            state["train_tokens"] += tokens_per_step * len(pending)
        log_window["tokens"] += tokens_per_step * len(pending)
        log_window["seconds"] += seconds
        pending.clear()

    first_step_unix = None
    val_loss = None
    step = start_step
    while step < max_steps:
        loss_sum = None
        for micro in range(accum):
            rows = batch_rows(
                step, micro, shard_size=len(train), micro_batch_size=mb, grad_accum=accum, seed=cfg["seed"], rank=rank
            )
            x = _to_device(train[rows], device)
            loss = engine(input_ids=x, labels=x).loss
            engine.backward(loss)
            engine.step()
            loss_sum = loss.detach() if loss_sum is None else loss_sum + loss.detach()
        step += 1
        state["step"] = step
        pending.append((step, loss_sum / accum, scheduler.get_lr()[0]))

        evaluate = step % cfg["eval_interval"] == 0 or step == max_steps
        log = step % cfg["log_interval"] == 0 or step == max_steps or step == start_step + 1
        checkpoint = step % cfg["checkpoint_interval"] == 0 and step < max_steps
        if not (evaluate or log or checkpoint or step == start_step + WARMUP_STEPS):
            continue
        flush()
        if first_step_unix is None:
            first_step_unix = time.time()
            marks["first_step"] = first_step_unix
        record = history[-1]
        if evaluate:
            val_loss = _evaluate(engine, val, mb)
            record["val_loss"] = val_loss
        if log:
            tps = log_window["tokens"] / max(log_window["seconds"], 1e-9)
            eta = (max_steps - step) * tokens_per_step / max(tps, 1e-9)
            extra = f" val {val_loss:.4f}" if "val_loss" in record else ""
            rt.log(
                f"pretrain: step {step}/{max_steps} loss {record['loss']:.4f}{extra} lr {record['lr']:.2e} "
                f"tok/s {tps:.0f} mfu {mfu(tps, flops_per_token, group_peak):.1%} eta {eta:.0f}s"
            )
            log_window.update(tokens=0, seconds=0.0)
        if checkpoint:
            _report(engine, {"step": step, "loss": record["loss"]}, state, history)
            if cfg.get("crash_after_step") == step and state["resumes"] == 0:
                raise RuntimeError(f"simulated crash after step {step} (crash_after_step test hook)")
        window.update(start=time.perf_counter(), start_cpu=time.process_time())  # eval/checkpoint time not counted

    if val_loss is None or history[-1].get("val_loss") is None:  # resumed at the end: evaluate once more
        val_loss = _evaluate(engine, val, mb)
    tokens_per_second = state["train_tokens"] / state["train_seconds"] if state["train_seconds"] else 0.0
    (peak_rss_kb,) = all_reduce_floats([resource.getrusage(resource.RUSAGE_SELF).ru_maxrss], op="max", device=device)
    (cpu_seconds,) = all_reduce_floats([state.get("train_cpu_seconds", 0.0)], device=device)
    summary = {
        "val_loss": val_loss,
        "val_perplexity": math.exp(val_loss) if val_loss < 700 else math.inf,
        "tokens_per_second": tokens_per_second,
        "mfu": mfu(tokens_per_second, flops_per_token, group_peak),
        "tokens_per_cpu_second": state["train_tokens"] / cpu_seconds if cpu_seconds else 0.0,
        "train_steps": step,
        "resumed_from_step": start_step,
        "first_step_unix": first_step_unix,
        "startup_marks": marks,
        "peak_flops": group_peak,
        "peak_source": peak_source,
        "device_name": device_name,
        "compiled": bool(cfg["compile"]),
        "architecture": model_config.model_type,
        "peak_rss_mb_per_worker": peak_rss_kb / 1024.0,
        "n_params": n_params,
        "flops_per_token": flops_per_token,
    }
    weights = _full_state_dict(engine, ds_config["zero_optimization"]["stage"])
    _report(engine, {"step": step, "val_loss": val_loss}, state, history, weights if rank == 0 else None, model_config)
    return summary
