"""What the eval stage publishes: per-model summary rows, the markdown table, report.json and win_rates.png."""

from __future__ import annotations

import json
from pathlib import Path

from stages.eval.metrics import mean, win_rate_matrix

# per-model numbers, in table order: (key, column header, format)
COLUMNS = [
    ("gold_score", "gold", "{:+.3f}"),
    ("win_rate_vs_sft", "win rate vs SFT", "{:.3f}"),
    ("function_pass_rate", "functions pass", "{:.3f}"),
    ("rm_score", "RM score", "{:+.3f}"),
    ("kl", "KL to SFT (nats)", "{:.3f}"),
    ("reply_length", "length (tokens)", "{:.1f}"),
]


def model_summary(rows: dict[str, list], gold: list[float] | None, formats: list[bool] | None) -> dict:
    """One model's means over its replies; gold_score and format_rate are None off the demo task."""
    return {
        "gold_score": mean(gold) if gold is not None else None,
        "format_rate": mean([float(f) for f in formats]) if formats is not None else None,
        "rm_score": mean(rows["rm_score"]) if rows["rm_score"] and rows["rm_score"][0] is not None else None,
        "kl": mean(rows["kl"]),
        "reply_length": mean([float(n) for n in rows["length"]]),
        "eos_rate": mean([float(e) for e in rows["ended"]]),
        "replies": len(rows["rm_score"]),
    }


def function_summary(scores: dict[str, list], thresholds: dict[str, float]) -> dict:
    """One model's reward-function numbers: `fn/<label>` (mean), `fn/<label>/pass` (share at or above its threshold,
    pass@1) and `function_pass_rate` (share of replies passing every function that scored them)."""
    out: dict = {}
    for label, values in scores.items():
        scored = [v for v in values if v is not None]
        out[f"fn/{label}"] = mean(scored) if scored else None
        out[f"fn/{label}/pass"] = mean([float(v >= thresholds[label]) for v in scored]) if scored else None
    n = len(next(iter(scores.values())))
    passed = []
    for i in range(n):
        row = {label: values[i] for label, values in scores.items() if values[i] is not None}
        passed.append(float(bool(row) and all(v >= thresholds[label] for label, v in row.items())))
    out["function_pass_rate"] = mean(passed)
    return out


def win_rates(per_reply: dict[str, list[float]], baseline: str) -> tuple[dict[str, dict[str, float]], dict[str, float]]:
    """The pairwise matrix and each model's row against the baseline (the baseline against itself: 0.5)."""
    matrix = win_rate_matrix(per_reply)
    return matrix, {name: matrix[name][baseline] for name in per_reply}


def summary_table(summaries: dict[str, dict]) -> str:
    """A markdown table: one row per model (in order), the COLUMNS as numbers, "n/a" where a metric does not apply."""
    # a column no model has a value for (functions pass without functions, RM score without a reward model) is left out
    columns = [c for c in COLUMNS if any(s.get(c[0]) is not None for s in summaries.values())]
    lines = ["| model | " + " | ".join(h for _, h, _ in columns) + " |", "|---" * (len(columns) + 1) + "|"]
    for name, s in summaries.items():
        cells = ["n/a" if s.get(k) is None else fmt.format(s[k]) for k, _, fmt in columns]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def headline(summaries: dict[str, dict]) -> str:
    """One log line: each model's gold (when there is one), RM score, win rate over SFT and KL."""
    parts = []
    for name, s in summaries.items():
        gold = "" if s["gold_score"] is None else f"gold {s['gold_score']:+.3f} "
        passed = "" if s.get("function_pass_rate") is None else f"pass {s['function_pass_rate']:.3f} "
        rm = "" if s["rm_score"] is None else f"rm {s['rm_score']:+.3f} "
        parts.append(f"{name} {passed}{gold}{rm}win {s['win_rate_vs_sft']:.3f} kl {s['kl']:.3f}")
    return "; ".join(parts)


def matrix_table(matrix: dict[str, dict[str, float]]) -> str:
    """The win-rate matrix in markdown: the row model's win rate over the column model."""
    names = list(matrix)
    lines = ["| row beats column | " + " | ".join(names) + " |", "|---" * (len(names) + 1) + "|"]
    lines += [f"| {a} | " + " | ".join(f"{matrix[a][b]:.3f}" for b in names) + " |" for a in names]
    return "\n".join(lines)


def reply_rows(prompts: list[str], replies: list[str], numbers: dict[str, list], gold: list[float] | None) -> list:
    """Every reply of one model with its numbers, in prompt order (sample j of prompt p at p * k + j)."""
    return [
        {"prompt": p, "reply": t, "rm_score": numbers["rm_score"][i], "kl": numbers["kl"][i],
         "length": numbers["length"][i], "gold_score": gold[i] if gold is not None else None}
        for i, (p, t) in enumerate(zip(prompts, replies, strict=True))
    ]  # fmt: skip


def side_by_side(prompts: list[str], replies: dict[str, list[str]], scores: dict[str, list[float]], count: int,
                 samples_per_prompt: int) -> list[dict]:  # fmt: skip
    """The first `count` prompts with every model's first reply and its score (gold, else reward model)."""
    shown = []
    for p in range(min(count, len(prompts))):
        i = p * samples_per_prompt
        by_model = {m: {"reply": replies[m][i], "score": scores[m][i]} for m in replies}
        shown.append({"prompt": prompts[p], "replies": by_model})
    return shown


def markdown_report(report: dict) -> str:
    """report.md: what was evaluated, the summary table, the win-rate matrix and the samples."""
    by = report["win_rates"]["by"]
    s = report["settings"]
    out = [
        "# Evaluation on held-out prompts",
        "",
        f"{report['prompts']} prompts x {s['samples_per_prompt']} sampled replies per model (temperature "
        f"{s['temperature']}, at most {s['max_new_tokens']} new tokens, seed {s['seed']}); win rates by "
        f"{'gold score' if by == 'gold' else 'reward-model score'}, ties counting half; KL is log p_model - log p_sft "
        "summed over each reply, averaged.",
        "",
        summary_table(report["summaries"]),
        "",
        "## Win rates",
        "",
        matrix_table(report["win_rates"]["matrix"]),
        "",
        "## Samples",
    ]
    for sample in report["samples"]:
        out += ["", f"**Prompt:** {json.dumps(sample['prompt'], ensure_ascii=False)}", ""]
        out += [f"- {m}: {json.dumps(r['reply'], ensure_ascii=False)} ({r['score']:+.3f})"
                for m, r in sample["replies"].items()]  # fmt: skip
    return "\n".join(out) + "\n"


def write_plot(report: dict, path: Path) -> None:
    """win_rates.png: gold and RM score per model (bars), and the pairwise win-rate heatmap."""
    import matplotlib

    matplotlib.use("Agg")  # no display on workers and CI boxes
    import matplotlib.pyplot as plt

    names = list(report["summaries"])
    fig, (bars, heat) = plt.subplots(1, 2, figsize=(12, 4.8))
    x = range(len(names))
    series = [("function_pass_rate", "functions pass rate"), ("rm_score", "RM score"), ("gold_score", "gold score")]
    series = [(k, label) for k, label in series if all(report["summaries"][n].get(k) is not None for n in names)]
    width = 0.8 / max(1, len(series))
    for j, (key, label) in enumerate(series):
        bars.bar([i + (j - (len(series) - 1) / 2) * width for i in x],
                 [report["summaries"][n][key] for n in names], width, label=label)  # fmt: skip
    bars.set_xticks(list(x), names, rotation=20)
    bars.axhline(0, color="black", linewidth=0.6)
    bars.set_title("mean score per model")
    bars.legend()
    bars.grid(axis="y", alpha=0.3)
    matrix = report["win_rates"]["matrix"]
    values = [[matrix[a][b] for b in names] for a in names]
    image = heat.imshow(values, vmin=0, vmax=1, cmap="RdYlGn")
    heat.set_xticks(list(x), names, rotation=20)
    heat.set_yticks(list(x), names)
    for i, row in enumerate(values):
        for j, v in enumerate(row):
            heat.text(j, i, f"{v:.2f}", ha="center", va="center", fontsize=9)
    heat.set_title(f"win rate of row over column (by {report['win_rates']['by']})")
    fig.colorbar(image, ax=heat)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def write_files(report: dict, out: Path) -> None:
    """report.json, report.md and win_rates.png into `out`."""
    (out / "report.json").write_text(json.dumps(report, indent=1, ensure_ascii=False) + "\n")
    (out / "report.md").write_text(markdown_report(report))
    write_plot(report, out / "win_rates.png")


def flat_metrics(summaries: dict[str, dict]) -> dict:
    """Manifest metrics: `<model>.<metric>` for every model and metric, e.g. `ppo.gold_score`."""
    return {f"{name}.{key}": value for name, s in summaries.items() for key, value in s.items()}
