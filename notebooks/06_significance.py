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
# # 06 — Significance: spread over seeds and paired bootstrap intervals
#
# Two views of "is this difference real?":
#
# 1. every cell of the main table (model/task x precision x calibrator [+ PTQ]) as mean and spread
#    (std, min-max, each seed as a dot) over the `seed`s present — run-to-run variation of
#    calibration (calibration subset, ES seed);
# 2. for every pair of calibrators evaluated on the same test clips (same model, task, precision,
#    PTQ method and seed), the metric difference with a 95% **paired bootstrap** interval over
#    test clips (`esc.report.pair_table`), intervals containing zero marked — test-set noise.
#
# Rows: `$ESC_ROWS` (default `results/<study>/rows`, study `$ESC_STUDY`, default `demo`); the
# intervals are recomputed from the rows' `.samples.npz` files (`$ESC_BOOT` resamples, default
# 1000), falling back to the study's `pairs.csv` next to the rows folder. Figures: `$ESC_FIGURES`.

# %%
import os

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
import pandas as pd

from esc.analysis.rows import calibrator_sort_key, frame, load_rows, note, save_figure
from esc.report import pair_table

STUDY = os.environ.get("ESC_STUDY", "demo")
N_BOOT = int(os.environ.get("ESC_BOOT", "1000"))
rows, folder = load_rows(STUDY)
print(f"{len(rows)} rows from {folder}")
df = frame(rows)
if not df.empty:
    df["method"] = df["calibrator"].where(df["ptq"] == "none", df["calibrator"] + " + " + df["ptq"])
    df.loc[df["precision"] == "fp32", "method"] = "FP32"

# %%
cells = pd.DataFrame()
if not df.empty:
    cells = (df.groupby(["model", "task", "metric", "precision", "method"])["quantized"]
             .agg(mean="mean", std=lambda v: v.std(ddof=1) if len(v) > 1 else np.nan, min="min", max="max", seeds="count")
             .reset_index())
    print(cells.to_string(index=False, float_format=lambda v: f"{v:.3f}"))
multi = not cells.empty and (cells["seeds"] > 1).any()
if not cells.empty and not multi:
    note("every cell has a single seed: no spread over seeds to show (run the sweep with seed=0,1,2 for it)")
if multi:
    groups = list(df[df["precision"] != "fp32"].groupby(["model", "task", "metric"]))
    fig, axes = plt.subplots(1, len(groups), figsize=(7 * len(groups), 4.5), squeeze=False)
    for ax, ((model, task, metric), g) in zip(axes[0], groups):
        precisions = sorted(g["precision"].unique())
        methods = sorted(g["method"].unique(), key=lambda m: (calibrator_sort_key(m.split(" + ")[0]), m))
        width = 0.8 / max(len(precisions), 1)
        for j, prec in enumerate(precisions):
            for i, m in enumerate(methods):
                v = g[(g["precision"] == prec) & (g["method"] == m)]["quantized"].to_numpy()
                if not len(v):
                    continue
                x = i + (j - (len(precisions) - 1) / 2) * width
                ax.errorbar([x], [v.mean()], yerr=[[v.mean() - v.min()], [v.max() - v.mean()]], fmt="none", ecolor=f"C{j}",
                            alpha=0.4, lw=6)
                ax.errorbar([x], [v.mean()], yerr=[v.std(ddof=1) if len(v) > 1 else 0], fmt="o", color=f"C{j}", capsize=4,
                            label=prec if i == 0 else None)
                ax.scatter(np.full(len(v), x) + 0.04, v, s=8, color="k", zorder=3)
        fp = df[(df["model"] == model) & (df["task"] == task)]["fp32"].mean()
        ax.axhline(fp, color="k", ls="--", lw=1, label=f"FP32 {fp:.3g}")
        ax.set_xticks(range(len(methods)))
        ax.set_xticklabels(methods, rotation=20)
        ax.set_ylabel(metric)
        ax.set_title(f"{model} / {task}: mean ± std (bar: min-max, dots: seeds)", fontsize=10)
        ax.grid(axis="y", alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    save_figure(fig, "06_seed_spread")
    plt.close(fig)

# %% [markdown]
# **Reading (when drawn).** Each point is a cell of the main table: the mean over seeds, with the
# std as a thin error bar, the min-max range as the light band and each seed as a black dot.
# Overlapping bands of two calibrators mean the ordering flips between seeds. This spread covers
# what the seed changes (calibration clips, ES randomness) on a fixed test set; it does **not**
# include test-set sampling noise (next figure) and, with two or three seeds, the std itself is
# very uncertain.

# %%
pairs = pair_table(rows, folder, n_boot=N_BOOT) if rows else pd.DataFrame()
source = f"recomputed from the rows' samples ({N_BOOT} resamples)"
if pairs.empty and (folder.parent / "pairs.csv").exists():
    pairs, source = pd.read_csv(folder.parent / "pairs.csv"), f"read from {folder.parent / 'pairs.csv'}"
if pairs.empty:
    note("no calibrator pairs with per-sample results on the same test clips: no bootstrap intervals to show")
else:
    print(f"{len(pairs)} paired comparisons, {source}; {int((~pairs['significant'].astype(bool)).sum())} contain zero")
    facets = list(pairs.groupby(["model", "task", "precision", "ptq", "metric"]))
    heights = [max(1.5, 0.32 * len(g) + 1) for _, g in facets]
    fig, axes = plt.subplots(len(facets), 1, figsize=(8, sum(heights)), squeeze=False,
                             gridspec_kw={"height_ratios": heights})
    several_seeds = pairs["seed"].nunique() > 1
    for ax, ((model, task, precision, ptq, metric), g) in zip(axes[:, 0], facets):
        g = g.reset_index(drop=True)
        y = np.arange(len(g))[::-1]
        for yi, r in zip(y, g.itertuples(index=False)):
            sig = bool(r.significant)
            ax.errorbar([r.diff], [yi], xerr=[[r.diff - r.lo], [r.hi - r.diff]], fmt="o", capsize=3,
                        color="C3" if sig and r.diff > 0 else ("C0" if sig else "0.55"), mfc=None if sig else "white")
        ax.axvline(0, color="k", lw=0.8)
        ax.set_yticks(y)
        ax.set_yticklabels([f"{r.value} − {r.versus}" + (f" (s{r.seed})" if several_seeds else "")
                            + ("" if r.significant else "  n.s.") for r in g.itertuples(index=False)], fontsize=8)
        extra = "" if ptq == "none" else f" + {ptq}"
        ax.set_title(f"{model} / {task} {precision}{extra}: difference in {metric} [95% paired bootstrap CI]", fontsize=9)
        ax.grid(axis="x", alpha=0.3)
    axes[-1, 0].set_xlabel("metric difference (first minus second); hollow grey = interval contains 0 (n.s.)")
    fig.tight_layout()
    save_figure(fig, "06_paired_bootstrap")
    plt.close(fig)

# %% [markdown]
# **Reading.** Each line compares two calibrators on the same test clips: the dot is the metric
# difference (first minus second) on the full test set, the bar its 95% percentile interval from
# resampling test clips with replacement (the same clips for both runs). Hollow grey points
# ("n.s.") have intervals containing zero: the test set cannot tell those two apart. Filled
# points are significant (red: the first is higher; blue: lower — for an error metric such as
# WER lower is better, so read the sign with the metric). What it does **not** show: variation
# over calibration seeds (previous figure), any correction for the many comparisons made at once
# (with 10 pairs per precision, expect about one spurious "significant" interval in 20 at 95%),
# or uncertainty from a test set that is not representative of deployment.
