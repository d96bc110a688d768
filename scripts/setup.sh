#!/usr/bin/env bash
# Creates ./.venv with everything the project needs, when missing or when pyproject.toml changed.
# Idempotent: a second call with nothing changed returns in about a second.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
stamp=.venv/.installed-$(sha256sum pyproject.toml | cut -c1-16)
if [ -f "$stamp" ]; then exit 0; fi
start=$(date +%s)
# Quiet pip: this machine's pip config names extra local indexes that do not exist; drop those warnings only.
pipq() { "$@" 2>&1 | { grep -v -e "is ignored: it is neither a file nor a directory" || true; }; return "${PIPESTATUS[0]}"; }
[ -x .venv/bin/python ] || "$PY" -m venv .venv
pipq .venv/bin/python -m pip install --quiet --upgrade pip
# torch first and pinned, so the resolver keeps the tested build (on this kind of machine pip finds the CPU wheel
# locally; on a GPU box it is the CUDA build from the index).
pipq .venv/bin/python -m pip install --quiet "torch==2.13.0"
pipq .venv/bin/python -m pip install --quiet -e ".[dev]"
rm -f .venv/.installed-*
touch "$stamp"
echo "setup: environment ready in $(( $(date +%s) - start )) s"
