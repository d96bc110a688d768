"""Where a stage's Ray Train workers ran: each rank's record (taken in the worker) and the console line (driver).

A worker group restarted after a lost node sends its records again; the line describes the last group and counts
the restarts before it. The RL stage's actors say the same per role (`stages/rl/report.placement_line`).
"""

from __future__ import annotations

import os


def describe_placements(placements: list[dict]) -> str:
    """'ran on 2 nodes (1a2b3c4d: ranks 0; 5e6f7a8b: ranks 1)': the nodes of the last worker group to start, plus
    how many groups started before it (a restart after a lost worker)."""
    groups: list[list[dict]] = [[]]
    for p in placements:
        if any(q["rank"] == p["rank"] for q in groups[-1]):
            groups.append([])  # a rank seen again: the worker group was restarted
        groups[-1].append(p)
    last = groups[-1]
    nodes: dict[str, list[int]] = {}
    for p in sorted(last, key=lambda p: p["rank"]):
        nodes.setdefault(p["node_id"][:8], []).append(p["rank"])
    where = "; ".join(f"{n}: ranks {', '.join(map(str, r))}" for n, r in nodes.items())
    restarts = f", after {len(groups) - 1} restart(s) of the worker group" if len(groups) > 1 else ""
    return f"{len(last)} workers ran on {len(nodes)} node(s) ({where}){restarts}"


def worker_placement() -> dict:
    """Where this process runs in the Ray cluster: the node's id and address and the process id."""
    import ray

    return {"node_id": ray.get_runtime_context().get_node_id(), "node_ip": ray.util.get_node_ip_address(),
            "pid": os.getpid()}
