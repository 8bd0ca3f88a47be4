"""BBOB noiseless test functions f1, f2, f8, f10, f12, f15 with their instances.

Written from the published definitions (Hansen, Finck, Ros, Auger 2009, "Real-parameter
black-box optimization benchmarking 2009: noiseless functions definitions", INRIA RR-6829)
and the instance generation of the BBOB/COCO reference implementation: the legacy
Park-Miller generator with a 32-slot shuffle table seeds ``x_opt`` (uniform on a 1e-4 grid in
[-4, 4]), ``f_opt`` (a rounded, clipped Cauchy-like ratio of Gaussians) and the random
rotations (Gram-Schmidt of Gaussian matrices). The values agree with ``cocoex`` to
round-off (``tests/test_bbob.py``).

Usage::

    f = bbob.get(10, dim=20, instance=1)    # rotated ellipsoid
    f(x)                                    # x: (d,) or (n, d) tensor -> () or (n,) tensor
    f.xopt, f.fopt                          # the optimum
"""

from __future__ import annotations

import math
from functools import lru_cache
from typing import Dict, List, Tuple

import numpy as np
import torch
from torch import Tensor

FUNCTIONS = {1: "sphere", 2: "ellipsoid", 8: "rosenbrock", 10: "ellipsoid_rotated", 12: "bent_cigar",
             15: "rastrigin_rotated"}


# ----------------------------------------------------------------------------- RNG
def _legacy_uniform(n: int, seed: int) -> List[float]:
    """``n`` uniform numbers in (0, 1] from BBOB's legacy generator seeded with ``seed``."""
    state, table = max(abs(int(seed)), 1), [0] * 32

    def lehmer(s: int) -> int:
        hi = s // 127773
        s = 16807 * (s - hi * 127773) - 2836 * hi
        return s + 2147483647 if s < 0 else s

    for i in range(39, -1, -1):
        state = lehmer(state)
        if i < 32:
            table[i] = state
    current = table[0]
    out = []
    for _ in range(n):
        state = lehmer(state)
        slot = current // 67108865
        current = table[slot]
        table[slot] = state
        value = current / 2.147483647e9
        out.append(1e-99 if value == 0.0 else value)
    return out


def _legacy_gauss(n: int, seed: int) -> List[float]:
    """Box-Muller normals from ``2 n`` legacy uniforms (first half radii, second half angles)."""
    u = _legacy_uniform(2 * n, seed)
    normals = (math.sqrt(-2 * math.log(u[i])) * math.cos(2 * math.pi * u[n + i]) for i in range(n))
    return [1e-99 if g == 0.0 else g for g in normals]


@lru_cache(maxsize=256)
def _rotation(seed: int, dim: int) -> np.ndarray:
    """Random orthogonal matrix: column-major Gaussian matrix, Gram-Schmidt on the columns."""
    b = np.array(_legacy_gauss(dim * dim, seed)).reshape(dim, dim).T.copy()  # B[i][j]: normal j * dim + i
    for i in range(dim):
        for j in range(i):
            b[:, i] -= (b[:, i] @ b[:, j]) * b[:, j]
        b[:, i] /= math.sqrt(b[:, i] @ b[:, i])
    return b


def _xopt(seed: int, dim: int) -> np.ndarray:
    """Uniform on a 1e-4 grid in [-4, 4], zeros moved to -1e-5."""
    u = np.array(_legacy_uniform(dim, seed))
    x = 8 * np.floor(1e4 * u) / 1e4 - 4
    x[x == 0.0] = -1e-5
    return x


def _fopt(function: int, instance: int) -> float:
    """A ratio of two Gaussians, rounded to 0.01 and clipped to [-1000, 1000]."""
    seed = function + 10000 * instance
    g1 = _legacy_gauss(1, seed)[0]
    g2 = _legacy_gauss(1, seed + 1)[0]
    return min(1000.0, max(-1000.0, math.floor(100.0 * 100.0 * g1 / g2 + 0.5) / 100.0))


# ----------------------------------------------------------------------------- transforms
def t_osz(x: Tensor) -> Tensor:
    """Oscillation ``T_osz``: ``sign(x) exp(x_hat + 0.049 (sin(c1 x_hat) + sin(c2 x_hat)))``,
    ``x_hat = log|x|``, ``(c1, c2) = (10, 7.9)`` for ``x > 0`` and ``(5.5, 3.1)`` otherwise."""
    pos = x > 0
    xh = torch.where(x != 0, x.abs().clamp_min(1e-300).log(), torch.zeros_like(x))
    c1 = torch.where(pos, torch.full_like(x, 10.0), torch.full_like(x, 5.5))
    c2 = torch.where(pos, torch.full_like(x, 7.9), torch.full_like(x, 3.1))
    y = torch.sign(x) * torch.exp(xh + 0.049 * (torch.sin(c1 * xh) + torch.sin(c2 * xh)))
    return torch.where(x != 0, y, torch.zeros_like(x))


def t_asy(x: Tensor, beta: float) -> Tensor:
    """Asymmetry ``T_asy^beta``: ``x_i^(1 + beta (i-1)/(D-1) sqrt(x_i))`` for ``x_i > 0``."""
    d = x.shape[-1]
    ramp = beta * torch.arange(d, dtype=x.dtype, device=x.device) / max(d - 1, 1)
    pos = x > 0
    xp = torch.where(pos, x, torch.ones_like(x))
    return torch.where(pos, xp ** (1 + ramp * xp.sqrt()), x)


# ----------------------------------------------------------------------------- functions
class BBOBFunction:
    """One BBOB problem ``f_{function}`` in dimension ``dim``, instance ``instance``.

    Calling it on a ``(d,)`` or ``(n, d)`` tensor returns a ``()`` or ``(n,)`` tensor (same
    dtype, float64 recommended); NumPy arrays and lists give floats / NumPy arrays.
    """

    def __init__(self, function: int, dim: int, instance: int = 1):
        if function not in FUNCTIONS:
            raise ValueError(f"function must be one of {sorted(FUNCTIONS)}, got {function!r}")
        if not isinstance(dim, int) or dim < 2:
            raise ValueError(f"dim must be an integer >= 2, got {dim!r}")
        if not isinstance(instance, int) or instance < 1:
            raise ValueError(f"instance must be a positive integer, got {instance!r}")
        self.function, self.dim, self.instance = function, dim, instance
        self.name = FUNCTIONS[function]
        seed = function + 10000 * instance
        self.fopt = _fopt(function, instance)
        xopt = _xopt(seed + 1000000 if function == 12 else seed, dim)
        self._xopt = 0.75 * xopt if function == 8 else xopt
        self._mats: Dict[str, np.ndarray] = {}
        if function in (10, 12, 15):
            self._mats["R"] = _rotation(seed + 1000000, dim)
        if function == 15:
            lam = np.sqrt(10.0) ** (np.arange(dim) / (dim - 1))
            self._mats["M"] = self._mats["R"] @ (lam[:, None] * _rotation(seed, dim))
        self._cache: Dict[Tuple, Dict[str, Tensor]] = {}

    @property
    def xopt(self) -> Tensor:
        """The optimum (float64 tensor)."""
        return torch.from_numpy(self._xopt.copy())

    def _consts(self, dtype, device) -> Dict[str, Tensor]:
        """``xopt`` and the rotations as tensors of ``dtype`` on ``device``, built once."""
        key = (dtype, str(device))
        if key not in self._cache:
            arrays = {"xopt": self._xopt, **self._mats}
            self._cache[key] = {k: torch.as_tensor(v, dtype=dtype, device=device) for k, v in arrays.items()}
        return self._cache[key]

    def evaluate(self, x: Tensor) -> Tensor:
        """Values at ``x`` (``(..., d)`` tensor)."""
        if x.shape[-1] != self.dim:
            raise ValueError(f"{self!r} expects points of size {self.dim}, got shape {tuple(x.shape)}")
        c, d, fn = self._consts(x.dtype, x.device), self.dim, self.function
        s = x - c["xopt"]
        if fn == 1:
            val = (s * s).sum(-1)
        elif fn in (2, 10):
            z = t_osz(s @ c["R"].T if fn == 10 else s)
            conditioning = 1e6 ** (torch.arange(d, dtype=x.dtype, device=x.device) / max(d - 1, 1))
            val = (conditioning * z * z).sum(-1)
        elif fn == 8:
            z = max(1.0, math.sqrt(d) / 8.0) * s + 1
            val = (100 * (z[..., :-1] ** 2 - z[..., 1:]) ** 2 + (z[..., :-1] - 1) ** 2).sum(-1)
        elif fn == 12:
            z = t_asy(s @ c["R"].T, 0.5) @ c["R"].T
            val = z[..., 0] ** 2 + 1e6 * (z[..., 1:] ** 2).sum(-1)
        else:  # 15
            z = t_asy(t_osz(s @ c["R"].T), 0.2) @ c["M"].T
            val = 10 * (d - torch.cos(2 * math.pi * z).sum(-1)) + (z * z).sum(-1)
        return val + self.fopt

    def __call__(self, x):
        if isinstance(x, Tensor):
            return self.evaluate(x)
        out = self.evaluate(torch.as_tensor(np.asarray(x, dtype=np.float64)))
        return float(out) if out.dim() == 0 else out.numpy()

    def __repr__(self) -> str:
        return f"BBOBFunction(f{self.function} {self.name}, dim={self.dim}, instance={self.instance})"


def get(function: int, dim: int, instance: int = 1) -> BBOBFunction:
    """The BBOB problem ``f{function}`` (one of 1, 2, 8, 10, 12, 15) in ``dim`` dimensions."""
    return BBOBFunction(function, dim, instance)


def suite(functions=tuple(FUNCTIONS), dims=(2, 5, 10, 20, 40), instances=(1, 2, 3)) -> List[BBOBFunction]:
    """All combinations of the given functions, dimensions and instances."""
    return [BBOBFunction(f, d, i) for f in functions for d in dims for i in instances]


__all__: List[str] = ["BBOBFunction", "FUNCTIONS", "get", "suite", "t_osz", "t_asy"]

