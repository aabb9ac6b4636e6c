"""python -m stackwise_ray.report EXPERIMENT_DIR [--out DIR]

Plots and a summary of a sweep (`python -m stackwise_ray.tune`) from the results.csv and
phases.csv it left in EXPERIMENT_DIR: val_loss_per_stack.png, phase_time_memory.png,
loss_vs_flops.png, summary.md and summary.html in DIR (default EXPERIMENT_DIR/report).

From Python: `write_report(experiment_dir, out_dir)` returns the paths it wrote.
"""

from __future__ import annotations

import argparse
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

from . import storage  # noqa: E402

# Older sweeps or partial runs may lack some columns; they are added empty so the report still renders.
RESULT_COLUMNS = ["trial_id", "kind", "status", "val_loss", "flops", "wall_s", "phases_trained", "phases_reused",
                  "error"]
PHASE_COLUMNS = ["trial_id", "kind", "stack", "val_loss", "cum_flops", "wall_s", "peak_memory_mb", "status"]
PLOTS = {"val_loss_per_stack": "val_loss_per_stack.png", "phase_time_memory": "phase_time_memory.png",
         "loss_vs_flops": "loss_vs_flops.png"}


NUMERIC_COLUMNS = {"val_loss", "flops", "wall_s", "phases_trained", "phases_reused", "stack", "cum_flops",
                   "peak_memory_mb"}


class BadTableError(ValueError):
    """A results.csv or phases.csv that is not what a sweep writes; the message names the file."""


def read_table(path: str, columns: list[str]) -> pd.DataFrame:
    try:
        data = storage.read_bytes(path)
    except FileNotFoundError:
        data = b""
    if b"\0" in data:
        raise BadTableError(f"{path}: a binary file, not CSV")
    try:
        table = pd.read_csv(io.BytesIO(data), dtype={"trial_id": str}, encoding="utf-8")
    except pd.errors.EmptyDataError:  # a sweep with no reported phases writes an empty file
        table = pd.DataFrame()
    except (UnicodeDecodeError, pd.errors.ParserError) as e:
        raise BadTableError(f"{path}: not a CSV table ({str(e).splitlines()[0][:200]})") from None
    if len(table.columns) and "trial_id" not in table:
        raise BadTableError(f"{path}: no trial_id column (not a table written by python -m stackwise_ray.tune)")
    for c in columns:
        if c not in table:
            table[c] = pd.Series(dtype=object if c in ("trial_id", "kind", "status", "error") else float)
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


def best_trial(results: pd.DataFrame):
    """Lowest val_loss among trials that did not error; progressive trials first, since the
    point is to compare them with the baseline."""
    scored = results[(results["status"] != "ERROR") & results["val_loss"].notna()]
    progressive = scored[scored["kind"] != "baseline"]
    pool = progressive if not progressive.empty else scored
    return None if pool.empty else pool.loc[pool["val_loss"].idxmin()]


def comparison_lines(results: pd.DataFrame, labels: dict) -> list[str]:
    best = best_trial(results)
    if best is None:
        return ["No trial finished with a validation loss."]
    lines = [f"Best trial: {labels[best['trial_id']]}, val_loss {best['val_loss']:.4f}."]
    baseline = results[(results["kind"] == "baseline") & results["val_loss"].notna()]
    if best["kind"] != "baseline" and not baseline.empty:
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


def markdown(title, command, header, rows, lines) -> str:
    def cells(row):
        return "| " + " | ".join(c.replace("|", "\\|").replace("\n", " ") for c in row) + " |"

    table = [cells(header), "|" + "---|" * len(header), *(cells(r) for r in rows)]
    images = [f"![{name}]({file})" for name, file in PLOTS.items()]
    return "\n\n".join([f"# {title}", f"Made by `{command}`", "\n".join(table), *lines, *images]) + "\n"


def html_page(title, command, header, rows, lines) -> str:
    e = html.escape
    head = "".join(f"<th>{e(c)}</th>" for c in header)
    body = "".join("<tr>" + "".join(f"<td>{e(c)}</td>" for c in r) + "</tr>\n" for r in rows)
    paragraphs = "".join(f"<p>{e(line)}</p>\n" for line in lines)
    images = "".join(f'<p><img src="{e(file)}" alt="{e(name)}"></p>\n' for name, file in PLOTS.items())
    return (f"<!doctype html>\n<html><head><meta charset=\"utf-8\"><title>{e(title)}</title>"
            "<style>table{border-collapse:collapse}td,th{border:1px solid #ccc;padding:2px 6px}</style></head>\n"
            f"<body><h1>{e(title)}</h1>\n<p>Made by <code>{e(command)}</code></p>\n"
            f"<table><tr>{head}</tr>\n{body}</table>\n{paragraphs}{images}</body></html>\n")


def write_report(experiment_dir: str, out_dir: str | None = None) -> dict:
    command = " ".join(["python -m stackwise_ray.report", shlex.quote(experiment_dir),
                        *(["--out", shlex.quote(out_dir)] if out_dir else [])])
    upload_to = storage.join(experiment_dir, "report") if out_dir is None and storage.is_remote(experiment_dir) else None
    results = read_table(storage.join(experiment_dir, "results.csv"), RESULT_COLUMNS)  # before anything is written
    phases = read_table(storage.join(experiment_dir, "phases.csv"), PHASE_COLUMNS)
    out_dir = tempfile.mkdtemp(prefix="report-") if upload_to else out_dir or os.path.join(experiment_dir, "report")
    os.makedirs(out_dir, exist_ok=True)
    labels = trial_labels(results)
    paths = {name: os.path.join(out_dir, file) for name, file in PLOTS.items()}
    plot_val_loss(results, phases, labels, paths["val_loss_per_stack"])
    plot_time_memory(phases, labels, paths["phase_time_memory"])
    plot_loss_vs_flops(results, phases, labels, paths["loss_vs_flops"])
    title = f"Sweep report: {os.path.basename(storage.resolve(experiment_dir)[1])}"
    header, rows = table_rows(results)
    lines = comparison_lines(results, labels)
    paths["summary_md"] = os.path.join(out_dir, "summary.md")
    paths["summary_html"] = os.path.join(out_dir, "summary.html")
    with open(paths["summary_md"], "w") as f:
        f.write(markdown(title, command, header, rows, lines))
    with open(paths["summary_html"], "w") as f:
        f.write(html_page(title, command, header, rows, lines))
    if upload_to:  # a sweep in object storage gets its report there too
        storage.upload(out_dir, upload_to)
        shutil.rmtree(out_dir)
        paths = {k: storage.join(upload_to, os.path.basename(v)) for k, v in paths.items()}
    return paths


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m stackwise_ray.report",
                                     description="Plots and a summary of a sweep.")
    parser.add_argument("experiment_dir", help="the sweep's directory (holds results.csv and phases.csv)")
    parser.add_argument("--out", help="where to write the report (default: EXPERIMENT_DIR/report)")
    args = parser.parse_args(argv)
    if not storage.exists(storage.join(args.experiment_dir, "results.csv")):
        print(f"error: {args.experiment_dir}: no results.csv here", file=sys.stderr)
        return 2
    try:
        paths = write_report(args.experiment_dir, args.out)
    except BadTableError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"report: {paths['summary_html']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
