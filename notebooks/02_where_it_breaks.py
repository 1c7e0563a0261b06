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
# # 02 — Where 4-bit breaks: weights only, activations only, or both
#
# Compares, per model and calibrator, the task metric at **W4** (4-bit weights, float
# activations), **A4** (float weights, 4-bit activations) and **W4A4** (both) against FP32.
# Rows come from the `breaks` study (`python -m esc.run -m +experiment=breaks`, config
# `conf/experiment/breaks.yaml`), read from `$ESC_ROWS` (default `results/breaks/rows`; another
# study with `$ESC_STUDY`). Figures go to `$ESC_FIGURES` (default `results/figures`).

# %%
import os

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import pandas as pd

from esc.analysis.rows import activation_bits, calibrator_sort_key, frame, load_rows, mean_std, note, save_figure, weight_bits

STUDY = os.environ.get("ESC_STUDY", "breaks")
rows, folder = load_rows(STUDY)
print(f"{len(rows)} rows from {folder}")


def kind(row: dict) -> str | None:
    """'W4' / 'A4' / 'W4A4' / 'FP32' for the precisions this figure compares (None: other precisions)."""
    w, a = weight_bits(row), activation_bits(row)
    return {(None, None): "FP32", (4, None): "W4", (None, 4): "A4", (4, 4): "W4A4"}.get((w, a))


df = frame([r for r in rows if r.get("ptq", "none") == "none"], extra={"kind": kind})
df = df[df["kind"].notna()]
present = sorted(set(df["kind"]) - {"FP32"})
if df.empty or not present:
    note("no W4 / A4 / W4A4 rows in this study: run `python -m esc.run -m +experiment=breaks` and commit its rows")
else:
    missing = [k for k in ("W4", "A4", "W4A4") if k not in present]
    if missing:
        note(f"these precisions have no rows here: {missing} (the figure shows the others)")

# %%
KINDS = ["W4", "A4", "W4A4"]
groups = [] if df.empty or not present else list(df.groupby(["model", "task", "metric"]))
if groups:
    fig, axes = plt.subplots(1, len(groups), figsize=(6.5 * len(groups), 4.5), squeeze=False)
    for ax, ((model, task, metric), g) in zip(axes[0], groups):
        fp = g["fp32"].mean()  # every row records the FP32 metric of its model/task/seed
        cals = sorted(set(g.loc[g["kind"].isin(["A4", "W4A4"]), "calibrator"]), key=calibrator_sort_key)
        width = 0.8 / max(len(cals), 1)
        table, labelled = {}, set()
        w4 = g[g["kind"] == "W4"]
        if not w4.empty:  # no activation calibrator: one bar (per-channel max weights)
            m, s, n = mean_std(w4["quantized"])
            table[("weights only", "W4")] = f"{m:.2f}" + (f" ± {s:.2f} (n={n})" if n > 1 else "")
            ax.bar(0, m, 0.8 / 3, yerr=s if n > 1 else None, capsize=2, color="0.6", label="W4 (no activation calibrator)")
        for j, cal in enumerate(cals):
            for i, k in enumerate(KINDS[1:], start=1):
                sel = g[(g["kind"] == k) & (g["calibrator"] == cal)]
                if sel.empty:
                    continue
                m, s, n = mean_std(sel["quantized"])
                table[(cal, k)] = f"{m:.2f}" + (f" ± {s:.2f} (n={n})" if n > 1 else "")
                ax.bar(i + (j - (len(cals) - 1) / 2) * width, m, width, yerr=s if n > 1 else None, capsize=2,
                       color=f"C{j}", label=None if cal in labelled else cal)
                labelled.add(cal)
        ax.axhline(fp, color="k", ls="--", lw=1, label=f"FP32 {fp:.2f}")
        ax.set_xticks(range(len(KINDS)))
        ax.set_xticklabels(["W4\n(weights only)", "A4\n(activations only)", "W4A4\n(both)"])
        ax.set_ylabel(metric)
        ax.set_title(f"{model} / {task}")
        ax.legend(fontsize=8)
        ax.grid(axis="y", alpha=0.3)
        print(f"{model} / {task} ({metric}); FP32 {fp:.3f}")
        print(pd.Series(table).unstack().reindex(columns=[k for k in KINDS if k in present]).fillna("-").to_string())
    fig.tight_layout()
    save_figure(fig, "02_where_it_breaks")
    plt.close(fig)

# %% [markdown]
# **Reading.** Each panel is one model/task; bars are the quantized metric (mean over seeds,
# error bar = std when there are several) for weights-only 4-bit, activations-only 4-bit and
# both, one colour per activation calibrator, with FP32 as the dashed line. W4 has no activation
# calibrator, so it is a single grey bar (per-channel max weights). If
# the A4 bars sit near W4A4 and W4 sits near FP32, the collapse at W4A4 comes from the
# activations — the case ESC targets. What this does **not** show: which layers break (see
# `04_sensitivity`), whether a gap is beyond test-set noise (see `06_significance` for paired
# intervals), or other weight calibrations (rows use `calibration.weights=minmax` unless set).
