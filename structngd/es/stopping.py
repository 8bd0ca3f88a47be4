"""pycma's stopping rules of :class:`~structngd.es.StructuredNES`: ``ftarget``, ``maxfevals`` and ``maxiter``
end the run; ``tolx``, ``tolupsigma``, ``tolfun``, ``tolflatfitness`` and ``tolstagnation`` may trigger a restart."""

from __future__ import annotations

import math
from typing import Dict

import torch
from torch import Tensor

#: stop reasons that end the whole run (no restart)
FINAL_REASONS = ("ftarget", "maxfevals", "maxiter")


def termination(es, sorted_f: Tensor) -> Dict[str, object]:
    """The criteria of ``es`` that fire after a generation whose finite costs, sorted, are ``sorted_f``."""
    out: Dict[str, object] = {}
    if es.target is not None and es.best_f <= es.target:
        out["ftarget"] = es.target
    if es.budget is not None and es.evaluations >= es.budget:
        out["maxfevals"] = es.budget
    if es.max_iterations is not None and es.iterations >= es.max_iterations:
        out["maxiter"] = es.max_iterations
    scale = es.sigma * math.sqrt(float(es._sq_norms().max()))
    if es.tolx is not None and scale < es.tolx and es.sigma * float(es.p_c.abs().max()) < es.tolx:
        out["tolx"] = es.tolx
    if es.tolupsigma is not None and scale > es.tolupsigma * es.sigma0:
        out["tolupsigma"] = es.tolupsigma
    if es.tolfun is not None and es.run_iteration > 1 and len(sorted_f):
        window = es._run_best[-(10 + int(math.ceil(30 * es.dim / es.popsize))) :]
        finite = [v for v in window if math.isfinite(v)]
        if finite and len(finite) == len(window):
            spread = max(max(finite) - min(finite), float(sorted_f[-1] - sorted_f[0]))
            if spread < es.tolfun:
                out["tolfun"] = es.tolfun
    if es.tolflatfitness is not None and es._flat > es.tolflatfitness:
        out["tolflatfitness"] = es.tolflatfitness
    if es.tolstagnation is not False:
        n_stag = es.tolstagnation or int(100 + 100 * es.dim**1.5 / es.popsize)
        hist = len(es._run_best)
        ell = int(max(n_stag / 10, hist / 10))
        if es.run_iteration > n_stag and hist >= 2 * ell:
            med = lambda v: float(torch.tensor(v, dtype=torch.float64).median())  # noqa: E731
            recent_m, older_m = es._run_median[-ell:], es._run_median[-2 * ell : -ell]
            recent_b, older_b = es._run_best[-ell:], es._run_best[-2 * ell : -ell]
            if med(recent_m) >= med(older_m) and med(recent_b) >= med(older_b):
                out["tolstagnation"] = n_stag
    return out
