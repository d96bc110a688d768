"""Joining Ray as the driver, and the checks that must fail fast instead of hanging or losing work."""

from __future__ import annotations

import os
import socket
from urllib.parse import urlparse

from stages.common.config import ConfigError

# A bare path is node-local; `file:///mnt/shared/...` says explicitly "this folder is shared by every node".
LOCAL_SCHEMES = ("",)


def probe_ray_address(address: str, timeout: float = 3.0) -> None:
    """A TCP connect to the Ray address, so a dead address is an error within seconds rather than a long hang.
    `auto` is first looked up as Ray would (RAY_ADDRESS, the last `ray start`, a running GCS): none is one line."""
    if address == "local":
        return
    if address == "auto":
        address = _auto_address()
        if address is None:
            return
    parsed = urlparse(address if "://" in address else f"ray://{address}")
    host, port = parsed.hostname, parsed.port
    if not host or not port:
        raise ConfigError(f"ray address {address!r}: expected HOST:PORT (e.g. 10.0.0.5:6379) or ray://HOST:10001")
    try:
        with socket.create_connection((host, port), timeout=timeout):
            pass
    except OSError as e:
        raise ConfigError(f"ray address {address!r} does not answer ({e.strerror or e}); is the cluster up?") from None


def _auto_address() -> str | None:
    """The cluster `ray.init(address="auto")` would join, or ConfigError when there is none (Ray's own ConnectionError
    came as a traceback after Prefect had started). None when this Ray has no such lookup: Ray then decides."""
    try:
        from ray._private.services import get_ray_address_from_environment
    except ImportError:  # pragma: no cover - a Ray without the private helper
        return None
    try:
        found = get_ray_address_from_environment("auto", None)
    except ConnectionError:
        raise ConfigError(
            "ray address 'auto': no running Ray cluster found on this machine; start one (`ray start --head`), name "
            "it (run.ray_address=HOST:PORT) or leave run.ray_address unset for a local Ray"
        ) from None
    return None if found in (None, "auto") else found


class RayDriver:
    """The flow process as Ray driver, connected only when a stage actually has to run.

    A fully cached run never pays Ray's start-up. The address is probed up front, so a dead cluster still fails at
    once. `close()` shuts down only a Ray this driver started or joined itself.
    """

    def __init__(self, address: str | None, store_root: str, work_dir: str, check=None):
        self.address = address or os.environ.get("RAY_ADDRESS")
        self.store_root, self.work_dir = store_root, work_dir
        self.check = check  # called with the joined cluster's Resources: does the run fit there?
        self._owned = False
        if self.address:
            probe_ray_address(self.address)

    def ensure(self) -> None:
        import ray

        if not ray.is_initialized():
            from stages.common.ray_train import init_ray

            init_ray(self.address)
            self._owned = True
            if self.address and self.check is not None:
                from flows.preflight import Resources

                self.check(Resources.of_ray_cluster(self.address))
        check_store_reachable(self.store_root, self.work_dir)

    def resources(self):
        """What the cluster has: this machine's for a local Ray the driver will start, else the joined cluster's."""
        from flows.preflight import Resources

        if not self.address:
            return Resources.of_this_machine()
        self.ensure()
        return Resources.of_ray_cluster(self.address)

    def close(self) -> None:
        if self._owned:
            import ray

            ray.shutdown()
            self._owned = False


def is_local_path(uri: str) -> bool:
    return urlparse(uri).scheme in LOCAL_SCHEMES or (len(uri) > 1 and uri[1] == ":")


def check_store_reachable(store_root: str, work_dir: str) -> None:
    """On a multi-node cluster a local folder is a different folder on every node: refuse it up front."""
    import ray

    alive = [n for n in ray.nodes() if n.get("Alive")]
    if len(alive) <= 1:
        return
    for what, uri in (("run.store", store_root), ("run.work_dir", work_dir)):
        if is_local_path(str(uri)):
            raise ConfigError(
                f"{what} {uri!r} is a local path but the Ray cluster has {len(alive)} nodes; "
                "use a shared URI (s3://, gs://), or file:///PATH for a shared filesystem every node mounts"
            )
