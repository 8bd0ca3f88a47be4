"""Structured natural evolution strategies: xNES, SNES and their structured, O(nnz) variants.

The search distribution ``N(mu, A A^T)``, ``A = sigma B``, ``B`` in a :mod:`structngd.groups` group, is a
covariance-parameterized :class:`~structngd.families.Gaussian` (``loc = mu``, ``factor = B``, ``scale = sigma``).
One generation: ``x_k = mu + sigma B z_k``, ``z_k ~ N(0, I)``; with the rank utilities ``u``,
``G_delta = sum_k u_k z_k`` and ``G_M = sum_k u_k (z_k z_k^T - I)`` (pattern entries only) step
``mu <- mu + eta_mu sigma B G_delta``, the scale by ``G_sigma = tr(G_M) / d`` and ``B <- B h(eta_B / 2 Pi_hat(G_B))``
by the trace-free part, in O(nnz(B)) per sample (score-function gradients, then the layer-3 kernel's step).
"""

from __future__ import annotations

import math
import warnings
from typing import Callable, Dict, Optional, Sequence, Union

import torch
from torch import Tensor

from .. import checks
from .. import groups as _groups
from ..families import Gaussian
from ..families.estimators import score_function_gradients, standard_normal_noise
from ..optim.kernel import natural_gradient_step
from . import cumulation
from .result import ESHistory, ESResult
from .stopping import FINAL_REASONS, termination
from .utilities import as_costs, default_popsize, rank_order, recombination_weights, utilities

RATES = ("cma", "default", "xnes")
#: ``"default"`` is the former name of ``"cma"``
_RATE_ALIASES = {"default": "cma"}
RETRACTIONS = ("h", "exp")
_DEFAULT_KEYS = ("eta_mu", "c1", "cmu", "cs", "ds", "cc")
_XNES_KEYS = ("eta_mu", "eta_sigma", "eta_B")
#: below this dimension ``rates="cma"`` samples mirrored pairs and halves CMA-ES's step-size damping;
#: from it on both changes hurt large low-rank searches, so CMA-ES's are kept
MIRRORED_BELOW_DIM = 500


def _checked_scalar(name: str, value):
    """A state's scalar: ``sigma`` a positive number, ``best_f`` a number, the flag a bool, the rest integers
    (``popsize >= 2``); ``ValueError`` otherwise."""
    if name == "_warned_nonfinite":
        return checks.flag(name, value)
    if name == "sigma":
        return checks.positive("state 'sigma'", value)
    if name in ("best_f", "seed"):
        if not (checks.is_integer(value) if name == "seed" else checks.is_number(value)):
            what = "an integer" if name == "seed" else "a number"
            raise ValueError(f"state {name!r} must be {what}, got {value!r}; nothing was loaded")
        return value
    return checks.count(f"state {name!r}", value, minimum=2 if name == "popsize" else 0)


def _optional_int(value):
    """``None`` or ``int(value)`` (numpy's integers become ``int``, so states and reprs stay plain)."""
    return None if value is None else int(value)


class StructuredNES:
    """Ask-and-tell natural evolution strategy with a structured covariance factor.

    Args:
        x0: initial mean, a ``(d,)`` tensor / array / list, or a callable returning one (called at every restart).
        sigma0: initial global step size (> 0); the initial covariance is ``sigma0^2 I``.
        structure: group of ``B`` (``"dense"``, ``"diagonal"``, ``"block_triangular"`` with ``k``, ``"heisenberg"``
            with ``k`` and ``k2``, ... see :func:`structngd.groups.make`) or a group instance. Block groups are
            block *upper*-triangular: an "arrow" covariance, dense leading ``k`` block plus diagonal.
        popsize: population size ``lambda`` (default ``4 + floor(3 ln d)``).
        seed: seed of the object's own ``torch.Generator`` (``None``: random, readable as :attr:`seed`); each
            generation draws ``torch.randn((popsize, d), generator=...)`` (half of it with ``mirrored``).
        rates: ``"xnes"``: the published xNES rates and updates (``eta_mu = 1``,
            ``eta_sigma = eta_B = 3 (3 + ln d) / (5 d sqrt d)``, SNES's ``(3 + ln d) / (5 sqrt d)`` for
            ``"diagonal"``, exact exponential): with ``"dense"`` this *is* xNES, with ``"diagonal"`` SNES.
            ``"cma"`` (default; ``"default"`` is the same): the same shape update with CMA-ES-sized rates plus
            a cumulative rank-one term and cumulative step-size adaptation (see :meth:`_update_default`).
            A dict ``{"base": "cma", "cmu": 0.1}`` overrides single constants (``eta_mu, c1, cmu, cs, ds, cc``
            for ``"cma"``, ``eta_mu, eta_sigma, eta_B`` for ``"xnes"``). ``c1`` and ``cmu`` are dense rates;
            groups with fewer parameters scale them entry-wise (sep-CMA's ``(d + 2) / 3`` for the diagonal).
        mirrored: draw ``z`` and ``-z`` pairs (the population is rounded up to an even size). ``None``
            (default): on with ``rates="cma"`` below ``MIRRORED_BELOW_DIM`` = 500 dimensions, else off.
        restarts: number of IPOP restarts: when a restartable criterion fires (any but ``ftarget``, ``maxfevals``,
            ``maxiter``) the run starts again from ``x0`` with the population multiplied by ``incpopsize``.
        budget, target, max_iterations: stop when the evaluations reach ``budget``, the best value is
            ``<= target``, or the generations (all restarts) reach ``max_iterations``.
        tolx, tolfun, tolstagnation, tolflatfitness, tolupsigma: pycma's criteria (``None`` disables one;
            ``tolstagnation=None`` uses pycma's window ``100 + 100 d^1.5 / popsize``, ``False`` disables it).
        retraction: ``"h"`` (``I + M + M^2 / 2``, default for ``"cma"``) or ``"exp"`` (default for ``"xnes"``).
        transpose: use ``A = sigma B^T`` (block *lower*-triangular pattern): ``block_triangular(k)`` then
            gives a rank-k plus diagonal covariance (the VkD-CMA / LM-MA-ES regime).
        dtype, device: of every tensor of the search state (default float64, CPU).
        **group_options: options of the group (``k``, ``k2``, ``block_size`` ...).
    """

    def __init__(
        self, x0: Union[Tensor, Sequence[float], Callable[[], Tensor]], sigma0: float,
        structure: Union[str, _groups.MatrixGroup] = "dense", popsize: Optional[int] = None,
        seed: Optional[int] = None, rates: Union[str, Dict[str, float]] = "cma", mirrored: Optional[bool] = None,
        restarts: int = 0, incpopsize: float = 2, budget: Optional[int] = None, target: Optional[float] = None,
        max_iterations: Optional[int] = None, tolx: Optional[float] = 1e-11, tolfun: Optional[float] = 1e-11,
        tolstagnation: Union[None, bool, int] = None, tolflatfitness: Optional[int] = 1,
        tolupsigma: Optional[float] = 1e20, retraction: Optional[str] = None, transpose: bool = False,
        dtype: torch.dtype = torch.float64, device=None, **group_options,
    ):
        self.dtype = dtype
        self.device = torch.device(device) if device is not None else torch.device("cpu")
        self._x0 = x0 if callable(x0) else self._as_vector(x0, "x0")
        first = self._initial_mean()
        self.dim = int(first.shape[0])
        self.group = _groups.make(structure, self.dim, **group_options)
        self.sigma0 = checks.positive("sigma0", float(sigma0) if isinstance(sigma0, Tensor) else sigma0)

        base, overrides = (rates, {}) if isinstance(rates, str) else (dict(rates).pop("base", "cma"), dict(rates))
        overrides.pop("base", None)
        if not isinstance(base, str) or base not in RATES:
            raise ValueError(f"rates must be one of {RATES} or a dict with 'base' in {RATES}, got {rates!r}")
        base = _RATE_ALIASES.get(base, base)
        allowed = _XNES_KEYS if base == "xnes" else _DEFAULT_KEYS
        bad = [k for k in overrides if k not in allowed]
        if bad:
            raise ValueError(f"unknown rate(s) {bad} for rates={base!r}; allowed: {allowed}")
        self.mode, self._rate_overrides = base, {k: checks.non_negative(f"rate {k}", v) for k, v in overrides.items()}
        self.retraction = retraction or ("exp" if base == "xnes" else "h")
        checks.one_of("retraction", self.retraction, RETRACTIONS)
        self.transpose = checks.flag("transpose", transpose)

        popsize = _optional_int(checks.optional_count("popsize", popsize, minimum=2))
        self.base_popsize = popsize if popsize is not None else default_popsize(self.dim)
        if mirrored is None:
            mirrored = base == "cma" and self.dim < MIRRORED_BELOW_DIM
        self.mirrored = checks.flag("mirrored", mirrored)
        restarts = checks.count("restarts", restarts, minimum=0)
        if not (checks.positive("incpopsize", incpopsize) >= 1):
            raise ValueError(f"incpopsize must be a number >= 1, got {incpopsize!r}")
        self.restarts, self.incpopsize = restarts, incpopsize
        budget = _optional_int(checks.optional_count("budget", budget))
        max_iterations = _optional_int(checks.optional_count("max_iterations", max_iterations))
        if target is not None and not (checks.is_number(target) and not math.isnan(target)):
            raise ValueError(f"target must be a number or None, got {target!r}")
        for name, value in (("tolx", tolx), ("tolfun", tolfun), ("tolupsigma", tolupsigma)):
            checks.optional_non_negative(name, value)
        tolflatfitness = _optional_int(checks.optional_count("tolflatfitness", tolflatfitness, minimum=0))
        if tolstagnation is not False:
            tolstagnation = _optional_int(checks.optional_count("tolstagnation", tolstagnation))
        self.budget, self.target, self.max_iterations = budget, target, max_iterations
        self.tolx, self.tolfun, self.tolupsigma = tolx, tolfun, tolupsigma
        self.tolflatfitness, self.tolstagnation = tolflatfitness, tolstagnation

        if seed is None:
            seed = int(torch.Generator().seed() % (2**63))
        if not checks.is_integer(seed):
            raise ValueError(f"seed must be an integer or None, got {seed!r}")
        seed = int(seed)
        self.seed, self.generator = seed, torch.Generator(device=self.device).manual_seed(seed)

        self._weights_c = self.group.constant("inverse_fisher_weights", dtype, self.device)
        self._algebra_dim = self.group.algebra_dim

        # run-independent counters
        self.iterations = self.evaluations = self.restarts_done = self.nonfinite = 0
        self._warned_nonfinite = False
        self.best_x, self.best_f = first.clone(), math.inf
        self.history, self.restart_log = ESHistory(), []
        self._stop: Dict[str, object] = {}
        self._start(self.base_popsize, first)

    def _as_vector(self, x, name: str) -> Tensor:
        try:
            v = torch.as_tensor(x, dtype=self.dtype, device=self.device)
        except (TypeError, ValueError, RuntimeError) as err:
            raise ValueError(f"{name} must be a 1-D array of numbers: {err}") from None
        if v.dim() != 1 or v.shape[0] < 1:
            raise ValueError(f"{name} must be a non-empty 1-D vector, got shape {tuple(v.shape)}")
        if not torch.isfinite(v).all():
            raise ValueError(f"{name} must be finite")
        return v.detach().clone()

    def _initial_mean(self) -> Tensor:
        x0 = self._as_vector(self._x0(), "x0()") if callable(self._x0) else self._x0.clone()
        if hasattr(self, "dim") and x0.shape[0] != self.dim:
            raise ValueError(f"x0() returned a vector of size {x0.shape[0]}, expected {self.dim}")
        return x0

    def _start(self, popsize: int, mean: Tensor) -> None:
        """(Re)initialise the search distribution and the per-run bookkeeping."""
        self.popsize = int(popsize)
        if self.mirrored and self.popsize % 2:
            self.popsize += 1
        self.family = Gaussian(self.dim, self.group, loc=mean, parameterization="covariance", scale=self.sigma0,
                               transpose=self.transpose, dtype=self.dtype, device=self.device).requires_grad_(False)
        self.p_sigma = torch.zeros(self.dim, dtype=self.dtype, device=self.device)
        self.p_c = torch.zeros(self.dim, dtype=self.dtype, device=self.device)
        self.run_iteration, self._flat, self._pending = 0, 0, None
        self._run_best, self._run_median = [], []
        self._set_parameters()

    def _set_parameters(self) -> None:
        d, lam = self.dim, self.popsize
        kw = dict(dtype=self.dtype, device=self.device)
        self._u, self._w = utilities(lam, **kw), recombination_weights(lam, **kw)
        self.mueff = mueff = float(1.0 / (self._w * self._w).sum())
        if self.mode == "xnes":
            diagonal = isinstance(self.group, _groups.Diagonal)
            eta = (3 + math.log(d)) / (5 * math.sqrt(d)) if diagonal else 3 * (3 + math.log(d)) / (5 * d * math.sqrt(d))
            self.rates = {"eta_mu": 1.0, "eta_sigma": eta, "eta_B": eta}
        else:
            cs = (mueff + 2) / (d + mueff + 5)
            # half of CMA-ES's damping below MIRRORED_BELOW_DIM (sigma adapts twice as fast, with mirrored
            # pairs); large dimensions keep CMA-ES's, where the faster adaptation stalls low-rank searches
            damping = 0.5 if d < MIRRORED_BELOW_DIM else 1.0
            ds = damping + 2 * max(0.0, math.sqrt((mueff - 1) / (d + 1)) - 1) + cs
            cc = (4 + mueff / d) / (d + 4 + 2 * mueff / d)
            c1 = 2 / ((d + 1.3) ** 2 + mueff)
            # 4x CMA-ES's rank-mu rate: the zero-sum utilities make the rank-mu term an "active" update
            # with zero mean under random selection, which tolerates larger steps
            cmu = 4 * 2 * (mueff - 2 + 1 / mueff) / ((d + 2) ** 2 + mueff)
            if c1 + cmu > 1:
                c1, cmu = c1 / (c1 + cmu), cmu / (c1 + cmu)
            self.rates = {"eta_mu": 1.0, "c1": c1, "cmu": max(cmu, 0.0), "cs": cs, "ds": ds, "cc": cc}
        self.rates.update(self._rate_overrides)
        # groups with fewer shape parameters than dense learn them faster: algebra entries scaled by
        # S = min((d+2)/3, d(d+1)/2 / dim M) (sep-CMA's (d+2)/3), free coupling entries by S/4 only (at full
        # speed they collapse the search on a rotated cigar); neither below 1
        big = min((d + 2) / 3, d * (d + 1) / 2 / self._algebra_dim)
        self._rate_mask = None
        if self.mode == "cma" and big > 1:
            diag_scale, coupling_scale = max(1.0, big), max(1.0, big / 4)
            wc = self._weights_c
            self._rate_mask = torch.where(wc == 1, torch.full_like(wc, coupling_scale), torch.full_like(wc, diag_scale))
            bound = max(diag_scale, coupling_scale) * (self.rates["c1"] + self.rates["cmu"])
            if bound > 1:  # keep the largest per-entry rate below one
                self._rate_mask = self._rate_mask / bound
        self._chi = cumulation.expected_norm(d)

    @property
    def mean(self) -> Tensor:
        """The mean ``mu`` of the search distribution (a copy)."""
        return self.family.loc.detach().clone()

    @mean.setter
    def mean(self, value: Tensor) -> None:
        with torch.no_grad():
            self.family.loc.copy_(value)

    @property
    def factor(self) -> Tensor:
        """The shape factor ``B`` in the group's compact form (a copy)."""
        return self.family.factor.detach().clone()

    @factor.setter
    def factor(self, value: Tensor) -> None:
        with torch.no_grad():
            self.family.factor.copy_(value)

    @property
    def sigma(self) -> float:
        """The global step size ``sigma``."""
        return float(self.family.scale)

    @sigma.setter
    def sigma(self, value: float) -> None:
        with torch.no_grad():
            self.family.scale.fill_(float(value))

    def ask(self) -> Tensor:
        """Sample the next population: a ``(popsize, d)`` tensor (a new tensor each call)."""
        if self._pending is not None:
            raise RuntimeError("ask() called twice: tell() the fitness of the previous population first")
        z = standard_normal_noise((self.popsize, self.dim), self.mirrored, generator=self.generator,
                                  dtype=self.dtype, device=self.device)
        with torch.no_grad():
            x = self.family.from_noise(z)
        self._pending = (z, x)
        return x.clone()

    @property
    def pending(self) -> Optional[Tensor]:
        """The population of the last :meth:`ask` still waiting for :meth:`tell` (a copy), else ``None``;
        after :meth:`load_state_dict` of a state saved between the two, the one the next ``tell`` expects."""
        return None if self._pending is None else self._pending[1].clone()

    def _as_fitness(self, fitness) -> Tensor:
        f = as_costs(fitness)
        if f.dim() != 1 or f.shape[0] != self.popsize:
            raise ValueError(f"fitness must be a 1-D sequence of length popsize={self.popsize}, "
                             f"got shape {tuple(f.shape)}")
        return f

    def tell(self, fitness) -> None:
        """Update the search distribution from the costs (lower is better) of the last :meth:`ask`, in the order
        of its rows: a list, tuple, numpy array or tensor of real numbers (a dict or a set is refused).

        NaN and infinite costs rank worst (warned once; :attr:`nonfinite` counts them). A raise (a refused kernel
        step, an ``x0()`` that fails at a restart) leaves the search as it was, the population still pending.
        """
        if self._pending is None:
            raise RuntimeError("tell() without a pending population: call ask() first")
        f = self._as_fitness(fitness)
        undo = self._undo()
        try:
            self._tell(f)
        except Exception:
            undo()
            raise

    def _undo(self) -> Callable[[], None]:
        """A function that puts the search back as it is now: its attributes, the search distribution's tensors
        and the lengths of the run records (the only things :meth:`tell` changes in place)."""
        attributes, family = dict(self.__dict__), self.family
        values = [p.detach().clone() for p in family.parameters()]
        records = [self._run_best, self._run_median, self.restart_log, *self.history.data.values()]
        lengths = [len(r) for r in records]

        def undo() -> None:
            for record, n in zip(records, lengths):
                del record[n:]
            self.__dict__.clear()
            self.__dict__.update(attributes)
            with torch.no_grad():
                for p, v in zip(family.parameters(), values):
                    p.copy_(v)

        return undo

    def _tell(self, f: Tensor) -> None:
        z, x = self._pending
        order, n_bad = rank_order(f)
        if n_bad:
            self.nonfinite += n_bad
            if not self._warned_nonfinite:
                self._warned_nonfinite = True
                warnings.warn(f"{n_bad} non-finite fitness value(s) (NaN/inf) ranked worst; further ones are only "
                              "counted in .nonfinite", RuntimeWarning, stacklevel=3)
        self._pending = None
        self.evaluations += self.popsize
        self.iterations += 1
        self.run_iteration += 1
        good = f[order[: self.popsize - n_bad]]
        if len(good):
            gen_best, gen_median = float(good[0]), float(good.median())
            if gen_best < self.best_f:
                self.best_f, self.best_x = gen_best, x[int(order[0])].clone()
        else:
            gen_best = gen_median = math.inf
        flat = len(good) > 1 and float(good[min(len(good) - 1, int(math.ceil(0.1 + self.popsize / 4)))]) == gen_best
        zs = z[order.to(self.device)]
        (self._update_xnes if self.mode == "xnes" else self._update_default)(zs)
        self._flat = self._flat + 1 if flat else 0
        if flat and self.mode == "cma":  # pycma: escape a plateau by enlarging sigma
            self.sigma *= cumulation.flat_fitness_factor(self.rates["cs"], self.rates["ds"])
        self._run_best.append(gen_best)
        self._run_median.append(gen_median)
        self.history.append(iteration=self.iterations, evaluations=self.evaluations, best_f=self.best_f,
                            f_best=gen_best, f_median=gen_median, sigma=self.sigma, popsize=self.popsize,
                            restart=self.restarts_done)
        reasons = termination(self, good)
        if reasons and not any(k in FINAL_REASONS for k in reasons) and self.restarts_done < self.restarts:
            self.restart_log.append({"iteration": self.iterations, "evaluations": self.evaluations, "reasons": reasons})
            self.restarts_done += 1
            self._start(int(round(self.base_popsize * self.incpopsize**self.restarts_done)), self._initial_mean())
            reasons = {}
        self._stop = reasons

    def _sq_norms(self) -> Tensor:
        """Diagonal of ``B B^T`` (``B^T B`` with ``transpose``): marginal variances / sigma^2."""
        return (self.group.col_sq_norms if self.transpose else self.group.row_sq_norms)(self.family.factor)

    def _step(self, direction, part_lrs: Dict[str, float]) -> None:
        """The layer-3 kernel's step of the search distribution along ``direction``."""
        natural_gradient_step([self.family], [None], lr=[1.0], momentum=[0.0], max_step=[None],
                              retraction=[self.retraction], part_lrs=[part_lrs], directions=[direction],
                              labels=["StructuredNES"])

    def _update_xnes(self, zs: Tensor) -> None:
        """xNES / SNES (Glasmachers et al. 2010, Schaul et al. 2011) with the group's pattern:
        ``mu += eta_mu sigma B G_delta``, ``sigma *= exp(eta_sigma/2 G_sigma)``,
        ``B <- B exp(eta_B/2 Pi_hat(G_B))``, one kernel step of ``loc``, ``scale``, ``factor``."""
        r = self.rates
        local = score_function_gradients(self.group, zs, self._u)
        direction = self.family.natural_gradient(local_gradient=local)
        self._step(direction, {"loc": r["eta_mu"], "factor": r["eta_B"], "scale": r["eta_sigma"]})

    def _update_default(self, zs: Tensor) -> None:
        """CMA-sized natural-gradient step (``rates="cma"``).

        * mean: ``mu += eta_mu sigma B sum_r w_r z_r`` with ``w_r = u_r + 1/lambda`` (CMA-ES's recombination);
        * shape: the trace-free natural gradient of ``cmu sum_k u_k (z_k z_k^T - I)`` plus the rank-one
          ``c1 (z_c z_c^T - I)``, ``z_c = B^{-1} p_c``, retracted with ``h``; ``B`` is then rescaled to keep
          ``det B`` (the scale belongs to ``sigma``);
        * scale: cumulative step-size adaptation on ``p_sigma``, the path of ``sum_r w_r z_r``.
        Mean and shape are one kernel step (scale at rate 0); paths, volume and step size are :mod:`.cumulation`'s.
        """
        r, d = self.rates, self.dim
        zw = self._w @ zs
        step = self.family.factor_matvec(zw)
        self.p_sigma, self.p_c, ps_norm = cumulation.update_paths(self.p_sigma, self.p_c, zw, step, r["cs"], r["cc"],
                                                                  self.mueff, self._chi, self.run_iteration, d)
        factor = self.family.factor
        if r["c1"] > 0:
            zc = self.group.tsolve(factor, self.p_c) if self.transpose else self.group.solve(factor, self.p_c)
            zall = torch.cat([zs, zc.unsqueeze(0)])
            coef = torch.cat([r["cmu"] * self._u, self._u.new_tensor([r["c1"]])])
        else:
            zall, coef = zs, r["cmu"] * self._u
        local = score_function_gradients(self.group, zs, self._w, shape_z=zall, shape_utilities=coef)
        direction = self.family.natural_gradient(local_gradient=local)
        if self._rate_mask is not None:  # per-entry rates of the shape
            direction = direction._replace(factor=direction.factor * self._rate_mask)
        old_logdet = float(self.group.logdet(factor))
        self._step(direction, {"loc": r["eta_mu"], "factor": 1.0, "scale": 0.0})
        with torch.no_grad():
            self.family.factor.mul_(cumulation.volume_shrink(self.group, self.family.factor, old_logdet))
        self.sigma = self.sigma * cumulation.csa_factor(r["cs"], r["ds"], ps_norm, self._chi)

    def stop(self) -> Dict[str, object]:
        """The active stop criteria after the last :meth:`tell` (pycma style, empty while running)."""
        return dict(self._stop)

    @property
    def result(self) -> ESResult:
        """The best point so far and the run record, as an :class:`ESResult`."""
        return ESResult(x=self.best_x.clone(), f=self.best_f, evaluations=self.evaluations, iterations=self.iterations,
                        stop_reason=self.stop(), history=self.history.copy(), mean=self.mean.clone(), sigma=self.sigma,
                        restarts=self.restarts_done, nonfinite=self.nonfinite)

    def covariance_factor(self) -> Tensor:
        """The dense ``A = sigma B`` (``sigma B^T`` with ``transpose``; ``d x d``: small ``d`` or inspection only)."""
        b = self.group.to_dense(self.factor)
        return self.sigma * (b.mT if self.transpose else b)

    def stds(self) -> Tensor:
        """Marginal standard deviations ``sigma sqrt(diag(B B^T))`` at O(nnz) cost."""
        return self.sigma * self._sq_norms().sqrt()

    _TENSORS = ("mean", "factor", "p_sigma", "p_c", "best_x")
    _SCALARS = ("sigma", "popsize", "run_iteration", "iterations", "evaluations", "restarts_done", "nonfinite",
                "_warned_nonfinite", "best_f", "_flat", "seed")
    _RECORDS = ("generator", "pending", "history", "run_best", "run_median", "restart_log", "stop")

    def state_dict(self) -> Dict[str, object]:
        """Everything needed to resume bit for bit (RNG included); tensors are copies."""
        state = {"version": 1, "dim": self.dim, "group": repr(self.group), "mode": self.mode,
                 "transpose": self.transpose}
        state.update({name: getattr(self, name).clone() for name in self._TENSORS})
        state.update({name: getattr(self, name) for name in self._SCALARS})
        state["generator"] = self.generator.get_state()
        state["pending"] = None if self._pending is None else tuple(t.clone() for t in self._pending)
        state["history"] = self.history.as_dict()
        state["run_best"], state["run_median"] = list(self._run_best), list(self._run_median)
        state["restart_log"] = [dict(e) for e in self.restart_log]
        state["stop"] = dict(self._stop)
        return state

    def load_state_dict(self, state: Dict[str, object]) -> None:
        """Restore a :meth:`state_dict` into an object built with the same options. Everything is checked and
        converted (the search's dimension, group and rates, every key, tensor shape, number and the generator
        state) before anything is set: a ``ValueError`` leaves the object as it was."""
        new = self._checked_state(state)
        new.pop("generator")  # a checked copy: the object's own generator takes the state
        for name, value in new.items():
            setattr(self, name, value)
        self._set_parameters()
        self.generator.set_state(state["generator"])

    def _checked_state(self, state) -> Dict[str, object]:
        """The attributes a :meth:`state_dict` restores, converted; ``ValueError`` naming what does not fit."""
        version = state.get("version") if isinstance(state, dict) else state
        if version != 1:
            raise ValueError(f"unsupported state version {version!r}")
        mode = _RATE_ALIASES.get(state.get("mode"), state.get("mode"))
        saved = (state.get("dim"), state.get("group"), mode, state.get("transpose", False))
        if saved != (self.dim, repr(self.group), self.mode, self.transpose):
            raise ValueError(f"state of a {state.get('group')} {state.get('mode')!r} search in dimension "
                             f"{state.get('dim')} cannot be loaded into a {self.group!r} {self.mode!r} search in "
                             f"dimension {self.dim}")
        missing = [k for k in self._TENSORS + self._SCALARS + self._RECORDS if k not in state]
        if missing:
            raise ValueError(f"state misses {missing}; nothing was loaded")
        try:
            new = {name: self._checked_tensor(name, state[name]) for name in self._TENSORS}
            new.update((name, _checked_scalar(name, state[name])) for name in self._SCALARS)
            new["_pending"] = self._checked_pending(state["pending"], new["popsize"])
            new["generator"] = torch.Generator(device=self.device)
            new["generator"].set_state(state["generator"])
            new["history"] = ESHistory({k: list(v) for k, v in dict(state["history"]).items()})
            new["_run_best"], new["_run_median"] = list(state["run_best"]), list(state["run_median"])
            new["restart_log"] = [dict(e) for e in state["restart_log"]]
            new["_stop"] = dict(state["stop"])
        except (TypeError, RuntimeError) as err:
            raise ValueError(f"state does not fit this search ({err}); nothing was loaded") from None
        return new

    def _checked_tensor(self, name: str, value) -> Tensor:
        shape = tuple(self.group.shape) if name == "factor" else (self.dim,)
        if not isinstance(value, Tensor) or tuple(value.shape) != shape:
            got = tuple(value.shape) if isinstance(value, Tensor) else type(value).__name__
            raise ValueError(f"state {name!r} must be a tensor of shape {shape}, got {got}; nothing was loaded")
        return value.to(dtype=self.dtype, device=self.device).clone()

    def _checked_pending(self, pending, popsize: int):
        if pending is None:
            return None
        if not (isinstance(pending, tuple) and len(pending) == 2
                and all(isinstance(t, Tensor) and tuple(t.shape) == (popsize, self.dim) for t in pending)):
            raise ValueError(f"state 'pending' must be None or two ({popsize}, {self.dim}) tensors; nothing was loaded")
        return tuple(t.to(self.device).clone() for t in pending)

    def __repr__(self) -> str:
        return (f"StructuredNES(dim={self.dim}, group={self.group!r}, rates={self.mode!r}, popsize={self.popsize}, "
                f"iterations={self.iterations}, evaluations={self.evaluations}, best_f={self.best_f:.6g})")
