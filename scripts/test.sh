#!/usr/bin/env bash
# Runs the whole test suite in ./.venv (created by scripts/setup.sh when missing). Extra args go to pytest.
set -uo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh || exit 1
export PREFECT_SERVER_ANALYTICS_ENABLED=false RAY_USAGE_STATS_ENABLED=0 TOKENIZERS_PARALLELISM=false
# Two workers (pytest-xdist): a one-process run leaves about 30% of the cores idle (Ray and Prefect start-up,
# raylets waiting on each other). Whole modules, and the tests of the shared tiny pipeline, stay on one worker
# (tests/conftest.py's scheduler). `scripts/test.sh -n 0 ...` runs in this process alone.
.venv/bin/python -m pytest -q --timeout=900 -n "${RLHF_TEST_WORKERS:-2}" --no-loadscope-reorder "$@"
rc=$?
# pytest exits 5 when the selection holds no test: that is a broken selection, not a pass, so say it plainly.
if [ "$rc" -eq 5 ]; then echo "test.sh: no tests were collected" >&2; fi
exit $rc
