"""structngd.kron under misuse and faults: every failed step leaves no trace, nothing non-finite is
ever written, statistics come only from what is backpropagated, hooks belong to their model and
preconditioner, state dicts are checked when loaded, and bad arguments get clear errors."""

import copy
import gc
import io
import pickle
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, grad, vmap

from structngd.kron import EKFAC, KFAC, LocalKFAC

from helpers import assert_same

PRECONDITIONERS = {
    "kfac": lambda m, **kw: KFAC(m, update_every=1, **kw),
    "ekfac": lambda m, **kw: EKFAC(m, update_every=2, **kw),
    "local_dense": lambda m, **kw: LocalKFAC(m, update_every=1, **kw),
    "local_diagonal": lambda m, **kw: LocalKFAC(m, structure="diagonal", update_every=1, **kw),
}


def mlp(seed=0, dtype=torch.float32):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3)).to(dtype)


def batch(seed, n=12, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 4, generator=g, dtype=dtype), torch.randint(0, 3, (n,), generator=g)


def backward(model, x, y):
    model.zero_grad()
    F.cross_entropy(model(x), y).backward()


def snapshot(model, pre):
    """Every parameter, gradient and block tensor, cloned."""
    out = {f"param {k}": v.detach().clone() for k, v in model.named_parameters()}
    out.update({f"grad {k}": v.grad.clone() for k, v in model.named_parameters() if v.grad is not None})
    for name, state in pre.state.items():
        out.update({f"{name}.{k}": v.clone() for k, v in state.items()})
    return out


def all_finite(model, pre, grads=True):
    return all(bool(torch.isfinite(v).all()) for k, v in snapshot(model, pre).items()
               if v.is_floating_point() and (grads or not k.startswith("grad")))


def assert_refused(model, pre, call, match):
    """``call()`` raises ``ValueError`` matching ``match`` and leaves every tensor of ``model`` and ``pre`` as it was."""
    before = snapshot(model, pre)
    with pytest.raises(ValueError, match=match):
        call()
    assert_same(before, snapshot(model, pre))


def twin_steps(kind, batches, dtype=torch.float32):
    model = mlp(dtype=dtype)
    pre = PRECONDITIONERS[kind](model)
    for x, y in batches:
        backward(model, x, y)
        pre.step()
    return model, pre


# ------------------------------------------------------------------ 1. a failed step leaves no trace
@pytest.mark.parametrize("kind", PRECONDITIONERS)
def test_a_nan_batch_raises_changes_nothing_and_does_not_poison_the_next_step(kind):
    model, pre = twin_steps(kind, [batch(0)])
    x, y = batch(1)
    x[3, 1] = float("nan")
    backward(model, x, y)
    assert_refused(model, pre, pre.step, "non-finite")
    backward(model, *batch(2))  # the next batch starts afresh
    pre.step()
    twin_model, twin = twin_steps(kind, [batch(0), batch(2)])
    assert_same(snapshot(twin_model, twin), snapshot(model, pre))


@pytest.mark.parametrize("kind", PRECONDITIONERS)
def test_overflowing_activations_are_refused_before_anything_is_written(kind):
    model, pre = twin_steps(kind, [batch(0)])
    x, y = batch(1)
    backward(model, x * 1e25, y)  # x x^T overflows float32, the gradients do not
    assert_refused(model, pre, pre.step, "(statistics|scaling) of layer '0' (are|is) non-finite")


def test_a_huge_factor_step_without_trust_region_is_refused_not_written():
    model = mlp()
    pre = LocalKFAC(model, lr_cov=100.0, max_step=None, update_every=1)
    for seed in range(30):
        backward(model, *batch(seed))
        before = snapshot(model, pre)
        try:
            pre.step()
        except ValueError as err:
            assert "non-finite" in str(err) or "positive" in str(err)
            assert_same(before, snapshot(model, pre))
        assert all_finite(model, pre)


@pytest.mark.parametrize("kind", PRECONDITIONERS)
def test_random_faults_never_write_a_non_finite_value_and_every_raise_changes_nothing(kind):
    gen = torch.Generator().manual_seed(7)
    model = mlp()
    pre = PRECONDITIONERS[kind](model)
    raised = 0
    for step in range(150):
        x, y = batch(step)
        fault = int(torch.randint(0, 6, (1,), generator=gen))
        if fault == 1:
            x[int(torch.randint(0, 12, (1,), generator=gen)), 0] = float("nan")
        elif fault == 2:
            x = x * 1e25
        elif fault == 3:
            x[0, 0] = float("inf")
        backward(model, x, y)
        if fault == 4:
            model[2].weight.grad[0, 0] = float("inf")
        elif fault == 5:
            model[0].bias.grad.mul_(1e30)
        before = snapshot(model, pre)
        try:
            pre.step()
        except (ValueError, RuntimeError):
            raised += 1
            assert_same(before, snapshot(model, pre))
            assert all_finite(model, pre, grads=False), f"step {step}, fault {fault}"
            continue
        assert all_finite(model, pre), f"step {step}, fault {fault}"
        with torch.no_grad():  # the outer optimizer's step
            for p in model.parameters():
                p -= 1e-2 * p.grad
    assert 0 < raised < 150


# ------------------------------------------------------------------ 3. statistics only from what is backpropagated
def input_statistic(x):
    rows = torch.cat([x, torch.ones(x.shape[0], 1, dtype=x.dtype)], 1)
    return rows.T @ rows / x.shape[0]


def test_a_forward_that_is_never_backpropagated_adds_nothing():
    model = mlp(dtype=torch.float64)
    pre = KFAC(model, update_every=1)
    model(torch.randn(16, 4, dtype=torch.float64) * 10)  # logged, never backpropagated
    target = model(torch.randn(16, 4, dtype=torch.float64)).detach()  # a BYOL-style target
    x, y = batch(0, dtype=torch.float64)
    F.cross_entropy(model(x), y).backward()
    a, _ = pre.capture.batch_statistics(pre.layers[0])
    torch.testing.assert_close(a, input_statistic(x), rtol=1e-12, atol=1e-12)
    assert torch.isfinite(target).all()


def test_two_backward_passes_of_one_forward_keep_the_averaged_statistics():
    model = mlp(dtype=torch.float64)
    pre = KFAC(model, update_every=1)
    x, y = batch(0, dtype=torch.float64)
    loss = F.cross_entropy(model(x), y)
    loss.backward(retain_graph=True)
    once = [t.clone() for t in pre.capture.batch_statistics(pre.layers[0])]
    loss.backward()
    twice = pre.capture.batch_statistics(pre.layers[0])
    for a, b in zip(once, twice):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-14)


# ------------------------------------------------------------------ 4. hooks belong to their model and preconditioner
def test_a_deep_copy_of_the_model_is_not_preconditioned_and_feeds_nothing():
    model = mlp()
    pre = KFAC(model, update_every=1)
    teacher = copy.deepcopy(model)
    backward(teacher, *batch(0))
    assert not pre.capture.forward_seen
    assert all(s is None for s in pre.capture.a_sum.values())
    backward(model, *batch(0))
    pre.step()  # the original still works


@pytest.mark.parametrize("kind", PRECONDITIONERS)
def test_a_pickled_preconditioner_and_model_resume_exactly(kind):
    model = mlp()
    pre = PRECONDITIONERS[kind](model)
    for seed in range(3):
        backward(model, *batch(seed))
        pre.step()
    buffer = io.BytesIO()
    torch.save({"model": model, "pre": pre}, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=False)
    model2, pre2 = loaded["model"], loaded["pre"]
    assert pre2.layers[0].module is model2[0]
    for seed in range(3, 6):
        for m, p in ((model, pre), (model2, pre2)):
            backward(m, *batch(seed))
            p.step()
    assert_same(snapshot(model, pre), snapshot(model2, pre2))
    pickle.loads(pickle.dumps(model))  # a hooked model pickles alone, too


def test_a_dropped_preconditioner_removes_its_hooks():
    model = mlp()
    pre = EKFAC(model, update_every=3)
    hooks_before = len(model[0]._forward_hooks)
    del pre
    gc.collect()
    assert len(model[0]._forward_hooks) == hooks_before - 1
    KFAC(model)  # the layers are free again


def test_a_second_preconditioner_on_the_same_layers_is_an_error_until_the_first_detaches():
    model = mlp()
    first = KFAC(model)
    with pytest.raises(ValueError, match="already preconditioned"):
        LocalKFAC(model)
    first.remove_hooks()
    LocalKFAC(model)


def test_torch_func_transforms_of_a_hooked_model_are_harmless():
    model = mlp(dtype=torch.float64)
    pre = KFAC(model, update_every=1)
    params = {k: v.detach() for k, v in model.named_parameters()}
    x, y = batch(0, dtype=torch.float64)

    def loss(p, xi, yi):
        return F.cross_entropy(functional_call(model, p, (xi.unsqueeze(0),)), yi.unsqueeze(0))

    vmap(grad(loss), in_dims=(None, 0, 0))(params, x, y)
    backward(model, x, y)
    a, _ = pre.capture.batch_statistics(pre.layers[0])
    torch.testing.assert_close(a, input_statistic(x), rtol=1e-12, atol=1e-12)
    pre.step()


# ------------------------------------------------------------------ 5. state dicts are checked when loaded
def stepped(make, model=None):
    model = model or mlp()
    pre = make(model)
    backward(model, *batch(0))
    pre.step()
    return model, pre


@pytest.mark.parametrize(
    "source, target, words",
    [
        (lambda m: LocalKFAC(m, update_every=1), lambda m: LocalKFAC(m, structure="diagonal"), "Diagonal"),
        (lambda m: KFAC(m, update_every=1), lambda m: EKFAC(m), "KFAC state_dict cannot be loaded into a EKFAC"),
        (lambda m: KFAC(m, update_every=1), lambda m: LocalKFAC(m), "cannot be loaded"),
    ],
)
def test_a_state_dict_of_another_preconditioner_is_refused_with_nothing_changed(source, target, words):
    _, pre = stepped(source)
    model2, other = stepped(target)
    assert_refused(model2, other, lambda: other.load_state_dict(pre.state_dict()), words)


def test_a_state_dict_of_another_architecture_with_the_same_names_is_refused():
    _, pre = stepped(lambda m: KFAC(m, update_every=1))
    torch.manual_seed(0)
    wider = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 3))
    other = KFAC(wider)
    state = pre.state_dict()
    with pytest.raises(ValueError, match="layer '0'"):
        other.load_state_dict(state)
    del state["signatures"]  # an older state dict: the shapes still catch it
    with pytest.raises(ValueError, match="shape"):
        other.load_state_dict(state)


def test_loading_a_state_dict_with_other_hyperparameters_warns_and_restores_them():
    _, pre = stepped(lambda m: KFAC(m, damping=1e-2, update_every=1))
    other = KFAC(mlp(), damping=1e-3, update_every=1)
    with pytest.warns(UserWarning, match="damping=0.01"):
        other.load_state_dict(pre.state_dict())
    assert other.damping == 1e-2


# ------------------------------------------------------------------ 9. dtype and device moves after construction
@pytest.mark.parametrize("kind", PRECONDITIONERS)
def test_a_model_moved_to_float64_after_construction_is_followed(kind):
    model = mlp()
    pre = PRECONDITIONERS[kind](model)
    model.double()
    reference_model = mlp(dtype=torch.float64)
    reference = PRECONDITIONERS[kind](reference_model)
    for seed in range(3):
        for m, p in ((model, pre), (reference_model, reference)):
            backward(m, *batch(seed, dtype=torch.float64))
            p.step()
    assert all(t.dtype == torch.float64 for s in pre.state.values() for t in s.values() if t.is_floating_point())
    for (k, a), b in zip(model.named_parameters(), reference_model.parameters()):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-6, atol=1e-8, msg=k)


# ------------------------------------------------------------------ 10. input validation
def test_skip_takes_one_name_or_several_and_refuses_unknown_names():
    model = nn.Sequential()
    model.add_module("fc", nn.Linear(4, 3))
    model.add_module("out", nn.Linear(3, 2))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert [layer.name for layer in KFAC(model, skip="fc").layers] == ["out"]
    with pytest.raises(ValueError, match=r"\['f'\]"):
        KFAC(nn.Sequential(model), skip=["f"])


@pytest.mark.parametrize(
    "kwargs, words",
    [
        (dict(damping=True), "damping"),
        (dict(batch_averaged="no"), "batch_averaged must be True or False"),
        (dict(update_every=2.0), "update_every"),
        (dict(factor_decay=float("nan")), "factor_decay"),
    ],
)
def test_bad_arguments_are_refused_by_name(kwargs, words):
    with pytest.raises(ValueError, match=words):
        KFAC(mlp(), **kwargs)


def test_a_misspelt_group_option_is_an_error_not_a_dense_fallback():
    with pytest.raises(ValueError, match="kk2"):
        LocalKFAC(mlp(), structure="heisenberg", group_options={"k": 2, "kk2": 1})


def test_numpy_scalars_are_accepted_where_harmless():
    np = pytest.importorskip("numpy")
    pre = KFAC(mlp(), damping=np.float64(1e-3), update_every=np.int64(2))
    assert pre.update_every == 2


def test_a_layer_called_twice_in_one_forward_gets_one_warning_and_the_documented_statistics():
    torch.manual_seed(0)
    shared, head = nn.Linear(4, 4), nn.Linear(4, 3)
    model = nn.ModuleDict({"shared": shared, "head": head})
    pre = KFAC(model, update_every=1)
    x, y = batch(0)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(2):
            model.zero_grad()
            F.cross_entropy(head(torch.tanh(shared(torch.tanh(shared(x))))), y).backward()
            a, _ = pre.capture.batch_statistics(pre.layers[0])
            hidden = torch.tanh(shared(x)).detach()
            torch.testing.assert_close(a, (input_statistic(x) + input_statistic(hidden)) / 2)
            pre.step()
    assert [str(w.message) for w in caught if "called" in str(w.message)] == [
        "KFAC: layers {'shared': 2} were called (or backpropagated) more often than the others in one step; each "
        "call's rows count as more examples of their statistics"
    ]
