"""The pipeline's nodes and edges: which stage runs each node, what feeds its inputs, what it publishes.

```
 corpus -> [pretrain]? -> base-model   (or sft.base_model: an imported model)
 sft data -> [sft] -> sft-model -+-> [reward] -> reward-model -+
                                 |                             +-> [ppo] [grpo] [rloo]   (align.methods)
                                 +-> [dpo] (preferences) ------+-> [eval] -> eval-report (align.eval)
```
The alignment methods are sibling branches: each depends only on sft (and reward for the RL ones), so they run
concurrently when the cluster has room for them (flows/schedule.py), and each is cached and rerun on its own. GRPO and RLOO are the
RL stage (stages/rl), each node with its own config section; DPO is its own stage.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from stages.rl.config import METHODS as RL_METHODS  # run by the RL stage, stages/rl
from stages.rl.stage import POLICY_NAMES as RL_POLICY_NAMES

ALIGN_METHODS = (*RL_METHODS, "dpo")
POLICY_NAMES = {**RL_POLICY_NAMES, "dpo": "policy-dpo"}
POLICY_ROLE_PREFIX = "policy_"  # the eval node's inputs: policy_ppo, policy_dpo, ...


@dataclass(frozen=True)
class Node:
    """One node of the DAG. `inputs` maps the stage's input role to ("data", format) or ("output", artifact name)."""

    name: str  # the node's name: a Prefect task, a cache-key namespace, the value of --from / --only
    stage: str  # the stage package that runs it (ppo, grpo and rloo run stages/rl)
    inputs: dict[str, tuple[str, str]] = field(default_factory=dict)
    outputs: tuple[str, ...] = ()  # artifact names it publishes

    @property
    def is_branch(self) -> bool:
        """An alignment method: independent of its siblings."""
        return self.name in ALIGN_METHODS


def _rl_node(method: str) -> Node:
    return Node(method, "rl", {"sft_model": ("output", "sft-model"), "reward_model": ("output", "reward-model"),
                                "prompts": ("data", "prompts")}, (POLICY_NAMES[method],))  # fmt: skip


PRETRAIN = Node("pretrain", "pretrain", {"corpus": ("data", "corpus")}, ("tokenizer", "base-model"))
SFT = Node("sft", "sft", {"base_model": ("output", "base-model"), "data": ("data", "sft")}, ("sft-model",))
REWARD = Node("reward", "reward", {"sft_model": ("output", "sft-model"), "preferences": ("data", "preferences")},
              ("reward-model",))  # fmt: skip
DPO = Node("dpo", "dpo", {"sft_model": ("output", "sft-model"), "preferences": ("data", "preferences")},
           (POLICY_NAMES["dpo"],))  # fmt: skip
ALL_NODE_NAMES = ("pretrain", "sft", "reward", *ALIGN_METHODS, "eval")


def eval_node(methods: list[str]) -> Node:
    """The final node: the SFT model and every policy of the run, scored on the same held-out prompts."""
    inputs = {"sft_model": ("output", "sft-model"), "reward_model": ("output", "reward-model"),
              "prompts": ("data", "prompts")}  # fmt: skip
    for method in methods:
        inputs[POLICY_ROLE_PREFIX + method] = ("output", POLICY_NAMES[method])
    return Node("eval", "eval", inputs, ("eval-report",))


def build(methods: list[str], *, pretrain: bool, evaluate: bool) -> list[Node]:
    """The nodes of one pipeline, in an order where every node comes after what feeds it."""
    nodes = ([PRETRAIN] if pretrain else []) + [SFT, REWARD]
    nodes += [_rl_node(m) if m in RL_METHODS else DPO for m in methods]
    if evaluate:
        nodes.append(eval_node(methods))
    return nodes

