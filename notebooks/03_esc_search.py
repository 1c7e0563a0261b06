# ---
# jupyter:
#   jupytext:
#     formats: py:percent
#     text_representation:
#       extension: .py
#       format_name: percent
#   kernelspec:
#     display_name: Python 3
#     language: python
#     name: python3
# ---

# %% [markdown]
# # 03 — The ESC search: fitness per generation, and the test metric along the way
#
# ESC rows store `history.best` and `history.mean` (the best and mean fitness of each CMA-ES
# generation's population on the calibration clips), `local_fitness` (the local-step start) and
# `final_fitness` (of the scales set). Rows from runs with `calibration.monitor_every=N > 0`
# (the demo sets 10) also hold `monitor_generation`, `monitor_fitness` (calibration fitness of the
# search mean) and `monitor_metric` (test metric of the search mean) at generation 1 and every N
# generations; the second figure puts that test metric next to the calibration fitness: with
# ~100 calibration clips the search can fit those clips and lose on the test set. (Older shapes
# under `history.monitor` — `{generation: value}`, `[[generation, value], ...]` — are read too.)
#
# Rows: `$ESC_ROWS` (default `results/<study>/rows`, study `$ESC_STUDY`, default `demo`);
# figures: `$ESC_FIGURES` (default `results/figures`).

# %%
import os

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np

from esc.analysis.rows import axis, load_rows, note, save_figure

STUDY = os.environ.get("ESC_STUDY", "demo")
rows, folder = load_rows(STUDY)
esc_rows = [r for r in rows if r.get("history", {}).get("best")]
esc_rows.sort(key=lambda r: (r["model"], r["task"], r["precision"], r.get("ptq", ""), r.get("seed", 0)))
print(f"{len(rows)} rows from {folder}; {len(esc_rows)} with an ESC search history")
if not esc_rows:
    note("no ESC rows with a search history (calibrator=esc, generations > 0): nothing to plot")


def label(r: dict) -> str:
    """Short legend label of a row."""
    extra = "" if r.get("ptq", "none") == "none" else f" +{r['ptq']}"
    fit = axis(r, "calibrator", "fitness", default="?")
    return f"{r['model']} {r['precision']}{extra} s{r.get('seed', 0)} ({fit})"


def monitor_series(r: dict) -> tuple[np.ndarray, np.ndarray, np.ndarray | None] | None:
    """``(generations, test metric, calibration fitness of the mean or None)`` of a row's monitor (None if absent)."""
    h = r.get("history", {})
    if h.get("monitor_generation") and h.get("monitor_metric"):
        fit = np.asarray(h["monitor_fitness"], dtype=float) if h.get("monitor_fitness") else None
        return np.asarray(h["monitor_generation"], dtype=float), np.asarray(h["monitor_metric"], dtype=float), fit
    mon = h.get("monitor")
    if not mon:
        return None
    if isinstance(mon, dict):
        pairs = [(int(k), float(v)) for k, v in mon.items()]
    else:
        pairs = [(int(item[0]), float(item[1])) if isinstance(item, (list, tuple)) else (i, float(item)) for i, item in enumerate(mon)]
    pairs.sort()
    return np.array([p[0] for p in pairs], dtype=float), np.array([p[1] for p in pairs]), None


# %%
if esc_rows:
    fig, ax = plt.subplots(figsize=(8, 5))
    positive = all(min(r["history"]["best"] + r["history"]["mean"]) > 0 for r in esc_rows)
    for r in esc_rows:
        h = r["history"]
        gens = np.arange(1, len(h["best"]) + 1)
        line, = ax.plot(gens, h["best"], lw=1.2, label=f"{label(r)} best")
        ax.plot(gens, h["mean"], color=line.get_color(), ls=":", lw=1, label=f"{label(r)} population mean")
        if h.get("local_fitness"):
            ax.plot([0], h["local_fitness"], marker="o", color=line.get_color(), ms=5)
        if h.get("final_fitness"):
            ax.plot([gens[-1]], h["final_fitness"], marker="*", color=line.get_color(), ms=9)
        kept = bool(h.get("kept_local", [0])[0])
        print(f"{label(r)}: local {h.get('local_fitness', ['?'])[0]}, search result {h.get('search_fitness', ['?'])[0]}, "
              f"final {h.get('final_fitness', ['?'])[0]}{' (guard kept the local scales)' if kept else ''}; "
              f"test {r['metric']} {r['quantized']:.4g} (FP32 {r['fp32']:.4g})")
    if positive:
        ax.set_yscale("log")
    ax.set_xlabel("generation (0 = local-step start, ● ; ★ = fitness of the scales set)")
    ax.set_ylabel("fitness on the calibration clips (lower is better)")
    ax.set_title("ESC: CMA-ES fitness per generation")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    save_figure(fig, "03_esc_search")
    plt.close(fig)

# %% [markdown]
# **Reading.** Solid lines are the best candidate of each generation, dotted lines the mean
# fitness of the population (it includes exploration noise, so it sits above the best); the dot
# at generation 0 is the fitness of the local-step (per-layer MSE) scales and the star the
# fitness of the scales finally set (the mean of the final search distribution, or the local
# scales if the guard fired). A curve that keeps falling says the budget is not exhausted; a
# flat one that the search converged (or is stuck). This is the fitness on the **calibration**
# clips only: it does **not** show test accuracy/WER along the search (next figure, when the rows
# carry a `monitor`) or run-to-run variation beyond the seeds drawn.

# %%
monitored = [(r, monitor_series(r)) for r in esc_rows]
monitored = [(r, m) for r, m in monitored if m is not None]
if esc_rows and not monitored:
    note("no ESC row has a monitor (test metric of the search mean along the search): the overfitting view needs "
         "rows from a run with calibration.monitor_every > 0")
if monitored:
    fig, axes = plt.subplots(len(monitored), 1, figsize=(8, 3.6 * len(monitored)), squeeze=False)
    for ax, (r, (g_mon, v_mon, f_mon)) in zip(axes[:, 0], monitored):
        h = r["history"]
        gens = np.arange(1, len(h["best"]) + 1)
        ax.plot(gens, h["best"], color="C0", lw=1.2, label="best fitness (calibration)")
        ax.plot(gens, h["mean"], color="C0", ls=":", lw=1, label="population mean fitness (calibration)")
        if f_mon is not None:
            ax.plot(g_mon, f_mon, color="C0", marker="s", ms=3, lw=1.5, label="fitness of the search mean (calibration)")
        if h.get("local_fitness"):
            ax.plot([0], h["local_fitness"], "o", color="C0")
        if min(h["best"] + h["mean"] + (list(f_mon) if f_mon is not None else [])) > 0:
            ax.set_yscale("log")
        ax.set_ylabel("fitness (lower is better)", color="C0")
        ax.set_xlabel("generation")
        ax2 = ax.twinx()
        ax2.plot(g_mon, v_mon, color="C3", marker="o", ms=3, label=f"test {r['metric']} of the search mean")
        ax2.axhline(r["fp32"], color="C3", ls="--", lw=0.8, label=f"FP32 {r['fp32']:.3g}")
        ax2.set_ylabel(f"test {r['metric']}", color="C3")
        best_g = int(g_mon[np.argmax(v_mon) if r.get("higher_is_better", True) else np.argmin(v_mon)])
        ax2.axvline(best_g, color="C3", ls=":", lw=0.8)
        ax.set_title(f"{label(r)}: best test {r['metric']} at generation {best_g}, last at {int(g_mon[-1])}")
        lines = ax.get_legend_handles_labels()
        lines2 = ax2.get_legend_handles_labels()
        ax.legend(lines[0] + lines2[0], lines[1] + lines2[1], fontsize=7, loc="best")
    fig.tight_layout()
    save_figure(fig, "03_esc_overfitting")
    plt.close(fig)

# %% [markdown]
# **Reading (when drawn).** Blue: fitness on the calibration clips (best and population mean per
# generation, squares: the search mean at the monitored generations); red: the test metric of
# that same search mean; the dotted red line
# marks the generation with the best test metric. If the fitness keeps improving while the test
# metric peaks early and then declines, the search is fitting the calibration clips (a case for
# more clips, fewer generations or a distribution-level fitness such as `kl`). It does **not**
# show a test metric the run would have reported (rows report only the final scales) nor noise
# bars: each monitor point is one evaluation on the test set used for the final number.
