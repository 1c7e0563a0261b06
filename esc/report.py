"""Turn result rows into paper-style tables and plots.

``python -m esc.report --study demo`` reads ``experiments/rows/demo/*.json`` and writes to
``results/demo/``:

* ``table.csv``: one line per run (task, model, precision, scope, calibrator, ptq, metric, fp32,
  quantized, drop, loop counts for ASR, calib_seconds, ...);
* ``table.md``: the paper's Table 1 shape, rows = calibrator x precision x scope, columns = model/task,
  cells = quantized metric (mean ± std over seeds when there are several), and below it the hub
  revisions (``repo@commit``) the rows loaded, when any came from the Hugging Face hub;
* ``metric_by_calibrator.png``: the metric per calibrator per precision, one panel per model/task;
* ``esc_fitness.png``: ESC's best and mean fitness per generation (when ESC rows exist);
* ``pairs.csv`` / ``pairs.md``: for every pair of rows that differ only in the calibrator axis
  (same model, task, precision, PTQ method, calibration set, seed and data hashes: the same test clips) the
  metric difference with a 95% paired bootstrap interval; ``n.s.``: the interval contains zero;
* ``provenance.md``: how many rows came from which commit (``-dirty`` with the diff hash for a
  modified tree); writing into ``results/`` is refused when the checkout or any row is dirty,
  unless ``--allow-dirty``;
* ``failed.md``: the runs whose row is an error (when there are any);
* ``asr_loops.md`` (ASR rows): corpus WER next to the looping hypotheses, WER without them and
  the median per-utterance WER;
* ``esc_timings.md`` (ESC rows that record ``calib_timings``): local step, seconds per generation,
  one FP32 pass over the calibration set, and the two ratios ESC's cost is judged by (a generation
  over population x FP32 passes; the local step in generations);

Rows that share model, task, precision, calibrator, PTQ method and seed but differ in another
setting (an ablation's ``calibrator.generations``, a smaller ``calibration.num_samples``, other data
bytes) are told apart by a ``setting`` label naming the differing values, in every table.
* ``rows/``: a copy of the raw rows and per-sample results (what notebooks and later reports read
  when ``experiments/`` is absent, e.g. on a fresh clone).
"""
from __future__ import annotations

import argparse
import importlib
import itertools
import json
import logging
from collections import defaultdict
import shutil
from pathlib import Path

import numpy as np

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import pandas as pd  # noqa: E402

from esc.config import project_root  # noqa: E402
from esc.results import NEUTRAL_DEFAULTS, flatten, git_state, read_rows  # noqa: E402
from esc.stats import paired_bootstrap  # noqa: E402

log = logging.getLogger("esc.report")

COLUMNS = ["task", "model", "precision", "scope", "calibrator", "ptq", "setting", "seed", "calibration_seed", "metric",
           "higher_is_better", "fp32", "quantized", "drop", "rel_drop", *(LOOP_COLUMNS := ["looping", "WER_no_loops", "WER_median"]),
           "calib_seconds", "ptq_seconds", "eval_seconds", "forward_passes", "n_act_quantizers", "calib_samples", "revisions", "git_commit", "key"]
CALIBRATOR_ORDER = ["none", "minmax", "percentile", "entropy", "mse", "esc"]
PAIR_AXES = ("model", "task", "precision", "scope", "calibrator", "ptq", "seed")
#: Rows written before the scope axis existed quantized what the ``full`` scope does.
SCOPE_BEFORE_AXIS = "full"


def row_scope(row: dict) -> str:
    """A row's scope: its ``scope`` field, else ``none`` (FP32) or :data:`SCOPE_BEFORE_AXIS` for rows that predate it."""
    return row.get("scope", "none" if row.get("precision") == "fp32" else SCOPE_BEFORE_AXIS)


def _flatten(node) -> dict[str, str]:
    """Dotted-key view ``{"calibrator.generations": "10", ...}`` of a nested config axis (values as JSON),
    with every option of :data:`esc.results.NEUTRAL_DEFAULTS` filled in where a row predates it, and
    without data locations (``${paths...}`` strings: the rows' ``data_hashes`` say which bytes were used)."""
    flat = {**NEUTRAL_DEFAULTS, **flatten(node)}
    return {k: json.dumps(v) for k, v in flat.items() if not (isinstance(v, str) and v.startswith("${paths."))}


def setting(row: dict) -> dict[str, str]:
    """A row's flattened config (:func:`_flatten`) plus its splits' content hashes (``data.test``, ...): other bytes never merge."""
    return {**_flatten(row.get("axes", {})), **{f"data.{k}": v for k, v in (row.get("data_hashes") or {}).items()}}


def setting_labels(rows: list[dict]) -> dict[str, str]:
    """Per row key, the config values or data hashes that set the row apart from the other rows with the same
    model, task, precision, calibrator, PTQ method and seed (``"calibration.num_samples=32"``); ``""`` when none."""
    groups = defaultdict(list)
    for r in rows:
        groups[tuple(r.get(a) for a in PAIR_AXES)].append(r)
    labels = {}
    for group in groups.values():
        flat = [setting(r) for r in group]
        differing = [k for k in sorted(set().union(*flat)) if len({f.get(k) for f in flat}) > 1]
        for r, f in zip(group, flat):
            labels[r["key"]] = ", ".join(f"{k}={f.get(k, 'unset')}" for k in differing)
    return labels


def revision_list(revisions: dict[str, str] | None) -> str:
    """A row's hub revisions as ``repo@commit`` words, sorted (``""`` for a row that loaded nothing from the hub)."""
    return " ".join(f"{repo}@{commit}" for repo, commit in sorted((revisions or {}).items()))


def labelled(name: str, setting: str) -> str:
    """``name`` with its setting label in brackets, when it has one."""
    return f"{name} ({setting})" if setting else name


def rows_frame(rows: list[dict]) -> pd.DataFrame:
    """Successful rows as a DataFrame with the :data:`COLUMNS` (errors are logged and dropped)."""
    ok = [r for r in rows if r.get("status") == "ok"]
    for r in rows:
        if r.get("status") != "ok":
            log.warning("run %s failed: %s", r.get("key"), r.get("error"))
    ok = [{**r, "scope": row_scope(r),
           **{k: r.get("metrics", {}).get(k) for k in LOOP_COLUMNS}} for r in ok]
    labels = setting_labels(ok)
    df = pd.DataFrame([{**r, "setting": labels[r["key"]], "revisions": revision_list(r.get("revisions"))} for r in ok],
                      columns=COLUMNS)
    order = {c: i for i, c in enumerate(CALIBRATOR_ORDER)}
    return df.sort_values(["task", "model", "precision", "scope", "calibrator", "ptq", "seed"],
                          key=lambda s: s.map(order).fillna(len(order)) if s.name == "calibrator" else s).reset_index(drop=True)


def _cell(values: pd.Series) -> str:
    if len(values) == 1:
        return f"{values.iloc[0]:.4g}"
    return f"{values.mean():.4g} ± {values.std(ddof=1):.2g}"


def paper_table(df: pd.DataFrame) -> pd.DataFrame:
    """Rows calibrator x precision (x ptq), columns ``model / task (metric)``; FP32 first."""
    method = df["calibrator"].where(df["ptq"] == "none", df["calibrator"] + " + " + df["ptq"])
    df = df.assign(column=df["model"] + " / " + df["task"] + " (" + df["metric"] + ")",
                   method=[labelled(m, s) for m, s in zip(method, df["setting"])])
    df.loc[df["precision"] == "fp32", "method"] = "FP32"
    table = df.groupby(["precision", "scope", "method", "column"], sort=False)["quantized"].apply(_cell).unstack("column")
    return table.reset_index().fillna("-")


def markdown(table: pd.DataFrame) -> str:
    """A DataFrame as a GitHub markdown table."""
    lines = ["| " + " | ".join(map(str, table.columns)) + " |", "|" + "---|" * len(table.columns)]
    lines += ["| " + " | ".join(str(v) for v in row) + " |" for row in table.itertuples(index=False)]
    return "\n".join(lines) + "\n"


def write_tables(df: pd.DataFrame, out: Path) -> None:
    """Write ``table.csv`` (one line per run), ``table.md`` (paper shape, then the hub revisions) and, with PTQ rows, ``ptq_table.md``."""
    df.to_csv(out / "table.csv", index=False, float_format="%.6g")
    revisions = sorted({word for words in df["revisions"] for word in words.split()})
    note = f"\nHub revisions: {', '.join(revisions)}\n" if revisions else ""
    (out / "table.md").write_text(markdown(paper_table(df)) + note)
    table = ptq_table(df)
    if table is not None:
        (out / "ptq_table.md").write_text("PTQ methods on top of each calibrator (in brackets: change vs calibration alone)\n\n"
                                          + markdown(table))
    loops = df[df["looping"].notna()]
    if not loops.empty:
        cols = ["model", "task", "precision", "scope", "calibrator", "ptq", "setting", "seed", "quantized", *LOOP_COLUMNS]
        (out / "asr_loops.md").write_text(
            "ASR: corpus WER (`quantized`) next to the number of looping hypotheses (at least twice the reference length), "
            "the WER without them and the median per-utterance WER\n\n" + markdown(loops[cols].round(4)))


def ptq_table(df: pd.DataFrame) -> pd.DataFrame | None:
    """Rows model x precision x calibrator, columns PTQ methods, cells ``metric (±change vs calibration alone)``.

    ``None`` when the rows hold no PTQ method besides ``none``.
    """
    q = df[df["precision"] != "fp32"]
    if set(q["ptq"]) <= {"none"}:
        return None
    q = q.assign(calibrator=[labelled(c, s) for c, s in zip(q["calibrator"], q["setting"])])
    mean = q.groupby(["model", "task", "metric", "precision", "scope", "calibrator", "ptq"])["quantized"].mean().unstack("ptq")
    base = mean["none"] if "none" in mean.columns else None
    cells = mean.copy().astype(object)
    for col in mean.columns:
        for idx, value in mean[col].items():
            if pd.isna(value):
                cells.loc[idx, col] = "-"
            elif base is None or col == "none" or pd.isna(base[idx]):
                cells.loc[idx, col] = f"{value:.4g}"
            else:
                cells.loc[idx, col] = f"{value:.4g} ({value - base[idx]:+.3g})"
    order = ["none"] + sorted(c for c in cells.columns if c != "none")
    return cells[[c for c in order if c in cells.columns]].reset_index()


def plot_metric(df: pd.DataFrame, out: Path) -> None:
    """Bar chart: metric per calibrator, grouped by precision, one panel per model/task."""
    groups = list(df.groupby(["model", "task", "metric"]))
    fig, axes = plt.subplots(1, len(groups), figsize=(6 * len(groups), 4), squeeze=False)
    for ax, ((model, task, metric), g) in zip(axes[0], groups):
        fp = g["fp32"].mean()
        q = g[g["precision"] != "fp32"]
        pivot = q.pivot_table(index="precision", columns="calibrator", values="quantized", aggfunc="mean")
        pivot = pivot[[c for c in CALIBRATOR_ORDER if c in pivot.columns] + [c for c in pivot.columns if c not in CALIBRATOR_ORDER]]
        pivot.plot.bar(ax=ax, rot=0)
        ax.axhline(fp, color="k", ls="--", lw=1, label="FP32")
        ax.set_title(f"{model} / {task}")
        ax.set_ylabel(metric)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "metric_by_calibrator.png", dpi=120)
    plt.close(fig)


def plot_fitness(rows: list[dict], out: Path) -> bool:
    """ESC fitness curves (best and mean per generation); returns False when there is no ESC row."""
    esc_rows = [r for r in rows if r.get("status") == "ok" and r.get("history", {}).get("best")]
    if not esc_rows:
        return False
    fig, ax = plt.subplots(figsize=(6, 4))
    for r in esc_rows:
        label = f"{r['model']} {r['precision']} s{r['seed']}"
        line, = ax.plot(r["history"]["best"], label=f"{label} best")
        ax.plot(r["history"]["mean"], color=line.get_color(), ls=":", label=f"{label} mean")
    ax.set_xlabel("generation")
    ax.set_ylabel("fitness (calibration set)")
    ax.set_yscale("log")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / "esc_fitness.png", dpi=120)
    plt.close(fig)
    return True


def load_samples(rows_dir: Path, key: str) -> dict[str, np.ndarray] | None:
    """The quantized model's per-sample results of row ``key`` (None if not saved)."""
    path = Path(rows_dir) / f"{key}.samples.npz"
    if not path.exists():
        return None
    with np.load(path) as z:
        return {k.split("/", 1)[1]: z[k] for k in z.files if k.startswith("quantized/")} or None


def metric_function(task_class: str):
    """``metric_from_samples`` of the task class recorded in a row."""
    module, _, cls = task_class.rpartition(".")
    return getattr(importlib.import_module(module), cls).metric_from_samples


def pair_table(rows: list[dict], rows_dir: Path, n_boot: int = 1000, axis: str = "calibrator",
               baseline: str | None = None) -> pd.DataFrame:
    """Paired bootstrap CI of the metric difference between rows whose config and data differ only in ``axis``
    (``calibrator``: every pair; ``ptq`` with ``baseline="none"``: each PTQ method against calibration alone),
    on the same test clips. Rows with a setting label (:func:`setting_labels`) carry it in ``value`` / ``versus``."""
    ok = [{**r, "scope": row_scope(r)} for r in rows
          if r.get("status") == "ok" and r.get("precision") != "fp32" and r.get("task_class")]
    labels = setting_labels(ok)
    fixed = [a for a in PAIR_AXES if a != axis]
    order = CALIBRATOR_ORDER if axis == "calibrator" else [baseline] if baseline else []

    def group_key(r: dict) -> tuple:  # every config axis but ``axis`` and the data (names first, for a readable order)
        rest = {k: v for k, v in r.get("axes", {}).items() if k != axis}
        return tuple(str(r[a]) for a in fixed), json.dumps(setting({**r, "axes": rest}), sort_keys=True)

    out = []
    for _, group in itertools.groupby(sorted(ok, key=group_key), key=group_key):
        group = sorted(group, key=lambda r: (order.index(r[axis]) if r[axis] in order else len(order), r[axis], labels[r["key"]]))
        samples = {r["key"]: load_samples(rows_dir, r["key"]) for r in group}
        for a, b in itertools.combinations(group, 2):
            if samples[a["key"]] is None or samples[b["key"]] is None or (baseline and a[axis] != baseline):
                continue
            ci = paired_bootstrap(samples[b["key"]], samples[a["key"]], metric_function(a["task_class"]), n_boot=n_boot,
                                  seed=a["seed"])
            out.append({**{f: a[f] for f in fixed}, "metric": a["metric"], "compared": axis,
                        "value": labelled(b[axis], labels[b["key"]]), "versus": labelled(a[axis], labels[a["key"]]), **ci})
    return pd.DataFrame(out, columns=[*fixed, "metric", "compared", "value", "versus", "diff", "lo", "hi", "significant"])


def esc_timings(rows: list[dict]) -> pd.DataFrame:
    """One line per ESC row with ``calib_timings``: its stages in seconds and the ratios
    ``generation / (popsize x FP32 pass)`` and ``local step / generation``."""
    lines = []
    for r in rows:
        t = r.get("calib_timings") or {}
        if r.get("status") != "ok" or not t.get("seconds_per_generation"):
            continue
        gen, fp32 = t["seconds_per_generation"], t.get("fp32_pass", 0.0)
        lines.append({"model": r["model"], "precision": r["precision"], "scope": row_scope(r), "seed": r["seed"],
                      "generations run": int(t["generations_run"]), "popsize": int(t["popsize"]),
                      "local step s": round(t["local"], 1), "s / generation": round(gen, 2), "FP32 pass s": round(fp32, 3),
                      "generation / (popsize x FP32 pass)": round(gen / (t["popsize"] * fp32), 2) if fp32 else float("nan"),
                      "local step / generation": round(t["local"] / gen, 2),
                      "bare forward share": round(t["forward"] / t["fitness"], 3) if t.get("fitness") else float("nan")})
    return pd.DataFrame(lines)


def write_pairs(pairs: pd.DataFrame, out: Path, name: str = "pairs") -> None:
    """Write ``<name>.csv`` and ``<name>.md`` (differences with 95% intervals; n.s. when 0 is inside)."""
    pairs.to_csv(out / f"{name}.csv", index=False, float_format="%.6g")
    table = pairs[list(pairs.columns[:pairs.columns.get_loc("metric")])].copy()
    table["comparison"] = [f"{r['value']} − {r['versus']}" for r in pairs.to_dict("records")]
    table["difference [95% CI]"] = [f"{r['diff']:+.3g} [{r['lo']:+.3g}, {r['hi']:+.3g}]" + ("" if r["significant"] else " n.s.")
                                    for r in pairs.to_dict("records")]
    (out / f"{name}.md").write_text(markdown(table))


def archive_rows(rows_dir: Path, out: Path) -> None:
    """Mirror the rows (and their per-sample files) into ``out/rows`` so committed results carry
    exactly the raw data the tables were built from (rows no longer in ``rows_dir`` are removed)."""
    dest = out / "rows"
    if dest.resolve() == Path(rows_dir).resolve():
        return
    dest.mkdir(parents=True, exist_ok=True)
    keep = {p.name for p in Path(rows_dir).iterdir() if p.suffix in (".json", ".npz") and not p.name.startswith(".")}
    for name in keep:
        shutil.copy2(Path(rows_dir) / name, dest / name)
    for stale in dest.iterdir():
        if stale.name not in keep and stale.suffix in (".json", ".npz"):
            stale.unlink()


def provenance_line(rows: list[dict]) -> str:
    """Which commits the rows came from: ``"Rows: 12 from abc1234, 3 from def5678-dirty (diff 0a1b...)"``."""
    counts: dict[str, int] = defaultdict(int)
    for r in rows:
        commit = r.get("git_commit") or "unknown"
        label = commit[:7] + ("-dirty" if commit.endswith("-dirty") else "")
        if r.get("git_diff_sha256"):
            label += f" (diff {r['git_diff_sha256']})"
        counts[label] += 1
    return "Rows: " + ", ".join(f"{n} from {label}" for label, n in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0])))


def dirty_sources(rows: list[dict]) -> list[str]:
    """Why these rows would not be evidence: the current tree is modified, or some rows came from a modified tree."""
    reasons = []
    if (git_state()[0] or "").endswith("-dirty"):
        reasons.append("this checkout has uncommitted changes to tracked files")
    dirty = sum(str(r.get("git_commit", "")).endswith("-dirty") for r in rows)
    if dirty:
        reasons.append(f"{dirty} of {len(rows)} rows come from a modified tree")
    return reasons


def build_report(rows_dir: Path, out: Path, allow_dirty: bool = True) -> pd.DataFrame:
    """Read rows from ``rows_dir`` and write tables and plots (and a copy of the rows) to ``out``;
    with ``allow_dirty=False`` refuse (before writing anything) when :func:`dirty_sources` finds a reason."""
    rows = read_rows([rows_dir])
    if not rows:
        raise SystemExit(f"no result rows under {rows_dir}; run a sweep first (e.g. `make demo`)")
    if not allow_dirty and (reasons := dirty_sources(rows)):
        raise SystemExit(f"refusing to write {out}: {'; '.join(reasons)}. Commit, rerun the changed rows, or pass --allow-dirty "
                         "(make ... ALLOW_DIRTY=1) to write them anyway")
    out.mkdir(parents=True, exist_ok=True)
    archive_rows(rows_dir, out)
    df = rows_frame(rows)
    if df.empty:
        raise SystemExit(f"all {len(rows)} runs under {rows_dir} failed; see their 'error' fields")
    write_tables(df, out)
    plot_metric(df, out)
    plot_fitness(rows, out)
    write_pairs(pair_table(rows, rows_dir), out)
    (out / "provenance.md").write_text(provenance_line(rows) + "\n")
    if not (timings := esc_timings(rows)).empty:
        (out / "esc_timings.md").write_text("ESC's cost per stage (wall seconds on the machine that made each row)\n\n"
                                            + markdown(timings))
    failed = [r for r in rows if r.get("status") != "ok"]
    (out / "failed.md").unlink(missing_ok=True)
    if failed:  # listed, not only logged: a failed cell must not pass for a missing one
        lines = [f"- `{r.get('key')}` {r.get('study', '')}: {r.get('error', 'no error recorded')}" for r in failed]
        (out / "failed.md").write_text(f"{len(failed)} run(s) failed (a rerun of the sweep retries them):\n\n" + "\n".join(lines) + "\n")
        log.warning("%d run(s) failed, listed in %s", len(failed), out / "failed.md")
    log.info("%s", provenance_line(rows))
    if df["ptq"].nunique() > 1 and (df["ptq"] == "none").any():
        write_pairs(pair_table(rows, rows_dir, axis="ptq", baseline="none"), out, "pairs_ptq")
    log.info("wrote %s (%d runs)", out, len(df))
    return df


def main(argv: list[str] | None = None) -> None:
    """Command line: ``python -m esc.report --study NAME [--rows DIR] [--out DIR]``."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--study", default="demo")
    parser.add_argument("--rows", type=Path, help="rows directory (default experiments/rows/STUDY, else the committed results/STUDY/rows)")
    parser.add_argument("--out", type=Path, help="output directory (default results/STUDY)")
    parser.add_argument("--allow-dirty", action="store_true", help="write results/ even from a modified tree or dirty rows")
    parser.add_argument("--check-clean", action="store_true", help="only check that the checkout has no uncommitted changes")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    if args.check_clean:
        if not args.allow_dirty and (git_state()[0] or "").endswith("-dirty"):
            raise SystemExit("refusing to start: this checkout has uncommitted changes to tracked files, so its rows would "
                             "not say which code made them. Commit first, or pass ALLOW_DIRTY=1 to make")
        return
    root = Path(project_root())
    out = args.out or root / "results" / args.study
    rows = args.rows or root / "experiments" / "rows" / args.study
    if args.rows is None and not rows.is_dir():
        rows = out / "rows"
    inside_results = out.resolve().is_relative_to((root / "results").resolve())
    build_report(rows, out, allow_dirty=args.allow_dirty or not inside_results)
    print(out / "table.md")


if __name__ == "__main__":
    main()
