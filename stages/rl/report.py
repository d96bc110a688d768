"""What the RL stage writes next to the policy weights: metrics.jsonl, curves.png, samples.json, and log lines."""

from __future__ import annotations

import json
from pathlib import Path

CURVES = [  # (title, metric keys drawn on one panel)
    ("reward, reward-model and gold score", ["reward_score", "rm_score", "gold_score"]),
    ("KL to reference (nats / reply)", ["kl"]),
    ("policy loss", ["policy_loss"]),
    ("value loss (ppo), KL loss (kl_penalty loss)", ["value_loss", "kl_loss"]),
    ("entropy, clip fraction, approx KL", ["entropy", "clip_frac", "approx_kl"]),
    ("response length (tokens)", ["response_length"]),
]


def log_line(m: dict, total: int, algorithm: str = "ppo") -> str:
    """One progress line per iteration, prefixed by the algorithm (the critic's and the KL loss only where present)."""
    gold = f" gold {m['gold_score']:+.3f}" if "gold_score" in m else ""
    vf = f" vf {m['value_loss']:.4f}" if "value_loss" in m else ""
    kl_loss = f" kl_loss {m['kl_loss']:.4f}" if "kl_loss" in m else ""
    flat = f" flat {m['flat_group_frac']:.2f}" if "flat_group_frac" in m else ""
    rm = f"rm {m['rm_score']:+.3f}" if "rm_score" in m else f"reward {m['reward_score']:+.3f}"
    functions = "".join(f" {k[3:-5]} {v:.2f}" for k, v in m.items() if k.startswith("fn/") and k.endswith("/pass"))
    return (
        f"{algorithm} iter {m['iteration']}/{total}: {rm}{functions}{gold} kl {m['kl']:.3f} "
        f"ent {m['entropy']:.2f} clip {m['clip_frac']:.3f} approx_kl {m['approx_kl']:.4f} "
        f"pg {m['policy_loss']:+.4f}{vf}{kl_loss}{flat} len {m['response_length']:.1f} | "
        f"gen {m['seconds_generation']:.1f}s score {m['seconds_scoring']:.1f}s train {m['seconds_training']:.1f}s"
    )


def placement_line(placements: dict[str, list[dict]]) -> str:
    """'actors on 2 node(s): policy 1a2b3c4d, critic 5e6f7a8b, ...' (node ids cut to 8 characters)."""
    nodes = {p["node_id"] for actors in placements.values() for p in actors}
    roles = ", ".join(f"{role} {'+'.join(p['node_id'][:8] for p in actors)}" for role, actors in placements.items())
    return f"actors on {len(nodes)} node(s): {roles}"


def write_curves(history: list[dict], path: Path) -> None:
    """curves.png: reward, gold score, KL, losses and policy statistics per iteration."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 3, figsize=(13, 7))
    x = [m["iteration"] for m in history]
    for ax, (title, keys) in zip(axes.flat, CURVES, strict=True):
        if title.startswith("reward,") and history:  # each reward function's pass rate beside the scores
            keys = keys + [k for k in history[0] if k.startswith("fn/") and k.endswith("/pass")]
        drawn = [key for key in keys if history and key in history[0]]
        for key in drawn:
            ax.plot(x, [m[key] for m in history], label=key, marker=".")
        ax.set_title(title)
        ax.set_xlabel("iteration")
        ax.grid(alpha=0.3)
        if len(keys) > 1 and drawn:
            ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)


def write_samples(before: list[dict], after: list[dict], count: int, path: Path) -> list[dict]:
    """samples.json: the first `count` held-out prompts with the SFT and PPO replies and their scores side by side."""
    samples = [
        {
            "prompt": b["prompt"],
            "sft_response": b["response"],
            "ppo_response": a["response"],
            "sft_reward": b["reward_score"],
            "ppo_reward": a["reward_score"],
            "sft_rm_score": b["rm_score"],
            "ppo_rm_score": a["rm_score"],
            "sft_functions": b["functions"],
            "ppo_functions": a["functions"],
            "sft_gold_score": b["gold_score"],
            "ppo_gold_score": a["gold_score"],
        }
        for b, a in list(zip(before, after, strict=True))[:count]
    ]
    path.write_text(json.dumps(samples, indent=2, ensure_ascii=False) + "\n")
    return samples
