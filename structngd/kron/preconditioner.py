"""The Kronecker preconditioner's step: capture, reduction over ranks, one curvature block per layer, KL clip."""

from __future__ import annotations

import warnings
from typing import Dict, Iterable, Optional

import torch
import torch.distributed as dist
from torch import Tensor, nn

from .. import checks
from ..families.estimators import FISHERS
from .blocks import CurvatureBlock
from .capture import Capture, KronLayer, find_layers, statistics_dtype, warn_skipped
from .distributed import all_reduce_statistics, world
from .fisher_sampling import sampled_label_loss
from .trust_region import kl_clip_scale

HYPERPARAMETERS = ("damping", "factor_decay", "update_every", "kl_clip", "optimizer_lr")


class KroneckerPreconditioner:
    """Rewrites the ``.grad`` of every supported layer with a preconditioned gradient.

    Use it before any torch optimizer: ``loss.backward(); pre.step(); opt.step()``. Every
    ``update_every`` steps the batch statistics ``A``, ``G`` enter the moving averages
    ``X <- factor_decay X + (1 - factor_decay) X_batch`` (the first batch initializes them) and
    each layer's :class:`~structngd.kron.blocks.CurvatureBlock` (``self.blocks``) refreshes.
    Under ``torch.distributed`` the statistics are averaged over the ranks and the refreshes
    split round-robin and broadcast; the gradients must already be averaged (as DDP does).

    Args:
        model: its ``Linear`` / ``Conv2d`` layers are preconditioned (one warning lists the
            other parameterized modules, which are left alone).
        damping: Tikhonov damping ``lambda > 0``.
        factor_decay: moving-average weight in ``[0, 1)`` of the old statistics.
        update_every: steps between updates of the statistics and refreshes of the blocks.
        fisher: ``"empirical"`` (the loss's gradients) or ``"true"`` (labels sampled from the
            model: call :meth:`sample_fisher` on the output before the loss's backward).
        batch_averaged: the loss is a batch mean, so per-example output gradients are the
            captured ones times the batch size.
        accumulation_steps: micro-batches (losses divided by this number) per ``step()``.
        grad_scaler: a ``torch.amp.GradScaler`` whose scale divides the captured gradients.
        skip: a name or names of modules to leave alone.
        kl_clip: scale the preconditioned gradients ``p`` by
            ``nu = min(1, sqrt(kl_clip / (lr^2 sum_l <p_l, g_l>)))`` (Ba et al. 2017); ``None``: off.
        optimizer_lr: the outer optimizer's ``lr`` that ``kl_clip`` needs (``lr=``: deprecated alias).
    """

    kind = "KroneckerPreconditioner"

    def __init__(
        self,
        model: nn.Module,
        damping: float = 1e-3,
        factor_decay: float = 0.95,
        update_every: int = 10,
        fisher: str = "empirical",
        batch_averaged: bool = True,
        accumulation_steps: int = 1,
        grad_scaler=None,
        skip: Iterable[str] = (),
        kl_clip: Optional[float] = None,
        optimizer_lr: Optional[float] = None,
        lr: Optional[float] = None,
    ):
        if lr is not None:
            if optimizer_lr is not None:
                raise ValueError("pass the outer optimizer's learning rate once, as optimizer_lr")
            warnings.warn(f"{self.kind}(lr=...) is deprecated: the outer optimizer's learning rate is optimizer_lr",
                          DeprecationWarning, stacklevel=2)
            optimizer_lr = lr
        checks.positive("damping", damping)
        if kl_clip is not None:
            checks.positive("kl_clip", kl_clip)
            checks.positive("optimizer_lr (the outer optimizer's learning rate, needed with kl_clip)", optimizer_lr)
        self.kl_clip, self.optimizer_lr = kl_clip, optimizer_lr
        checks.fraction("factor_decay", factor_decay)
        checks.count("update_every", update_every)
        checks.count("accumulation_steps", accumulation_steps)
        checks.one_of("fisher", fisher, FISHERS)
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
        self.damping, self.factor_decay, self.update_every = float(damping), float(factor_decay), update_every
        self.batch_averaged = checks.flag("batch_averaged", batch_averaged)
        self.fisher, self.accumulation_steps, self.grad_scaler = fisher, accumulation_steps, grad_scaler
        skip = (skip,) if isinstance(skip, str) else tuple(skip)
        unknown = sorted(set(skip) - {name for name, _ in model.named_modules()})
        if unknown:
            raise ValueError(f"skip names modules the model does not have: {unknown}")
        self.layers, self.skipped = find_layers(model, skip)
        if not self.layers:
            raise ValueError(f"{self.kind} found no supported layer (nn.Linear, nn.Conv2d) in the model")
        warn_skipped(self.kind, self.skipped)
        self.capture = Capture(self.layers, self._grad_scale, from_sampled_labels=fisher == "true")
        self.capture.on_reset = self._discard_batch
        self.steps, self._warned_repeated = 0, False
        self.blocks: Dict[str, CurvatureBlock] = {layer.name: self._make_block(layer) for layer in self.layers}
        self._arm_capture()

    def _discard_batch(self) -> None:
        for block in self.blocks.values():
            block.discard_batch()

    def _make_block(self, layer: KronLayer) -> CurvatureBlock:
        """The layer's curvature block (each preconditioner defines its own)."""
        raise NotImplementedError

    @property
    def state(self) -> Dict[str, Dict[str, Tensor]]:
        """Every layer's tensors by layer name (the blocks' ``state`` dicts themselves)."""
        return {name: block.state for name, block in self.blocks.items()}

    def hyperparameters(self) -> dict:
        """The values the blocks read at each call (and ``state_dict`` saves)."""
        return {k: getattr(self, k) for k in HYPERPARAMETERS}

    # ------------------------------------------------------------- hooks
    def _grad_scale(self, batch: int) -> float:
        scale = (batch if self.batch_averaged else 1) * self.accumulation_steps
        if self.grad_scaler is not None and self.grad_scaler.is_enabled():
            scale /= float(self.grad_scaler.get_scale())
        return scale

    @staticmethod
    def statistics_dtype(layer: KronLayer) -> torch.dtype:
        """The dtype of the layer's statistics (float64 for float64 layers, else float32)."""
        return statistics_dtype(layer.weight.dtype)

    def block_dtype(self, layer: KronLayer) -> torch.dtype:
        """The dtype of the layer's block (its statistics' dtype, unless a preconditioner says otherwise)."""
        return self.statistics_dtype(layer)

    def _follow_layers(self) -> None:
        """Move each block to its layer's device and dtype (a model moved after construction)."""
        for layer in self.layers:
            block, device = self.blocks[layer.name], layer.weight.device
            dtype = self.block_dtype(layer)
            if block.dtype != dtype or block.device != device:
                block.move(dtype, device)

    @property
    def is_update_step(self) -> bool:
        """Whether the coming ``step()`` updates the statistics (and the blocks refresh)."""
        return self.steps % self.update_every == 0

    def _arm_capture(self) -> None:
        """Tell the hooks what the coming step gathers: ``A``, ``G`` on update steps, rows if consumed."""
        self.capture.arm(statistics=self.is_update_step, on_rows=self._row_consumer())

    def _row_consumer(self):
        """``on_rows(layer, a_rows, g_rows)`` for the coming step, or ``None`` (no rows needed)."""
        return None

    def sample_fisher(self, output: Tensor, likelihood: str = "categorical") -> None:
        """Backpropagate ``-log p(y_hat | output)`` for labels ``y_hat`` sampled from the model.

        For ``fisher="true"``, before the loss's backward: ``output`` holds logits
        (``"categorical"``, or ``"bernoulli"`` for independent binary outputs summed per
        example) or unit-variance Gaussian means (``"gaussian"``). Only the statistics see
        these gradients (``.grad`` is untouched); a no-op at steps that gather none.
        """
        if self.fisher != "true":
            raise RuntimeError(f"sample_fisher is for fisher='true'; this {self.kind} uses fisher={self.fisher!r}")
        if not self.capture.capturing:
            return  # no statistics are gathered at this step
        loss = sampled_label_loss(output, likelihood, self.batch_averaged)
        params = [p for layer in self.layers for p in layer.parameters]
        with self.capture.sampled_label_pass():
            torch.autograd.grad(loss / self.accumulation_steps, params, retain_graph=True, allow_unused=True)

    # -------------------------------------------------------------- step
    @torch.no_grad()
    def step(self) -> None:
        """Precondition the gradients of every supported layer in place.

        All or nothing: if a block's update fails or a statistic or preconditioned gradient is
        non-finite, every block is put back, no ``.grad`` is written and the error is raised. The
        failed batch's statistics stay for a retry and are dropped at the next forward pass."""
        try:
            self._step()
        except BaseException:
            self.capture.stale = True
            raise

    def _step(self) -> None:
        self._follow_layers()
        if not (self.capture.backward_seen if self.capture.capturing else self.capture.forward_seen):
            raise RuntimeError(f"{self.kind}.step() found no backward pass since the last step: call loss.backward() "
                               "on a loss computed in training mode first")
        grads = {}
        for layer in self.layers:
            if any(p.grad is None for p in layer.parameters):
                raise RuntimeError(f"layer {layer.name!r} has no gradient; no parameter was changed")
            grads[layer.name] = layer.grad_matrix()
            if not torch.isfinite(grads[layer.name].sum()):  # one reduction: NaN/inf anywhere shows
                raise ValueError(f"layer {layer.name!r} has non-finite gradients; nothing was changed")
        hp = self.hyperparameters()
        saved = {name: block.snapshot(self.capture.statistics) for name, block in self.blocks.items()}
        try:
            preconditioned = self._update_and_precondition(grads, hp)
        except BaseException:
            for name, block in self.blocks.items():
                block.restore(saved[name])
            raise
        nu = self._kl_clip_scale(grads, preconditioned)
        for layer in self.layers:
            p = preconditioned[layer.name]
            layer.set_grad_matrix((p if nu == 1.0 else p * nu).to(grads[layer.name].dtype))
        self.steps += 1
        self.capture.reset()
        self._arm_capture()

    def _update_and_precondition(self, grads: Dict[str, Tensor], hp: dict) -> Dict[str, Tensor]:
        """The blocks' work of a step; returns the preconditioned gradients."""
        if self.capture.statistics:
            repeated = self.capture.repeated_calls()
            if repeated and not self._warned_repeated:
                self._warned_repeated = True
                warnings.warn(f"{self.kind}: layers {repeated} were called (or backpropagated) more often than the "
                              "others in one step; each call's rows count as more examples of their statistics",
                              stacklevel=3)
            batch = {layer.name: self.capture.batch_statistics(layer) for layer in self.layers}
            batch = all_reduce_statistics(batch)
            for name, (a, g) in batch.items():
                if not torch.isfinite(a.sum() + g.sum()):
                    raise ValueError(f"{self.kind}: the Kronecker statistics of layer {name!r} are non-finite "
                                     f"(activations or output gradients overflow {a.dtype}); nothing was changed")
            for name, block in self.blocks.items():
                block.update_statistics(*batch[name], hp["factor_decay"])
            self._refresh_all(hp)
        else:
            for block in self.blocks.values():
                block.between_updates(hp)
        preconditioned = {}
        for name, block in self.blocks.items():
            preconditioned[name] = block.precondition(grads[name].to(block.dtype), hp)
            if not torch.isfinite(preconditioned[name].sum()):
                raise ValueError(
                    f"{self.kind}: the preconditioned gradient of layer {name!r} is non-finite "
                    f"(overflowing statistics, or damping too small in {block.dtype}); nothing was changed"
                )
        return preconditioned

    def _refresh_all(self, hp: dict) -> None:
        """Refresh every block; with several ranks each refreshes its share of the layers
        (round-robin) and broadcasts the results (the block's ``broadcast_keys``)."""
        world_size, rank = world()
        blocks = list(self.blocks.values())
        split = world_size > 1 and any(block.broadcast_keys for block in blocks)
        for index, block in enumerate(blocks):
            if not split or index % world_size == rank:
                block.refresh(hp)
        if split:
            for index, block in enumerate(blocks):
                state = block.state
                for key, like in block.broadcast_keys.items():
                    if index % world_size == rank:
                        state[key] = state[key].contiguous()  # e.g. eigh's column-major eigenvectors
                    elif key not in state:
                        state[key] = torch.empty_like(state[like[0]] if len(like) == 1 else state[like[0]][0])
                    dist.broadcast(state[key], src=index % world_size)
        for block in blocks:
            block.after_refresh(hp)

    def fisher_block(self, name: str) -> Tensor:
        """The layer's undamped Fisher approximation, dense over column-major ``vec(W)`` (small layers)."""
        return self.blocks[name].fisher()

    def _kl_clip_scale(self, grads: Dict[str, Tensor], preconditioned: Dict[str, Tensor]) -> float:
        """``nu = min(1, sqrt(kl_clip / (lr^2 sum <p, g>)))`` (1 without ``kl_clip``)."""
        if self.kl_clip is None:
            return 1.0
        inner = sum(float((p * g.to(p.dtype)).sum()) for p, g in zip(preconditioned.values(), grads.values()))
        return kl_clip_scale(self.kl_clip, self.optimizer_lr, inner)

    # -------------------------------------------------------- state dicts
    def state_dict(self) -> dict:
        return {
            "kind": self.kind,
            "steps": self.steps,
            "layers": {name: {k: v.clone() for k, v in s.items()} for name, s in self.state.items()},
            "signatures": {name: block.signature() for name, block in self.blocks.items()},
            "hyperparameters": self.hyperparameters(),
        }

    def load_state_dict(self, state_dict: dict) -> None:
        """Restore a :meth:`state_dict` (hyperparameters included, with a warning where they differ).

        The saved preconditioner's kind, layers, their shapes and groups must match; nothing is
        changed when they do not (``ValueError`` saying what differs)."""
        kind, layers = state_dict.get("kind", self.kind), state_dict["layers"]
        if kind != self.kind:
            raise ValueError(f"a {kind} state_dict cannot be loaded into a {self.kind}")
        if set(layers) != set(self.blocks):
            raise ValueError(f"state_dict holds layers {sorted(layers)}, this {self.kind} has {sorted(self.blocks)}")
        for name, saved in state_dict.get("signatures", {}).items():
            if saved != self.blocks[name].signature():
                raise ValueError(f"layer {name!r} of the state_dict is {saved}; in this {self.kind} it is "
                                 f"{self.blocks[name].signature()}")
        for name, tensors in layers.items():
            block = self.blocks[name]
            dims = {"A": (block.layer.in_dim,) * 2, "G": (block.layer.out_dim,) * 2}
            expected = {**dims, **{k: tuple(v.shape) for k, v in block.state.items()}}
            for key, value in tensors.items():
                if key in expected and tuple(value.shape) != expected[key]:
                    raise ValueError(f"layer {name!r}: the state_dict's {key} has shape {tuple(value.shape)}, this "
                                     f"{self.kind} needs {expected[key]}")
        saved_hp = {"optimizer_lr" if k == "lr" else k: v for k, v in state_dict.get("hyperparameters", {}).items()}
        current = self.hyperparameters()
        changed = [f"{k}={v!r} (was {current[k]!r})" for k, v in saved_hp.items() if k in current and current[k] != v]
        if changed:
            warnings.warn(f"{self.kind}.load_state_dict restores the saved hyperparameters {', '.join(changed)}; "
                          "assign them after loading to change them", stacklevel=2)
        self.steps = int(state_dict["steps"])
        for name, tensors in layers.items():
            block = self.blocks[name]
            block.state = {k: v.to(block.device, block.dtype if v.is_floating_point() else None).clone()
                           for k, v in tensors.items()}
        for key, value in saved_hp.items():
            setattr(self, key, value)
        self.capture.reset()
        self._arm_capture()

    def remove_hooks(self) -> None:
        """Detach from the model (the preconditioner can no longer step; another may attach)."""
        self.capture.remove()

