#!/usr/bin/env bash
# GPU smoke test: the whole pipeline on the single-gpu preset at tiny sizes, then the GPU pretraining benchmark,
# then one summary table. Run from the project root on a CUDA machine, either with the project's venv or on an
# offline GPU box set up per shared/gpu/README.md:
#     bash scripts/gpu_smoke.sh                                        # .venv/bin/rlhf and .venv/bin/python
#     OUT=/tmp/out bash run.sh bundle proj -- bash proj/scripts/gpu_smoke.sh
# Environment: OUT (results folder; default a new temp dir), PY (python; default .venv/bin/python or python3),
# BENCH_STEPS (timed steps per benchmark row, default 30), SKIP_BENCH=1 / SKIP_PIPELINE=1 to leave one part out.
# For a dry run of the script itself on a CPU machine: ALLOW_CPU=1 PRESET=tiny RUN_ARGS="--only pretrain"
# BENCH_ARGS="--device cpu --tiny" (RUN_ARGS and BENCH_ARGS are split on spaces).
# Writes $OUT/run.json (`rlhf run --json`), $OUT/run.log, $OUT/bench.json, $OUT/bench.log, $OUT/summary.md.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-$(mktemp -d -t gpu-smoke-XXXX)}
mkdir -p "$OUT"
if [ -z "${PY:-}" ]; then
  if [ -x .venv/bin/python ]; then PY=.venv/bin/python; else PY=python3; fi
fi
if [ -x .venv/bin/rlhf ]; then RLHF=(.venv/bin/rlhf); else RLHF=("$PY" -m flows.cli); fi
export TOKENIZERS_PARALLELISM=false RAY_USAGE_STATS_ENABLED=0 PREFECT_SERVER_ANALYTICS_ENABLED=false

PRESET=${PRESET:-single-gpu}
read -r -a RUN_ARGS <<< "${RUN_ARGS:-}"
read -r -a BENCH_ARGS <<< "${BENCH_ARGS:-}"
if [ -z "${ALLOW_CPU:-}" ]; then
  "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 'gpu_smoke: no CUDA device visible to torch')" \
    || exit 2
fi
[ -f "flows/presets/$PRESET.yaml" ] || { echo "gpu_smoke: flows/presets/$PRESET.yaml is missing" >&2; exit 2; }

rc_run=0 rc_bench=0
if [ -z "${SKIP_PIPELINE:-}" ]; then
  # Tiny sizes: every stage section of the tiny preset over the single-gpu preset (its run: section is left out,
  # so the GPU scaling of single-gpu stays).
  "$PY" - "$OUT/tiny-sizes.yaml" <<'EOF'
import sys, yaml
tiny = yaml.safe_load(open("flows/presets/tiny.yaml"))
tiny.pop("run", None)
yaml.safe_dump(tiny, open(sys.argv[1], "w"), sort_keys=False)
EOF
  echo "gpu_smoke: pipeline ($PRESET preset, tiny sizes) -> $OUT/run.log" >&2
  start=$SECONDS
  "${RLHF[@]}" run --preset "$PRESET" --config "$OUT/tiny-sizes.yaml" --store "$OUT/store" \
    --set run.work_dir="$OUT/runs" --json "${RUN_ARGS[@]}" > "$OUT/run.out" 2> "$OUT/run.log"
  rc_run=$?
  echo "gpu_smoke: pipeline exit $rc_run after $((SECONDS - start)) s" >&2
  # the summary is the last top-level JSON object on stdout (anything logged before it is kept in run.log)
  "$PY" - "$OUT/run.out" "$OUT/run.json" <<'EOF'
import json, sys
text = open(sys.argv[1]).read()
at = text.rfind("\n{\n") + 1 if not text.startswith("{") else 0
try:
    json.dump(json.loads(text[at:]), open(sys.argv[2], "w"), indent=1)
except ValueError:
    print("gpu_smoke: no JSON summary in the pipeline's output", file=sys.stderr)
EOF
  cat "$OUT/run.out" >> "$OUT/run.log"
fi

if [ -z "${SKIP_BENCH:-}" ]; then
  echo "gpu_smoke: benchmark (GPT-2 small: eager, torch.compile, the stage) -> $OUT/bench.log" >&2
  start=$SECONDS
  "$PY" benchmarks/gpu_pretrain_bench.py --steps "${BENCH_STEPS:-30}" --json "$OUT/bench.json" "${BENCH_ARGS[@]}" \
    > "$OUT/bench.log" 2>&1
  rc_bench=$?
  echo "gpu_smoke: benchmark exit $rc_bench after $((SECONDS - start)) s" >&2
fi

"$PY" - "$OUT" "$rc_run" "$rc_bench" <<'EOF' | tee "$OUT/summary.md"
import json, sys
from pathlib import Path

out, rc_run, rc_bench = Path(sys.argv[1]), sys.argv[2], sys.argv[3]
print(f"# GPU smoke ({out})\n")
run = json.loads((out / "run.json").read_text()) if (out / "run.json").is_file() else None
if run:
    from stages.common.store import ArtifactStore

    store = ArtifactStore(run["store"])
    print(f"pipeline: exit {rc_run}, {run.get('wall_seconds', 0):.0f} s\n")
    print("| stage | state | seconds | key metrics |")
    print("|---|---|---|---|")
    for name, info in run["stages"].items():
        shown = []
        for ref in info["outputs"].values():
            art = store.get(ref)
            m = art.metrics
            if name == "pretrain" and "tokens_per_second" in m:
                startup = art.manifest["timings"].get("startup_seconds") or 0.0
                shown.append(f"{ref}: val ppl {m['val_perplexity']:.2f} (unigram {m['unigram_perplexity']:.1f}), "
                             f"{m['tokens_per_second']:,.0f} tok/s, MFU {m['mfu']:.1%} (peak {m.get('peak_source')}, "
                             f"{m.get('device_name')}), compiled {m.get('compiled')}, start-up {startup:.1f} s")
            elif m:
                shown.append(f"{ref}: " + ", ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}"
                                                     for k, v in list(m.items())[:4]))
        print(f"| {name} | {info['state']} | {info['stage_seconds']:.1f} | {'; '.join(shown)} |")
    base_model = run["stages"].get("pretrain", {}).get("outputs", {}).get("base-model")
    if base_model:
        from stages.pretrain.stage import STARTUP_PHASES

        breakdown = store.get(base_model).manifest["timings"].get("startup_breakdown") or {}
        print("\npretrain start-up: " + ", ".join(f"{k} {breakdown[k]:.1f} s" for k in STARTUP_PHASES if k in breakdown))
else:
    print(f"pipeline: exit {rc_run}, no summary (see run.log)" if rc_run != "0" else "pipeline: not run")
bench = json.loads((out / "bench.json").read_text()) if (out / "bench.json").is_file() else None
if bench:
    shape = bench["shape"]
    print(f"\nbenchmark: {bench['device']}, peak {bench['peak_flops'] / 1e12:.4g} TFLOP/s ({bench['peak_source']}), "
          f"GPT-2 {shape['n_layer']} layers x {shape['n_embd']}, context {shape['context']}, micro-batch "
          f"{shape['micro_batch_size']}, {bench['warmup']} warm-up + {bench['steps']} timed steps\n")
    print("| run | tok/s | step ms | MFU |")
    print("|---|---|---|---|")
    for name, r in bench["rows"].items():
        print(f"| {name} | {r['tokens_per_second']:,.0f} | {r['step_ms']:.1f} | {r['mfu']:.1%} |")
    print("\n" + ", ".join(f"{k} {v:.2f}" for k, v in bench["ratios"].items()))
else:
    print(f"\nbenchmark: exit {rc_bench}, no results (see bench.log)" if rc_bench != "0" else "\nbenchmark: not run")
EOF
[ "$rc_run" = 0 ] && [ "$rc_bench" = 0 ]
