"""P6: does growing pay at equal compute? The comparison protocol of `tune:` (every arm at
every learning rate and seed, the report at each arm's best LR) on a corpus larger than the
token budget.

Arms: the source document's growth (append, frozen trunk, cached) and growth that keeps
training everything (trunk_strategy: full, as G_stack/MSG/LiGO), each with new stacks
started at random or as a copy of the stack below (new_stack_init: copy); against the
end-to-end baseline matched on FLOPs and optimizer steps (sweep A) and on FLOPs alone
(sweep B). Sweep B's only progressive arm is the base config, whose phases sweep A has
already trained: its phase store starts as a copy of sweep A's, so B trains only its
baseline. Then every arm whose best LR is the largest (smallest) it ran runs again at
twice (half) that LR, up to two times, so no arm is reported at the edge of its grid
untested. The corpus is the running Python's standard library as JSONL, built in a
temporary directory and deleted afterwards.

    python benchmarks/quality.py                      # the published run (about 2 h on 2 CPUs)
    python benchmarks/quality.py --lrs 1e-3 --seeds 0 --steps 20 --no-write   # a smoke run (one LR is every
                                                      # arm's edge: each then runs 2 more LRs)
    python benchmarks/quality.py --from DIR       # the report again, from a run made with --keep DIR
    python benchmarks/quality.py --from DIR --extend   # extend a kept run's edge arms first
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


def sweep_config(corpus: str, lrs, seeds, steps: int, match: str | None, grid: bool, arm: dict | None = None):
    """The experiment on `corpus`; `match` None: no baseline; `arm`: progressive values
    ({key: value} under training.progressive) replacing the grid's."""
    tune = {"lrs": lrs, "seeds": seeds, "baseline": "end_to_end" if match else "none", "baseline_match": match or "flops"}
    if not grid:
        tune["search_space"] = {}
    return config({"data": {"source": corpus, "format": "jsonl", "val_fraction": VAL_FRACTION},
                   "training": {"steps_per_stack": steps, "progressive": arm or {}}, "tune": tune}, base=EXPERIMENT)


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


def edge_extensions(results: pd.DataFrame) -> list[tuple[str, float]]:
    """(arm, next LR) for every arm whose best LR is the grid's largest (next: twice it) or
    smallest (next: half of it) among the LRs it ran."""
    out = []
    for arm, rows in results[results["val_loss"].notna()].groupby("arm"):
        means = rows.groupby("training.lr")["val_loss"].mean()
        best = means.idxmin()
        if best == means.index.max():
            out.append((arm, float(best) * 2))
        elif best == means.index.min():
            out.append((arm, float(best) / 2))
    return out


def arm_values(results: pd.DataFrame, arm: str) -> dict:
    """The training.progressive values that make `arm` (a progressive arm's grid columns)."""
    row = results[results["arm"] == arm].iloc[0]
    prefix = "training.progressive."
    return {c.removeprefix(prefix): row[c] for c in results.columns if c.startswith(prefix) and pd.notna(row[c])}


def extend(keep_dir: str, rounds: int = 2) -> None:
    """Run every arm whose best LR sits at the edge of the LRs it ran one LR further out
    (up to `rounds` times), adding the trials to the kept run."""
    results, curves, facts = kept(keep_dir)
    tmp = tempfile.mkdtemp(prefix="quality-corpus-")
    try:
        corpus = stdlib_corpus(tmp)
        for r in range(rounds):
            todo = edge_extensions(results)
            for k, (arm, lr) in enumerate(todo):
                baseline = {STEP_MATCHED: "flops_and_steps", FLOP_MATCHED: "flops"}.get(arm)
                cfg = sweep_config(corpus, [lr], facts["seeds"], facts["steps"], baseline, False,
                                   None if baseline else arm_values(results, arm))
                wall, exp = run_sweep(cfg, f"quality_x{r}{k}")
                rx, cx = read(exp, f"X{r}{k}", arm)  # its baseline, or its only progressive arm, is `arm`
                if baseline:
                    rx, cx = rx[rx["arm"] == arm], cx[cx["arm"] == arm]
                else:
                    rx["arm"], cx["arm"] = arm, arm
                results, curves = pd.concat([results, rx]), pd.concat([curves, cx])
                facts.setdefault("extensions", []).append({"arm": arm, "lr": lr, "wall": wall, "trials": len(rx)})
                facts["trials"] += len(rx)
            keep(keep_dir, results, curves, facts)
    finally:
        shutil.rmtree(tmp)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--lrs", type=float, nargs="+", default=LRS)
    parser.add_argument("--seeds", type=int, nargs="+", default=SEEDS)
    parser.add_argument("--steps", type=int, default=STEPS)
    parser.add_argument("--no-write", action="store_true", help="print the tables, leave docs/benchmarks.md alone")
    parser.add_argument("--keep", help="write the sweeps' results.csv and curves.csv, and facts.json, here")
    parser.add_argument("--from", dest="source", help="write the report from a --keep directory instead of running")
    parser.add_argument("--extend", action="store_true",
                        help="with --from: first run every arm whose best LR is at the grid's edge one LR further out "
                             "(a fresh run always does)")
    args = parser.parse_args()
    if args.source and args.extend:
        extend(args.source)
    if args.source:
        results, curves, facts = kept(args.source)
    else:
        tmp = tempfile.mkdtemp(prefix="quality-corpus-")
        try:
            results, curves, facts = run(tmp, args.lrs, args.seeds, args.steps)
        finally:
            shutil.rmtree(tmp)
        out = args.keep or tempfile.mkdtemp(prefix="quality-kept-")
        keep(out, results, curves, {**facts, "lrs": args.lrs, "seeds": args.seeds, "steps": args.steps})
        extend(out)  # an arm whose best LR is at the grid's edge is not tuned yet
        results, curves, facts = kept(out)
    body = report(results, curves, facts, args)
    print(body) if args.no_write else write_section("p6", "P6: progressive vs end-to-end at equal compute", body)



def markdown_table(rows: list[dict]) -> str:
    lines = ["| " + " | ".join(COMPARE_HEADER) + " |", "|" + "---|" * len(COMPARE_HEADER)]
    return "\n".join(lines + ["| " + " | ".join(cells) + " |" for cells in comparison_rows(rows)])


def lr_table(results: pd.DataFrame) -> str:
    """Mean final val_loss over seeds for every arm and LR: the whole grid, not only the best."""
    done = results[results["val_loss"].notna()]
    grid = done.pivot_table(index="arm", columns="training.lr", values="val_loss", aggfunc="mean")
    head = ["arm"] + [f"lr {lr:.3g}" for lr in grid.columns]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    lines += ["| " + " | ".join([arm] + ["-" if pd.isna(v) else f"{v:.4f}" for v in row]) + " |"
              for arm, row in grid.iterrows()]
    return "\n".join(lines)


def report(results, curves, facts, args) -> str:
    if args.source:  # the grid the kept run used
        args.lrs, args.seeds, args.steps = facts["lrs"], facts["seeds"], facts["steps"]
    versus_steps = against(results, curves, STEP_MATCHED)
    versus_flops = against(results, curves, FLOP_MATCHED)
    edges = [arm for arm, _ in edge_extensions(results)]
    extended = "".join(f" {x['arm']} also ran LR {x['lr']:.3g} ({x['trials']} trials, {x['wall'] / 60:.0f} min), its "
                       "best LR having been at the edge of the grid." for x in facts.get("extensions", []))
    return (
        f"`{EXPERIMENT}` (d_model 128, 4 heads, 3 stacks of 1 block, seq_len 128, byte tokenizer, batch 16, "
        f"{args.steps} steps per stack, in every phase 20 warmup steps then cosine decay to a tenth of the LR, validation every 50 steps on the whole validation "
        f"split) on the standard library's `.py` files as JSONL ({facts['corpus_mb']:.1f} MB, "
        f"{facts['train_examples']:,} training windows, val_fraction {VAL_FRACTION}). Every arm ran every LR of "
        f"{args.lrs} with seeds {args.seeds}: {facts['trials']} trials, sweep A {facts['wall_a'] / 60:.0f} min, "
        f"sweep B {facts['wall_b'] / 60:.0f} min.{extended} No arm reads more than a small fraction of the corpus (column "
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
        + (f"Best LR still at the edge of the LRs it ran for: {'; '.join(edges)}; a wider grid might improve these "
           "arms.\n\n" if edges else "Every arm's best LR lies inside the LRs it ran.\n\n")
        + f"What this does not show: one small model (0.6 M parameters in its blocks) and {3 * args.steps} steps; one corpus "
        "(Python source); CPU float32. Whether the ordering holds at larger scale, with longer training or "
        "with other data is not measured here."
    )


if __name__ == "__main__":
    main()
