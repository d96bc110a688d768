"""Submit a command as a Ray job with this checkout as its working dir, stream its logs, exit with its outcome.

    python -m cluster.submit --address http://127.0.0.1:8265 -- rlhf run --preset tiny --store s3://bucket/rlhf

The same as `RAY_AUTH_MODE=token ray job submit --runtime-env cluster/runtime_env.yaml --working-dir . -- ...`, but
it finds Ray's auth token itself (RAY_AUTH_TOKEN, then the file RAY_AUTH_TOKEN_PATH, then ~/.ray/auth_token) and sends
it explicitly, so a missing or wrong token is one clear line instead of a traceback.
Exit codes: 0 job succeeded, 1 job failed or was stopped, 2 usage, connection or authentication error.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shlex
import sys
from pathlib import Path
from typing import Any

import yaml

DEFAULT_RUNTIME_ENV = Path(__file__).with_name("runtime_env.yaml")


class SubmitError(Exception):
    """A problem the user can fix (address, token, runtime env file); printed as one line, exit 2."""


def read_auth_token() -> str | None:
    """Ray 2.60's token lookup order: RAY_AUTH_TOKEN, the file at RAY_AUTH_TOKEN_PATH, ~/.ray/auth_token."""
    token = os.environ.get("RAY_AUTH_TOKEN", "").strip()
    if token:
        return token
    path_var = os.environ.get("RAY_AUTH_TOKEN_PATH")
    path = Path(path_var) if path_var else Path.home() / ".ray" / "auth_token"
    if path_var and not path.is_file():
        raise SubmitError(f"RAY_AUTH_TOKEN_PATH={path_var}: no such file")
    if path.is_file():
        return path.read_text().strip() or None
    return None


def load_runtime_env(path: str | os.PathLike, working_dir: str | None) -> dict[str, Any]:
    """The runtime env YAML, with working_dir resolved to an absolute local path (or kept as a remote URI)."""
    path = Path(path)
    try:
        env = yaml.safe_load(path.read_text()) or {}
    except OSError as e:
        raise SubmitError(f"runtime env {path}: cannot read it ({e.strerror})") from None
    if not isinstance(env, dict):
        raise SubmitError(f"runtime env {path}: expected a mapping at the top level, found {type(env).__name__}")
    if working_dir is not None:
        env["working_dir"] = working_dir
    wd = env.get("working_dir")
    if wd and "://" not in str(wd):
        local = Path(wd).expanduser().resolve()
        if not local.is_dir():
            raise SubmitError(f"working dir {wd!r}: not a directory")
        env["working_dir"] = str(local)
    return env


def make_client(address: str):
    """A JobSubmissionClient that sends the auth token when one is available."""
    from ray.exceptions import AuthenticationError
    from ray.job_submission import JobSubmissionClient

    token = read_auth_token()
    headers = {"Authorization": f"Bearer {token}"} if token else None
    try:
        return JobSubmissionClient(address, headers=headers)
    except ConnectionError as e:
        raise SubmitError(f"Ray job server {address} does not answer ({str(e).splitlines()[0]})") from None
    except AuthenticationError:
        hint = "no token found" if token is None else "the token was refused"
        raise SubmitError(
            f"Ray job server {address}: authentication failed ({hint}); copy ~/.ray/auth_token from the head node, "
            "or set RAY_AUTH_TOKEN / RAY_AUTH_TOKEN_PATH"
        ) from None


async def _stream_logs(client, job_id: str) -> None:
    async for lines in client.tail_job_logs(job_id):
        print(lines, end="", flush=True)


def submit(address: str, entrypoint: list[str], *, runtime_env: dict[str, Any], wait: bool = True,
           submission_id: str | None = None, entrypoint_num_cpus: float | None = None) -> tuple[str, str]:
    """Submit `entrypoint` and, with `wait`, stream its logs until it ends; returns (job id, final status)."""
    client = make_client(address)
    job_id = client.submit_job(
        entrypoint=shlex.join(entrypoint),
        runtime_env=runtime_env,
        submission_id=submission_id,
        entrypoint_num_cpus=entrypoint_num_cpus,
    )
    print(f"submitted job {job_id} to {address}", file=sys.stderr, flush=True)
    if not wait:
        return job_id, str(client.get_job_status(job_id))
    asyncio.run(_stream_logs(client, job_id))
    return job_id, str(client.get_job_status(job_id))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m cluster.submit", description=__doc__.split("\n")[0])
    parser.add_argument("--address", default=os.environ.get("RAY_API_SERVER_ADDRESS", "http://127.0.0.1:8265"),
                        help="Ray job server (dashboard) URL (default $RAY_API_SERVER_ADDRESS or http://127.0.0.1:8265)")
    parser.add_argument("--runtime-env", default=str(DEFAULT_RUNTIME_ENV), help="runtime env YAML")
    parser.add_argument("--working-dir", default=None, help="overrides the runtime env's working_dir (default: its own)")
    parser.add_argument("--submission-id", default=None, help="a job id of your choosing (must be unique)")
    parser.add_argument("--entrypoint-num-cpus", type=float, default=None, help="CPUs reserved for the driver")
    parser.add_argument("--no-wait", action="store_true", help="return once submitted instead of streaming logs")
    parser.add_argument("entrypoint", nargs=argparse.REMAINDER, help="-- COMMAND ARGS...")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    entrypoint = args.entrypoint[1:] if args.entrypoint[:1] == ["--"] else args.entrypoint
    if not entrypoint:
        print("error: no command to run; e.g. python -m cluster.submit -- rlhf run --preset tiny", file=sys.stderr)
        return 2
    try:
        runtime_env = load_runtime_env(args.runtime_env, args.working_dir)
        job_id, status = submit(args.address, entrypoint, runtime_env=runtime_env, wait=not args.no_wait,
                                submission_id=args.submission_id, entrypoint_num_cpus=args.entrypoint_num_cpus)
    except SubmitError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"job {job_id}: {status}", file=sys.stderr)
    if args.no_wait:
        return 0
    return 0 if status == "SUCCEEDED" else 1


if __name__ == "__main__":
    sys.exit(main())
