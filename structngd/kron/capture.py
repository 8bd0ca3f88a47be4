"""Per-layer capture of layer inputs and output gradients (module forward hooks + output-tensor hooks).

For every supported layer the weight (and bias, when it trains) is seen as one matrix
``W`` of shape ``(d_out, d_in)`` acting on input rows ``a_bar = (a, 1)``:

* ``nn.Linear``: one row per example (extra leading dimensions, e.g. positions, are extra rows);
* ``nn.Conv2d`` (``groups=1``, zero padding, any stride / dilation / padding): the KFC patch
  expansion, one row per output location ``t`` (``d_in = C_in k_h k_w (+1)``).

Per step the capture accumulates ``A = E_n[sum_t a_bar a_bar^T]`` and
``G = E_n[(1/T) sum_t g g^T]`` with ``g`` the per-example output gradient
``d(-log p(y_n | x_n)) / d s_n`` (the batch-mean loss's gradient times the batch size), so
that the layer's Fisher block is approximated by ``A ⊗ G`` (KFAC / KFC).
"""

from __future__ import annotations

import contextlib
import inspect
import warnings
import weakref
from typing import Callable, Dict, List, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class KronLayer:
    """A supported layer with the maps from its tensors to Kronecker rows."""

    def __init__(self, name: str, module: nn.Module):
        self.name, self.module = name, module
        self.weight: nn.Parameter = module.weight
        bias = module.bias
        self.bias: Optional[nn.Parameter] = bias if bias is not None and bias.requires_grad else None
        self.has_ones = bias is not None  # a frozen bias still shifts the output, but has no gradient
        self.out_dim = module.weight.shape[0]
        self.in_dim = module.weight[0].numel() + (1 if self.bias is not None else 0)

    def __repr__(self) -> str:
        return f"KronLayer({self.name!r}, {type(self.module).__name__}, d_in={self.in_dim}, d_out={self.out_dim})"

    @property
    def parameters(self) -> List[nn.Parameter]:
        return [self.weight] + ([self.bias] if self.bias is not None else [])

    # ------------------------------------------------------------- rows
    def input_rows(self, x: Tensor) -> Tensor:
        """``(N, T, d_in)`` rows ``a_bar`` (bias coordinate 1 last)."""
        m = self.module
        if isinstance(m, nn.Conv2d):
            if x.dim() == 3:  # unbatched input
                x = x.unsqueeze(0)
            padding = _conv_padding(m)
            if any(padding):
                x = F.pad(x, padding)
            rows = F.unfold(x, m.kernel_size, dilation=m.dilation, stride=m.stride).transpose(1, 2)
        else:
            rows = x.reshape(x.shape[0] if x.dim() > 1 else 1, -1, x.shape[-1])
        if self.bias is not None:
            rows = torch.cat([rows, rows.new_ones(rows.shape[:-1] + (1,))], dim=-1)
        return rows

    def grad_rows(self, g: Tensor) -> Tensor:
        """``(N, T, d_out)`` rows of output gradients."""
        if isinstance(self.module, nn.Conv2d):
            if g.dim() == 3:
                g = g.unsqueeze(0)
            return g.flatten(2).transpose(1, 2)
        return g.reshape(g.shape[0] if g.dim() > 1 else 1, -1, g.shape[-1])

    # ----------------------------------------------------- gradient matrix
    def grad_matrix(self) -> Tensor:
        """``dL/dW`` as ``(d_out, d_in)`` (bias gradient as the last column)."""
        g = self.weight.grad.reshape(self.out_dim, -1)
        if self.bias is not None:
            g = torch.cat([g, self.bias.grad.reshape(self.out_dim, 1)], dim=1)
        return g

    def set_grad_matrix(self, mat: Tensor) -> None:
        """Write a ``(d_out, d_in)`` matrix back into ``weight.grad`` (and ``bias.grad``)."""
        self._write(mat, self.weight.grad, None if self.bias is None else self.bias.grad)

    @torch.no_grad()
    def set_weight_matrix(self, mat: Tensor) -> None:
        """Write a ``(d_out, d_in)`` matrix into ``weight`` (and the trained ``bias``, the last column)."""
        self._write(mat, self.weight, self.bias)

    def _write(self, mat: Tensor, weight: Tensor, bias: Optional[Tensor]) -> None:
        weight.copy_((mat[:, : self.weight[0].numel()] if bias is not None else mat).reshape(self.weight.shape))
        if bias is not None:
            bias.copy_(mat[:, -1])

    def weight_matrix(self) -> Tensor:
        """``W`` as ``(d_out, d_in)`` (bias as the last column)."""
        w = self.weight.detach().reshape(self.out_dim, -1)
        if self.bias is not None:
            w = torch.cat([w, self.bias.detach().reshape(self.out_dim, 1)], dim=1)
        return w


def _conv_padding(m: nn.Conv2d) -> Tuple[int, int, int, int]:
    """``F.pad`` amounts (left, right, top, bottom) of a zero-padded ``Conv2d``."""
    if m.padding == "valid":
        return (0, 0, 0, 0)
    if m.padding == "same":
        pads = []
        for k, d in zip(reversed(m.kernel_size), reversed(m.dilation)):  # width first for F.pad
            total = d * (k - 1)
            pads += [total // 2, total - total // 2]
        return tuple(pads)
    ph, pw = m.padding
    return (pw, pw, ph, ph)


def unsupported_reason(module: nn.Module) -> Optional[str]:
    """Why a ``Linear`` / ``Conv2d`` cannot be preconditioned, or ``None`` if it can."""
    if not module.weight.requires_grad:
        return "frozen weight"
    if isinstance(module, nn.Conv2d):
        if module.groups != 1:
            return f"groups={module.groups}"
        if module.padding_mode != "zeros":
            return f"padding_mode={module.padding_mode!r}"
    return None


def find_layers(model: nn.Module, skip: Tuple[str, ...] = ()) -> Tuple[List[KronLayer], Dict[str, str]]:
    """Supported layers of ``model`` and, by name, the parameterized modules left alone and why."""
    layers, skipped = [], {}
    owners: Dict[int, List[str]] = {}
    for name, module in model.named_modules():
        for p in module.parameters(recurse=False):
            owners.setdefault(id(p), []).append(name)
    for name, module in model.named_modules():
        direct = [p for p in module.parameters(recurse=False) if p.requires_grad]
        if name in skip:
            if direct:
                skipped[name] = "skipped on request"
            continue
        if type(module) in (nn.Linear, nn.Conv2d):
            reason = unsupported_reason(module)
            shared = [n for p in module.parameters(recurse=False) for n in owners[id(p)] if n != name]
            if reason is None and shared:
                reason = f"weight shared with {sorted(set(shared))}"
            if reason is None:
                layers.append(KronLayer(name, module))
            else:
                skipped[name] = reason
        elif isinstance(module, nn.modules.lazy.LazyModuleMixin) and module.has_uninitialized_params():
            skipped[name] = "uninitialized lazy module (run one forward pass before building the preconditioner)"
        elif direct:
            skipped[name] = f"unsupported layer type {type(module).__name__}"
    return layers, skipped


#: the live capture of every hooked module: a second preconditioner on the same layer is an error
_OWNERS: "weakref.WeakKeyDictionary[nn.Module, weakref.ref]" = weakref.WeakKeyDictionary()


def _held_weakly(fn: Optional[Callable]) -> Callable[[], Optional[Callable]]:
    """``fn`` behind a reference that keeps a bound method's object alive through nothing."""
    if inspect.ismethod(fn):
        return weakref.WeakMethod(fn)
    return lambda: fn


_CALLBACKS = ("_grad_scale", "_on_rows", "_on_reset")


class _ForwardHook:
    """A layer's forward hook, tied weakly to its capture. A copy or a pickle of the hooked module
    gets an inert hook (copies of a model are not preconditioned); a pickled preconditioner hooks its
    own copy of the model again when it is loaded."""

    def __init__(self, capture: "Capture", layer: KronLayer):
        self.capture, self.layer = weakref.ref(capture), layer

    def __call__(self, module, inputs, output):
        capture = self.capture()
        if capture is not None and module is self.layer.module:
            capture._forward(self.layer, inputs, output)

    def __reduce__(self):
        return (_InertHook, ())


class _InertHook:
    """What a copied or unpickled module keeps of a preconditioner's hook: nothing."""

    def __call__(self, module, inputs, output):
        return None


class Capture:
    """Hooks that accumulate the Kronecker statistics of the supported layers.

    A forward hook takes the input rows and hooks the output tensor; only when that output's
    gradient arrives (also when the input needs no gradient, and under ``torch.autograd.grad``)
    do the input's ``A`` and the gradient's ``G`` enter the statistics, so forwards that are never
    backpropagated count for nothing. A second backward pass through the same forward counts as
    more examples, as does a second call of a module in one forward. :meth:`arm` says what a step
    gathers: ``A``, ``G`` and/or the rows for ``on_rows(layer, a_rows, g_rows)``. ``grad_scale(n)``
    multiplies the output gradients of a micro-batch of ``n``; with ``from_sampled_labels`` only
    :meth:`sampled_label_pass` feeds the statistics. Forwards under ``torch.func`` transforms are
    ignored. ``input_statistics[name](rows)`` (rows ``(n, d_in)``), where set, replaces a layer's
    ``rows^T rows`` by the part a block reads (e.g. the diagonal, for diagonal factors).
    """

    def __init__(self, layers: List[KronLayer], grad_scale: Callable[[int], float], from_sampled_labels: bool = False):
        for layer in layers:
            owner = _OWNERS.get(layer.module)
            if owner is not None and owner() is not None:
                raise ValueError(f"layer {layer.name!r} is already preconditioned by another preconditioner: call its "
                                 "remove_hooks() first")
        self.layers = layers
        self.grad_scale = grad_scale
        self.from_sampled_labels = bool(from_sampled_labels)
        self.statistics = True
        self.input_statistics: Dict[str, Callable[[Tensor], Tensor]] = {}
        self.on_rows = self.on_reset = None
        self._in_sampled_pass = False
        self._handles: list = []
        self._register()
        self.reset()

    # the preconditioner's methods are held weakly, so that hooks keep no preconditioner alive
    @property
    def grad_scale(self) -> Callable[[int], float]:
        return self._grad_scale()

    @grad_scale.setter
    def grad_scale(self, fn: Callable[[int], float]) -> None:
        self._grad_scale = _held_weakly(fn)

    @property
    def on_rows(self) -> Optional[Callable[[KronLayer, Tensor, Tensor], None]]:
        return self._on_rows()

    @on_rows.setter
    def on_rows(self, fn: Optional[Callable[[KronLayer, Tensor, Tensor], None]]) -> None:
        self._on_rows = _held_weakly(fn)

    @property
    def on_reset(self) -> Optional[Callable[[], None]]:
        """Called when the step's statistics are forgotten (what ``on_rows`` took goes with them)."""
        return self._on_reset()

    @on_reset.setter
    def on_reset(self, fn: Optional[Callable[[], None]]) -> None:
        self._on_reset = _held_weakly(fn)

    def _register(self) -> None:
        for layer in self.layers:
            self._handles.append(layer.module.register_forward_hook(_ForwardHook(self, layer)))
            _OWNERS[layer.module] = weakref.ref(self)
        weakref.finalize(self, _remove_handles, self._handles)

    def __getstate__(self) -> dict:
        state = {k: v for k, v in self.__dict__.items() if k not in ("_handles",) + _CALLBACKS}
        return {**state, **{name[1:]: getattr(self, name[1:]) for name in _CALLBACKS}}

    def __setstate__(self, state: dict) -> None:
        callbacks = {name[1:]: state.pop(name[1:]) for name in _CALLBACKS}
        self.__dict__.update(state)
        for name, fn in callbacks.items():
            setattr(self, name, fn)
        self._handles = []
        self._register()

    def arm(self, statistics: bool, on_rows: Optional[Callable[[KronLayer, Tensor, Tensor], None]] = None) -> None:
        """What the coming step gathers: ``A`` and ``G`` (``statistics``) and the rows for ``on_rows``."""
        self.statistics, self.on_rows = bool(statistics), on_rows

    @contextlib.contextmanager
    def sampled_label_pass(self):
        """Backward passes inside feed the true Fisher's statistics (and nothing else)."""
        self._in_sampled_pass = True
        try:
            yield
        finally:
            self._in_sampled_pass = False

    def reset(self) -> None:
        """Forget the statistics of the current step."""
        self.a_sum, self.g_sum = ({layer.name: None for layer in self.layers} for _ in range(2))
        self.a_count, self.g_count, self.calls = ({layer.name: 0 for layer in self.layers} for _ in range(3))
        self.backward_seen = self.forward_seen = self.stale = False
        on_reset = self.on_reset
        if on_reset is not None:
            on_reset()

    def remove(self) -> None:
        _remove_handles(self._handles)
        for layer in self.layers:
            owner = _OWNERS.get(layer.module)
            if owner is not None and owner() is self:
                del _OWNERS[layer.module]

    def _forward(self, layer: KronLayer, inputs, output) -> None:
        if not (layer.module.training and torch.is_grad_enabled() and isinstance(output, Tensor)
                and output.requires_grad) or _under_functorch():
            return
        if self.stale:  # the first forward after a failed step starts the statistics afresh
            self.reset()
        self.forward_seen = True
        if not self.capturing:
            return  # nothing to capture this step (KFAC between statistics updates)
        x = inputs[0].detach()
        rows = layer.input_rows(x).to(statistics_dtype(x.dtype))
        a_batch = self._input_statistic(layer, rows) if self.statistics else None
        output.register_hook(self._gradient_hook(layer, rows.shape[0], a_batch,
                                                 rows if self.on_rows is not None else None))

    def _input_statistic(self, layer: KronLayer, rows: Tensor) -> Tensor:
        """``sum_{n, t} a a^T`` of the ``(n, t, d_in)`` rows, or what ``input_statistics`` makes of them."""
        reader = self.input_statistics.get(layer.name)
        if reader is None:
            return torch.einsum("nti,ntj->ij", rows, rows)
        return reader(rows.reshape(-1, rows.shape[-1]))

    def _gradient_hook(self, layer: KronLayer, n: int, a_batch: Optional[Tensor], a_rows: Optional[Tensor]):
        def hook(grad: Tensor):
            if not self._in_sampled_pass:
                self.backward_seen = True
            if self._in_sampled_pass != self.from_sampled_labels:  # not the Fisher's gradients
                return
            g = grad.detach()
            g_rows = layer.grad_rows(g).to(statistics_dtype(g.dtype)) * self.grad_scale(n)
            if self.statistics and a_batch is not None:
                _add(self.a_sum, layer.name, a_batch)
                self.a_count[layer.name] += n
                _add(self.g_sum, layer.name, torch.einsum("nti,ntj->ij", g_rows, g_rows) / g_rows.shape[1])
                self.g_count[layer.name] += g_rows.shape[0]
                self.calls[layer.name] += 1
            on_rows = self.on_rows
            if on_rows is not None and a_rows is not None:
                on_rows(layer, a_rows, g_rows)

        return hook

    @property
    def capturing(self) -> bool:
        """Whether this step needs rows (new statistics, or per-example rows)."""
        return self.statistics or self.on_rows is not None

    def repeated_calls(self) -> Dict[str, int]:
        """Layers whose outputs were backpropagated more often than the others' in this step, with the count."""
        fewest = min(self.calls.values(), default=0)
        return {name: n for name, n in self.calls.items() if n > fewest > 0}

    def batch_statistics(self, layer: KronLayer) -> Tuple[Tensor, Tensor]:
        """This step's ``(A, G)`` of ``layer`` (sums over the micro-batches, averaged)."""
        name = layer.name
        if self.a_sum[name] is None or self.g_sum[name] is None:
            raise RuntimeError(f"no statistics were captured for layer {name!r} in this step: run the forward and "
                               "backward passes in training mode with gradients enabled before step()")
        return self.a_sum[name] / self.a_count[name], self.g_sum[name] / self.g_count[name]


def _remove_handles(handles: list) -> None:
    for handle in handles:
        handle.remove()
    handles.clear()


def _under_functorch() -> bool:
    """Whether a ``torch.func`` transform (``vmap``, ``grad``, ...) is running."""
    active = getattr(torch._C, "_are_functorch_transforms_active", None)
    return bool(active()) if active is not None else False


def statistics_dtype(dtype: torch.dtype) -> torch.dtype:
    """Statistics in float64 for float64 models, else float32 (also under autocast / bfloat16)."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def _add(store: Dict[str, Optional[Tensor]], key: str, value: Tensor) -> None:
    store[key] = value if store[key] is None else store[key] + value


def warn_skipped(kind: str, skipped: Dict[str, str]) -> None:
    """One warning listing the parameterized modules a preconditioner leaves alone."""
    if skipped:
        listing = "; ".join(f"{name or '<model>'}: {why}" for name, why in skipped.items())
        warnings.warn(f"{kind} leaves these modules' gradients unchanged (the optimizer still updates them): "
                      f"{listing}", stacklevel=3)
