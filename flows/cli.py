"""`rlhf`: run the pipeline, inspect artifacts (flows/cli_artifacts.py), write the demo data, sample from a model.

User mistakes end with one line on stderr and exit code 2; a corrupted artifact or a failed run exits 1.
Heavy libraries are imported inside the commands so that `rlhf --help` answers at once.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Any

from flows.cli_artifacts import UsageError, add_artifacts_commands, add_store, named_store, print_json

STAGE_NAMES = ["pretrain", "sft", "reward", "ppo", "grpo", "rloo", "dpo", "eval"]  # flows/dag.py ALL_NODE_NAMES


# --- commands -------------------------------------------------------------------------------------------------------


def cmd_run(args: argparse.Namespace) -> int:
    from flows.cached import answer_from_cache
    from flows.plan import plan_run

    if args.verbose:
        os.environ["RLHF_VERBOSE"] = "1"  # read by stages.common.ray_train when Ray starts

    inputs = {}
    for item in args.input or []:
        role, sep, ref = item.partition("=")
        if not sep or not role or not ref:
            raise UsageError(f"--input {item!r}: expected ROLE=REF, e.g. --input sft_model=sft-model@v2")
        inputs[role] = ref
    if inputs and not args.only:
        raise UsageError("--input is only meaningful with --only STAGE")
    params = dict(preset=args.preset, config_file=args.config, overrides=args.set or [], store=args.store,
                  from_stage=args.from_stage, only=args.only, inputs=inputs, force=args.force)  # fmt: skip
    plan = plan_run(params)  # every check, once; the cache answer and the flow take the plan as it is
    if args.dry_run:
        from flows.cached import dry_run, dry_run_text

        report = dry_run(plan)
        if args.json:
            print_json(report)
        else:
            print(dry_run_text(report))
        return 0
    # Nothing to run? Then answer from the store, without starting Prefect or Ray (a no-op rerun in seconds).
    summary = answer_from_cache(plan)
    if summary is None:
        from flows.pipeline import run_pipeline

        summary = run_pipeline(plan)
    if args.json:
        print_json(summary)
    else:
        _print_run_summary(summary, plan.store)
    return 0


def cmd_sweep(args: argparse.Namespace) -> int:
    from flows.sweep import plan_sweep, run_sweep

    if args.verbose:
        os.environ["RLHF_VERBOSE"] = "1"
    params = dict(preset=args.preset, config_file=args.config, overrides=args.set or [], store=args.store)
    flags = {"grid": args.grid, "choice": args.choice, "uniform": args.uniform, "loguniform": args.loguniform,
             "samples": args.samples, "metric": args.metric, "mode": args.mode, "max_trials": args.max_trials,
             "scheduler": args.scheduler}  # fmt: skip
    plan = plan_sweep(params, flags)  # every check before Prefect, Ray or Tune start
    log = (lambda line: print(line, file=sys.stderr)) if args.json else print
    report = run_sweep(plan, promote=args.promote, log=log)
    if args.json:
        print_json(report)
    else:
        from flows.sweep_report import markdown

        print("\n" + markdown(report), end="")
        print(f"\n{report['ref']}: rlhf artifacts show {report['ref']}")
    return 0 if report["best"] else 1


def _print_run_summary(summary: dict[str, Any], store) -> None:
    """The end of `rlhf run` on the terminal: per stage, reused or ran, what it produced and its headline metrics."""
    from stages.common.redact import redact_credentials

    print(
        f"\npipeline finished in {summary['wall_seconds']:.1f} s, orchestration overhead "
        f"{summary['orchestration_overhead_seconds']:.1f} s (store: {redact_credentials(summary['store'])})"
    )
    if summary.get("prefect") == "not started":
        print("  nothing to run: every stage's artifacts for its cache key are in the store (Prefect not started)")
    for name, reason in summary.get("skipped", {}).items():
        print(f"  {name:<8} {'Skipped':<9} not run: {reason}")
    report = None
    for name, info in summary["stages"].items():
        for ref in info["outputs"].values():
            art = store.get(ref)
            if art.kind == "eval-report":
                report = art
            keys = HEADLINE_METRICS.get(
                art.name.split("@")[0], HEADLINE_METRICS["policy"] if art.name.startswith("policy") else ()
            )
            shown = ", ".join(_metric_text(k, art.metrics[k]) for k in keys if art.metrics.get(k) is not None)
            print(f"  {name:<8} {info['state']:<9} {ref:<20} {shown}")
    if report is not None and (Path(report.path) / "report.md").is_file():
        print(f"\n{report.ref}:\n" + "\n".join(_first_table((Path(report.path) / "report.md").read_text())))
    print("\nevery metric: rlhf artifacts show REF")


# What the end-of-run summary shows per artifact (`rlhf artifacts show REF` has them all).
HEADLINE_METRICS = {
    "tokenizer": ("vocab_size",),
    "base-model": ("val_perplexity", "unigram_perplexity", "tokens_per_second", "mfu"),
    "sft-model": ("eval_loss", "format_rate", "gold_score"),
    "reward-model": ("eval_accuracy", "gold_correlation"),
    "policy-dpo": ("eval_reward_accuracy", "format_rate", "gold_score"),
    "policy": ("gold_score_before", "gold_score_after", "gold_win_rate", "rm_score_before", "rm_score_after", "kl"),
    "eval-report": (),
}


def _first_table(markdown: str) -> list[str]:
    """The first markdown table of a report (the per-model summary), without the prose and samples around it."""
    lines = markdown.splitlines()
    start = next((i for i, line in enumerate(lines) if line.startswith("|")), len(lines))
    end = next((i for i in range(start, len(lines)) if not lines[i].startswith("|")), len(lines))
    return lines[start:end]


def _metric_text(key: str, value: Any) -> str:
    return f"{key}={value:.4g}" if isinstance(value, float) else f"{key}={value}"


def cmd_config(args: argparse.Namespace) -> int:
    import yaml

    from flows.config import load_config

    cfg = load_config(args.preset, args.config, args.set or [])
    print(yaml.safe_dump(cfg.to_dict(), sort_keys=False), end="")
    return 0


def cmd_data_demo(args: argparse.Namespace) -> int:
    from stages.data.demo import DemoConfig, generate, write_jsonl_dir

    cfg = DemoConfig(seed=args.seed, size=args.size)
    sets = generate(cfg)
    write_jsonl_dir(sets, args.out)
    for name, splits in sets.items():
        print(f"{args.out}/{name}: " + ", ".join(f"{split} {len(rows)} rows" for split, rows in splits.items()))
    return 0


def cmd_generate(args: argparse.Namespace) -> int:
    from flows.generate import generate_text

    for text in generate_text(
        named_store(args).get(args.ref),
        args.prompt,
        max_new_tokens=args.max_new_tokens,
        temperature=args.temperature,
        num_samples=args.num_samples,
        seed=args.seed,
    ):
        print(text)
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    from flows.eval_command import evaluate_refs
    from stages.eval.report import summary_table

    log = (lambda line: print(line, file=sys.stderr)) if args.json else print
    artifact, report = evaluate_refs(named_store(args), args.refs, sft=args.sft, reward_model=args.reward_model,
                                     prompts=args.prompts, log=log)  # fmt: skip
    if args.json:
        print_json({"ref": artifact.ref, "path": artifact.path, **report})
    else:
        print(summary_table(report["summaries"]))
        print(f"published {artifact.ref} ({artifact.path})")
    return 0


# --- parser ---------------------------------------------------------------------------------------------------------


class _Parser(argparse.ArgumentParser):
    """argparse with the CLI's one error line: usage first, then `error: ...` last (exit 2), like every user error."""

    def error(self, message: str):
        self.print_usage(sys.stderr)
        self.exit(2, f"error: {self.prog}: {message}\n")


def _add_config(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--preset",
        default="demo",
        choices=["tiny", "demo", "single-gpu", "gpu-cluster"],
        help="base preset (default demo)",
    )
    p.add_argument("--config", help="YAML file merged over the preset")
    p.add_argument("--set", action="append", metavar="KEY=VALUE", help="override one key, e.g. --set sft.max_steps=50")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="rlhf", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("run", help="run the pipeline (cached stages are reused)")
    _add_config(p)
    add_store(p)
    group = p.add_mutually_exclusive_group()
    group.add_argument("--from", dest="from_stage", choices=STAGE_NAMES, help="force this stage and all downstream")
    group.add_argument("--only", choices=STAGE_NAMES, help="run one stage on explicit --input artifacts")
    group.add_argument("--force", action="store_true", help="rerun every stage")
    p.add_argument("--input", action="append", metavar="ROLE=REF", help="with --only: an input artifact per role")
    p.add_argument("--json", action="store_true", help="print the run summary (or the --dry-run plan) as JSON")
    p.add_argument(
        "--dry-run",
        action="store_true",
        help="print the plan (per stage: reused or run, and why) without starting Prefect or Ray or publishing",
    )
    p.add_argument(
        "--verbose",
        action="store_true",
        help="show the workers' own output (Ray, DeepSpeed, HF) instead of writing it to run.work_dir logs",
    )
    p.set_defaults(func=cmd_run)

    p = sub.add_parser("sweep", help="run variants of a stage as Ray Tune trials (sibling branches) and rank them")
    _add_config(p)
    add_store(p)
    for kind, example in (("grid", "'reward.learning_rate=[3e-4,1e-3]'"), ("choice", "'dpo.beta=[0.05,0.1]'"),
                          ("uniform", "'ppo.kl_coef=[0.01,0.2]'"), ("loguniform", "'sft.learning_rate=[1e-4,1e-2]'")):
        p.add_argument(f"--{kind}", action="append", metavar="KEY=[...]", help=f"a {kind} dimension, e.g. {example}")
    p.add_argument("--samples", type=int, help="Tune's num_samples: grid repeats, or random trials (default 1)")
    p.add_argument("--metric", help="NODE.METRIC to rank by, e.g. eval.ppo.gold_score (default: see the docs)")
    p.add_argument("--mode", choices=["max", "min"], help="the metric's direction")
    p.add_argument("--max-trials", type=int, help="refuse a space with more trials (default 16)")
    p.add_argument("--scheduler", choices=["fifo", "asha"], help="asha: stop trials early on their RL iterations")
    p.add_argument("--promote", action="store_true", help="alias the best trial's artifacts NAME@best")
    p.add_argument("--json", action="store_true", help="print the sweep report as JSON (progress goes to stderr)")
    p.add_argument("--verbose", action="store_true", help="show the workers' own output")
    p.set_defaults(func=cmd_sweep)

    p = sub.add_parser("config", help="print the resolved config")
    _add_config(p)
    p.set_defaults(func=cmd_config)

    add_artifacts_commands(sub)

    data = sub.add_parser("data", help="data utilities").add_subparsers(
        dest="data_command", required=True, metavar="ACTION"
    )
    p = data.add_parser("demo", help="write the built-in demo task's four data sets as jsonl")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--size", default="demo", choices=["tiny", "demo"])
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=cmd_data_demo)

    p = sub.add_parser("generate", help="sample from a causal-LM artifact (base-model, sft-model or policy)")
    p.add_argument("ref", help="e.g. policy@latest")
    p.add_argument("--prompt", required=True, help='plain text; the demo task uses "User: ...\\nAssistant:"')
    p.add_argument("--max-new-tokens", type=int, default=32)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    p.add_argument("--num-samples", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)
    add_store(p)
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser("eval", help="score causal-LM artifacts and the SFT model on the same held-out prompts")
    p.add_argument("refs", nargs="+", metavar="REF", help="causal-lm artifacts to evaluate, e.g. policy@latest")
    p.add_argument("--sft", default="sft-model@latest", help="the baseline (default sft-model@latest)")
    p.add_argument("--reward-model", default="reward-model@latest", help="default reward-model@latest")
    p.add_argument(
        "--prompts", default="prompt-data@latest", help="dataset whose test split is used (default prompt-data@latest)"
    )
    add_store(p)
    p.add_argument("--json", action="store_true", help="print report.json (progress goes to stderr)")
    p.set_defaults(func=cmd_eval)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from stages.common.config import ConfigError
    from stages.common.errors import StageInputError
    from stages.common.gates import GateFailed
    from stages.common.redact import redact_credentials
    from stages.common.store import ArtifactCorrupted, ArtifactError

    try:
        from stages.data.read import DataError
    except ImportError:  # pragma: no cover - data module always ships
        DataError = ValueError  # noqa: N806
    try:
        return args.func(args)
    except ArtifactCorrupted as e:
        print(redact_credentials(f"error: {e}"), file=sys.stderr)
        return 1
    except (UsageError, ConfigError, ArtifactError, DataError, StageInputError, GateFailed) as e:
        print(redact_credentials(f"error: {e}"), file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
