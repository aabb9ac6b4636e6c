"""python -m stackwise_ray.report EXPERIMENT_DIR [--out DIR]

Plots and a summary of a sweep (`python -m stackwise_ray.tune`) from the results.csv,
phases.csv and curves.csv it left in EXPERIMENT_DIR: val_loss_per_stack.png,
phase_time_memory.png, loss_vs_flops.png, summary.md and summary.html in DIR (default
EXPERIMENT_DIR/report); for a sweep that names its arms (results' `arm` column), a
comparison table (each arm at its best LR against the baseline, over seeds) and
compare_loss_vs_flops.png.

From Python: `write_report(experiment_dir, out_dir)` returns the paths it wrote.
"""

from __future__ import annotations

import html
import io
import os
import shlex
import shutil
import sys
import tempfile

import matplotlib

matplotlib.use("Agg")  # reports are made on headless machines; no display backend
import matplotlib.pyplot as plt  # noqa: E402
import pandas as pd  # noqa: E402
from scipy import stats  # noqa: E402

import yaml  # noqa: E402

from . import storage  # noqa: E402
from .cli import OneLineParser, refuse  # noqa: E402
from .config import StackWiseConfig  # noqa: E402
from .local_files import read_regular  # noqa: E402
from .errors import first_line  # noqa: E402

# Older sweeps or partial runs may lack some columns; they are added empty so the report still renders.
RESULT_COLUMNS = ["trial_id", "kind", "status", "val_loss", "val_ppl", "val_accuracy", "flops", "wall_s",
                  "phases_trained", "phases_reused", "error", "arm", "budget", "steps", "tokens", "epochs", "val_bpb"]
PHASE_COLUMNS = ["trial_id", "kind", "stack", "val_loss", "cum_flops", "wall_s", "peak_memory_mb", "status", "val_bpb"]
CURVE_COLUMNS = ["trial_id", "kind", "arm", "global_step", "flops", "val_loss", "val_bpb"]
COMPARE_PLOT = "compare_loss_vs_flops.png"  # with an `arm` column (a sweep by this version)
PLOTS = {"val_loss_per_stack": "val_loss_per_stack.png", "phase_time_memory": "phase_time_memory.png",
         "loss_vs_flops": "loss_vs_flops.png"}


NUMERIC_COLUMNS = {"val_loss", "val_ppl", "val_accuracy", "val_bpb", "flops", "wall_s", "phases_trained", "phases_reused", "stack", "cum_flops",
                   "peak_memory_mb", "budget", "steps", "tokens", "epochs", "global_step"}
TEXT_COLUMNS = ("trial_id", "kind", "status", "error", "arm")


class BadTableError(ValueError):
    """A results.csv or phases.csv that is not what a sweep writes; the message names the file."""


def read_table(path: str, columns: list[str]) -> pd.DataFrame:
    try:
        data = storage.read_bytes(path) if storage.is_remote(path) else read_regular(path)  # a FIFO: refused, not read
    except FileNotFoundError:
        data = b""
    except OSError as e:  # a directory, a FIFO, no permission
        raise BadTableError(f"{path}: cannot read: {e.strerror or e}") from None
    if b"\0" in data:
        raise BadTableError(f"{path}: a binary file, not CSV")
    try:
        table = pd.read_csv(io.BytesIO(data), dtype={"trial_id": str}, encoding="utf-8")
    except pd.errors.EmptyDataError:  # a sweep with no reported phases writes an empty file
        table = pd.DataFrame()
    except (UnicodeDecodeError, pd.errors.ParserError) as e:
        raise BadTableError(f"{path}: not a CSV table ({first_line(e)})") from None
    if len(table.columns) and "trial_id" not in table:
        raise BadTableError(f"{path}: no trial_id column (not a table written by python -m stackwise_ray.tune)")
    for c in columns:
        if c not in table:
            table[c] = pd.Series(dtype=object if c in TEXT_COLUMNS else float)
        elif c in NUMERIC_COLUMNS:
            table[c] = numeric(table[c], path)
    return table


def numeric(column: pd.Series, path: str) -> pd.Series:
    values = pd.to_numeric(column, errors="coerce")
    bad = column.notna() & values.isna()
    if bad.any():
        row = int(bad.idxmax())
        raise BadTableError(f"{path}: {column.name}: row {row + 1}: not a number: {str(column[row])[:50]!r}")
    return values


def swept_columns(results: pd.DataFrame) -> list[str]:
    return [c for c in results.columns if "." in c]  # the sweep names them by their full config key path


def trial_labels(results: pd.DataFrame) -> dict[str, str]:
    swept = swept_columns(results)
    labels = {}
    for _, r in results.iterrows():
        values = [f"{c.split('.')[-1]}={r[c]}" for c in swept if pd.notna(r[c])]
        values += [tag for tag in ("baseline", "ERROR") if tag in (r["kind"], r["status"])]
        labels[r["trial_id"]] = f"{r['trial_id']} ({', '.join(values)})" if values else str(r["trial_id"])
    return labels


def plot_trials(ax, phases: pd.DataFrame, labels: dict, x: str, y: str) -> None:
    """One line per trial; reused phases get hollow markers (their time and memory were not spent here)."""
    for trial_id, rows in phases.groupby("trial_id", sort=False):
        rows = rows.sort_values(x)
        (line,) = ax.plot(rows[x], rows[y], "-", label=labels.get(trial_id, trial_id))
        reused = rows["status"].eq("reused")
        ax.plot(rows[x][~reused], rows[y][~reused], "o", color=line.get_color())
        ax.plot(rows[x][reused], rows[y][reused], "o", color=line.get_color(), markerfacecolor="none")


def finish(fig, ax, path: str) -> None:
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_val_loss(results, phases, labels, path: str) -> None:
    fig, ax = plt.subplots(figsize=(8, 5))
    plot_trials(ax, phases[phases["kind"] != "baseline"], labels, "stack", "val_loss")
    for _, b in results[(results["kind"] == "baseline") & results["val_loss"].notna()].iterrows():
        ax.axhline(b["val_loss"], color="black", linestyle="--", label=f"baseline {b['trial_id']}")
    ax.set(xlabel="stack", ylabel="validation loss", title="Validation loss per stack (hollow: reused phase)")
    ax.xaxis.get_major_locator().set_params(integer=True)
    finish(fig, ax, path)


def plot_time_memory(phases, labels, path: str) -> None:
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(8, 7), sharex=True)
    plot_trials(top, phases, labels, "stack", "wall_s")
    plot_trials(bottom, phases, labels, "stack", "peak_memory_mb")
    top.set(ylabel="phase wall time (s)", title="Per-phase wall time and peak memory (hollow: reused phase)")
    bottom.set(xlabel="stack", ylabel="peak memory (MB)")
    bottom.xaxis.get_major_locator().set_params(integer=True)
    finish(fig, top, path)


def plot_loss_vs_flops(results, phases, labels, path: str) -> None:
    fig, ax = plt.subplots(figsize=(8, 5))
    plot_trials(ax, phases[phases["kind"] != "baseline"], labels, "cum_flops", "val_loss")
    base = phases[phases["kind"] == "baseline"]
    if base.empty:  # no per-phase rows: fall back to the baseline's final result
        base = results[results["kind"] == "baseline"].rename(columns={"flops": "cum_flops"})
    for trial_id, rows in base.groupby("trial_id"):
        rows = rows.sort_values("cum_flops")
        ax.plot(rows["cum_flops"], rows["val_loss"], "k--s", markersize=8, label=f"baseline {trial_id}")
    ax.set(xlabel="cumulative training FLOPs", ylabel="validation loss", title="Validation loss vs FLOPs")
    finish(fig, ax, path)


BEST_RULE = ("the progressive trial that trained every stack (not stopped by a scheduler, not errored) with the "
             "best final {metric} ({mode}); ties go to the first trial; the baseline is compared with it, never chosen")


def best_trial(results: pd.DataFrame, metric: str = "val_loss", mode: str = "min"):
    """The best trial of a sweep (BEST_RULE): the one definition both tune's
    best_config.yaml and the report's summary use. None where no trial qualifies."""
    pool = results[(results["kind"] != "baseline") & (results["status"] == "TERMINATED") & results[metric].notna()]
    if pool.empty:
        return None
    return pool.loc[pool[metric].idxmin() if mode == "min" else pool[metric].idxmax()]


def sweep_metric(experiment_dir: str) -> tuple[str, str]:
    """(tune.metric, tune.mode) of the sweep in `experiment_dir` (its config.yaml), by
    default val_loss and min."""
    path = storage.join(experiment_dir, "config.yaml")
    try:
        tune = StackWiseConfig.from_dict(yaml.safe_load(storage.read_text(path))).tune
        return tune.metric, tune.mode
    except (OSError, ValueError, yaml.YAMLError):  # a sweep from before config.yaml, or a damaged one
        return "val_loss", "min"


def comparison_lines(results: pd.DataFrame, labels: dict, metric: str = "val_loss", mode: str = "min") -> list[str]:
    best = best_trial(results, metric, mode)
    if best is None:
        return ["No progressive trial trained every stack."]
    lines = [f"Best trial: {labels[best['trial_id']]}, {metric} {best[metric]:.4f} (best trial: "
             f"{BEST_RULE.format(metric=metric, mode=mode)})."]
    baseline = results[(results["kind"] == "baseline") & results["val_loss"].notna()]
    if not baseline.empty:
        b = baseline.iloc[0]
        diff = best["val_loss"] - b["val_loss"]
        ratio = best["flops"] / b["flops"] if b["flops"] else float("nan")
        lines.append(f"Against the baseline {b['trial_id']}: val_loss {diff:+.4f} ({best['val_loss']:.4f} vs "
                     f"{b['val_loss']:.4f}), FLOP ratio {ratio:.2f}x ({best['flops']:.3g} vs {b['flops']:.3g}).")
    return lines


def fmt(value, spec: str = "") -> str:
    if value is None or (not isinstance(value, str) and pd.isna(value)):
        return "-"
    if isinstance(value, float) and value.is_integer() and not spec:
        value = int(value)  # an int column with blanks (the baseline's swept values) is read as float
    return format(value, spec) if spec else str(value)


def table_rows(results: pd.DataFrame) -> tuple[list[str], list[list[str]]]:
    swept = swept_columns(results)
    header = ["trial", "kind", *(c.split(".")[-1] for c in swept), "val_loss", "FLOPs", "wall (s)",
              "trained/reused", "status", "error"]
    rows = [[fmt(r["trial_id"]), fmt(r["kind"]), *(fmt(r[c]) for c in swept), fmt(r["val_loss"], ".4f"),
             fmt(r["flops"], ".3g"), fmt(r["wall_s"], ".1f"),
             f"{fmt(r['phases_trained'], '.0f')}/{fmt(r['phases_reused'], '.0f')}", fmt(r["status"]),
             "" if pd.isna(r["error"]) else str(r["error"])]
            for _, r in results.iterrows()]
    return header, rows


# ---------------------------------------------------------------- the comparison protocol

LR, SEED = "training.lr", "training.seed"
OVER_BUDGET = 1 + 1e-9  # FLOPs are sums of floats: an arm at exactly the budget must not be marked
COMPARE_HEADER = ["arm", "best LR", "seeds", "final val_loss (mean ± std)", "vs baseline [95% CI]", "FLOPs",
                  "steps", "tokens", "epochs", "FLOPs to reach baseline", "compute-matched", "val_bpb (mean)"]
COMPARE_NOTES = [
    "Each arm at its best LR: the lowest mean final val_loss over seeds (trials that errored or were stopped "
    "early left out). seeds: distinct training seeds (trials that repeat a seed measured one thing and count "
    "once). std: sample standard deviation over seeds. "
    "vs baseline: the arm's mean final val_loss minus the baseline's (both at their best LR), with a 95% confidence "
    "interval from Welch's t-test over seeds (unequal variances); an interval that contains 0 is no significant "
    "difference. FLOPs, steps, tokens and epochs: means over seeds; epochs: examples seen / training examples.",
    "FLOPs to reach baseline: where the arm's mean validation curve (over seeds, against FLOPs from the run's start) "
    "first reaches the baseline's mean final val_loss, linearly interpolated between evaluations "
    "(training.eval_every sets how often), and its ratio to the baseline's FLOPs. compute-matched: NO where the "
    "arm spends more than the budget (the FLOPs of the base config's progressive run, which the baseline matches).",
]


def comparison(results: pd.DataFrame, curves: pd.DataFrame) -> list[dict]:
    """One row per arm (results' `arm` column) at its best learning rate; the numbers of the
    comparison table. Trials that errored, that a scheduler stopped early or that have no
    val_loss are left out: their last loss is not a final one."""
    if "arm" not in results:
        return []
    done = finished(results)
    done = done[done["arm"].notna()]
    chosen = {arm: best_lr(rows) for arm, rows in done.groupby("arm", sort=False)}
    tried = {arm: rows[LR].nunique() if LR in rows else 1 for arm, rows in done.groupby("arm", sort=False)}
    grids = {arm: sorted(rows[LR].dropna().unique()) if LR in rows else [] for arm, rows in done.groupby("arm", sort=False)}
    base = chosen.get("baseline")
    base_losses = per_seed(base[1]) if base is not None else pd.Series(dtype=float)
    base_loss = base_losses.mean() if base is not None else float("nan")
    base_flops = base[1]["flops"].mean() if base is not None else float("nan")
    out = []
    for arm, (lr, rows) in chosen.items():
        losses = per_seed(rows)
        diff, low, high = welch(losses, base_losses) if base is not None and arm != "baseline" else (float("nan"),) * 3
        curve = mean_curve(curves, rows["trial_id"])
        reach = flops_to_reach(curve["flops"].tolist(), curve["val_loss"].tolist(), base_loss) if len(curve) else None
        flops, budget = rows["flops"].mean(), rows["budget"].max() if "budget" in rows else float("nan")
        bpb = per_seed(rows, "val_bpb") if "val_bpb" in rows else pd.Series(dtype=float)
        grid = grids[arm]
        edge = None if len(grid) < 2 else {grid[0]: "smallest", grid[-1]: "largest"}.get(lr)
        out.append({"arm": arm, "lr": lr, "lrs_tried": max(1, int(tried[arm])), "lr_edge": edge, "seeds": len(losses),
                    "val_loss_mean": losses.mean(),
                    "val_bpb_mean": bpb.mean() if len(bpb) else float("nan"),
                    "val_loss_std": losses.std(ddof=1) if len(losses) > 1 else float("nan"),
                    "diff": diff, "ci_low": low, "ci_high": high, "flops": flops,
                    **{k: rows[k].mean() if k in rows else float("nan") for k in ("steps", "tokens", "epochs")},
                    "flops_to_reach": reach, "reach_ratio": reach / base_flops if reach is not None else None,
                    "budget": budget, "over_budget": bool(flops > OVER_BUDGET * budget) if pd.notna(budget) else None})
    return out


MIN_SEEDS = 3  # fewer seeds give no interval (1) or one too wide to mean much (2)


def weak_evidence(rows: list[dict]) -> list[str]:
    """What makes a comparison table's evidence weak, one line each (none: it follows the
    protocol): untuned learning rates, an arm whose best LR is at the edge of its grid, too
    few seeds, a baseline matched in FLOPs only that trained fewer steps than the arms,
    arms over the budget."""
    if not rows:
        return []
    lines = []
    if max(r.get("lrs_tried", 1) for r in rows) <= 1:
        lines.append("Weak evidence: a single learning rate for every arm, so each arm's LR is untuned and the "
                     "comparison may only say which arm suits that LR (tune.lrs runs several).")
    for r in rows:
        if r.get("lr_edge"):
            lines.append(f"Weak evidence: {r['arm']}'s best LR ({r['lr']:g}) is the {r['lr_edge']} it tried, so its "
                         "optimum may lie outside the grid and the arm may be undertuned (widen tune.lrs).")
    fewest = min(r["seeds"] for r in rows)
    if fewest < MIN_SEEDS:
        lines.append(f"Weak evidence: {fewest} seed{'s' if fewest != 1 else ''} for some arm (fewer than {MIN_SEEDS}), "
                     "so there is no confidence interval worth the name (tune.seeds runs several).")
    base = next((r for r in rows if r["arm"] == "baseline"), None)
    arms = [r for r in rows if r["arm"] != "baseline"]
    arm_steps = [r["steps"] for r in arms if pd.notna(r.get("steps"))]
    if base is not None and pd.notna(base.get("steps")) and arm_steps and base["steps"] < min(arm_steps):
        lines.append(f"Weak evidence: the baseline is matched in FLOPs only and trained {base['steps']:.0f} steps "
                     f"against the arms' {min(arm_steps):.0f}+, so it is less trained, not only cheaper "
                     "(tune.baseline_match: flops_and_steps matches the steps too).")
    over = [r["arm"] for r in arms if r.get("over_budget")]
    if over:
        lines.append(f"Weak evidence: {', '.join(over)} spent more FLOPs than the budget the baseline was given, "
                     "so a gain there is not compute-matched.")
    return lines


def finished(results: pd.DataFrame) -> pd.DataFrame:
    return results[~results["status"].isin(["ERROR", "STOPPED"]) & results["val_loss"].notna()]


def best_lr(rows: pd.DataFrame):
    """(the LR with the lowest mean final val_loss over seeds, its trials); (None, all of
    them) for a sweep without an LR grid."""
    if LR not in rows or rows[LR].isna().all():
        return None, rows
    lr = rows.groupby(LR)["val_loss"].mean().idxmin()
    return lr, rows[rows[LR] == lr]


def per_seed(rows: pd.DataFrame, column: str = "val_loss") -> pd.Series:
    """Final val_loss (or another column) per distinct training seed. A trial is deterministic given its seed:
    trials repeating a seed (num_samples repeats, a grid value listed twice) measured one
    thing, so they count once, and a spread or interval needs distinct seeds. Without a
    seed column every trial ran the base config's seed."""
    seeds = rows[SEED] if SEED in rows else pd.Series(0, index=rows.index)
    return rows[column].groupby(seeds.fillna(-1)).mean()


def welch(a: pd.Series, b: pd.Series) -> tuple[float, float, float]:
    """mean(a) - mean(b) and its 95% confidence interval (Welch's t; NaN with fewer than 2 of either)."""
    diff = a.mean() - b.mean()
    if len(a) < 2 or len(b) < 2:
        return diff, float("nan"), float("nan")
    ci = stats.ttest_ind(a, b, equal_var=False).confidence_interval(0.95)
    return diff, float(ci.low), float(ci.high)


def mean_curve(curves: pd.DataFrame, trial_ids) -> pd.DataFrame:
    """The trials' validation curves averaged point by point (their points share global steps):
    flops, val_loss (mean) and spread (std over seeds), by global step."""
    rows = curves[curves["trial_id"].isin(set(trial_ids))]
    if rows.empty:
        return pd.DataFrame(columns=["flops", "val_loss", "spread"])
    grouped = rows.groupby("global_step")
    return pd.DataFrame({"flops": grouped["flops"].mean(), "val_loss": grouped["val_loss"].mean(),
                         "spread": grouped["val_loss"].std(ddof=1)}).sort_index()


def flops_to_reach(flops: list[float], losses: list[float], target: float) -> float | None:
    """FLOPs where the curve first gets to `target` (linear between points), or None."""
    for i, loss in enumerate(losses):
        if loss <= target:
            if i == 0:
                return flops[0]
            f0, f1, l0 = flops[i - 1], flops[i], losses[i - 1]
            return f0 + (f1 - f0) * (l0 - target) / (l0 - loss)
    return None


def comparison_rows(rows: list[dict]) -> list[list[str]]:
    def pm(r):
        return f"{r['val_loss_mean']:.4f} ± {fmt(r['val_loss_std'], '.4f')}"

    def versus(r):
        if pd.isna(r["diff"]):
            return "-"
        return f"{r['diff']:+.4f} [{fmt(r['ci_low'], '+.4f')}, {fmt(r['ci_high'], '+.4f')}]"

    def reach(r):
        return "not reached" if r["flops_to_reach"] is None else f"{r['flops_to_reach']:.3g} ({r['reach_ratio']:.2f}x)"

    def matched(r):
        return "-" if r["over_budget"] is None else (f"NO ({r['flops'] / r['budget']:.2f}x budget)" if r["over_budget"] else "yes")

    return [[r["arm"], fmt(r["lr"], ".3g"), str(r["seeds"]), pm(r), versus(r), fmt(r["flops"], ".3g"),
             fmt(r["steps"], ".0f"), fmt(r["tokens"], ".3g"), fmt(r["epochs"], ".2f"), reach(r), matched(r),
             fmt(r.get("val_bpb_mean"), ".4f")]
            for r in rows]


def plot_comparison(rows: list[dict], results: pd.DataFrame, curves: pd.DataFrame, path: str) -> None:
    """Each arm's mean validation curve at its best LR, ± one std over seeds (shaded)."""
    fig, ax = plt.subplots(figsize=(8, 5))
    done = finished(results)
    for r in rows:
        ids = best_lr(done[done["arm"] == r["arm"]])[1]["trial_id"]
        curve = mean_curve(curves, ids)
        style = dict(color="black", linestyle="--") if r["arm"] == "baseline" else {}
        (line,) = ax.plot(curve["flops"], curve["val_loss"], marker=".", label=f"{r['arm']} (lr {fmt(r['lr'], '.3g')})",
                          **style)
        spread = curve["spread"].fillna(0)
        ax.fill_between(curve["flops"], curve["val_loss"] - spread, curve["val_loss"] + spread,
                        color=line.get_color(), alpha=0.2)
        if r["arm"] == "baseline":
            ax.axhline(r["val_loss_mean"], color="black", linestyle=":", linewidth=0.8)
    ax.set(xlabel="training FLOPs from the run's start", ylabel="validation loss",
           title="Validation loss vs FLOPs: mean over seeds at each arm's best LR (band: ± 1 std)")
    finish(fig, ax, path)


def markdown(title, command, header, rows, lines, compare=None) -> str:
    """`compare`: (header, rows, notes) of the comparison table, or None."""
    def cells(row):
        return "| " + " | ".join(c.replace("|", "\\|").replace("\n", " ") for c in row) + " |"

    def table(head, body):
        return "\n".join([cells(head), "|" + "---|" * len(head), *(cells(r) for r in body)])

    images = [f"![{name}]({file})" for name, file in PLOTS.items()]
    parts = [f"# {title}", f"Made by `{command}`"]
    if compare is not None:
        parts += ["## Comparison", table(compare[0], compare[1]), *compare[2], f"![comparison]({COMPARE_PLOT})",
                  "## Trials"]
    return "\n\n".join([*parts, table(header, rows), *lines, *images]) + "\n"


def html_page(title, command, header, rows, lines, compare=None) -> str:
    e = html.escape

    def table(head, body):
        cells = "".join(f"<th>{e(c)}</th>" for c in head)
        trs = "".join("<tr>" + "".join(f"<td>{e(c)}</td>" for c in r) + "</tr>\n" for r in body)
        return f"<table><tr>{cells}</tr>\n{trs}</table>\n"

    paragraphs = "".join(f"<p>{e(line)}</p>\n" for line in lines)
    images = "".join(f'<p><img src="{e(file)}" alt="{e(name)}"></p>\n' for name, file in PLOTS.items())
    comparison = "" if compare is None else (
        "<h2>Comparison</h2>\n" + table(compare[0], compare[1]) + "".join(f"<p>{e(n)}</p>\n" for n in compare[2])
        + f'<p><img src="{COMPARE_PLOT}" alt="comparison"></p>\n<h2>Trials</h2>\n')
    return (f"<!doctype html>\n<html><head><meta charset=\"utf-8\"><title>{e(title)}</title>"
            "<style>table{border-collapse:collapse}td,th{border:1px solid #ccc;padding:2px 6px}</style></head>\n"
            f"<body><h1>{e(title)}</h1>\n<p>Made by <code>{e(command)}</code></p>\n"
            f"{comparison}{table(header, rows)}{paragraphs}{images}</body></html>\n")


def write_report(experiment_dir: str, out_dir: str | None = None) -> dict:
    command = " ".join(["python -m stackwise_ray.report", shlex.quote(experiment_dir),
                        *(["--out", shlex.quote(out_dir)] if out_dir else [])])
    upload_to = storage.join(experiment_dir, "report") if out_dir is None and storage.is_remote(experiment_dir) else None
    results = read_table(storage.join(experiment_dir, "results.csv"), RESULT_COLUMNS)  # before anything is written
    phases = read_table(storage.join(experiment_dir, "phases.csv"), PHASE_COLUMNS)
    curves = read_table(storage.join(experiment_dir, "curves.csv"), CURVE_COLUMNS)
    target = upload_to or out_dir or os.path.join(experiment_dir, "report")
    if not upload_to:
        os.makedirs(target, exist_ok=True)
    # written in a fresh directory, then moved into place: a link planted where a file
    # goes is replaced, never written through
    out_dir = tempfile.mkdtemp(prefix=".report-", dir=None if upload_to else target)
    try:
        paths = _write_files(experiment_dir, command, results, phases, curves, out_dir)
        if upload_to:  # a sweep in object storage gets its report there too
            storage.upload(out_dir, upload_to)
        else:
            for path in paths.values():
                os.replace(path, os.path.join(target, os.path.basename(path)))
    finally:
        shutil.rmtree(out_dir, ignore_errors=True)
    return {k: storage.join(target, os.path.basename(v)) for k, v in paths.items()}


def _write_files(experiment_dir, command, results, phases, curves, out_dir) -> dict:
    labels = trial_labels(results)
    paths = {name: os.path.join(out_dir, file) for name, file in PLOTS.items()}
    plot_val_loss(results, phases, labels, paths["val_loss_per_stack"])
    plot_time_memory(phases, labels, paths["phase_time_memory"])
    plot_loss_vs_flops(results, phases, labels, paths["loss_vs_flops"])
    title = f"Sweep report: {os.path.basename(storage.resolve(experiment_dir)[1])}"
    header, rows = table_rows(results)
    lines = comparison_lines(results, labels, *sweep_metric(experiment_dir))
    compared = comparison(results, curves)
    compare = (COMPARE_HEADER, comparison_rows(compared), weak_evidence(compared) + COMPARE_NOTES) if compared else None
    if compared:
        paths["comparison"] = os.path.join(out_dir, COMPARE_PLOT)
        plot_comparison(compared, results, curves, paths["comparison"])
    paths["summary_md"] = os.path.join(out_dir, "summary.md")
    paths["summary_html"] = os.path.join(out_dir, "summary.html")
    with open(paths["summary_md"], "w") as f:
        f.write(markdown(title, command, header, rows, lines, compare))
    with open(paths["summary_html"], "w") as f:
        f.write(html_page(title, command, header, rows, lines, compare))
    return paths


def out_dir_problem(out: str | None) -> str | None:
    """Why the report cannot go to `out` (a local path), or None."""
    if out is None or storage.is_remote(out) or not os.path.lexists(out):
        return None
    return None if os.path.isdir(out) and not os.path.islink(out) else "not a directory (a report is a directory of files)"


def main(argv=None) -> int:
    parser = OneLineParser(prog="python -m stackwise_ray.report", description="Plots and a summary of a sweep.")
    parser.add_argument("experiment_dir", help="the sweep's directory (holds results.csv and phases.csv)")
    parser.add_argument("--out", help="where to write the report (default: EXPERIMENT_DIR/report)")
    args = parser.parse_args(argv)
    if not storage.exists(storage.join(args.experiment_dir, "results.csv")):
        return refuse(args.experiment_dir, "no results.csv here")
    if problem := out_dir_problem(args.out):
        return refuse(f"--out {args.out}", problem)
    try:
        paths = write_report(args.experiment_dir, args.out)
    except BadTableError as e:
        return refuse(None, e)
    except OSError as e:  # a read-only or full destination
        return refuse(args.out or storage.join(args.experiment_dir, "report"), f"cannot write the report: {e.strerror or e}")
    print(f"report: {paths['summary_html']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

