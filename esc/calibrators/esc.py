"""ESC: evolution-strategy calibration of all activation scales at once (the paper's method).

See :class:`ESCCalibrator` for the exact definition, :mod:`esc.calibrators.local_step` for the local
step, :mod:`esc.calibrators.fitness` for the fitness kinds and :mod:`esc.calibrators.search_state`
for resuming an interrupted search.
"""
from __future__ import annotations

import logging
import math
import time
import warnings
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import torch
from tqdm.auto import tqdm

from esc.calibrators import BY_NAME
from esc.calibrators.base import CalibrationData, CalibrationResult, Calibrator
from esc.calibrators.fitness import FITNESS_KINDS, FitnessEvaluator
from esc.calibrators.local_step import LOCAL_SEARCHES, local_mse_scales, local_passes
from esc.calibrators.search_state import SearchState
from esc.quant.model import QuantizedModel
from esc.quant.quantizer import QuantizationError

log = logging.getLogger(__name__)

BACKENDS = ("evotorch", "pycma")
FINALS = ("mean", "best")
#: Starts of the search: the per-layer output-MSE local step, or a statistic calibrator's scales
#: (``tensor_mse`` = the MSE calibrator, the name the committed ablation rows use).
INITS = {"output_mse": None, "tensor_mse": "mse", "minmax": "minmax", "percentile": "percentile", "entropy": "entropy"}


# ----------------------------------------------------------------------------------- calibrator
class ESCCalibrator(Calibrator):
    """Evolution-strategy calibration (ESC): local per-layer MSE scales, then CMA-ES on all scales.

    Exact definition:

    1. **Local step** (:func:`~esc.calibrators.local_step.local_mse_scales`): each activation quantizer ``i`` gets the scale
       ``s_i`` minimising the MSE between its layer's output with the FP input and with that input
       quantized (weights as currently quantized in both, so only the input quantization is
       measured). Layer: the module itself for Linear/Conv input quantizers; the tensor itself
       (tensor MSE) for LayerNorm output quantizers; the matmul with the other operand in float
       for MatMul operand quantizers. Grid: ``local_grid`` geometric fractions of the observed
       ``max |x|`` from ``local_min_fraction`` to 1 (clip ``c = f * max|x|``, ``s = c / qmax``).
       Two passes over the calibration set (max, then errors of all candidates batched).
       Cheaper options (not the default, so existing results stay reproducible; see
       :func:`~esc.calibrators.local_step.local_mse_scales`): ``local_search="coarse_fine"`` evaluates every ``local_stride``-th
       grid candidate, then the grid between the coarse neighbours of the ``local_refine`` best
       (at most 47 of 100 candidates at the defaults 10 and 2), and ``local_samples`` evaluates
       the errors on a seeded (``seed``) row sample of at most that many elements per quantizer,
       kept in the max pass (one pass over the calibration set in all).
       ``init="tensor_mse"`` starts instead from the :class:`~esc.calibrators.mse.MSECalibrator`
       scales (MSE of the quantized activation tensor itself, its default grid), for comparison;
       ``init="minmax"``, ``"percentile"`` or ``"entropy"`` from that calibrator's scales (its
       defaults), e.g. where entropy's clip of a residual stream lies in a basin the MSE start misses.
    2. **Global step**: CMA-ES over ``theta`` in ``R^N`` (``N`` = number of activation quantizers)
       with ``scales = s_local * exp(clip(theta, -theta_bound, theta_bound))``, starting at
       ``theta = 0`` with step size ``sigma0``, population ``popsize`` (``None``: CMA-ES default
       ``4 + floor(3 ln N)``), for ``generations`` generations (``separable``: diagonal covariance).
       ``backend="evotorch"`` uses ``evotorch.algorithms.CMAES`` on a vectorized, seeded
       ``evotorch.Problem`` (``num_actors``: that many Ray actors split each population's fitness
       evaluation; every actor holds its own copy of the quantized model and the calibration data, so
       actors scale the evaluation over cores or GPUs, not the model size a device can hold; same
       result as in process for a seed; ``None`` = in process); ``backend="pycma"`` uses ``cma.CMAEvolutionStrategy``
       (seed ``seed + 1``, since pycma treats 0 as "random"; stopping criteria are ignored so
       exactly ``generations`` generations run) as a cross-check.
    3. **Fitness** (:mod:`esc.calibrators.fitness`) of a population: one batched forward pass over
       the calibration set with the quantizers holding ``[P]`` scales (``batched=False``: one pass
       per candidate, same values); ``fitness="task"``: mean per-sample task loss; ``"kl"``: mean
       ``KL(softmax FP logits || softmax quantized logits)`` over the last dim; ``"mse"``: MSE to
       the FP outputs. FP outputs (every quantizer off) are computed once and cached.
       ``max_batch`` bounds the samples per forward by splitting the population into chunks;
       ``max_batch="auto"`` times chunk sizes on the first generation and keeps the fastest per
       candidate, never slower than one by one on that probe (``history["population_chunk"]``;
       see :class:`~esc.calibrators.fitness.FitnessEvaluator`).
    4. **Result**: ``final="mean"``: the mean of the final search distribution (the paper);
       ``"best"``: the best sample seen in any generation. **Guard**: if the result's fitness is
       worse than the local start's, the local scales are kept (and a warning is logged).

    ``generations=0`` is the local step alone. ``monitor`` (a callable returning e.g. the test
    metric of the model as currently set; the runner wires it to the task when
    ``calibration.monitor_every > 0``) is called on the mean solution at generation 1 and every
    ``monitor_every`` generations: ``history`` then holds ``monitor_generation``,
    ``monitor_fitness`` (calibration fitness of the mean) and ``monitor_metric``. Monitoring costs
    test evaluations; their time is excluded from ``seconds`` (the calibration cost).

    ``CalibrationResult.history``: ``best`` and ``mean`` population fitness and ``sigma`` per
    generation (length ``generations``), ``local_fitness``, ``search_fitness`` (fitness of the
    search result before the guard), ``final_fitness`` (of the scales set) and ``kept_local``
    (1.0 if the guard fired), each a one-element list; with ``max_batch="auto"`` also
    ``population_chunk`` (the chosen candidates per forward). ``forward_passes`` counts full passes
    over the calibration set: the local step's (:func:`~esc.calibrators.local_step.local_passes`: 2 by default, 1 with
    ``local_samples``, 3 for ``coarse_fine`` without; 1 for a calibrator ``init``) + 1 (FP reference, kl/mse only) + one per
    evaluated candidate (a batched pass of ``P`` candidates counts ``P``). Deterministic under
    ``seed`` (with ``max_batch="auto"``, see its caveat on batch-size-dependent rounding).

    **Interruption**: with ``state_path`` set (the runner sets it next to the calibration cache),
    the local scales and every generation's population fitness are saved there (after the local
    step and every ``save_every`` generations); a killed run started again with the same settings
    replays the saved generations without forward passes and ends exactly as an uninterrupted run
    (:meth:`~esc.calibrators.search_state.SearchState.load`). The file is deleted when the search ends.

    ESC needs symmetric per-tensor activation quantizers (a scale per quantizer, zero point 0).
    After ``calibrate``, ``timings`` holds wall seconds: ``local`` (local step), ``fitness`` (all
    fitness evaluations), ``forward`` (the model forwards inside them), ``search_overhead``
    (everything else: FP reference pass, CMA-ES, bookkeeping; with Ray actors also the population
    evaluations, which the actors' own evaluator copies time), ``total``,
    ``generations_run`` (generations evaluated in this process: fewer after a resume), ``popsize``, ``seconds_per_generation`` (the
    search loop's wall time over ``generations_run``) and ``fp32_pass`` (one FP32 forward over the
    calibration set, timed after the search); ``CalibrationResult.timings`` (recorded in the result
    row) is a copy, so ``seconds_per_generation / (popsize * fp32_pass)``
    is ESC's cost per generation in units of the forward passes it needs.
    """

    name = "esc"

    def __init__(self, generations: int = 100, popsize: Optional[int] = None, sigma0: float = 0.1,
                 fitness: str = "task", final: str = "mean", backend: str = "evotorch", separable: bool = False,
                 local_grid: int = 100, local_min_fraction: float = 1e-3, batched: bool = True, seed: int = 0,
                 num_actors: Optional[int | str] = None, max_batch: Optional[int | str] = None, theta_bound: float = 10.0,
                 local_max_elements: int = 2**22, progress: bool = True, monitor_every: int = 0,
                 monitor: Optional[Callable[[], float]] = None, init: str = "output_mse",
                 state_path: Optional[str | Path] = None, save_every: int = 10, local_search: str = "exhaustive",
                 local_stride: int = 10, local_refine: int = 2, local_samples: Optional[int] = None) -> None:
        if fitness not in FITNESS_KINDS:
            raise QuantizationError(f"ESC: unknown fitness {fitness!r}; use one of {FITNESS_KINDS}")
        if final not in FINALS:
            raise QuantizationError(f"ESC: unknown final {final!r}; use one of {FINALS}")
        if init not in INITS:
            raise QuantizationError(f"ESC: unknown init {init!r}; use one of {list(INITS)}")
        if backend not in BACKENDS:
            raise QuantizationError(f"ESC: unknown backend {backend!r}; use one of {BACKENDS}")
        if generations < 0:
            raise QuantizationError(f"ESC: generations={generations} must be >= 0")
        if popsize is not None and popsize < 2:
            raise QuantizationError(f"ESC: popsize={popsize} must be >= 2 (or None for the CMA-ES default)")
        if sigma0 <= 0:
            raise QuantizationError(f"ESC: sigma0={sigma0} must be > 0")
        if local_search not in LOCAL_SEARCHES:
            raise QuantizationError(f"ESC: unknown local_search {local_search!r}; use one of {LOCAL_SEARCHES}")
        self.local_search, self.local_stride, self.local_refine = local_search, int(local_stride), int(local_refine)
        self.local_samples = None if local_samples is None else int(local_samples)
        self.generations, self.popsize, self.sigma0 = generations, popsize, sigma0
        self.fitness, self.final, self.backend, self.separable = fitness, final, backend, separable
        self.local_grid, self.local_min_fraction = local_grid, local_min_fraction
        self.batched, self.seed, self.num_actors, self.max_batch = batched, seed, num_actors, max_batch
        self.theta_bound, self.local_max_elements, self.progress = theta_bound, local_max_elements, progress
        self.monitor_every, self.monitor, self.init = int(monitor_every), monitor, init
        if save_every < 1:
            raise QuantizationError(f"ESC: save_every={save_every} must be >= 1")
        self.state_path, self.save_every = (Path(state_path) if state_path else None), int(save_every)
        self.timings: dict[str, float] = {}

    # ---------------------------------------------------------------------------------- helpers
    @property
    def remote(self) -> bool:
        """Whether Ray actors evaluate the populations (``num_actors`` set, evotorch backend)."""
        return self.backend == "evotorch" and self.num_actors not in (None, 0)

    @staticmethod
    def default_popsize(n: int) -> int:
        """CMA-ES default population ``4 + floor(3 ln n)``."""
        return 4 + int(math.floor(3 * math.log(max(n, 1))))

    def _check(self, qmodel: QuantizedModel) -> None:
        quantizers = qmodel.activation_quantizers
        if not quantizers:
            raise QuantizationError("ESC: the model has no activation quantizers; quantize it with an activation spec first")
        for name, q in quantizers.items():
            if not q.symmetric or q.granularity != "tensor":
                raise QuantizationError(f"ESC: quantizer {name!r} is {'asymmetric' if not q.symmetric else q.granularity}; "
                                        "ESC calibrates symmetric per-tensor activation scales (use QuantSpec(bits, True, 'tensor'))")

    def _local_scales(self, qmodel: QuantizedModel, data: CalibrationData) -> torch.Tensor:
        """The start of the search (``init``): per-layer output-MSE scales, or a statistic calibrator's."""
        if INITS[self.init] is not None:
            BY_NAME[INITS[self.init]]().calibrate(qmodel, data)
            return qmodel.activation_scales().float()
        return local_mse_scales(qmodel, data, self.local_grid, self.local_min_fraction, self.local_max_elements,
                                self.local_search, self.local_stride, self.local_refine, self.local_samples, self.seed)[0]

    def _scales(self, s_local: torch.Tensor, theta: torch.Tensor) -> torch.Tensor:
        if isinstance(theta, torch.Tensor) and type(theta) is not torch.Tensor:
            theta = theta.as_subclass(torch.Tensor)  # evotorch hands over read-only tensor subclasses
        theta = torch.as_tensor(theta, dtype=torch.float32).clamp(-self.theta_bound, self.theta_bound)
        return s_local * torch.exp(theta)

    # ------------------------------------------------------------------------------- calibrate
    def calibrate(self, qmodel: QuantizedModel, data: CalibrationData) -> CalibrationResult:
        """Run the local step, then CMA-ES; set the final scales on ``qmodel``."""
        if self.backend == "evotorch":
            import evotorch.algorithms  # noqa: F401  (first import takes seconds: not part of the timings)
        start = time.perf_counter()
        self._check(qmodel)
        state = SearchState(self.state_path, self._state_settings())
        saved = state.load(len(qmodel.activation_quantizers))
        if saved is None:
            s_local = self._local_scales(qmodel, data)
            t_local = time.perf_counter() - start
        else:
            s_local, t_local = saved["s_local"], float(saved["t_local"])
            log.info("ESC: resuming from %s (local step and %d generations saved)", self.state_path, len(saved["fitness"]))
        n = len(s_local)
        popsize = self.popsize or self.default_popsize(n)
        evaluator = FitnessEvaluator(qmodel, data, self.fitness, self.batched, self.max_batch)
        local_fit = float(evaluator(s_local)[0])
        if not math.isfinite(local_fit):  # a NaN candidate scores inf (CMA-ES discards it), but not the start
            raise QuantizationError(f"ESC: the {self.fitness} fitness of the local start is {local_fit} on the calibration "
                                    "data; check that the FP32 model's outputs and the task loss are finite there")
        fitness_log: list[torch.Tensor] = []  # every generation's population fitness: the search state (see SearchState.load)
        replay = list(saved["fitness"]) if saved else []
        state.save(s_local, t_local, fitness_log)
        log.info("ESC: %d activation quantizers, local step %.2fs, local fitness (%s) %.6g; CMA-ES (%s) popsize %d, "
                 "%d generations, sigma0 %g", n, t_local, self.fitness, local_fit, self.backend, popsize,
                 self.generations, self.sigma0)

        def objective(theta: torch.Tensor) -> torch.Tensor:
            fit = replay.pop(0) if replay else evaluator(self._scales(s_local, theta))
            fitness_log.append(fit.detach().double().cpu().clone())
            if not replay and len(fitness_log) % self.save_every == 0:
                state.save(s_local, t_local, fitness_log)
            return fit.to(torch.float64)

        history: dict[str, list[float]] = {"best": [], "mean": [], "sigma": []}
        best_theta, best_fit = torch.zeros(n), local_fit
        center, self._monitor_seconds = None, 0.0
        run = self._run_evotorch if self.backend == "evotorch" else self._run_pycma
        t_search = time.perf_counter()
        try:  # on any error, leave the model with the local scales rather than a population
            for gen, (pop_theta, pop_fit, sigma, center) in enumerate(run(objective, n, popsize), start=1):
                history["best"].append(float(pop_fit.min()))
                history["mean"].append(float(pop_fit.mean()))
                history["sigma"].append(float(sigma))
                i = int(torch.argmin(pop_fit))
                if float(pop_fit[i]) < best_fit:
                    best_theta, best_fit = pop_theta[i].clone(), float(pop_fit[i])
                if self.monitor is not None and self.monitor_every and (gen % self.monitor_every == 0 or gen == 1):
                    self._record_monitor(qmodel, evaluator, s_local, center(), gen, history)
            t_search = time.perf_counter() - t_search - self._monitor_seconds
            if center is None:  # generations=0: the local step alone
                final_theta, search_fit = best_theta, local_fit
            elif self.final == "mean":
                final_theta = center()
                search_fit = float(evaluator(self._scales(s_local, final_theta))[0])
            else:
                final_theta, search_fit = best_theta, best_fit
        except BaseException:
            qmodel.set_activation_scales(s_local)
            raise
        state.clear()
        kept_local = search_fit > local_fit
        if kept_local:
            log.warning("ESC: the search result's fitness %.6g is worse than the local start's %.6g; keeping the local scales",
                        search_fit, local_fit)
            final_scales, final_fit = s_local, local_fit
        else:
            final_scales, final_fit = self._scales(s_local, final_theta), search_fit
        qmodel.set_activation_scales(final_scales)
        seconds = time.perf_counter() - start - self._monitor_seconds
        run_here = self.generations - (len(saved["fitness"]) if saved else 0)  # generations evaluated in this process
        self.timings = dict(local=t_local, fitness=evaluator.seconds, forward=evaluator.forward_seconds, total=seconds,
                            search_overhead=seconds - t_local - evaluator.seconds, generations_run=float(run_here),
                            popsize=float(popsize), seconds_per_generation=t_search / run_here if run_here else 0.0,
                            fp32_pass=self._fp32_pass_seconds(qmodel, data))
        remote = popsize * len(history["best"]) if self.remote else 0  # counted by the actors' evaluator copies
        remote += popsize * len(saved["fitness"]) if saved else 0  # evaluated before the interruption
        start_passes = local_passes(self.local_search, self.local_samples) if INITS[self.init] is None else 1  # one observation pass
        passes = start_passes + (1 if evaluator.reference is not None else 0) + evaluator.evaluations + remote
        history.update(local_fitness=[local_fit], search_fitness=[search_fit], final_fitness=[final_fit],
                       kept_local=[float(kept_local)])
        if evaluator.chunk is not None:
            history["population_chunk"] = [float(evaluator.chunk)]
        log.info("ESC: fitness %.6g -> %.6g in %.1fs (%d candidate evaluations)", local_fit, final_fit, seconds,
                 evaluator.evaluations)
        return CalibrationResult(seconds=seconds, forward_passes=passes, history=history, timings=dict(self.timings))

    @staticmethod
    def _fp32_pass_seconds(qmodel: QuantizedModel, data: CalibrationData) -> float:
        """Wall seconds of one FP32 forward over the calibration set (quantizers off): the unit in which
        a generation's cost is judged (``seconds_per_generation / (popsize * fp32_pass)``)."""
        with qmodel.quant_state(weights=False, activations=False), torch.no_grad():
            start = time.perf_counter()
            for batch in data.batches:
                data.forward(qmodel, batch)
            return time.perf_counter() - start

    def _state_settings(self) -> dict:
        """What a saved search state must match; the cheaper local-step options count only when set, so
        that states saved before they existed stay valid."""
        settings = {"generations": self.generations, "popsize": self.popsize, "sigma0": self.sigma0, "fitness": self.fitness,
                    "backend": self.backend, "separable": self.separable, "seed": self.seed, "init": self.init,
                    "local_grid": self.local_grid, "local_min_fraction": self.local_min_fraction}
        if self.local_search != "exhaustive" or self.local_samples is not None:
            settings.update(local_search=self.local_search, local_stride=self.local_stride, local_refine=self.local_refine,
                            local_samples=self.local_samples)
        return settings

    def _record_monitor(self, qmodel: QuantizedModel, evaluator, s_local: torch.Tensor, theta: torch.Tensor,
                        generation: int, history: dict[str, list[float]]) -> None:
        """Record the calibration fitness and the ``monitor()`` value (e.g. the test metric) of the current mean."""
        start = time.perf_counter()
        counters = evaluator.evaluations, evaluator.seconds, evaluator.forward_seconds
        scales = self._scales(s_local, theta)
        fitness = float(evaluator(scales)[0])
        evaluator.evaluations, evaluator.seconds, evaluator.forward_seconds = counters  # monitoring is not calibration cost
        qmodel.set_activation_scales(scales)
        history.setdefault("monitor_generation", []).append(float(generation))
        history.setdefault("monitor_fitness", []).append(fitness)
        history.setdefault("monitor_metric", []).append(float(self.monitor()))
        self._monitor_seconds += time.perf_counter() - start

    # --------------------------------------------------------------------------------- backends
    def _bar(self):
        return tqdm(range(self.generations), desc=f"ESC ({self.backend})", disable=not self.progress, leave=False)

    def _run_evotorch(self, objective, n: int, popsize: int):
        """Yield ``(theta [P, N], fitness [P], sigma, center_fn)`` per generation with evotorch's CMAES."""
        from evotorch import Problem
        from evotorch.algorithms import CMAES

        problem = Problem("min", objective, solution_length=n, initial_bounds=(-self.sigma0, self.sigma0),
                          vectorized=True, seed=None if self.remote else self.seed, num_actors=self.num_actors,
                          dtype=torch.float32, eval_dtype=torch.float64, device="cpu", store_solution_stats=False)
        if self.remote:  # evotorch 0.6.1's actors call a missing Problem.seed() on a seeded Problem: start them unseeded,
            problem.all_remote_problems()  # now, then seed the main copy (the only one that samples)
            problem.manual_seed(self.seed)
        with warnings.catch_warnings():  # evotorch copy-constructs its own weight tensor (harmless UserWarning)
            warnings.filterwarnings("ignore", message="To copy construct from a tensor", category=UserWarning)
            searcher = CMAES(problem, stdev_init=self.sigma0, popsize=popsize, center_init=[0.0] * n,
                             separable=self.separable)
        center = lambda: searcher.m.detach().clone().float()  # noqa: E731
        for _ in self._bar():
            searcher.step()
            pop = searcher.population
            yield pop.values.detach().clone(), pop.evals[:, 0].detach().clone(), float(searcher.sigma), center

    def _run_pycma(self, objective, n: int, popsize: int):
        """Yield ``(theta [P, N], fitness [P], sigma, center_fn)`` per generation with pycma."""
        import cma

        opts = {"popsize": popsize, "seed": self.seed + 1, "verbose": -9, "verb_disp": 0, "verb_log": 0,
                "CMA_diagonal": bool(self.separable), "maxiter": max(self.generations, 1), "tolfun": 0, "tolx": 0,
                "tolfunhist": 0, "tolstagnation": 10**9, "tolflatfitness": 10**9}
        es = cma.CMAEvolutionStrategy(np.zeros(n), self.sigma0, opts)
        center = lambda: torch.as_tensor(np.asarray(es.mean), dtype=torch.float32)  # noqa: E731
        for _ in self._bar():
            xs = es.ask()
            theta = torch.as_tensor(np.asarray(xs), dtype=torch.float32)
            fit = objective(theta)
            es.tell(xs, fit.double().tolist())
            yield theta, fit, float(es.sigma), center
