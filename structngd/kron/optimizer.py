"""KFACOptimizer: KFAC's whole update (Martens & Grosse 2015, sections 6 and 7) as one ``torch.optim`` optimizer.

A Kronecker preconditioner gives the direction ``Delta = -F_hat^{-1} grad``; the step's scale ``alpha`` and
momentum ``mu`` minimize the exact quadratic model ``M(d) = grad^T d + 1/2 d^T (G + (lambda + eta) I) d`` over
``d = alpha Delta + mu delta_0``, with ``G`` the Gauss-Newton matrix of the mini-batch loss, computed by
forward-mode products ``J v``. The damping ``lambda`` follows the Levenberg-Marquardt rule.
"""

from __future__ import annotations

import math
import warnings
from typing import Callable, Dict, List, Optional, Tuple

import torch
from torch import Tensor, nn
from torch.func import functional_call, jvp, vjp, vmap

from .. import checks
from .capture import _under_functorch
from .ekfac import EKFAC
from .kfac import KFAC
from .local import LocalKFAC

CURVATURES = {"kfac": KFAC, "ekfac": EKFAC, "local": LocalKFAC}
LOSSES = ("cross_entropy", "mse")
#: preconditioner options the optimizer sets itself
_OWN_OPTIONS = ("damping", "kl_clip", "optimizer_lr", "lr")


class _CallRecorder:
    """Forward hooks on the model keeping the arguments and output of its last call (outside ``torch.func``)."""

    def __init__(self, model: nn.Module):
        self.args, self.kwargs, self.output = None, None, None
        self.handles = [model.register_forward_pre_hook(self._before, with_kwargs=True),
                        model.register_forward_hook(self._after)]

    def _before(self, module, args, kwargs):
        if not _under_functorch():
            self.args, self.kwargs = args, kwargs

    def _after(self, module, args, output):
        if not _under_functorch():
            self.output = output

    def forget(self) -> None:
        self.args = self.kwargs = self.output = None

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()


def dot(xs: List[Tensor], ys: List[Tensor]) -> float:
    """``sum_i <x_i, y_i>`` in float64."""
    return float(sum((x.double() * y.double()).sum() for x, y in zip(xs, ys)))


def output_hessian_form(loss: str, outputs: Tensor, u: Tensor, w: Tensor) -> float:
    """``u^T H_L w`` for the Hessian ``H_L`` of the batch-mean loss in the outputs ``z``.

    ``"cross_entropy"`` (``F.cross_entropy`` of ``(N, C)`` logits): ``H_L = (1/N) diag_n(diag(p_n) - p_n p_n^T)``,
    ``p_n = softmax(z_n)``. ``"mse"`` (``F.mse_loss``, the mean over all ``M`` entries): ``H_L = (2/M) I``."""
    u, w = u.double(), w.double()
    if loss == "mse":
        return float(2.0 * (u * w).sum() / u.numel())
    p = torch.softmax(outputs.detach().double(), dim=-1)
    pu, pw = (p * u).sum(-1), (p * w).sum(-1)
    return float(((p * u * w).sum(-1) - pu * pw).sum() / outputs.shape[0])


def output_hessian_apply(loss: str, outputs: Tensor, u: Tensor) -> Tensor:
    """``H_L u`` (see :func:`output_hessian_form`)."""
    if loss == "mse":
        return 2.0 * u / u.numel()
    p = torch.softmax(outputs.detach(), dim=-1).to(u.dtype)
    return (p * u - p * (p * u).sum(-1, keepdim=True)) / outputs.shape[0]


def solve_coefficients(quad: Tensor, linear: Tensor, fixed: Tuple[Optional[float], Optional[float]]) -> Tensor:
    """``(alpha, mu)`` (or ``(alpha,)``) minimizing ``1/2 x^T quad x + linear^T x`` over the entries of ``fixed``
    that are ``None``.

    ``quad``, ``linear``: the model's 2x2 (1x1) matrix and vector (float64). A fixed entry keeps its value; a free
    one solves its row of ``quad x = -linear`` (both free: the 2x2 solve; ``mu = 0`` where it is singular)."""
    x = torch.tensor([0.0 if f is None else f for f in fixed], dtype=torch.float64)
    free = [i for i, f in enumerate(fixed) if f is None]
    if len(free) == 2:
        (a, b), (c, d) = quad.tolist()
        det = a * d - b * c
        if det > 1e-12 * abs(a * d):  # Cramer's rule (exact and reproducible in float64)
            x = torch.tensor([(-linear[0] * d + b * linear[1]) / det, (c * linear[0] - a * linear[1]) / det],
                             dtype=torch.float64)
        else:  # delta_0 parallel to Delta: the step along Delta alone
            x = torch.tensor([-float(linear[0]) / a, 0.0], dtype=torch.float64)
    elif len(free) == 1:
        i = free[0]
        others = sum(quad[i, j] * x[j] for j in range(len(fixed)) if j != i)
        x[i] = -(linear[i] + others) / quad[i, i]
    return x


class KFACOptimizer(torch.optim.Optimizer):
    """KFAC with the quadratic-model step and Levenberg-Marquardt damping (Martens & Grosse 2015, sections 6, 7).

    Each :meth:`step` (``delta_0`` the previous update, zero at the first step; ``eta = weight_decay``):

    1. ``closure()`` computes the gradient; ``grad = dL/dtheta + eta theta`` (L2 on every parameter).
    2. The preconditioner (``curvature``, with damping ``lambda + eta``) gives ``Delta = -F_hat^{-1} grad`` for
       its ``Linear`` / ``Conv2d`` layers; every other trained parameter (norms, embeddings, ...) has
       ``Delta = -grad``.
    3. ``alpha``, ``mu`` minimize ``M(alpha Delta + mu delta_0)``,
       ``M(d) = grad^T d + 1/2 d^T (G + (lambda + eta) I) d``, ``G = J^T H_L J`` the Gauss-Newton matrix of the
       batch loss (the Fisher, for these losses): the 2x2 system of ``v^T G w`` over ``v, w in {Delta, delta_0}``
       from ``J v`` by one forward-mode pass. A fixed ``lr`` is ``alpha``, a fixed ``momentum`` is ``mu``.
    4. ``theta <- theta + delta``, ``delta = alpha Delta + mu delta_0``.
    5. Every ``adapt_every`` steps the closure runs again at ``theta + delta`` (same batch) for
       ``rho = (h(theta + delta) - h(theta)) / M_0(delta)``, ``h = L + eta/2 ||theta||^2``, ``M_0`` the model
       without ``lambda`` (section 6.5); ``lambda <- omega lambda`` if ``rho > 3/4``, ``lambda <- lambda / omega``
       if ``rho < 1/4``, clamped to ``[min_damping, max_damping]``.

    Closure contract: ``closure()`` zeroes the gradients, calls ``model`` once, computes ``loss`` (this
    optimizer's ``loss``, batch mean, of the model's output), calls ``loss.backward()`` and returns
    ``(loss, outputs)`` with ``outputs`` the model's output. The model's last call is recorded by a forward hook;
    the Gauss-Newton products re-run that call (same arguments, copies of the buffers) under ``torch.func.jvp``.
    The forward must be deterministic (no dropout in training mode) for ``G`` to be the loss's.

    All or nothing: a step that raises (non-finite loss, gradients, curvature products or re-evaluated loss)
    leaves the parameters, the preconditioner's statistics, ``lambda`` and ``delta_0`` as they were.

    Args:
        model: the model (all its trained parameters form the one parameter group).
        lr: ``None`` (automatic ``alpha``) or a fixed ``alpha > 0``.
        momentum: ``None`` (automatic ``mu``) or a fixed ``mu`` in ``[0, 1)``.
        damping: the initial ``lambda > 0``.
        weight_decay: ``eta >= 0``.
        curvature: ``"kfac"`` (:class:`~structngd.kron.KFAC`), ``"ekfac"`` (:class:`~structngd.kron.EKFAC`) or
            ``"local"`` (:class:`~structngd.kron.LocalKFAC`).
        loss: ``"cross_entropy"`` (``F.cross_entropy``, ``(N, C)`` logits) or ``"mse"`` (``F.mse_loss``).
        adapt_damping: adapt ``lambda`` (else it stays fixed and the closure runs once per step).
        adapt_every: steps between adaptations ``T_1``.
        omega: the multiplier ``omega`` in ``(0, 1)``; default ``(19/20)^adapt_every``.
        min_damping, max_damping: the range ``lambda`` is clamped to (with ``lambda`` near 0 a batch the model
            already fits gives steps far beyond the other batches' quadratic regions).
        update_every, factor_decay, fisher, **preconditioner_options: passed to the preconditioner
            (``fisher="true"``: call ``optimizer.preconditioner.sample_fisher(outputs)`` before the backward).
    """

    def __init__(
        self,
        model: nn.Module,
        lr: Optional[float] = None,
        momentum: Optional[float] = None,
        damping: float = 1e-2,
        weight_decay: float = 0.0,
        curvature: str = "kfac",
        loss: str = "cross_entropy",
        adapt_damping: bool = True,
        adapt_every: int = 5,
        omega: Optional[float] = None,
        min_damping: float = 1e-4,
        max_damping: float = 1e4,
        update_every: int = 1,
        factor_decay: float = 0.95,
        fisher: str = "empirical",
        **preconditioner_options,
    ):
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
        checks.optional_positive("lr", lr)
        if momentum is not None:
            checks.fraction("momentum", momentum)
        checks.positive("damping", damping)
        checks.non_negative("weight_decay", weight_decay)
        checks.one_of("curvature", curvature, tuple(CURVATURES))
        checks.one_of("loss", loss, LOSSES)
        self.adapt_damping = checks.flag("adapt_damping", adapt_damping)
        self.adapt_every = checks.count("adapt_every", adapt_every)
        if omega is None:
            omega = (19 / 20) ** adapt_every
        if not (checks.is_number(omega) and 0 < omega < 1):
            raise ValueError(f"omega must be in (0, 1), got {omega!r}")
        checks.positive("min_damping", min_damping)
        checks.positive("max_damping", max_damping)
        if not min_damping <= damping <= max_damping:
            raise ValueError(f"damping must lie in [min_damping, max_damping] = [{min_damping}, {max_damping}], "
                             f"got {damping}")
        own = sorted(set(preconditioner_options) & set(_OWN_OPTIONS))
        if own:
            raise ValueError(f"KFACOptimizer sets the preconditioner's {own} itself (the step's scale comes from the "
                             "quadratic model; its damping is lambda + weight_decay)")
        params = [p for p in model.parameters() if p.requires_grad]
        if not params:
            raise ValueError("the model has no trained parameter")
        self.model, self.loss, self.curvature = model, loss, curvature
        self.omega, self.min_damping, self.max_damping = float(omega), float(min_damping), float(max_damping)
        defaults = dict(lr=lr, momentum=momentum, damping=float(damping), weight_decay=float(weight_decay))
        super().__init__(params, defaults)
        with warnings.catch_warnings():  # the parameters it leaves alone take -grad in this optimizer
            warnings.filterwarnings("ignore", message=".*leaves these modules' gradients unchanged")
            self.preconditioner = CURVATURES[curvature](
                model, damping=float(damping) + float(weight_decay), update_every=update_every,
                factor_decay=factor_decay, fisher=fisher, **preconditioner_options)
        covered = {id(p) for layer in self.preconditioner.layers for p in layer.parameters}
        self._covered = [id(p) in covered for p in params]
        self._recorder = _CallRecorder(model)
        self.steps = 0
        self.last: Dict[str, float] = {}

    # ------------------------------------------------------------- helpers
    @property
    def params(self) -> List[Tensor]:
        return self.param_groups[0]["params"]

    @property
    def damping(self) -> float:
        """The current ``lambda``."""
        return self.param_groups[0]["damping"]

    def _functional(self) -> Callable:
        """``theta -> model(theta)`` on the last recorded call's arguments (buffers copied, left unchanged)."""
        rec = self._recorder
        if rec.args is None:
            raise RuntimeError("KFACOptimizer: the closure must call the model (no recorded forward pass)")
        names = {id(p): name for name, p in self.model.named_parameters()}
        keys = [names[id(p)] for p in self.params]
        buffers = {name: b.clone() for name, b in self.model.named_buffers()}
        frozen = {name: p.detach() for name, p in self.model.named_parameters() if p.requires_grad is False}

        def forward(*theta):
            out = functional_call(self.model, {**buffers, **frozen, **dict(zip(keys, theta))}, rec.args, rec.kwargs)
            if not isinstance(out, Tensor):
                raise ValueError("KFACOptimizer needs a model whose output is one tensor")
            return out

        return forward

    def jacobian_products(self, vectors: List[List[Tensor]]) -> List[Tensor]:
        """``J v`` (output space) of the last recorded model call for each ``v`` (one tensor per parameter)."""
        forward = self._functional()
        primals = tuple(p.detach() for p in self.params)
        tangents = [tuple(t.to(p.dtype) for t, p in zip(v, primals)) for v in vectors]
        if len(vectors) == 1:
            return [jvp(forward, primals, tangents[0])[1]]
        stacked = tuple(torch.stack(ts) for ts in zip(*tangents))
        return list(vmap(lambda *ts: jvp(forward, primals, ts)[1])(*stacked))  # one batched forward-mode pass

    def ggn_gram(self, vectors: List[List[Tensor]], outputs: Tensor) -> Tensor:
        """``[v_i^T G v_j]`` (float64), ``G = J^T H_L J`` of the last recorded call with outputs ``outputs``."""
        jv = self.jacobian_products(vectors)
        k = len(vectors)
        gram = torch.zeros(k, k, dtype=torch.float64)
        for i in range(k):
            for j in range(i, k):
                gram[i, j] = gram[j, i] = output_hessian_form(self.loss, outputs, jv[i], jv[j])
        return gram

    def ggn_vector_product(self, vector: List[Tensor], outputs: Tensor) -> List[Tensor]:
        """``G v = J^T H_L J v`` for the last recorded model call (one forward-mode and one reverse pass)."""
        (jv,) = self.jacobian_products([vector])
        _, pullback = vjp(self._functional(), *(p.detach() for p in self.params))
        return list(pullback(output_hessian_apply(self.loss, outputs, jv)))

    def _call(self, closure: Callable) -> Tuple[Tensor, Tensor]:
        """Run the closure; check its contract and that loss and gradients are finite."""
        self._recorder.forget()
        with torch.enable_grad():
            result = closure()
        if not (isinstance(result, tuple) and len(result) == 2 and isinstance(result[0], Tensor)):
            raise ValueError("KFACOptimizer's closure must return (loss, outputs): zero the gradients, outputs = "
                             "model(inputs), loss = the batch-mean loss of outputs, loss.backward()")
        loss, outputs = result
        if outputs is not self._recorder.output:
            raise ValueError("the outputs the closure returns must be those of its last call of the model")
        if self.loss == "cross_entropy" and outputs.dim() != 2:
            raise ValueError(f"loss='cross_entropy' needs (N, C) logits, got outputs of shape {tuple(outputs.shape)}")
        if not math.isfinite(float(loss.detach())):
            raise ValueError(f"KFACOptimizer: the loss is {float(loss.detach())}; nothing was changed")
        return loss, outputs

    # ---------------------------------------------------------------- step
    @torch.no_grad()
    def step(self, closure: Callable) -> Tensor:
        """One KFAC update (see the class); returns the loss at the parameters before the update."""
        if closure is None:
            raise ValueError("KFACOptimizer.step needs the closure (zero_grad, forward, loss, backward, "
                             "return loss, outputs)")
        pre = self.preconditioner
        try:
            loss, outputs = self._call(closure)
            grads = self._gradients()
        except BaseException:
            pre.capture.reset()  # drop this batch's statistics
            raise
        saved_steps = pre.steps
        saved_blocks = {name: block.snapshot(pre.capture.statistics) for name, block in pre.blocks.items()}
        saved_params = [p.detach().clone() for p in self.params]
        try:
            pre.damping = self.damping + self.param_groups[0]["weight_decay"]
            pre.step()  # all or nothing: .grad of its layers is now F_hat^{-1} grad
            direction = [-p.grad if covered else -g for p, g, covered in zip(self.params, grads, self._covered)]
            update, model_change = self._update(direction, grads, outputs)
            for p, d in zip(self.params, update):
                p.add_(d)
            adapt = self.adapt_damping and (self.steps + 1) % self.adapt_every == 0
            new_damping = self._adapted(closure, float(loss.detach()), saved_params, update, model_change) if adapt else None
        except BaseException:
            for p, old in zip(self.params, saved_params):
                p.copy_(old)
            for name, block in pre.blocks.items():
                block.restore(saved_blocks[name])
            pre.steps = saved_steps
            pre.capture.reset()
            pre._arm_capture()
            raise
        for p, d in zip(self.params, update):
            self.state[p]["previous_update"] = d
        if new_damping is not None:
            self.param_groups[0]["damping"] = new_damping
        self.steps += 1
        return loss

    def _gradients(self) -> List[Tensor]:
        """``dL/dtheta + eta theta`` of every parameter (zero where it has no gradient), written into the ``.grad``
        of the preconditioner's layers; raises on a non-finite gradient."""
        eta, grads = self.param_groups[0]["weight_decay"], []
        for p, covered in zip(self.params, self._covered):
            g = torch.zeros_like(p) if p.grad is None else p.grad
            if not torch.isfinite(g.sum()):
                raise ValueError("KFACOptimizer: a gradient is non-finite; nothing was changed")
            g = g + eta * p if eta else g.clone()
            if covered and p.grad is not None:
                p.grad.copy_(g)
            grads.append(g)
        return grads

    def _update(self, direction: List[Tensor], grads: List[Tensor], outputs: Tensor) -> Tuple[List[Tensor], float]:
        """``delta = alpha Delta + mu delta_0`` minimizing the quadratic model; returns it and ``M_0(delta)``."""
        group = self.param_groups[0]
        previous = [self.state[p].get("previous_update") for p in self.params]
        first = previous[0] is None
        vectors = [direction] if first else [direction, previous]
        needs_model = group["lr"] is None or (group["momentum"] is None and not first) or self.adapt_damping
        if needs_model:
            gram = self.ggn_gram(vectors, outputs)
            inner = torch.tensor([[dot(v, w) for w in vectors] for v in vectors], dtype=torch.float64)
            linear = torch.tensor([dot(grads, v) for v in vectors], dtype=torch.float64)
            undamped = gram + group["weight_decay"] * inner
            quad = undamped + group["damping"] * inner
            if not (torch.isfinite(quad).all() and torch.isfinite(linear).all()):
                raise ValueError("KFACOptimizer: non-finite curvature products; nothing was changed")
        fixed = (group["lr"], None if first else group["momentum"])
        if not needs_model:
            x = torch.tensor([fixed[0], fixed[1] or 0.0][: len(vectors)], dtype=torch.float64)
            model_change = math.nan
        else:
            x = solve_coefficients(quad, linear, fixed[: len(vectors)])
            model_change = float(linear @ x + 0.5 * x @ undamped @ x)
            self.last = {"alpha": float(x[0]), "mu": float(x[1]) if len(x) > 1 else 0.0,
                         "model": float(linear @ x + 0.5 * x @ quad @ x), "undamped_model": model_change}
        if not torch.isfinite(x).all():
            raise ValueError("KFACOptimizer: the step's coefficients are non-finite; nothing was changed")
        coefficients = x.tolist()
        update = [sum(c * v[i] for c, v in zip(coefficients, vectors)) for i in range(len(direction))]
        return update, model_change

    def _adapted(self, closure: Callable, loss: float, old: List[Tensor], update: List[Tensor],
                 model_change: float) -> float:
        """The Levenberg-Marquardt ``lambda`` after re-running the closure at ``theta + delta`` (its statistics are
        dropped)."""
        new_loss, _ = self._call(closure)
        new_loss = new_loss.detach()
        self.preconditioner.capture.reset()
        eta = self.param_groups[0]["weight_decay"]
        change = float(new_loss) - loss
        if eta:
            change += eta * dot(old, update) + 0.5 * eta * dot(update, update)
        rho = change / model_change if model_change < 0 else math.nan
        self.last["rho"] = rho
        return self.adapted_damping(self.damping, rho)

    def adapted_damping(self, damping: float, rho: float) -> float:
        """``omega lambda`` if ``rho > 3/4``, ``lambda / omega`` if ``rho < 1/4``, else ``lambda`` (a NaN ``rho``
        leaves it), clamped to ``[min_damping, max_damping]``."""
        if rho > 0.75:
            damping = damping * self.omega
        elif rho < 0.25:
            damping = damping / self.omega
        return min(max(damping, self.min_damping), self.max_damping)

    # --------------------------------------------------------- state dicts
    def state_dict(self) -> dict:
        """The optimizer's state (``delta_0``, ``lambda``), its step count and the preconditioner's state."""
        state = super().state_dict()
        state["kfac"] = {"steps": self.steps, "preconditioner": self.preconditioner.state_dict()}
        return state

    def load_state_dict(self, state_dict: dict) -> None:
        state_dict = dict(state_dict)
        kfac = state_dict.pop("kfac")
        self.preconditioner.damping = kfac["preconditioner"]["hyperparameters"]["damping"]
        self.preconditioner.load_state_dict(kfac["preconditioner"])
        super().load_state_dict(state_dict)
        self.steps = int(kfac["steps"])

    def remove_hooks(self) -> None:
        """Detach from the model (the optimizer can no longer step)."""
        self._recorder.remove()
        self.preconditioner.remove_hooks()
