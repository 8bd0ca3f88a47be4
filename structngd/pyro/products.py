"""Kronecker statistics of a Pyro model's matrix-shaped weight sites, captured in ``SVI``'s own pass.

The guide hands the model each weight as a :class:`TrackedWeight`: a tensor subclass that behaves as
the plain weight, records the inputs ``x`` of every product ``x W^T`` (``x @ W.mT``, ``F.linear(x, W)``)
or ``W x`` it enters, and hooks the product's output to record its gradient ``g``. With rows
``a = (x, 1)`` (bias folded) and the likelihood's scale ``s = N / B`` (``B`` rows of ``N`` per step),

``A = mean_rows a a^T``,  ``G = (P / s) sum_rows g g^T``

where ``P`` counts the particles (the ELBO averages over them). Then ``A ⊗ G`` estimates the data
term's Hessian ``sum_n E[a_n a_n^T] ⊗ E[g_n g_n^T]`` over all ``N`` rows (the empirical Fisher at the
sampled weights, as in noisy K-FAC), whatever the batch size, subsampling or number of particles.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

_MATMULS = {torch.matmul, Tensor.matmul, Tensor.__matmul__}
_FLIPS = {Tensor.transpose, torch.transpose, Tensor.t, torch.t, Tensor.mT.__get__, Tensor.T.__get__}
_KEEPS = {Tensor.unsqueeze, Tensor.squeeze, Tensor.expand, Tensor.view, Tensor.reshape, Tensor.contiguous,
          torch.unsqueeze, torch.squeeze, torch.reshape, Tensor.__getitem__, Tensor.expand_as, Tensor.view_as,
          Tensor.to, Tensor.clone}


class ProductStatistics:
    """What the products of one weight site recorded in the current pass (see the module)."""

    def __init__(self, name: str, out_dim: int, in_dim: int, ones: bool):
        self.name, self.out_dim, self.in_dim, self.ones = name, out_dim, in_dim, ones
        self.reset()

    def reset(self) -> None:
        self.a_sum: Optional[Tensor] = None
        self.g_sum: Optional[Tensor] = None
        self.rows = 0
        self.particles = 0
        self.unsupported: Optional[str] = None

    @property
    def empty(self) -> bool:
        return self.a_sum is None or self.g_sum is None

    def add_inputs(self, x: Tensor) -> None:
        rows = x.detach().reshape(-1, self.in_dim)
        if self.ones:
            rows = torch.cat([rows, rows.new_ones(rows.shape[0], 1)], -1)
        gram = rows.mT @ rows
        self.a_sum = gram if self.a_sum is None else self.a_sum + gram
        self.rows += rows.shape[0]

    def add_output_gradient(self, g: Tensor) -> None:
        rows = g.detach().reshape(-1, self.out_dim)
        gram = rows.mT @ rows
        self.g_sum = gram if self.g_sum is None else self.g_sum + gram

    def statistics(self, scale: float):
        """``(A, G)`` for likelihood scale ``s`` (see the module); ``ValueError`` if nothing was recorded."""
        if self.unsupported is not None:
            raise ValueError(f"the Kronecker estimator cannot read weight site {self.name!r}: {self.unsupported}; "
                             "use estimator='reparam'")
        if self.empty:
            raise ValueError(f"the Kronecker estimator saw no product x @ W.mT, F.linear(x, W) or W @ x with weight "
                             f"site {self.name!r} in the last training pass (or no gradient reached it); "
                             "use estimator='reparam'")
        return self.a_sum / self.rows, self.g_sum * (self.particles / scale)


class TrackedWeight(Tensor):
    """A weight site's value that records its products into a :class:`ProductStatistics` (see the module).

    Views that keep the matrix (``unsqueeze``, ``expand``, ``reshape`` to the same last two sizes, ...) stay
    tracked, transposes flip the orientation, every other operation returns a plain tensor."""

    _statistics: ProductStatistics
    _transposed: bool

    @staticmethod
    def wrap(value: Tensor, statistics: ProductStatistics, transposed: bool = False) -> "TrackedWeight":
        out = value.as_subclass(TrackedWeight)
        out._statistics, out._transposed = statistics, transposed
        return out

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = super().__torch_function__(func, types, args, kwargs)
        tracked = args[0] if args and isinstance(args[0], TrackedWeight) else None
        second = args[1] if len(args) > 1 and isinstance(args[1], TrackedWeight) else None
        out = _plain(out)
        if func in _MATMULS and (tracked is not None or second is not None):
            _record_product(args[0], args[1], out)
        elif func is F.linear and isinstance(args[1] if len(args) > 1 else kwargs.get("weight"), TrackedWeight):
            weight = args[1] if len(args) > 1 else kwargs["weight"]
            x = args[0] if args else kwargs["input"]
            _record(weight._statistics, _plain(x), out, weight._transposed, "F.linear")
        elif tracked is not None and isinstance(out, Tensor) and out.dim() >= 2:
            stats, shape = tracked._statistics, tuple(tracked.shape[-2:])
            if func in _FLIPS and tuple(out.shape[-2:]) == shape[::-1]:
                return TrackedWeight.wrap(out, stats, not tracked._transposed)
            if func in _KEEPS and tuple(out.shape[-2:]) == shape:
                return TrackedWeight.wrap(out, stats, tracked._transposed)
        return out


def _plain(value):
    if isinstance(value, TrackedWeight):
        return value.as_subclass(Tensor)
    if isinstance(value, (tuple, list)):
        return type(value)(_plain(v) for v in value)
    return value


def _record_product(left, right, out: Tensor) -> None:
    """``x @ W^T`` (inputs rows of ``x``) or ``W @ x`` (inputs columns of ``x``)."""
    if isinstance(right, TrackedWeight) and not isinstance(left, TrackedWeight):
        _record(right._statistics, _plain(left), out, not right._transposed, "x @ W")
    elif isinstance(left, TrackedWeight) and not isinstance(right, TrackedWeight) and not left._transposed:
        stats = left._statistics
        if torch.is_grad_enabled() and out.requires_grad:
            stats.add_inputs(_plain(right).mT)
            out.register_hook(lambda g: stats.add_output_gradient(g.mT))
    else:
        stats = (left if isinstance(left, TrackedWeight) else right)._statistics
        stats.unsupported = "it enters a product as W^T @ x or with another weight"


def _record(stats: ProductStatistics, x: Tensor, out: Tensor, wrong_way: bool, how: str) -> None:
    """Record ``out = x W^T``; ``wrong_way``: the weight entered untransposed (``x @ W``), which is not a layer."""
    if wrong_way:
        stats.unsupported = f"it enters {how} untransposed (the layer form is x @ W.mT)"
        return
    if torch.is_grad_enabled() and out.requires_grad:
        stats.add_inputs(x)
        out.register_hook(stats.add_output_gradient)
