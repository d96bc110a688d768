"""scripts/gpu_smoke/summary.py: each docs/GPU.md target judged from what the parts wrote (hand-made results)."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

SUMMARY = Path(__file__).resolve().parents[2] / "scripts" / "gpu_smoke" / "summary.py"


def _summary():
    spec = importlib.util.spec_from_file_location("gpu_smoke_summary", SUMMARY)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_targets_pass_miss_and_not_run(tmp_path):
    out = tmp_path
    (out / "pipeline.rc").write_text("0\n")
    (out / "load.rc").write_text("0\n")
    (out / "bench.rc").write_text("0\n")
    (out / "versions.json").write_text(json.dumps({"torch": "2.13.0", "cuda": "12.8", "nccl": "2.27.3", "cudnn": 91000,
                                                   "driver": "570.1", "devices": [{"name": "H100", "capability": "9.0",
                                                   "memory_gib": 79.1}], "transformers": "5", "trl": "1", "peft": "0",
                                                   "deepspeed": "0", "ray": "2"}))  # fmt: skip
    (out / "run.json").write_text(json.dumps({"wall_seconds": 300.0, "stages": {
        "sft": {"state": "Completed", "stage_seconds": 40.0, "outputs": {"sft-model": "sft-model@v1"}}}}))
    (out / "load.json").write_text(json.dumps([
        {"ref": "sft-model@v1", "loaded": "AutoModelForCausalLM", "device": "cuda:0", "finite": True},
        {"ref": "tokenizer@v1", "loaded": "AutoTokenizer"}]))
    (out / "bench.json").write_text(json.dumps({"device": "H100", "peak_flops": 989e12, "peak_source": "table",
        "rows": {"eager": {"tokens_per_second": 1e5, "step_ms": 10.0, "mfu": 0.14},
                 "stage": {"tokens_per_second": 2.85e5, "step_ms": 5.0, "mfu": 0.35, "startup_seconds": 25.0}},
        "ratios": {"stage/compile": 0.95}}))  # fmt: skip
    text = _summary().main(out)
    assert "torch 2.13.0, CUDA 12.8, NCCL 2.27.3" in text and "H100 (sm 9.0, 79.1 GiB)" in text
    verdicts = {line.split(" | ")[0].strip("| "): line.rsplit(" | ", 1)[1].strip(" |")
                for line in text.splitlines() if line.startswith("| ") and line.endswith(("PASS |", "MISS |", "run |"))}
    assert verdicts == {
        "pipeline completes": "PASS",
        "every artifact loads on the GPU, finite outputs": "PASS",  # 2/2
        "pretrain stage / compiled plain loop (GPT-2 small)": "PASS",  # 0.95 >= 0.9
        "pretrain stage MFU": "MISS",  # 35% < 40%
        "pretrain start-up to first step": "MISS",  # 25 s >= 20 s
    }
    assert (out / "summary.md").read_text() == text


def test_parts_not_run_are_said_so(tmp_path):
    text = _summary().main(tmp_path)
    assert "pipeline: exit not run" in text
    assert text.count("| not run |") == 5
