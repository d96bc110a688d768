"""Where the servers the pipeline starts listen: nothing beyond the address other nodes are told to use.

- The embedded local Ray (`keep_ray_on_loopback`): it is this machine's alone, so every Ray process listens on
  127.0.0.1. Given 127.0.0.1, Ray swaps in the machine's interface address (so that other machines could join) and its
  servers listen on every interface, unless RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0, Ray's own switch for one-machine
  clusters (its default on macOS and Windows).
- A process group's rendezvous (`host_rendezvous`, `node_bound_torch_config`): torch's TCPStore server listens on every
  interface of rank 0's machine. Here rank 0 binds the listening socket to its node's Ray address (127.0.0.1 on a
  local Ray, the address the other nodes reach on a cluster) and hosts the store over it; torch's process-group
  rendezvous then reuses that server, as every store it builds is multi-tenant (one server per port in a process).
Measured on a tiny pipeline: every socket of its processes listens on 127.0.0.1 only (before: the training workers'
and RL actors' stores on every interface, and Ray's servers on the machine's address).
"""

from __future__ import annotations

import datetime
import os
import socket

# port -> (socket, store): the rendezvous this process hosts, alive as long as the process (a process group's store
# holds the server too, but only once the group is made; until then nothing else refers to it)
_HOSTED: dict[int, tuple[socket.socket, object]] = {}


def keep_ray_on_loopback() -> None:
    """Make the Ray this process starts listen on 127.0.0.1 only (pass `_node_ip_address="127.0.0.1"` as well).
    The processes Ray starts read the switch from the environment; this one read it when it imported Ray, so its
    copy is set too."""
    from ray._private import ray_constants

    os.environ[ray_constants.ENABLE_RAY_CLUSTERS_ENV_VAR] = "0"
    ray_constants.ENABLE_RAY_CLUSTER = False


def host_rendezvous() -> tuple[str, int]:
    """Host a process group's rendezvous in this (rank 0) process, on this node's Ray address only: (address, port)
    for the ranks' MASTER_ADDR and MASTER_PORT. Call it in a Ray worker or actor, before the group is made here."""
    import ray
    import torch.distributed as dist

    address = ray.util.get_node_ip_address()
    listener = socket.socket(socket.AF_INET6 if ":" in address else socket.AF_INET)
    listener.bind((address, 0))
    listener.listen(128)
    port = listener.getsockname()[1]
    store = dist.TCPStore(address, port, None, True, datetime.timedelta(seconds=300), wait_for_workers=False,
                          multi_tenant=True, master_listen_fd=listener.fileno())  # fmt: skip
    _HOSTED[port] = (listener, store)
    return address, port


def node_bound_torch_config():
    """Ray Train's TorchConfig whose rank 0 hosts the rendezvous with `host_rendezvous` (Ray's own picks a free port
    and lets torch listen on every interface). The backend is Ray's (gloo, or NCCL when workers have GPUs)."""
    from ray.train.torch.config import (
        TorchConfig,
        _set_torch_distributed_env_vars,
        _setup_torch_process_group,
        _TorchBackend,
    )

    def set_master(addr: str, port: int) -> None:
        os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"] = addr, str(port)

    class NodeBoundTorchBackend(_TorchBackend):
        def on_start(self, worker_group, backend_config) -> None:
            import ray

            gpus = worker_group.get_resources_per_worker().get("GPU", 0)
            backend = backend_config.backend or ("nccl" if gpus > 0 else "gloo")
            addr, port = worker_group.execute_single(0, host_rendezvous)
            worker_group.execute(set_master, addr=addr, port=port)
            worker_group.execute(_set_torch_distributed_env_vars)  # RANK, LOCAL_RANK, WORLD_SIZE, ...
            ray.get([
                worker_group.execute_single_async(i, _setup_torch_process_group, backend=backend, world_rank=i,
                                                  world_size=len(worker_group), init_method="env://",
                                                  timeout_s=backend_config.timeout_s)
                for i in range(len(worker_group))
            ])  # fmt: skip

    class NodeBoundTorchConfig(TorchConfig):
        @property
        def backend_cls(self):
            return NodeBoundTorchBackend

    return NodeBoundTorchConfig()
