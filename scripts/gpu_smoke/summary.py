"""The GPU smoke test's last part: what the other parts wrote, as markdown, and each target of docs/GPU.md with
PASS, MISS or "not run". Writes OUT/summary.md. Usage: python scripts/gpu_smoke/summary.py OUT"""

from __future__ import annotations

import json
import sys
from pathlib import Path

# docs/GPU.md "Targets" (issue 9): the pretrain stage against the compiled plain loop, its MFU, its start-up
STAGE_VS_COMPILED = 0.9
STAGE_MFU = 0.40
STARTUP_S = 20.0


def _read(out: Path, name: str):
    path = out / name
    return json.loads(path.read_text()) if path.is_file() else None


def _rc(out: Path, part: str) -> str:
    path = out / f"{part}.rc"
    return path.read_text().strip() if path.is_file() else "not run"


def main(out: Path) -> str:
    lines = [f"# GPU smoke ({out})", ""]
    versions = _read(out, "versions.json")
    if versions:
        devices = ", ".join(f"{d['name']} (sm {d['capability']}, {d['memory_gib']} GiB)" for d in versions.get("devices", []))
        lines += [f"torch {versions['torch']}, CUDA {versions['cuda']}, NCCL {versions.get('nccl')}, cuDNN "
                  f"{versions.get('cudnn')}, driver {versions.get('driver')}; {devices or 'no CUDA device'}; "
                  + ", ".join(f"{k} {versions[k]}" for k in ("transformers", "trl", "peft", "deepspeed", "ray")), ""]  # fmt: skip
    run = _read(out, "run.json")
    lines.append(f"pipeline: exit {_rc(out, 'pipeline')}" + (f", {run['wall_seconds']:.0f} s" if run else ""))
    if run:
        lines += ["", "| stage | state | seconds | outputs |", "|---|---|---|---|"]
        lines += [f"| {n} | {i['state']} | {i['stage_seconds']:.1f} | {', '.join(i['outputs'].values())} |"
                  for n, i in run["stages"].items()]  # fmt: skip
    loads = _read(out, "load.json")
    lines += ["", f"load in transformers: exit {_rc(out, 'load')}"]
    if loads:
        lines += ["", "| artifact | loaded as | device | finite | adapter diff | error |", "|---|---|---|---|---|---|"]
        lines += [f"| {r['ref']} | {r.get('loaded')} | {r.get('device', '')} | {r.get('finite', '')} | "
                  f"{r.get('adapter_max_abs_diff', '')} | {r.get('error', '')} |" for r in loads]  # fmt: skip
    bench = _read(out, "bench.json")
    lines += ["", f"benchmark: exit {_rc(out, 'bench')}"]
    if bench:
        lines += ["", f"{bench['device']}, peak {bench['peak_flops'] / 1e12:.4g} TFLOP/s ({bench['peak_source']})", "",
                  "| run | tok/s | step ms | MFU |", "|---|---|---|---|"]  # fmt: skip
        lines += [f"| {n} | {r['tokens_per_second']:,.0f} | {r['step_ms']:.1f} | {r['mfu']:.1%} |"
                  for n, r in bench["rows"].items()]  # fmt: skip
    lines += ["", "| target | wanted | measured | verdict |", "|---|---|---|---|"]
    for target in targets(run, loads, bench, _rc(out, "pipeline")):
        lines.append("| " + " | ".join(target) + " |")
    text = "\n".join(lines) + "\n"
    (out / "summary.md").write_text(text)
    return text


def targets(run, loads, bench, pipeline_rc: str) -> list[tuple[str, str, str, str]]:
    def verdict(ok):
        return "not run" if ok is None else ("PASS" if ok else "MISS")

    rows = [("pipeline completes", "exit 0", pipeline_rc, verdict(None if pipeline_rc == "not run" else pipeline_rc == "0"))]
    if loads is None:
        rows.append(("every artifact loads on the GPU, finite outputs", "all", "-", "not run"))
    else:
        good = sum(1 for r in loads if r.get("loaded") and r.get("finite") is not False)
        rows.append(("every artifact loads on the GPU, finite outputs", "all", f"{good}/{len(loads)}", verdict(good == len(loads))))
    stage = (bench or {}).get("rows", {}).get("stage")
    ratio = (bench or {}).get("ratios", {}).get("stage/compile")
    rows.append(("pretrain stage / compiled plain loop (GPT-2 small)", f">= {STAGE_VS_COMPILED}",
                 "-" if ratio is None else f"{ratio:.2f}", verdict(None if ratio is None else ratio >= STAGE_VS_COMPILED)))
    mfu = stage.get("mfu") if stage else None
    rows.append(("pretrain stage MFU", f">= {STAGE_MFU:.0%}", "-" if mfu is None else f"{mfu:.1%}",
                 verdict(None if mfu is None else mfu >= STAGE_MFU)))
    startup = stage.get("startup_seconds") if stage else None
    rows.append(("pretrain start-up to first step", f"< {STARTUP_S:.0f} s", "-" if startup is None else f"{startup:.1f} s",
                 verdict(None if startup is None else startup < STARTUP_S)))
    return rows


if __name__ == "__main__":
    print(main(Path(sys.argv[1])), end="")
