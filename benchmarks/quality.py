"""P6: does growing pay at equal compute? The comparison protocol of `tune:` (every arm at
every learning rate and seed, the report at each arm's best LR) on a corpus larger than the
token budget.

Arms: the source document's growth (append, frozen trunk, cached) and growth that keeps
training everything (trunk_strategy: full, as G_stack/MSG/LiGO), each with new stacks
started at random or as a copy of the stack below (new_stack_init: copy); against the
end-to-end baseline matched on FLOPs and optimizer steps (sweep A) and on FLOPs alone
(sweep B). Sweep B's only progressive arm is the base config, whose phases sweep A has
already trained: its phase store starts as a copy of sweep A's, so B trains only its
baseline. The corpus is the running Python's standard library as JSONL, built in a
temporary directory and deleted afterwards.

    python benchmarks/quality.py                      # the published run (about 1 h on 2 CPUs)
    python benchmarks/quality.py --lrs 1e-3 --seeds 0 --steps 20 --no-write   # a smoke run
    python benchmarks/quality.py --from DIR       # the report again, from a run made with --keep DIR
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import sysconfig
import tempfile

import pandas as pd

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import config, run_sweep, write_section  # noqa: E402
from corpus_scale import python_files, write_jsonl  # noqa: E402

from stackwise_ray.report import COMPARE_HEADER, comparison, comparison_rows  # noqa: E402

EXPERIMENT = "experiments/compare_growth.yaml"
LRS = [3e-4, 6e-4, 1e-3, 2e-3, 4e-3]
SEEDS = [0, 1, 2]
STEPS = 150
SEQ_LEN = 128  # the experiment's data.seq_len
VAL_FRACTION = 0.002  # ~440 windows: eval_every evaluates the whole split
STEP_MATCHED, FLOP_MATCHED = "baseline, FLOPs and steps matched", "baseline, FLOPs matched"


def stdlib_corpus(tmp: str) -> str:
    path = os.path.join(tmp, "stdlib.jsonl")
    write_jsonl(path, python_files(sysconfig.get_paths()["stdlib"], ("site-packages", "dist-packages")))
    return path


def sweep_config(corpus: str, lrs, seeds, steps: int, match: str, grid: bool):
    tune = {"lrs": lrs, "seeds": seeds, "baseline_match": match}
    if not grid:
        tune["search_space"] = {}
    return config({"data": {"source": corpus, "format": "jsonl", "val_fraction": VAL_FRACTION},
                   "training": {"steps_per_stack": steps}, "tune": tune}, base=EXPERIMENT)


def read(experiment: str, tag: str, baseline_name: str) -> tuple[pd.DataFrame, pd.DataFrame]:
    """A sweep's results and curves, trial ids prefixed by `tag`, its baseline arm renamed."""
    out = []
    for name in ("results.csv", "curves.csv"):
        df = pd.read_csv(os.path.join(experiment, name))
        df["trial_id"] = tag + df["trial_id"].astype(str)
        df["arm"] = df["arm"].replace({"baseline": baseline_name})
        out.append(df)
    return out[0], out[1]


def against(results, curves, reference: str) -> list[dict]:
    """report.comparison with `reference` as the baseline every arm is compared to."""
    rename = {reference: "baseline"}
    rows = comparison(results.assign(arm=results["arm"].replace(rename)), curves.assign(arm=curves["arm"].replace(rename)))
    for r in rows:
        r["arm"] = reference if r["arm"] == "baseline" else r["arm"]
    return rows


def run(tmp: str, lrs, seeds, steps: int) -> tuple[pd.DataFrame, pd.DataFrame, dict]:
    corpus = stdlib_corpus(tmp)
    wall_a, exp_a = run_sweep(sweep_config(corpus, lrs, seeds, steps, "flops_and_steps", True), "quality_a")
    cfg_b = sweep_config(corpus, lrs, seeds, steps, "flops", False)
    storage_b = tempfile.mkdtemp(prefix="bench-quality_b-")
    shutil.copytree(os.path.join(exp_a, "phases"), os.path.join(storage_b, "quality_b", "phases"))
    wall_b, exp_b = run_sweep(cfg_b, "quality_b", storage=storage_b)
    ra, ca = read(exp_a, "A", STEP_MATCHED)
    rb, cb = read(exp_b, "B", FLOP_MATCHED)
    rb, cb = rb[rb["arm"] == FLOP_MATCHED], cb[cb["arm"] == FLOP_MATCHED]  # B's progressive arm repeats A's
    facts = {"corpus_mb": os.path.getsize(corpus) / 1e6, "wall_a": wall_a, "wall_b": wall_b,
             "trials": len(ra) + len(rb), "train_examples": int(round((ra["tokens"] / SEQ_LEN / ra["epochs"]).dropna().iloc[0]))}
    return pd.concat([ra, rb]), pd.concat([ca, cb]), facts


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--lrs", type=float, nargs="+", default=LRS)
    parser.add_argument("--seeds", type=int, nargs="+", default=SEEDS)
    parser.add_argument("--steps", type=int, default=STEPS)
    parser.add_argument("--no-write", action="store_true", help="print the tables, leave docs/benchmarks.md alone")
    parser.add_argument("--keep", help="also write both sweeps' results.csv and curves.csv, and facts.json, here")
    parser.add_argument("--from", dest="source", help="write the report from a --keep directory instead of running")
    args = parser.parse_args()
    if args.source:
        results, curves, facts = kept(args.source)
    else:
        tmp = tempfile.mkdtemp(prefix="quality-corpus-")
        try:
            results, curves, facts = run(tmp, args.lrs, args.seeds, args.steps)
        finally:
            shutil.rmtree(tmp)
        if args.keep:
            keep(args.keep, results, curves, {**facts, "lrs": args.lrs, "seeds": args.seeds, "steps": args.steps})
    body = report(results, curves, facts, args)
    print(body) if args.no_write else write_section("p6", "P6: progressive vs end-to-end at equal compute", body)


def keep(out: str, results: pd.DataFrame, curves: pd.DataFrame, facts: dict) -> None:
    os.makedirs(out, exist_ok=True)
    results.to_csv(os.path.join(out, "results.csv"), index=False)
    curves.to_csv(os.path.join(out, "curves.csv"), index=False)
    with open(os.path.join(out, "facts.json"), "w") as f:
        json.dump(facts, f, indent=1)


def kept(source: str) -> tuple[pd.DataFrame, pd.DataFrame, dict]:
    with open(os.path.join(source, "facts.json")) as f:
        facts = json.load(f)
    return pd.read_csv(os.path.join(source, "results.csv")), pd.read_csv(os.path.join(source, "curves.csv")), facts


def markdown_table(rows: list[dict]) -> str:
    lines = ["| " + " | ".join(COMPARE_HEADER) + " |", "|" + "---|" * len(COMPARE_HEADER)]
    return "\n".join(lines + ["| " + " | ".join(cells) + " |" for cells in comparison_rows(rows)])


def edge_lrs(rows: list[dict], lrs) -> list[str]:
    return [r["arm"] for r in rows if r["lr"] in (min(lrs), max(lrs))]


def lr_table(results: pd.DataFrame) -> str:
    """Mean final val_loss over seeds for every arm and LR: the whole grid, not only the best."""
    done = results[results["val_loss"].notna()]
    grid = done.pivot_table(index="arm", columns="training.lr", values="val_loss", aggfunc="mean")
    head = ["arm"] + [f"lr {lr:.3g}" for lr in grid.columns]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    lines += ["| " + " | ".join([arm] + [f"{v:.4f}" for v in row]) + " |" for arm, row in grid.iterrows()]
    return "\n".join(lines)


def report(results, curves, facts, args) -> str:
    if args.source:  # the grid the kept run used
        args.lrs, args.seeds, args.steps = facts["lrs"], facts["seeds"], facts["steps"]
    versus_steps = against(results, curves, STEP_MATCHED)
    versus_flops = against(results, curves, FLOP_MATCHED)
    edges = edge_lrs(versus_steps, args.lrs)
    return (
        f"`{EXPERIMENT}` (d_model 128, 4 heads, 3 stacks of 1 block, seq_len 128, byte tokenizer, batch 16, "
        f"{args.steps} steps per stack, in every phase 20 warmup steps then cosine decay to a tenth of the LR, validation every 50 steps on the whole validation "
        f"split) on the standard library's `.py` files as JSONL ({facts['corpus_mb']:.1f} MB, "
        f"{facts['train_examples']:,} training windows, val_fraction {VAL_FRACTION}). Every arm ran every LR of "
        f"{args.lrs} with seeds {args.seeds}: {facts['trials']} trials, sweep A {facts['wall_a'] / 60:.0f} min, "
        f"sweep B {facts['wall_b'] / 60:.0f} min. No arm reads more than a small fraction of the corpus (column "
        "*epochs*), so this is the one-pass regime, not repeated passes over a small corpus.\n\n"
        "Arms: `trunk_strategy=frozen` is the source document's growth (append; the trunk frozen and its "
        "outputs cached); `full` trains the whole rack after each growth (G_stack, MSG, LiGO train everything); "
        "`new_stack_init=copy` starts each new stack as a copy of the one below (depth stacking). The budget is "
        "the FLOPs of the frozen run; *full* arms spend more (they train the trunk) and are marked not "
        "compute-matched. Baselines: the same 3-block model trained end to end for that budget, with the batch "
        "set so it also takes " f"{3 * args.steps} optimizer steps (*FLOPs and steps matched*), or with batch 16 and as many "
        "steps as the budget pays for (*FLOPs matched*).\n\n"
        f"**Against the FLOPs-and-steps-matched baseline** (difference: arm minus baseline, nats, Welch 95% CI "
        f"over seeds):\n\n{markdown_table(versus_steps)}\n\n"
        f"**Against the FLOPs-matched baseline**:\n\n{markdown_table(versus_flops)}\n\n"
        f"**Every learning rate** (mean final val_loss over seeds):\n\n{lr_table(results)}\n\n"
        + (f"Best LR at the edge of the grid for: {'; '.join(edges)}; a wider grid might move these arms.\n\n"
           if edges else "Every arm's best LR lies inside the grid.\n\n")
        + f"What this does not show: one small model (0.6 M parameters in its blocks) and {3 * args.steps} steps; one corpus "
        "(Python source); CPU float32. Whether the ordering holds at larger scale, with longer training or "
        "with other data is not measured here."
    )


if __name__ == "__main__":
    main()
