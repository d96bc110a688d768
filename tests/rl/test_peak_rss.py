"""The actors' peak memory the RL stage records (`timings.peak_rss_mib`): each actor reads its own ru_maxrss in bytes,
the pool sums a role's actors, the stage adds the total."""

from __future__ import annotations

import resource
import sys

from stages.rl.actor_pool import ActorPool, RoleGroup
from stages.rl.actors import PolicyActor, _Role
from stages.rl.stage import _mib


def test_a_role_reports_its_process_peak_rss_in_bytes():
    role = object.__new__(PolicyActor)  # the method reads the process, not the actor's state
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    expected = peak if sys.platform == "darwin" else peak * 1024
    got = role.peak_rss()
    assert isinstance(got, int) and expected <= got < 2**40
    assert got > 50 * 2**20  # this process holds torch: tens of MiB at the least, so the unit is bytes, not KiB
    assert _Role.peak_rss is PolicyActor.peak_rss  # every role has it, from the base class


class _Handle:
    def __init__(self, value: int):
        self.peak_rss = type("M", (), {"remote": staticmethod(lambda: value)})


def test_the_pool_sums_each_roles_actors_and_the_stage_records_mib(monkeypatch):
    import ray

    monkeypatch.setattr(ray, "get", lambda refs: refs)  # the fake handles return values, not object refs
    pool = object.__new__(ActorPool)
    pool.groups = {"policy": RoleGroup("policy", [_Handle(3 * 2**20), _Handle(2**20)]),
                   "reward": RoleGroup("reward", [_Handle(2**19)])}  # fmt: skip
    peak = pool.peak_rss()
    assert peak == {"policy": 4 * 2**20, "reward": 2**19}
    assert _mib({**peak, "total": sum(peak.values())}) == {"policy": 4.0, "reward": 0.5, "total": 4.5}
