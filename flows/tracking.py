"""Experiment tracking: mirror each pipeline run into MLflow for people who browse experiments there.

The artifact store stays the source of truth; MLflow gets a copy of what is worth comparing across runs. One parent
run per pipeline run, and one nested run per stage holding:
  params   the stage's resolved config, flattened to dotted keys (`model.n_layer`), values cut to MLflow's limit;
  metrics  the output artifacts' manifest metrics, plus the curves of each output's `metrics.jsonl` as `curve/<key>`
           with their steps (a separate name, so a curve never mixes with the summary number of the same name,
           e.g. PPO's per-iteration `kl` and its final held-out `kl`);
  tags     `state` (ran / Cached), `output.<name>.ref|digest` and `input.<role>.ref|digest`: lineage readable there.

Where runs go: `tracking.uri`, else MLflow's own default (MLFLOW_TRACKING_URI, else `sqlite:///mlflow.db` in the
working directory), in MLflow's "Default" experiment (`tracking.experiment`), so a bare `mlflow.search_runs()` run
from the same directory finds them.

The values and keys MLflow gets (cut to its limits, credentials masked) are computed in flows/tracking_values.py.
Tracking never fails a pipeline: the first problem (an unreachable server, an unusable database, a rejected value) is
one warning line, and tracking is off for the rest of the run. mlflow is imported only when tracking is on.
"""

from __future__ import annotations

import logging
import os
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from pydantic import Field

from flows.tracking_values import (
    by_output,
    flatten,
    is_failure,
    lineage_tags,
    one_line,
    param_value,
    read_curves,
    safe_key,
    stage_times_ms,
    summary_metrics,
    tag_value,
)
from stages.common.config import Section
from stages.common.redact import redact_credentials
from stages.common.store import Artifact

_log = logging.getLogger(__name__)

# MLflow's per-request limits (mlflow/utils/validation.py in 3.17); the per-value ones are tracking_values.py's.
PARAMS_TAGS_PER_BATCH = 100
METRICS_PER_BATCH = 1000
# Seconds to wait for a tracking server to answer before calling it unreachable. MLflow's own client retries a
# refused connection with back-off for minutes, so we ask once, plainly, before handing it the URI.
PROBE_SECONDS = 5.0
RUN_STATUSES = ("FINISHED", "FAILED", "KILLED")


class TrackingSection(Section):
    """Whether and where the pipeline mirrors its runs into MLflow (the artifact store stays the source of truth)."""

    enabled: bool = True
    uri: str | None = Field(
        None, min_length=1, description="MLflow tracking URI; None = MLFLOW_TRACKING_URI or ./mlflow.db (sqlite)"
    )
    # MLflow's own default experiment, so a bare `mlflow.search_runs()` from the same folder finds the runs
    experiment: str = Field("Default", min_length=1, max_length=500, description="MLflow experiment of the runs")
    report_to: list[str] = Field(
        default_factory=list, description="integrations the TRL stages log to as well, e.g. ['tensorboard']"
    )


class TrackingUnavailable(Exception):
    """The tracking location cannot be used (server does not answer, database cannot be opened)."""


def probe(uri: str) -> None:
    """Fail fast, in seconds, when the tracking location cannot work; raise TrackingUnavailable saying why.

    http(s): any HTTP answer to GET /health counts (even 401/404: something is listening). sqlite: the database file
    opens for writing (its folder is created, as MLflow would; a read-only folder, such as a Ray job's unpacked
    working directory, fails here). Other schemes are left to MLflow.
    """
    scheme = uri.split("://", 1)[0].lower() if "://" in uri else ""
    if scheme in ("http", "https"):
        parts = urllib.parse.urlsplit(uri)  # urllib reads a user part as the host name: ask the host without it
        bare = urllib.parse.urlunsplit(parts._replace(netloc=parts.netloc.rpartition("@")[2]))
        try:
            urllib.request.urlopen(bare.rstrip("/") + "/health", timeout=PROBE_SECONDS).close()
        except urllib.error.HTTPError:
            return
        except (OSError, ValueError) as e:
            reason = e.reason if isinstance(e, urllib.error.URLError) else e  # URLError wraps the socket's error
            raise TrackingUnavailable(f"no answer from {redact_credentials(uri)} ({one_line(Exception(reason))})") from None
    elif scheme == "sqlite":
        import sqlite3

        db = uri[len("sqlite:///") :].split("?", 1)[0] if uri.startswith("sqlite:///") else ""
        if not db or db == ":memory:":
            return
        try:
            Path(db).expanduser().parent.mkdir(parents=True, exist_ok=True)
            sqlite3.connect(db).execute("select 1").close()
            # MLflow writes the file and its journal beside it: a read-only file, folder or mount fails here
            path = Path(db).expanduser()
            for target in (path, path.parent) if path.exists() else (path.parent,):
                if not os.access(target, os.W_OK):
                    raise OSError(f"{target} is read-only")
        except (OSError, sqlite3.Error) as e:
            raise TrackingUnavailable(f"cannot open the sqlite database {db} ({one_line(e)})") from None


RAY_JOB_ENV = "RAY_JOB_CONFIG_JSON_ENV_VAR"  # set by Ray in the driver of a `ray job submit`


def job_default_uri(store_root: str | None) -> str | None:
    """Where MLflow's runs go by default under `ray job submit`, else None (MLflow's own default, ./mlflow.db).

    A job's working directory is Ray's unpacked copy of the upload: read-only on some clusters, and gone with the
    job. So a job's default is a sqlite file beside the store's files (`<store>/tracking/mlflow.db`) when the store
    is a folder every node shares (a path or file://); for an object store (s3://) there is no file MLflow could
    share, and TrackingUnavailable says to set tracking.uri."""
    if RAY_JOB_ENV not in os.environ or store_root is None:
        return None
    scheme = store_root.split("://", 1)[0] if "://" in store_root else ""
    if scheme not in ("", "file"):
        raise TrackingUnavailable(f"under ray job submit with the store on {redact_credentials(store_root)} there is "
                                  "no shared default; set tracking.uri (or MLFLOW_TRACKING_URI) to an MLflow server")  # fmt: skip
    folder = Path(store_root.removeprefix("file://")).expanduser().resolve() / "tracking"
    return f"sqlite:///{folder / 'mlflow.db'}"


# ------------------------------------------------------------------------------------------------ the tracker


class Tracker:
    """Mirrors one pipeline run into MLflow: `start_pipeline`, then `log_stage` per stage, then `end`.

    Every method is a no-op when tracking is disabled or has been switched off by an earlier problem.
    `warn` receives the one warning line (the flow passes its Prefect logger's `warning`).
    """

    def __init__(self, section: TrackingSection, *, warn: Callable[[str], None] | None = None,
                 store_root: str | None = None):  # fmt: skip
        self.section = section
        self.store_root = store_root  # where a `ray job submit` run's default goes (job_default_uri)
        self._warn = warn or _log.warning
        self._on = section.enabled
        self._client = None
        self._uri: str | None = section.uri
        self._experiment_id: str | None = None
        self._parent_id: str | None = None

    @property
    def enabled(self) -> bool:
        """True while tracking is configured on and nothing has gone wrong with it."""
        return self._on

    @property
    def uri(self) -> str | None:
        """The tracking URI in use (resolved from MLflow's default once tracking has started), or None; shown, so
        with its password masked."""
        return None if self._uri is None else redact_credentials(self._uri)

    @property
    def parent_run_id(self) -> str | None:
        return self._parent_id

    def start_pipeline(self, run_name: str, params: Mapping[str, Any], tags: Mapping[str, Any],
                       kind: str = "pipeline") -> None:  # fmt: skip
        """Open the parent run of this pipeline run (or of a sweep: `kind`), with the given params (flattened) and
        tags."""
        self._guarded(f"open the {kind} run", self._start_pipeline, run_name, params, tags, kind)

    def log_trial(self, name: str, *, state: str, params: Mapping[str, Any], metrics: Mapping[str, float],
                  tags: Mapping[str, Any]) -> None:  # fmt: skip
        """Record one sweep trial as a finished run nested under the sweep's run: its point, objective and refs."""
        self._guarded(f"log trial {name}", self._log_trial, name, state, params, metrics, tags)

    def log_stage(
        self,
        stage: str,
        *,
        state: str,
        config: Mapping[str, Any],
        outputs: Mapping[str, Artifact],
        inputs: Mapping[str, Artifact],
    ) -> None:
        """Record one stage as a finished run nested under the pipeline run (top level if none was opened)."""
        self._guarded(f"log stage {stage}", self._log_stage, stage, state, config, outputs, inputs)

    def end(self, status: str = "FINISHED") -> None:
        """Close the pipeline run as FINISHED, FAILED or KILLED."""
        status = status.upper()
        if status not in RUN_STATUSES:
            raise ValueError(f"Tracker.end: status {status!r}: expected one of {', '.join(RUN_STATUSES)}")
        if self._parent_id is None:
            return
        parent, self._parent_id = self._parent_id, None
        self._guarded("close the pipeline run", lambda: self._client.set_terminated(parent, status))

    @contextmanager
    def pipeline(self, run_name: str, params: Mapping[str, Any], tags: Mapping[str, Any]) -> Iterator[Tracker]:
        """start_pipeline ... end: FINISHED when the block completes, FAILED when it raises (the error propagates)."""
        self.start_pipeline(run_name, params, tags)
        try:
            yield self
        except BaseException:
            self.end("FAILED")
            raise
        self.end("FINISHED")

    # ------------------------------------------------------------------------------------------------ internals

    def _guarded(self, what: str, fn: Callable[..., Any], *args: Any) -> None:
        """Run fn unless tracking is off; its first failure becomes the one warning line and turns tracking off."""
        if not self._on:
            return
        try:
            fn(*args)
        except Exception as e:  # noqa: BLE001 - tracking must never fail the pipeline
            self._on = False
            self._parent_id = None
            where = self._uri or "the default MLflow location"
            self._warn(redact_credentials(
                f"tracking: could not {what} in MLflow at {where}: {one_line(e)}; tracking is off for this run"))

    def _connect(self) -> None:
        """Resolve the URI, probe it, and open the client and the experiment (once)."""
        if self._client is not None:
            return
        import mlflow
        from mlflow import MlflowClient

        if os.environ.get("RLHF_VERBOSE") != "1":  # "Creating initial MLflow database tables..." and the like
            logging.getLogger("mlflow.store.db.utils").setLevel(logging.WARNING)
            logging.getLogger("alembic").setLevel(logging.WARNING)
        self._uri = (self.section.uri or os.environ.get("MLFLOW_TRACKING_URI") or job_default_uri(self.store_root)
                     or mlflow.get_tracking_uri())  # fmt: skip
        probe(self._uri)
        client = MlflowClient(tracking_uri=self._uri)
        self._experiment_id = _experiment_id(client, self.section.experiment)
        self._client = client

    def _start_pipeline(self, run_name: str, params: Mapping[str, Any], tags: Mapping[str, Any], kind: str) -> None:
        self._connect()
        run_tags = {safe_key(str(k)): tag_value(v) for k, v in tags.items()}
        run_tags["rlhf.run"] = kind
        run = self._client.create_run(self._experiment_id, run_name=run_name, tags=run_tags)
        self._parent_id = run.info.run_id
        self._log_batch(self._parent_id, params=flatten(params))

    def _log_stage(self, stage, state, config, outputs, inputs) -> None:
        from mlflow.utils.mlflow_tags import MLFLOW_PARENT_RUN_ID

        self._connect()
        start, end = stage_times_ms(outputs, state, int(time.time() * 1000))
        tags = {"rlhf.run": "stage", "stage": stage, "state": state, **lineage_tags(outputs, inputs)}
        if self._parent_id is not None:
            tags[MLFLOW_PARENT_RUN_ID] = self._parent_id
        tags = {k: tag_value(v) for k, v in tags.items()}
        run_id = self._client.create_run(self._experiment_id, start_time=start, run_name=stage, tags=tags).info.run_id
        summary = by_output({name: summary_metrics(art.metrics) for name, art in outputs.items()})
        curves = by_output({name: read_curves(_curves_file(art)) for name, art in outputs.items()
                            if _curves_file(art).is_file()})  # fmt: skip
        points = [(key, value, 0) for key, value in summary.items()]
        points += [(f"curve/{key}", value, step) for key, series in curves.items() for step, value in series]
        self._log_batch(run_id, params=flatten(config), metrics=points, timestamp=end)
        self._client.set_terminated(run_id, "FAILED" if is_failure(state) else "FINISHED", end_time=end)
        if self._parent_id is not None:
            parent_tags = {f"stage.{stage}.state": state}
            parent_tags.update({f"output.{n}.ref": a.ref for n, a in outputs.items()})
            self._log_batch(self._parent_id, tags=parent_tags)

    def _log_trial(self, name, state, params, metrics, tags) -> None:
        from mlflow.utils.mlflow_tags import MLFLOW_PARENT_RUN_ID

        self._connect()
        run_tags = {"rlhf.run": "trial", "state": state, **tags}
        if self._parent_id is not None:
            run_tags[MLFLOW_PARENT_RUN_ID] = self._parent_id
        run_id = self._client.create_run(self._experiment_id, run_name=name,
                                         tags={k: tag_value(v) for k, v in run_tags.items()}).info.run_id  # fmt: skip
        self._log_batch(run_id, params=params, metrics=[(k, float(v), 0) for k, v in metrics.items()])
        self._client.set_terminated(run_id, "FINISHED" if state == "done" else "FAILED")

    def _log_batch(
        self,
        run_id: str,
        *,
        params: Mapping[str, Any] | None = None,
        metrics: list[tuple[str, float, int]] | None = None,
        tags: Mapping[str, str] | None = None,
        timestamp: int | None = None,
    ) -> None:
        """Log params, metrics and tags in batches within MLflow's per-request limits."""
        from mlflow.entities import Metric, Param, RunTag

        ts = timestamp if timestamp is not None else int(time.time() * 1000)
        param_list = [Param(safe_key(k), param_value(v)) for k, v in (params or {}).items()]
        tag_list = [RunTag(safe_key(k), tag_value(v)) for k, v in (tags or {}).items()]
        metric_list = [Metric(safe_key(k), v, ts, step) for k, v, step in metrics or []]
        for i in range(0, len(param_list), PARAMS_TAGS_PER_BATCH):
            self._client.log_batch(run_id, params=param_list[i : i + PARAMS_TAGS_PER_BATCH])
        for i in range(0, len(tag_list), PARAMS_TAGS_PER_BATCH):
            self._client.log_batch(run_id, tags=tag_list[i : i + PARAMS_TAGS_PER_BATCH])
        for i in range(0, len(metric_list), METRICS_PER_BATCH):
            self._client.log_batch(run_id, metrics=metric_list[i : i + METRICS_PER_BATCH])


def _curves_file(art: Artifact) -> Path:
    """An artifact's metrics.jsonl: in its reports (outside the digest), or, for older artifacts, among its files."""
    in_reports = Path(art.reports_path) / "metrics.jsonl" if getattr(art, "reports_path", "") else None
    return in_reports if in_reports is not None and in_reports.is_file() else Path(art.path) / "metrics.jsonl"


def _experiment_id(client, name: str) -> str:
    """The id of experiment `name`, created when missing (another process creating it at the same time is fine)."""
    from mlflow.exceptions import MlflowException

    experiment = client.get_experiment_by_name(name)
    if experiment is None:
        try:
            return client.create_experiment(name)
        except MlflowException:
            experiment = client.get_experiment_by_name(name)  # lost a creation race: use the winner's
            if experiment is None:
                raise
    if experiment.lifecycle_stage != "active":
        raise TrackingUnavailable(
            f"experiment {name!r} is deleted there; restore it or set tracking.experiment to another name"
        )
    return experiment.experiment_id


__all__ = ["Tracker", "TrackingSection", "TrackingUnavailable", "probe"]
