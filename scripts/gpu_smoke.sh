#!/usr/bin/env bash
# GPU smoke test in parts, each at most PART_TIMEOUT seconds (default 480: one part fits a 10-minute device command)
# and each writing its results to $OUT, so a later part (or a later command) reads what an earlier one wrote:
#   versions  torch, CUDA, NCCL, cuDNN, the devices, the libraries        -> versions.json
#   pipeline  `rlhf run --preset single-gpu` at the tiny preset's sizes    -> run.json, run.log
#   load      every artifact of that run in plain transformers / PEFT, on the GPU, finite outputs -> load.json
#   bench     benchmarks/gpu_pretrain_bench.py (GPT-2 small: eager, torch.compile, the stage)  -> bench.json, bench.log
#   summary   all of the above as markdown, each docs/GPU.md target PASS / MISS / not run    -> summary.md
# Usage (from the project root, on a CUDA machine, with the project's venv or on an offline GPU box per
# shared/gpu/README.md):
#     OUT=/tmp/gpu-smoke bash scripts/gpu_smoke.sh                     # every part in order
#     OUT=/tmp/gpu-smoke bash scripts/gpu_smoke.sh versions pipeline   # one 10-minute command ...
#     OUT=/tmp/gpu-smoke bash scripts/gpu_smoke.sh load bench summary  # ... and the next
# Environment: OUT (results folder; default a new temp dir), PY (python; default .venv/bin/python or python3),
# BENCH_STEPS (timed steps per benchmark row, default 30), PART_TIMEOUT. For a dry run on a CPU machine:
# ALLOW_CPU=1 PRESET=tiny BENCH_ARGS="--device cpu --tiny" (RUN_ARGS and BENCH_ARGS are split on spaces).
# Each part's exit code goes to $OUT/<part>.rc; the script exits non-zero if any part it ran failed.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-$(mktemp -d -t gpu-smoke-XXXX)}
mkdir -p "$OUT"
if [ -z "${PY:-}" ]; then
  if [ -x .venv/bin/python ]; then PY=.venv/bin/python; else PY=python3; fi
fi
if [ -x .venv/bin/rlhf ]; then RLHF=(.venv/bin/rlhf); else RLHF=("$PY" -m flows.cli); fi
export TOKENIZERS_PARALLELISM=false RAY_USAGE_STATS_ENABLED=0 PREFECT_SERVER_ANALYTICS_ENABLED=false
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
PRESET=${PRESET:-single-gpu}
PART_TIMEOUT=${PART_TIMEOUT:-480}
read -r -a RUN_ARGS <<< "${RUN_ARGS:-}"
read -r -a BENCH_ARGS <<< "${BENCH_ARGS:-}"
PARTS=("$@")
[ ${#PARTS[@]} -gt 0 ] || PARTS=(versions pipeline load bench summary)
if [ -z "${ALLOW_CPU:-}" ]; then
  "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 'gpu_smoke: no CUDA device visible to torch')" \
    || exit 2
fi

part_pipeline() {
  [ -f "flows/presets/$PRESET.yaml" ] || { echo "gpu_smoke: flows/presets/$PRESET.yaml is missing" >&2; return 2; }
  # the tiny preset's stage sections over the single-gpu preset (its run: section left out: the GPU scaling stays)
  "$PY" -c 'import sys, yaml; t = yaml.safe_load(open("flows/presets/tiny.yaml")); t.pop("run", None); yaml.safe_dump(t, open(sys.argv[1], "w"), sort_keys=False)' \
    "$OUT/tiny-sizes.yaml"
  timeout "$PART_TIMEOUT" "${RLHF[@]}" run --preset "$PRESET" --config "$OUT/tiny-sizes.yaml" --store "$OUT/store" \
    --set run.work_dir="$OUT/runs" --json "${RUN_ARGS[@]}" > "$OUT/run.out" 2> "$OUT/run.log"
  local rc=$?
  # the summary is the last top-level JSON object on stdout (anything logged before it stays in run.log)
  "$PY" -c 'import json, sys; t = open(sys.argv[1]).read(); at = 0 if t.startswith("{") else t.rfind("\n{\n") + 1; json.dump(json.loads(t[at:]), open(sys.argv[2], "w"), indent=1)' \
    "$OUT/run.out" "$OUT/run.json" 2>/dev/null || echo "gpu_smoke: no JSON summary in the pipeline's output" >&2
  cat "$OUT/run.out" >> "$OUT/run.log"
  return $rc
}

part_bench() {
  timeout "$PART_TIMEOUT" "$PY" benchmarks/gpu_pretrain_bench.py --steps "${BENCH_STEPS:-30}" --json "$OUT/bench.json" "${BENCH_ARGS[@]}" \
    > "$OUT/bench.log" 2>&1
}

failed=0
for part in "${PARTS[@]}"; do
  start=$SECONDS
  echo "gpu_smoke: $part -> $OUT" >&2
  case "$part" in
    versions) timeout "$PART_TIMEOUT" "$PY" scripts/gpu_smoke/versions.py "$OUT" > "$OUT/versions.log" 2>&1 ;;
    pipeline) part_pipeline ;;
    load)
      if [ -f "$OUT/run.json" ]; then
        timeout "$PART_TIMEOUT" "$PY" scripts/gpu_smoke/load_check.py "$OUT" > "$OUT/load.log" 2>&1
      else
        echo "gpu_smoke: load needs the pipeline part's $OUT/run.json" >&2; false
      fi ;;
    bench) part_bench ;;
    summary) "$PY" scripts/gpu_smoke/summary.py "$OUT" ;;
    *) echo "gpu_smoke: unknown part '$part' (versions, pipeline, load, bench, summary)" >&2; exit 2 ;;
  esac
  rc=$?
  [ "$part" = summary ] || echo "$rc" > "$OUT/$part.rc"
  [ "$rc" -eq 124 ] && echo "gpu_smoke: $part stopped after PART_TIMEOUT=${PART_TIMEOUT}s" >&2
  echo "gpu_smoke: $part exit $rc after $((SECONDS - start)) s" >&2
  [ "$rc" -eq 0 ] || failed=1
done
exit $failed
