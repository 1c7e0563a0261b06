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
# # 05 — Ablations: calibration size, ESC budget, population size, fitness, search start
#
# One study per ablation (configs in `conf/experiment/`, run with
# `python -m esc.run -m +experiment=<name>`, add `seed=0,1,2` for a spread):
#
# | study | varied | fixed |
# |---|---|---|
# | `ablation_calib_size` | `calibration.num_samples` 10, 30, 100, 300 | MSE and ESC at W4A4 |
# | `ablation_budget` | `calibrator.generations` 0 (local step only), 10, 25, 50, 100, 200 | ESC at W4A4 |
# | `ablation_popsize` | `calibrator.popsize` 8, 16, default, 32, 64 | ESC at W4A4, 25 generations |
# | `ablation_fitness` | `calibrator.fitness` task, kl, mse | ESC at W4A4 |
# | `ablation_init` | `calibrator.init` output_mse (local step), tensor_mse (the `mse` calibrator) x generations 0, 100 | ESC at W4A4 |
#
# Each figure plots the test metric (mean ± std over seeds when there are several) and the
# calibration time against the varied parameter. Rows: `$ESC_ROWS` (read recursively and split by
# each row's `study`; default `results/<study>/rows` per study); figures: `$ESC_FIGURES`.

# %%
import math

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt

from esc.analysis.rows import axis, calibrator_sort_key, frame, load_rows, mean_std, note, save_figure


def popsize(row: dict):
    """The population size used (null in the config = CMA-ES default 4 + floor(3 ln N))."""
    p = axis(row, "calibrator", "popsize")
    n = row.get("n_act_quantizers") or 1
    return int(p) if p is not None else 4 + int(math.floor(3 * math.log(max(n, 1))))


ABLATIONS = {
    "ablation_calib_size": ("calibration clips", lambda r: axis(r, "calibration", "num_samples", default=r.get("calib_samples")), True),
    "ablation_budget": ("ESC generations (0 = local step only)", lambda r: axis(r, "calibrator", "generations"), False),
    "ablation_popsize": ("ESC population size (★ = CMA-ES default)", popsize, True),
    "ablation_fitness": ("ESC fitness", lambda r: axis(r, "calibrator", "fitness"), None),
    "ablation_init": ("ESC start / generations", lambda r: f"{axis(r, 'calibrator', 'init', default='output_mse')} / {axis(r, 'calibrator', 'generations')}", None),
}


def plot_ablation(study: str, xlabel: str, value, log_x) -> bool:
    """Metric and calibration seconds vs the varied parameter; False (with a note) when there are no rows."""
    rows, folder = load_rows(study, studies=[study])
    rows = [r for r in rows if r.get("precision") != "fp32"]
    if not rows:
        note(f"{study}: no rows yet (run `python -m esc.run -m +experiment={study}`)")
        return False
    df = frame(rows, extra={"x": value, "default_popsize": lambda r: axis(r, "calibrator", "popsize", default=0) is None})
    groups = list(df.groupby(["model", "task", "precision", "metric"]))
    fig, axes = plt.subplots(2, len(groups), figsize=(6 * len(groups), 7), squeeze=False, sharex="col")
    for col, ((model, task, precision, metric), g) in enumerate(groups):
        ax, ax_t = axes[0, col], axes[1, col]
        categorical = log_x is None
        xs_all = list(dict.fromkeys(g["x"])) if categorical else sorted(set(g["x"]))
        for j, cal in enumerate(sorted(g["calibrator"].unique(), key=calibrator_sort_key)):
            gc = g[g["calibrator"] == cal]
            stats = gc.groupby("x").agg(list)
            xs = [x for x in xs_all if x in stats.index]
            pos = [xs_all.index(x) for x in xs] if categorical else xs
            ms = [mean_std(stats.loc[x, "quantized"]) for x in xs]
            ts = [mean_std(stats.loc[x, "calib_seconds"]) for x in xs]
            n_max = max(m[2] for m in ms)
            ax.errorbar(pos, [m[0] for m in ms], yerr=[m[1] for m in ms], marker="o", capsize=3, color=f"C{j}",
                        label=f"{cal} (n={n_max} seed{'s' if n_max > 1 else ''} max)")
            ax_t.errorbar(pos, [t[0] for t in ts], yerr=[t[1] for t in ts], marker="o", capsize=3, color=f"C{j}", label=cal)
            if study == "ablation_popsize":
                for x in xs:
                    if stats.loc[x, "default_popsize"] and any(stats.loc[x, "default_popsize"]):
                        ax.plot([x], [ms[xs.index(x)][0]], marker="*", ms=14, color=f"C{j}")
            print(f"{study} {model}/{task} {precision} {cal}: " + ", ".join(
                f"{x}: {m[0]:.3g}" + (f"±{m[1]:.2g}" if m[2] > 1 else "") for x, m in zip(xs, ms)))
        ax.axhline(g["fp32"].mean(), color="k", ls="--", lw=1, label=f"FP32 {g['fp32'].mean():.3g}")
        ax.set_ylabel(f"test {metric}")
        ax.set_title(f"{study}: {model} / {task} {precision}", fontsize=10)
        ax_t.set_ylabel("calibration seconds")
        ax_t.set_xlabel(xlabel)
        if categorical:
            ax_t.set_xticks(range(len(xs_all)))
            ax_t.set_xticklabels([str(x) for x in xs_all])
        elif log_x and min(xs_all) > 0:
            ax.set_xscale("log")
            ax_t.set_xscale("log")
        for a in (ax, ax_t):
            a.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    save_figure(fig, f"05_{study}")
    plt.close(fig)
    return True


drawn = {study: plot_ablation(study, *spec) for study, spec in ABLATIONS.items()}
print("figures drawn:", [s for s, ok in drawn.items() if ok] or "none")

# %% [markdown]
# **Reading.** Top: the test metric of the quantized model against the varied parameter, one
# line per calibrator (mean over seeds; bars = std when several seeds exist, none otherwise);
# dashed: FP32. Bottom: the calibration wall time of the same runs (on whatever machine ran
# them; compare only runs from one machine). Calibration size: whether ESC keeps its edge over
# MSE with few clips (or overfits them) and what more clips buy. Budget: how much of the gain
# comes from the search at all (0 generations is the local per-layer MSE step alone) and where
# it saturates. Population size: larger populations at a fixed number of generations cost more
# forwards; the star marks the CMA-ES default. Fitness: which calibration objective transfers to
# the test metric. Start: whether the search or its starting point makes the difference to MSE
# (generations 0 = the start alone). These figures do **not** separate the effect from noise when a single seed
# was run (no error bars: use `06_significance` for paired intervals on the same test clips), and
# each ablation varies one parameter with the others at their defaults (no interactions).
