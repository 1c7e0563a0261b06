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
# # 04 — Per-layer sensitivity: which activation quantizer hurts on its own
#
# Reads the CSVs written by the sensitivity script (one per model):
#
# ```bash
# python -m esc.analysis.sensitivity --study demo --precision w4a4 \
#     --out results/sensitivity/ast_kws.csv            # + Hydra overrides (model=..., task=...)
# # (--max-test-clips N for a faster look; the committed CSV uses all 2,520 test clips: a 500-clip
# #  subset happened to give max and ESC the same all-on accuracy, 94.6%, though they differ by
# #  1.5 points on the full set)
# ```
#
# For each activation quantizer alone (all others off, weights float), with the clip range
# taken from the study's `minmax` row (clip = observed max |x|) and `esc` row, the script records
# the test-metric drop against FP32 on the same test clips. CSVs are read from
# `$ESC_SENSITIVITY` (a folder, default `results/sensitivity`); figures go to `$ESC_FIGURES`.

# %%
import os
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
import pandas as pd

from esc.analysis.rows import ROOT, calibrator_sort_key, note, save_figure, short_name

SENS_DIR = Path(os.environ.get("ESC_SENSITIVITY") or ROOT / "results" / "sensitivity")
paths = sorted(SENS_DIR.glob("*.csv")) if SENS_DIR.exists() else []
frames = [pd.read_csv(p) for p in paths]
df = pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()
print(f"{len(paths)} sensitivity CSVs under {SENS_DIR}: {[p.name for p in paths]}")
if df.empty:
    note(f"no sensitivity CSVs under {SENS_DIR}: run `python -m esc.analysis.sensitivity ...` first")

# %%
if not df.empty:
    for (model, task, precision), g in df.groupby(["model", "task", "precision"]):
        layers = g[g["quantizer"] != "ALL"]
        cals = sorted(layers["calibrator"].unique(), key=calibrator_sort_key)
        names = list(layers.sort_values("index")["quantizer"].drop_duplicates())
        idx = np.arange(len(names))
        width = 0.8 / max(len(cals), 1)
        fig, ax = plt.subplots(figsize=(max(8, 0.16 * len(names) + 4), 4.8))
        summary = {}
        for j, cal in enumerate(cals):
            d = layers[layers["calibrator"] == cal].set_index("quantizer")["drop"].reindex(names)
            all_drop = g[(g["quantizer"] == "ALL") & (g["calibrator"] == cal)]["drop"]
            ax.bar(idx + (j - (len(cals) - 1) / 2) * width, d.values, width, color=f"C{j}",
                   label=f"{cal} clips (all on: drop {all_drop.iloc[0]:.3g})" if len(all_drop) else f"{cal} clips")
            top = d.sort_values(ascending=False).head(5)
            summary[cal] = ", ".join(f"{short_name(n)} {v:.3g}" for n, v in top.items())
        ax.axhline(0, color="k", lw=0.6)
        metric = g["metric_name"].iloc[0]
        n_clips = g["test_clips"].iloc[0]
        ref = g["reference"].iloc[0] if "reference" in g else "fp32"
        ax.set_ylabel(f"{metric} drop vs {ref} (one quantizer on)")
        ax.set_title(f"{model} / {task}: {int(g['bits'].iloc[0])}-bit activations, clips from the {precision} rows "
                     f"({n_clips} test clips, {ref} {g['fp32'].iloc[0]:.3g})", fontsize=9)
        step = max(1, len(names) // 60)
        ax.set_xticks(idx[::step])
        ax.set_xticklabels([short_name(n) for n in names[::step]], rotation=90, fontsize=6)
        ax.set_xlabel("activation quantizer (forward order)")
        ax.grid(axis="y", alpha=0.3)
        ax.legend(fontsize=8)
        fig.tight_layout()
        save_figure(fig, f"04_sensitivity_{model}_{task}")
        plt.close(fig)
        print(f"{model} / {task}: largest single-layer drops")
        for cal, text in summary.items():
            print(f"  {cal}: {text}")
        pivot = layers.pivot_table(index="quantizer", columns="calibrator", values="drop").reindex(names)
        print("sum of single-layer drops:", pivot.sum().round(3).to_dict(),
              "| all on:", g[g["quantizer"] == "ALL"].set_index("calibrator")["drop"].round(3).to_dict())

# %% [markdown]
# **Reading.** Each bar is the metric lost when only that activation quantizer is 4-bit (weights
# and every other activation in float), with the clip of the max calibrator (observed range) and
# of ESC; the legend gives the drop with all quantizers on at once. Tall max bars show the layers
# whose wide range alone breaks the model at 4 bits; where the ESC bar is much lower, ESC's clip
# fixed that layer. ESC chooses all scales jointly (its fitness is the whole model's loss), so
# one ESC clip alone need not beat max — a clip can be set to compensate for another layer — and
# the sum of ESC's single-layer drops can exceed its all-on drop; compare the all-on drops for
# the calibrators, the bars for where each one's damage sits. What it does **not** show: interactions (the all-on drop is usually larger
# than any single bar and need not equal their sum), the effect of 4-bit weights (the rows' clips
# were calibrated with the row's weight precision but the weights stay float here), or noise:
# with the 2,520 KWS test clips one clip is 0.04 accuracy points, so drops (or negative drops,
# i.e. small gains) of a few clips come from a handful of borderline clips flipping and should not
# be ranked against each other.
