"""The pipeline's orchestration: the `rlhf` CLI, the Prefect flow, the DAG and its caching (see README, DESIGN.md).

Prefect settings that every entry point needs are set here, before any module of this package imports Prefect.
"""

import os

os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
# `rlhf run` without a Prefect API starts Prefect's temporary local server. Its first start on a machine builds the
# server's database, which took 27 s on a slow 2-core box; Prefect's default wait of 20 s then failed the very first
# run of a fresh install with "Timed out while attempting to connect to ephemeral Prefect API server".
os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")
