"""Where a stage's workers ran, as the console line says it: by hand-made placement records (the real records are
asserted in test_ray_train.py and the multi-node system test)."""

from __future__ import annotations

from stages.common.placements import describe_placements
from stages.rl.report import placement_line


def _p(rank: int, node: str, pid: int) -> dict:
    return {"rank": rank, "node_id": node * 4, "node_ip": "127.0.0.1", "pid": pid}


def test_two_ranks_on_two_nodes():
    assert describe_placements([_p(1, "bb", 11), _p(0, "aa", 10)]) == "2 workers ran on 2 node(s) (aaaaaaaa: ranks 0; bbbbbbbb: ranks 1)"


def test_a_restarted_group_is_described_by_its_last_start():
    first = [_p(0, "aa", 10), _p(1, "bb", 11)]
    again = [_p(0, "aa", 20), _p(1, "aa", 21)]  # node bb was lost; both ranks came back on aa
    assert describe_placements(first + again) == (
        "2 workers ran on 1 node(s) (aaaaaaaa: ranks 0, 1), after 1 restart(s) of the worker group")


def test_rl_roles_line_names_each_roles_nodes():
    placements = {"policy": [_p(0, "aa", 1)], "critic": [_p(0, "bb", 2)], "reward": [_p(0, "aa", 3), _p(1, "bb", 4)]}
    assert placement_line(placements) == (
        "actors on 2 node(s): policy aaaaaaaa, critic bbbbbbbb, reward aaaaaaaa+bbbbbbbb")
