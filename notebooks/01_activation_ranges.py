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
# # 01 — Activation ranges and level utilisation (the motivating diagnosis)
#
# For each model, at the lowest activation bit width of the study that has a `minmax` row (e.g.
# W4A4; else the lowest present), this notebook shows per activation quantizer:
#
# * the **observed range** `max |x|` on the calibration clips (the `minmax` row's `clip_hi`),
# * the **clip range chosen by each calibrator** (its row's `clip_hi`), on a log scale,
# * the clip as a fraction of the observed range,
# * the **level utilisation**: the fraction of the integer levels actually hit on the calibration
#   data (`QuantizedModel.measure_level_utilisation`, stored per quantizer in each row).
#
# Rows come from `$ESC_ROWS` (default `results/<study>/rows`) for each study in `$ESC_STUDY`
# (comma-separated, default `demo,whisper_asr_linear`; a model/task pair is drawn from the first study that
# has it); figures go to `$ESC_FIGURES` (default `results/figures`). Nothing is rerun.

# %%
import os

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
import pandas as pd

from esc.analysis.rows import activation_bits, calibrator_sort_key, load_rows, note, save_figure, short_name

STUDIES = os.environ.get("ESC_STUDY", "demo,whisper_asr_linear").split(",")
rows = []
for study in STUDIES:
    found, folder = load_rows(study)
    seen = {(r["model"], r["task"]) for r in rows}
    rows += [r for r in found if (r["model"], r["task"]) not in seen]
    print(f"{len(found)} rows from {folder}")

# %%
quantized = [r for r in rows if activation_bits(r) is not None and r.get("quantizers")]
figures = []
if not quantized:
    note("no rows with quantized activations (and per-quantizer summaries): nothing to plot")
else:
    for model, task in sorted({(r["model"], r["task"]) for r in quantized}):
        mine = [r for r in quantized if r["model"] == model and r["task"] == task]
        # the lowest activation bit width with a minmax row (it gives the observed range), else the lowest present
        with_max = [r for r in mine if r["calibrator"] == "minmax"]
        low = min(activation_bits(r) for r in (with_max or mine))
        mine = [r for r in mine if activation_bits(r) == low]
        print(f"{model} / {task}: lowest activation bit width with a minmax row: {low} bits ({len(mine)} rows)")
        # the precision at that activation width with the most calibrators (W4A4 over A4 on ties: lower weight bits first)
        by_prec = pd.Series([r["precision"] for r in mine]).value_counts()
        precision = sorted(by_prec.index, key=lambda p: (-by_prec[p], p))[0]
        # one row per calibrator (seed 0, or the lowest seed present)
        per_cal: dict[str, dict] = {}
        for r in sorted(mine, key=lambda r: r.get("seed", 0)):
            if r["precision"] == precision and r.get("ptq", "none") == "none":
                per_cal.setdefault(r["calibrator"], r)
        if not per_cal:
            note(f"{model}/{task}: no rows without a PTQ method at {precision}")
            continue
        tables = {}
        for cal, r in per_cal.items():
            act = [q for q in r["quantizers"] if q["kind"] == "activation"]
            tables[cal] = pd.DataFrame(act).set_index("name")[["clip_lo", "clip_hi", "level_utilisation"]]
        names = list(next(iter(tables.values())).index)
        if "minmax" in tables:
            observed = tables["minmax"]["clip_hi"].reindex(names)
        else:
            observed = None
            print(f"{model}/{task} {precision}: no minmax row, so the observed range max|x| is not shown (the figure says so)")
        figures.append((model, task, precision, names, tables, observed))

# %%
for model, task, precision, names, tables, observed in figures:
    idx = np.arange(len(names))
    cals = sorted(tables, key=calibrator_sort_key)
    fig, axes = plt.subplots(3, 1, figsize=(max(8, 0.14 * len(names) + 4), 11), sharex=True)
    if observed is not None:
        axes[0].plot(idx, observed.values, "k-", lw=2, alpha=0.35, label="observed max|x| (minmax)")
    for cal in cals:
        clip = tables[cal]["clip_hi"].reindex(names)
        axes[0].plot(idx, clip.values, marker="o", ms=3, lw=0.8, label=cal)
        if observed is not None:
            axes[1].plot(idx, (clip / observed).values, marker="o", ms=3, lw=0.8, label=cal)
        axes[2].plot(idx, tables[cal]["level_utilisation"].reindex(names).values, marker="o", ms=3, lw=0.8, label=cal)
    axes[0].set_yscale("log")
    axes[0].set_ylabel("clip range (|x| units, log)")
    axes[0].set_title(f"{model} / {task} at {precision}: activation clip ranges per quantizer")
    axes[1].set_yscale("log")
    axes[1].set_ylabel("clip / observed max")
    axes[1].axhline(1.0, color="k", lw=0.6)
    if observed is None:
        axes[1].text(0.5, 0.5, "no minmax row: observed range unknown", transform=axes[1].transAxes, ha="center")
    axes[2].set_ylim(0, 1.05)
    axes[2].set_ylabel("level utilisation")
    axes[2].set_xlabel("activation quantizer (forward order)")
    step = max(1, len(names) // 60)
    axes[2].set_xticks(idx[::step])
    axes[2].set_xticklabels([short_name(n) for n in names[::step]], rotation=90, fontsize=6)
    for ax in axes:
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, ncol=3)
    fig.tight_layout()
    save_figure(fig, f"01_activation_ranges_{model}_{task}")
    plt.close(fig)
    summary = pd.DataFrame({cal: [tables[cal]["level_utilisation"].median(), tables[cal]["clip_hi"].median(),
                                  int((tables[cal]["clip_lo"] >= 0).sum())] for cal in cals},
                           index=["median level utilisation", "median clip", "unsigned grids"]).T
    print(f"{model} / {task} {precision}")
    print(summary.round(3).to_string())
    print("quantizer index -> name:", "; ".join(f"{i}: {n}" for i, n in enumerate(names)))
    if observed is not None:
        print(f"observed max|x| spans {observed.min():.3g} .. {observed.max():.3g} "
              f"({observed.max() / max(observed.min(), 1e-12):.0f}x) over {len(names)} quantizers")
        widest = observed.sort_values(ascending=False).head(5)
        print("widest observed ranges:", "; ".join(f"{n} {v:.3g}" for n, v in widest.items()))

# %% [markdown]
# **Reading.** The top panel shows, per activation quantizer in forward order, how wide the
# activations are (grey: the largest |x| on the calibration clips, which is the minmax clip) and
# which clip each calibrator picked; the middle panel shows that clip as a fraction of the
# observed maximum (how much of the tail each calibrator saturates); the bottom panel shows the
# fraction of the `2^b - 1` integer levels that at least one calibration value lands on with that
# clip. Two things to keep in mind when reading the bottom panel: a non-negative tensor (softmax
# probabilities feeding `attn.av.a`) can only reach about half the levels of a symmetric signed
# grid, whatever the clip — rows made with `precision.activation.unsigned_nonnegative` (the
# default since it was added) give such tensors an unsigned grid instead, recorded as
# `clip_lo = 0` and counted above as "unsigned grids"; and "used" means hit at least once, so at 4
# bits a few values spread over the range already mark most levels used — utilisation near 1
# does not mean the bulk of the distribution is finely resolved. What the figure does **not**
# show: whether a lower clip helps the task (a layer may need its outliers — see
# `02_where_it_breaks` and `04_sensitivity`), utilisation on test data (it is measured on the
# calibration clips), or any spread over seeds (one row per calibrator, the lowest seed). Tick
# labels are shortened names (`.in` = a layer's input quantizer, `.out` = a LayerNorm output);
# the index -> full name list is printed above.
