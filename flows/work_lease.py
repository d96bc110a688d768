"""A lease on a stage's work_dir, so two runs of one stage and cache key (which share the folder) never run at once
and delete each other's checkpoints or export.

The lease is the file `<work_dir>.lease` beside the folder (a stage may clear its folder; the lease must survive
that), created atomically and holding the owner's pid, host, start time and a token. The holder renews it (its
modification time, or on a remote its `renewed_at`) every ttl/4 while the stage runs. Another run waits up to
`wait_s` for it and then refuses with one line naming the work_dir and the holder. A stale lease is taken over with
one warning line: its holder's pid is gone on this host, or it was not renewed for ttl_s (a holder on another host,
or a hung one). Takeover goes through `<work_dir>.lease.takeover`, created atomically too, so two waiters never
both take over; a takeover lock older than a minute belongs to a taker that died mid-way and is removed.

Atomic create: `file://` and plain paths use O_CREAT|O_EXCL. fsspec remotes use `pipe_file(mode="create")`, which
s3fs sends as a conditional write (If-None-Match: *), exclusive when the server honours it (AWS S3 since 2024-08,
moto). LIMIT: other fsspec backends (gcs, memory across processes) check-then-write there, so two runs starting in
the same instant could both get the lease; the renewal check then makes the loser warn, not stop.
"""

from __future__ import annotations

import json
import os
import socket
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import UTC, datetime

import fsspec
from fsspec.implementations.local import LocalFileSystem

from stages.common.errors import StageInputError
from stages.common.redact import redact_credentials

TAKEOVER_STALE_S = 60.0  # a takeover takes milliseconds; a lock this old is a dead taker's


class WorkDirBusy(StageInputError):
    """Another run holds the work_dir's lease (after waiting, if asked to): one line, never retried."""


class _Files:
    """The few file operations a lease needs, on a local path (os, O_EXCL) or an fsspec filesystem."""

    def __init__(self, uri: str):
        self.fs, path = fsspec.core.url_to_fs(uri)
        self.local = isinstance(self.fs, LocalFileSystem)
        self.path = os.path.abspath(path) if self.local else path.rstrip("/")

    def create(self, path: str, data: bytes) -> bool:
        if self.local:
            os.makedirs(os.path.dirname(path), exist_ok=True)
            try:
                fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                return False
            with os.fdopen(fd, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            return True
        try:
            self.fs.pipe_file(path, data, mode="create")
        except FileExistsError:
            return False
        return self.read(path) == data  # read back: a server that ignored the condition let someone else win

    def read(self, path: str) -> bytes | None:
        try:
            if self.local:
                with open(path, "rb") as f:
                    return f.read()
            self.fs.invalidate_cache(path)
            return self.fs.cat_file(path)
        except FileNotFoundError:
            return None

    def mtime(self, path: str) -> float | None:
        try:
            if self.local:
                return os.stat(path).st_mtime
            when = self.fs.modified(path)
            return when.timestamp() if isinstance(when, datetime) else float(when)
        except FileNotFoundError:
            return None

    def remove(self, path: str) -> None:
        try:
            os.unlink(path) if self.local else self.fs.rm_file(path)
        except FileNotFoundError:
            pass

    def renew(self, path: str, record: dict) -> None:
        if self.local:
            os.utime(path)
        else:
            self.fs.pipe_file(path, json.dumps({**record, "renewed_at": time.time()}).encode())


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # someone else's process: alive
    return True


def _holder_text(record: dict) -> str:
    if not record:
        return "an unknown holder (unreadable lease file)"
    since = datetime.fromtimestamp(record.get("started_at", 0), UTC).isoformat(timespec="seconds")
    return f"pid {record.get('pid')} on {record.get('host')} since {since}"


class WorkDirLease:
    def __init__(self, work_dir: str, *, ttl_s: float = 600.0, log: Callable[[str], None] = print):
        self.work_dir, self.ttl_s, self.log = work_dir, ttl_s, log
        self.files = _Files(work_dir)
        self.lease = self.files.path + ".lease"
        self.takeover = self.lease + ".takeover"
        self.host = socket.gethostname()
        self.record = {"pid": os.getpid(), "host": self.host, "started_at": time.time(), "token": uuid.uuid4().hex}
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _read(self) -> tuple[dict, float | None]:
        data = self.files.read(self.lease)
        if data is None:
            return {}, None
        try:
            record = json.loads(data)
            record = record if isinstance(record, dict) else {}
        except ValueError:
            record = {}  # being written this instant, or damaged: judged by its age alone
        renewed = max(self.files.mtime(self.lease) or 0.0, float(record.get("renewed_at") or 0.0))
        return record, renewed

    def _stale_reason(self, record: dict, renewed: float) -> str | None:
        if record.get("host") == self.host and isinstance(record.get("pid"), int) and not _pid_alive(record["pid"]):
            return "its process is gone"
        if time.time() - renewed > self.ttl_s:
            return f"not renewed for {time.time() - renewed:.0f}s (ttl {self.ttl_s:g}s)"
        return None

    def _try_takeover(self, record: dict, reason: str) -> bool:
        if not self.files.create(self.takeover, json.dumps(self.record).encode()):
            since = self.files.mtime(self.takeover)
            if since is not None and time.time() - since > TAKEOVER_STALE_S:
                self.files.remove(self.takeover)
            return False
        try:
            again, renewed = self._read()
            if again.get("token") != record.get("token") or renewed is None or not self._stale_reason(again, renewed):
                return False  # released or renewed meanwhile: not ours to take
            self.files.remove(self.lease)
            if not self.files.create(self.lease, json.dumps(self.record).encode()):
                return False
            self.log(f"warning: work_dir {redact_credentials(self.work_dir)}: took over a stale lease of "
                     f"{_holder_text(record)} ({reason})")
            return True
        finally:
            self.files.remove(self.takeover)

    def acquire(self, wait_s: float = 0.0, poll_s: float = 0.5) -> None:
        deadline, said = time.monotonic() + wait_s, False
        while True:
            if self.files.create(self.lease, json.dumps(self.record).encode()):
                break
            record, renewed = self._read()
            if renewed is None:
                continue  # released between our create and read: try again at once
            reason = self._stale_reason(record, renewed)
            if reason and self._try_takeover(record, reason):
                break
            if time.monotonic() >= deadline:
                waited = f" after waiting {wait_s:g}s" if wait_s > 0 else ""
                raise WorkDirBusy(f"work_dir {redact_credentials(self.work_dir)} is in use{waited} by "
                                  f"{_holder_text(record)} (another run of this stage and cache key); let it finish, "
                                  "or set run.work_dir_lease_wait_s to wait for it")
            if not said:
                self.log(f"work_dir {redact_credentials(self.work_dir)} is in use by {_holder_text(record)}; "
                         f"waiting up to {wait_s:g}s")
                said = True
            time.sleep(min(poll_s, max(0.0, deadline - time.monotonic())))
        self._thread = threading.Thread(target=self._renew_loop, name="work-dir-lease", daemon=True)
        self._thread.start()

    def _renew_loop(self) -> None:
        while not self._stop.wait(self.ttl_s / 4):
            record, _ = self._read()
            if record.get("token") != self.record["token"]:
                self.log(f"warning: work_dir {redact_credentials(self.work_dir)}: the lease was taken over by "
                         f"{_holder_text(record)} while this run held it")
                return
            try:
                self.files.renew(self.lease, self.record)
            except OSError as e:  # a flaky remote: the next round tries again, the TTL leaves room for it
                self.log(f"warning: work_dir lease not renewed ({e})")

    def release(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        record, _ = self._read()
        if record.get("token") == self.record["token"]:
            self.files.remove(self.lease)


@contextmanager
def work_dir_lease(work_dir: str, *, wait_s: float = 0.0, ttl_s: float = 600.0,
                   log: Callable[[str], None] = print, poll_s: float = 0.5) -> Iterator[WorkDirLease]:  # fmt: skip
    """Hold work_dir's lease for the block (waiting up to wait_s for another holder), or raise WorkDirBusy."""
    lease = WorkDirLease(work_dir, ttl_s=ttl_s, log=log)
    lease.acquire(wait_s, poll_s)
    try:
        yield lease
    finally:
        lease.release()
