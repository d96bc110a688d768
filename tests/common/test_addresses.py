"""Nothing the pipeline starts listens beyond loopback on one machine: the embedded local Ray, and the rendezvous of
the training workers' and RL actors' process groups (stages/common/addresses.py)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import psutil
import ray

ROOT = Path(__file__).resolve().parents[2]
LOOPBACK = {"127.0.0.1", "::1", "::ffff:127.0.0.1"}


def _listening(pids: set[int]) -> list[tuple[int, str, int]]:
    """(pid, address, port) of every TCP socket these processes listen on."""
    return [(c.pid, c.laddr.ip, c.laddr.port) for c in psutil.net_connections(kind="tcp")
            if c.status == psutil.CONN_LISTEN and c.pid in pids]  # fmt: skip


@ray.remote(num_cpus=0)
def _group_over_hosted_rendezvous() -> dict:
    """Host a rendezvous, make a one-rank gloo group over it (torch must reuse the hosted server: a second one on the
    same port could not bind), and report where this process listens."""
    import torch
    import torch.distributed as dist

    from stages.common.addresses import host_rendezvous

    addr, port = host_rendezvous()
    os.environ.update(MASTER_ADDR=addr, MASTER_PORT=str(port))
    dist.init_process_group("gloo", init_method="env://", rank=0, world_size=1)
    total = torch.ones(2)
    dist.all_reduce(total)
    listening = _listening({os.getpid()})
    dist.destroy_process_group()
    return {"addr": addr, "port": port, "sum": total.tolist(), "listening": listening}


def test_a_hosted_rendezvous_listens_on_the_node_address_only(local_ray):
    got = ray.get(_group_over_hosted_rendezvous.remote())
    assert got["addr"] == "127.0.0.1"  # the session's Ray runs on loopback
    assert got["sum"] == [1.0, 1.0]
    on_port = {ip for _, ip, port in got["listening"] if port == got["port"]}
    assert on_port == {"127.0.0.1"}
    assert {ip for _, ip, _ in got["listening"]} <= LOOPBACK  # gloo's own sockets too


_LOCAL_RAY = """
import json, os, psutil, ray
from stages.common.ray_train import init_ray
init_ray()

@ray.remote
def where():
    return ray.util.get_node_ip_address()

assert ray.get(where.remote()) == "127.0.0.1", "a task saw another node address"
me = psutil.Process()
pids = {me.pid} | {p.pid for p in me.children(recursive=True)}
print(json.dumps([(c.pid, c.laddr.ip, c.laddr.port) for c in psutil.net_connections(kind="tcp")
                  if c.status == psutil.CONN_LISTEN and c.pid in pids]))
ray.shutdown()
"""


def test_the_embedded_local_ray_listens_on_loopback_only(tmp_path):
    """A fresh process starting the product's local Ray, without anything the tests add (RLHF_RAY_LOOPBACK, the
    loopback sitecustomize): its processes listen, and only on loopback."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_") and k != "RLHF_RAY_LOOPBACK"}
    env.update(PYTHONPATH=str(ROOT), RAY_USAGE_STATS_ENABLED="0")
    out = subprocess.run([sys.executable, "-c", _LOCAL_RAY], cwd=tmp_path, env=env, capture_output=True, text=True,
                         timeout=300)  # fmt: skip
    assert out.returncode == 0, out.stderr[-2000:]
    listening = json.loads(out.stdout.strip().splitlines()[-1])
    assert len({pid for pid, _, _ in listening}) >= 3  # the driver, the GCS, the raylet and more: Ray's own servers
    beyond = [(pid, ip, port) for pid, ip, port in listening if ip not in LOOPBACK]
    assert beyond == []
