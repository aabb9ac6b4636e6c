"""P6b: growth operators on run-wide schedules, at equal compute. P6's protocol (every arm at
every learning rate and seed, each arm reported at its best LR, a corpus larger than the
token budget) with one schedule over the whole run (`lr_schedule: wsd` and `run_cosine`)
and the literature's operators under `trunk_strategy: full`: `new_stack_init` copy (stack
k-1), copy_trunk (G_stack: the whole trunk, in order) and identity (new blocks start as the
identity), against the end-to-end baseline on the same schedule over its own steps,
matched on FLOPs and optimizer steps. Stacks of 1, 1 and 2 blocks
(experiments/compare_operators.yaml), so copy and copy_trunk differ at the last growth.

The corpus is the running Python's standard library as JSONL, built in a temporary
directory and deleted afterwards. Per schedule one sweep; FLOPs to reach the baseline's
final loss are given on the mean curve and per seed (mean ± std over the seeds that reach
it), and so are the tokens to reach it (each trial's tokens per step times the interpolated
step): growth buys cheaper steps, so the FLOPs view and the equal-tokens view can disagree.
The runs behind docs/benchmarks.md are kept in benchmarks/kept/p6b/ (`--from` reports them
again without running).

    python benchmarks/quality_growth.py              # the full protocol: 2 schedules x 4 arms x 5 LRs x 3 seeds
                                                     # = 120 trials (2-2.7 hours on 2 CPUs: 62-80 min
                                                     # a schedule; the operators share phase 0)
    python benchmarks/quality_growth.py --schedules wsd --lrs 2e-3 --seeds 0 --steps 30   # a reduced run
    python benchmarks/quality_growth.py --from DIR   # the report again, from a run made with --keep DIR
    python benchmarks/quality_growth.py --schedules wsd --keep A     # a schedule at a time ...
    python benchmarks/quality_growth.py --schedules run_cosine --keep B
    python benchmarks/quality_growth.py --from A B   # ... reported together
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import sysconfig
import tempfile

import pandas as pd

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import config, keep, kept, run_sweep, write_section  # noqa: E402
from corpus_scale import python_files, write_jsonl  # noqa: E402

from stackwise_ray.report import (  # noqa: E402
    COMPARE_HEADER,
    comparison,
    comparison_rows,
    flops_to_reach,
    weak_evidence,
)

EXPERIMENT = "experiments/compare_operators.yaml"
SCHEDULES = ["wsd", "run_cosine"]
OPERATORS = ["copy", "copy_trunk", "identity"]
LRS = [3e-4, 6e-4, 1e-3, 2e-3, 4e-3]
SEEDS = [0, 1, 2]
STEPS = 150
SEQ_LEN = 128  # the experiment's data.seq_len
VAL_FRACTION = 0.002  # ~440 windows: eval_every evaluates the whole split


def stdlib_corpus(tmp: str) -> str:
    path = os.path.join(tmp, "stdlib.jsonl")
    write_jsonl(path, python_files(sysconfig.get_paths()["stdlib"], ("site-packages", "dist-packages")))
    return path


def sweep_config(corpus: str, schedule: str, operators, lrs, seeds, steps: int, eval_every: int):
    tune = {"lrs": lrs, "seeds": seeds, "baseline": "end_to_end", "baseline_match": "flops_and_steps",
            "search_space": {"training.progressive.new_stack_init": {"grid": list(operators)}}}
    return config({"data": {"source": corpus, "format": "jsonl", "val_fraction": VAL_FRACTION},
                   "training": {"steps_per_stack": steps, "lr_schedule": schedule, "eval_every": eval_every,
                                "progressive": {"trunk_strategy": "full"}},
                   "tune": tune}, base=EXPERIMENT)


def run(tmp: str, args) -> tuple[pd.DataFrame, pd.DataFrame, dict]:
    corpus = stdlib_corpus(tmp)
    results, curves, facts = [], [], {"corpus_mb": os.path.getsize(corpus) / 1e6, "walls": {}}
    for schedule in args.schedules:
        cfg = sweep_config(corpus, schedule, args.operators, args.lrs, args.seeds, args.steps, args.eval_every)
        wall, exp = run_sweep(cfg, f"quality_growth_{schedule}")
        facts["walls"][schedule] = wall
        for name, out in (("results.csv", results), ("curves.csv", curves)):
            df = pd.read_csv(os.path.join(exp, name))
            df["schedule"] = schedule
            df["trial_id"] = schedule + "-" + df["trial_id"].astype(str)
            out.append(df)
    results, curves = pd.concat(results), pd.concat(curves)
    done = results[results["val_loss"].notna()]
    facts["trials"] = len(results)
    facts["train_examples"] = round(float((done["tokens"] / SEQ_LEN / done["epochs"]).dropna().iloc[0]))
    return results, curves, facts


def per_seed_reach(results: pd.DataFrame, curves: pd.DataFrame, rows: list[dict]) -> dict:
    """{arm: {"flops": (mean, std, seeds reaching, seeds), "tokens": (mean, std, ...), "tokens_x":
    mean tokens over the baseline's, or None}}: the
    FLOPs, and the training tokens, at which each of the arm's trials at its best LR first
    reaches the baseline's mean final val_loss. Tokens are the trial's tokens per optimizer
    step times the (interpolated) global step: growth buys cheaper steps, so the two views
    can disagree."""
    base = next((r for r in rows if r["arm"] == "baseline"), None)
    if base is None:
        return {}
    out = {}
    for r in rows:
        trials = results[(results["arm"] == r["arm"]) & results["val_loss"].notna()]
        if r["lr"] is not None and "training.lr" in trials:
            trials = trials[trials["training.lr"] == r["lr"]]
        reached = {"flops": [], "tokens": []}
        for trial in trials.itertuples():
            c = curves[curves["trial_id"] == trial.trial_id].sort_values("global_step")
            losses = c["val_loss"].tolist()
            f = flops_to_reach(c["flops"].tolist(), losses, base["val_loss_mean"]) if len(c) else None
            step = flops_to_reach(c["global_step"].tolist(), losses, base["val_loss_mean"]) if len(c) else None
            if f is not None:
                reached["flops"].append(f)
                reached["tokens"].append(step * trial.tokens / trial.steps)
        out[r["arm"]] = {k: spread(v, len(trials)) for k, v in reached.items()}
        out[r["arm"]]["tokens_x"] = out[r["arm"]]["tokens"][0] / base["tokens"] if reached["tokens"] else None
    return out


def spread(values: list[float], total: int) -> tuple[float, float, int, int]:
    s = pd.Series(values, dtype=float)
    return s.mean(), s.std(ddof=1) if len(s) > 1 else float("nan"), len(s), total


def markdown_table(rows: list[dict], reach: dict) -> str:
    header = [*COMPARE_HEADER, "FLOPs to reach, per seed (mean ± std, reached/seeds)",
              "tokens to reach, per seed (mean ± std, x the baseline's tokens)"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    empty = {"flops": (float("nan"), float("nan"), 0, 0), "tokens": (float("nan"), float("nan"), 0, 0), "tokens_x": None}
    for r, cells in zip(rows, comparison_rows(rows)):
        arm = reach.get(r["arm"], empty)
        ratio = f" ({arm['tokens_x']:.2f}x)" if arm["tokens_x"] is not None else ""
        lines.append("| " + " | ".join([*cells, per_seed_cell(arm["flops"]), per_seed_cell(arm["tokens"]) + ratio]) + " |")
    return "\n".join(lines)


def per_seed_cell(stats: tuple[float, float, int, int]) -> str:
    mean, std, n, total = stats
    return "-" if n == 0 else f"{mean:.3g} ± {'-' if pd.isna(std) else f'{std:.2g}'} ({n}/{total})"


def command(a: dict) -> str:
    return ("python benchmarks/quality_growth.py --schedules " + " ".join(a["schedules"]) + " --operators "
            + " ".join(a["operators"]) + " --lrs " + " ".join(f"{x:g}" for x in a["lrs"]) + " --seeds "
            + " ".join(map(str, a["seeds"])) + f" --steps {a['steps']} --eval-every {a['eval_every']}")


def reductions(a: dict) -> list[str]:
    """How the run `a` (its arguments) falls short of the protocol."""
    full = {"operators": OPERATORS, "lrs": LRS, "seeds": SEEDS, "steps": STEPS}
    return [f"{k} {a[k]} (protocol: {v})" for k, v in full.items() if a[k] != v]


def sentence(text: str) -> str:
    return text[:1].upper() + text[1:]


def caveats(a: dict) -> list[str]:
    """What each of run `a`'s reductions costs the reader."""
    out = []
    if len(a["lrs"]) < len(LRS):
        out.append("with fewer LRs than the protocol an arm's best LR may lie outside those it ran (a line under "
                   "the table says so where a best LR is at the grid's edge)")
    if len(a["seeds"]) < 3:
        out.append("with fewer than 3 seeds there is no interval")
    if a["steps"] < STEPS:
        out.append("with fewer steps the schedules are mostly warmup and decay")
    if set(a["operators"]) != set(OPERATORS):
        out.append(f"operators {sorted(set(OPERATORS) - set(a['operators']))} not run")
    return out


def tokens_to_reach_ratios(reach: dict) -> list[float]:
    """Each operator arm's mean tokens to reach the baseline's final loss, over the baseline's tokens."""
    return [v["tokens_x"] for arm, v in reach.items() if arm != "baseline" and v["tokens_x"] is not None]


def equal_tokens(ratios: list[float]) -> str:
    """The sentence on the equal-tokens view (column *tokens to reach*)."""
    if not ratios:
        return "No arm reached the baseline's final loss, so there is no equal-tokens view."
    verdict = ("so per token of training the arms learn no faster than the baseline: the saving is in FLOPs per token"
               if min(ratios) >= 1 else "so some arm also needs fewer tokens than the baseline to get there")
    return (f"Put on equal tokens (column *tokens to reach*), the arms reach the baseline's final loss after "
            f"{min(ratios):.2f}-{max(ratios):.2f}x the tokens the baseline trained on, {verdict}.")


def tokens_ratio(results: pd.DataFrame) -> float:
    """Tokens an operator arm trained on, over the baseline's (both means over trials)."""
    done = results[results["val_loss"].notna()]
    return done[done["kind"] != "baseline"]["tokens"].mean() / done[done["kind"] == "baseline"]["tokens"].mean()


def still_falling(curves: pd.DataFrame) -> tuple[int, int]:
    """(trials whose last validation loss is below the one before it, trials)."""
    last_two = curves.sort_values("global_step").groupby("trial_id")["val_loss"].apply(lambda v: list(v)[-2:])
    return sum(len(v) == 2 and v[1] < v[0] for v in last_two), len(last_two)


def report(results: pd.DataFrame, curves: pd.DataFrame, facts: dict) -> str:
    runs = facts["runs"]  # [arguments of each run]: one run, or one per schedule (--from A B)
    a = runs[0]
    schedules = [s for r in runs for s in r["schedules"]]
    by_schedule = {s: r for r in runs for s in r["schedules"]}
    missing = [s for s in SCHEDULES if s not in schedules]
    parts = [
        "The run" + ("s" if len(runs) > 1 else "") + ": " + "; ".join(f"`{command(r)}`" for r in runs) + "."
        + (" Their tables are kept in " + ", ".join(f"`{d}`" for d in facts["sources"]) + " (`--from` reports them "
           "again)." if facts.get("sources") else ""),
        f"`{EXPERIMENT}` with `trunk_strategy: full` (d_model 128, 4 heads, 3 stacks of 1, 1 and 2 blocks, seq_len "
        f"128, byte tokenizer, batch 16, {a['steps']} steps per stack, 20 warmup steps once per run, validation "
        f"every {a['eval_every']} steps on the whole validation split) on the standard library's `.py` files as "
        f"JSONL ({facts['corpus_mb']:.1f} MB, {facts['train_examples']:,} training windows, val_fraction "
        f"{VAL_FRACTION}). Operators {a['operators']}, each against the end-to-end baseline on the same schedule "
        f"over its own steps, matched on FLOPs and optimizer steps: {facts['trials']} trials, "
        + ", ".join(f"{s} {w / 60:.0f} min" for s, w in facts["walls"].items()) + "."
        + (f" **Not run: {missing}** (the protocol has both schedules)." if missing else ""),
    ]
    token_ratios = []
    for schedule in schedules:
        r = by_schedule[schedule]
        reduced = reductions(r)
        res, cur = results[results["schedule"] == schedule], curves[curves["schedule"] == schedule]
        rows = comparison(res, cur)
        lines = weak_evidence(rows)
        reach = per_seed_reach(res, cur, rows)
        token_ratios += tokens_to_reach_ratios(reach)
        parts.append(
            f"**lr_schedule: {schedule}**, LRs {r['lrs']} x seeds {r['seeds']}"
            + (f". **A REDUCED run, not the protocol**: {'; '.join(reduced)}. " + sentence("; ".join(caveats(r))) if reduced
               else " (the protocol)")
            + ". Difference: arm minus baseline, nats, Welch 95% CI over seeds; FLOPs to reach: where the arm's "
            f"curve first reaches the baseline's mean final val_loss:\n\n{markdown_table(rows, reach)}"
            + ("\n\n" + "\n".join(f"- {line}" for line in lines) if lines else ""))
    parts.append(
        "What this does not show: one small model (3 stacks, 4 blocks in all) and one short run per arm; one corpus "
        "(Python source); CPU float32. Matching FLOPs and steps gives the baseline a smaller batch (the whole "
        f"rack costs more per example than a growing one), so it sees fewer tokens (column *tokens*: the arms "
        f"trained on {tokens_ratio(results):.2f}x the baseline's). That is where growth's saving comes from (its "
        "early steps are cheaper). " + equal_tokens(token_ratios) + " Every run "
        f"is short ({a['steps'] * 3} steps, under a tenth of an epoch) and its loss is still falling at the end "
        f"({'{} of {}'.format(*still_falling(curves))} trials lower at their last evaluation than at the one before): "
        "whether the gap closes with longer training, as \"No Train No Gain\" (Kaddour et al. 2023) found for "
        "other methods, is not measured. The budget the "
        "baseline matches is the FLOPs of the base run (trunk_strategy full, new stacks random), which every "
        "operator spends too (an operator changes a new stack's start, not its cost). A difference "
        "whose interval contains 0 is no difference; \"no gain\" is a result. Whether any ordering holds at larger "
        "scale, with longer training or other data is not measured here.")
    return "\n\n".join(parts)


def merged(sources: list[str]) -> tuple[pd.DataFrame, pd.DataFrame, dict]:
    """The kept runs in `sources` as one: each schedule run on its own (so a long protocol
    can be run, and kept, a schedule at a time) and reported together."""
    kept_runs = [kept(source) for source in sources]
    facts = {**kept_runs[0][2], "walls": {}, "trials": 0, "runs": [], "sources": sources}
    for _, _, more in kept_runs:
        if set(facts["walls"]) & set(more["walls"]):
            raise SystemExit(f"--from: {sources} run a schedule twice")
        if {more["args"][k] != kept_runs[0][2]["args"][k] for k in ("operators", "steps", "eval_every")} != {False}:
            raise SystemExit(f"--from: {sources} differ in operators, steps or eval_every")
        facts["walls"].update(more["walls"])
        facts["trials"] += more["trials"]
        facts["runs"].append(more["args"])
    return pd.concat([r for r, _, _ in kept_runs]), pd.concat([c for _, c, _ in kept_runs]), facts


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--schedules", nargs="+", default=SCHEDULES, choices=SCHEDULES)
    parser.add_argument("--operators", nargs="+", default=OPERATORS)
    parser.add_argument("--lrs", type=float, nargs="+", default=LRS)
    parser.add_argument("--seeds", type=int, nargs="+", default=SEEDS)
    parser.add_argument("--steps", type=int, default=STEPS)
    parser.add_argument("--eval-every", type=int, default=50)
    parser.add_argument("--no-write", action="store_true", help="print the tables, leave docs/benchmarks.md alone")
    parser.add_argument("--keep", help="write the sweeps' results.csv and curves.csv, and facts.json, here")
    parser.add_argument("--from", dest="sources", nargs="+",
                        help="write the report from --keep directories (one per schedule, say) instead of running")
    args = parser.parse_args()
    if args.sources:
        results, curves, facts = merged(args.sources)
    else:
        tmp = tempfile.mkdtemp(prefix="quality-growth-corpus-")
        try:
            results, curves, facts = run(tmp, args)
        finally:
            shutil.rmtree(tmp)
        facts["args"] = {k: getattr(args, k) for k in ("schedules", "operators", "lrs", "seeds", "steps", "eval_every")}
        keep(args.keep or tempfile.mkdtemp(prefix="quality-growth-kept-"), results, curves, facts)
        facts["runs"] = [facts["args"]]
    body = report(results, curves, facts)
    if args.no_write:
        print(body)
    else:
        write_section("p6b", "P6b: growth operators on run-wide schedules, at equal compute", body)


if __name__ == "__main__":
    main()
