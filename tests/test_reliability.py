"""Reliability of the library: numerics that never silently break, bad input that gets a clear
answer, non-finite values caught (or skipped without harm), and runs that repeat exactly.

The cases and the messages users see are listed in docs/RELIABILITY.md.
"""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

import wasi
from conftest import dense_linear, randn
from wasi import WASIConfig, WASILinear
from wasi import functional as WF
from wasi.modules import NonFiniteError, set_nonfinite_policy

pytestmark = pytest.mark.usefixtures("one_thread")

MODES = ["factored", "reference", "activations-only", "weights-only"]
COMPRESSING = ["factored", "reference", "activations-only"]
# no example database: the same examples on every run, and nothing written into the repository
FAST = settings(max_examples=25, deadline=None, database=None,
                suppress_health_check=[HealthCheck.function_scoped_fixture])


def _layer(in_features=16, out_features=12, *, dtype=torch.float32, seed=0, name="blocks.0.mlp.fc1",
           **config) -> WASILinear:
    config.setdefault("rank", 4 if config.get("mode") != "activations-only" else None)
    return WASILinear.from_module(dense_linear(in_features, out_features, dtype=dtype, seed=seed),
                                  WASIConfig(**config), name=name)


def _step(layer: nn.Module, x: torch.Tensor, seed: int = 0) -> torch.Tensor:
    y = layer(x)
    (y * randn(*y.shape, seed=seed, dtype=y.dtype)).sum().backward()
    return y


def _state(module: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def _assert_same_state(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for key, value in a.items():
        assert value.shape == b[key].shape and torch.equal(value, b[key]), key


def _all_finite(module: nn.Module) -> bool:
    tensors = [t for t in module.state_dict().values() if t.is_floating_point()]
    tensors += [p.grad for p in module.parameters() if p.grad is not None]
    return all(bool(torch.isfinite(t).all()) for t in tensors)


def _orthonormal(basis: torch.Tensor, atol: float = 1e-5) -> bool:
    eye = torch.eye(basis.shape[1], dtype=basis.dtype)
    return torch.allclose(basis.T @ basis, eye, atol=atol)


# ============================================================================ numerics
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("mode", ["factored", "reference"])
def test_subspace_iteration_and_qr_run_in_float32_for_low_precision(monkeypatch, mode, dtype):
    seen = []
    real_qr = torch.linalg.qr

    def spy(matrix, *args, **kwargs):
        seen.append(matrix.dtype)
        return real_qr(matrix, *args, **kwargs)

    monkeypatch.setattr(torch.linalg, "qr", spy)
    layer = _layer(mode=mode, activation_rank=(2, 3, 4), reorth_every=1).to(dtype)
    for step in range(3):  # cold start, then warm power steps (and re-orthonormalisation)
        _step(layer, randn(3, 5, 16, seed=step).to(dtype), seed=step)
    assert seen and set(seen) == {torch.float32}
    for n in range(3):
        assert getattr(layer, f"basis_{n}").dtype == torch.float32
    assert _all_finite(layer)


def test_float16_keeps_the_core_in_float32_so_large_activations_do_not_overflow():
    # a core entry reaches ||X||_F = 400 * sqrt(8 * 64 * 64) = 72e3 > 65504, float16's largest value,
    # while the output and the weight gradient (~400 * sqrt(8 * 64)) fit in float16
    reference = _layer(64, 32, rank=8, activation_rank=(2, 4, 8))
    layer = copy.deepcopy(reference).half()
    x = torch.full((8, 64, 64), 400.0)
    assert float(torch.linalg.vector_norm(x)) > torch.finfo(torch.float16).max
    g = randn(8, 64, 32, seed=1)
    (layer(x.half()) * g.half()).sum().backward()
    assert _all_finite(layer)
    (reference(x) * g).sum().backward()
    for p16, p32 in zip(layer.parameters(), reference.parameters()):
        torch.testing.assert_close(p16.grad.float(), p32.grad, rtol=2e-2, atol=2e-2 * float(p32.grad.abs().max()))


@settings(max_examples=20, deadline=None, database=None)
@given(exponent=st.integers(min_value=-30, max_value=30), mode=st.integers(0, 2))
def test_power_step_and_range_finder_are_scale_invariant(exponent, mode):
    x = randn(4, 6, 9, seed=1)
    previous = WF.orth(randn(x.shape[mode], 2, seed=2))
    c = 10.0 ** exponent
    base = WF.power_step(x, mode, previous)
    scaled = WF.power_step(x * c, mode, previous)
    assert bool(torch.isfinite(scaled).all())
    torch.testing.assert_close(scaled, base, atol=1e-4, rtol=0)
    cold = WF.range_finder(x * c, mode, 2, torch.Generator().manual_seed(3))
    torch.testing.assert_close(cold, WF.range_finder(x, mode, 2, torch.Generator().manual_seed(3)),
                               atol=1e-4, rtol=0)


@pytest.mark.parametrize("scale", [1e-30, 1e30])
def test_weight_tracking_energies_and_svd_are_scale_invariant(scale):
    w = randn(12, 16, seed=4) / 4
    left = WF.orth(randn(12, 3, seed=5))
    l1, r1 = WF.track_weight_subspace(w, left)
    l2, r2 = WF.track_weight_subspace(w * scale, left)
    torch.testing.assert_close(l2, l1, atol=1e-5, rtol=0)
    torch.testing.assert_close(r2 / scale, r1, atol=1e-5, rtol=1e-4)
    x = randn(4, 6, 9, seed=6)
    for mode in range(3):
        ref = WF.mode_energies(x, mode, scale_free=True)
        got = WF.mode_energies(x * scale, mode, scale_free=True)
        assert WF.energy_rank(got, 0.8) == WF.energy_rank(ref, 0.8)
    for eps in (0.5, 0.9):
        la, ra = WF.svd_factors(w, eps=eps)
        lb, rb = WF.svd_factors(w * scale, eps=eps)
        assert la.shape == lb.shape  # the same rank
        torch.testing.assert_close(lb @ rb / scale, la @ ra, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("scale", [1e-30, 1e30])
@pytest.mark.parametrize("mode", MODES)
def test_huge_and_tiny_activations_train_like_activations_of_one(mode, scale):
    kwargs = {"mode": mode, "activation_eps": 0.9} if mode != "weights-only" else {"mode": mode}
    plain, scaled = _layer(**kwargs), _layer(**kwargs)
    x = randn(3, 5, 16, seed=7)
    for step in range(3):
        plain.zero_grad()
        scaled.zero_grad()
        y1 = plain(x)
        y2 = scaled(x * scale)
        assert bool(torch.isfinite(y2).all())
        g = randn(*y1.shape, seed=step)
        (y1 * g).sum().backward()
        (y2 * g).sum().backward()
        if mode != "weights-only":
            assert scaled.last_activation_ranks == plain.last_activation_ranks
            for n in range(3):
                b1, b2 = getattr(plain, f"basis_{n}"), getattr(scaled, f"basis_{n}")
                torch.testing.assert_close(b2, b1, atol=1e-4, rtol=0)
        grads = [(p1.grad, p2.grad) for p1, p2 in zip(plain.parameters(), scaled.parameters())
                 if p1.grad is not None and p1.dim() == 2]
        for g1, g2 in grads:  # the weight gradient is linear in x
            assert bool(torch.isfinite(g2).all())
            torch.testing.assert_close(g2 / scale, g1, rtol=1e-3, atol=1e-4 * float(g1.abs().max()))


@pytest.mark.parametrize("scale", [1e-30, 1e30])
@pytest.mark.parametrize("mode", MODES)
def test_huge_and_tiny_weights_convert_and_train(mode, scale):
    config = WASIConfig(eps=0.9, mode=mode, activation_rank=(2, 3, 4) if mode != "weights-only" else None)
    layer = WASILinear.from_module(_scaled_linear(scale), config, name="fc")
    reference = WASILinear.from_module(_scaled_linear(1.0), config, name="fc")
    assert layer.rank == reference.rank  # the energy rank does not depend on the scale
    torch.testing.assert_close(layer.effective_weight().detach() / scale, reference.effective_weight().detach(),
                               atol=1e-5, rtol=1e-4)
    for step in range(3):
        y = _step(layer, randn(3, 5, 16, seed=step), seed=step)
        assert bool(torch.isfinite(y).all())
    assert _all_finite(layer)
    if layer.left is not None:
        assert _orthonormal(layer.left.detach())


def _scaled_linear(scale: float) -> nn.Linear:
    layer = dense_linear(16, 12, seed=8)
    with torch.no_grad():
        layer.weight.mul_(scale)
    return layer


@pytest.mark.parametrize("kind", ["zero", "constant", "rank-one"])
@pytest.mark.parametrize("mode", COMPRESSING)
def test_degenerate_activations_give_orthonormal_bases_and_finite_gradients(mode, kind):
    layer = _layer(mode=mode, activation_rank=(3, 4, 5), rank=4 if mode != "activations-only" else None)
    if kind == "zero":
        x = torch.zeros(3, 5, 16)
    elif kind == "constant":
        x = torch.full((3, 5, 16), 2.5)
    else:
        x = randn(3, 1, 1, seed=9) * randn(1, 5, 1, seed=10) * randn(1, 1, 16, seed=11)
    for step in range(3):
        layer.zero_grad()
        y = _step(layer, x, seed=step)
        assert bool(torch.isfinite(y).all()) and _all_finite(layer)
        for n in range(3):
            assert _orthonormal(getattr(layer, f"basis_{n}"))


def test_rank_one_activation_is_compressed_exactly():
    # X_(n) has rank 1 in every mode: any Tucker rank captures it, so dW is exact
    dense = dense_linear(16, 12, dtype=torch.float64, seed=12)
    layer = WASILinear.from_module(copy.deepcopy(dense), WASIConfig(eps=1.0, activation_rank=(2, 3, 4),
                                                                     precondition=False))
    left, right = layer.left.detach().clone(), layer.right.detach().clone()
    d = torch.float64
    x = randn(3, 1, 1, seed=13, dtype=d) * randn(1, 5, 1, seed=14, dtype=d) * randn(1, 1, 16, seed=15, dtype=d)
    g = randn(3, 5, 12, seed=16, dtype=torch.float64)
    (layer(x) * g).sum().backward()
    (dense(x) * g).sum().backward()
    torch.testing.assert_close(layer.left.grad, dense.weight.grad @ right.T, atol=1e-12, rtol=0)
    torch.testing.assert_close(layer.right.grad, left.T @ dense.weight.grad, atol=1e-12, rtol=0)


@pytest.mark.parametrize("kind", ["zero", "constant", "rank-deficient"])
def test_degenerate_weights_convert_to_a_valid_factorisation(kind):
    module = dense_linear(16, 12, seed=17)
    with torch.no_grad():
        if kind == "zero":
            module.weight.zero_()
        elif kind == "constant":
            module.weight.fill_(0.25)
        else:
            module.weight.copy_(randn(12, 2, seed=18) @ randn(2, 16, seed=19))
    for config in (WASIConfig(eps=0.9), WASIConfig(rank=5), WASIConfig(eps=0.9, mode="reference")):
        layer = WASILinear.from_module(copy.deepcopy(module), config, name="fc")
        assert _orthonormal(layer.left.detach())
        torch.testing.assert_close(layer.left @ layer.right, module.weight, atol=1e-5, rtol=0)
        if kind != "rank-deficient" and config.rank is None:
            assert layer.rank == 1
        _step(layer, randn(3, 5, 16, seed=20))
        assert _all_finite(layer)


def test_a_non_finite_weight_cannot_be_converted_and_says_which_layer():
    model = nn.Sequential()
    model.add_module("mlp", dense_linear(16, 12))
    with torch.no_grad():
        model.mlp.weight[0, 0] = float("nan")
    with pytest.raises(NonFiniteError, match=r"^mlp: the weight contains NaN or inf"):
        wasi.convert(model, WASIConfig())
    assert isinstance(model.mlp, nn.Linear)  # nothing was replaced


def test_svd_that_fails_in_float32_is_retried_in_float64_with_a_warning(monkeypatch):
    real_svd = torch.linalg.svd

    def failing(matrix, *args, **kwargs):
        if matrix.dtype == torch.float32:
            raise torch.linalg.LinAlgError("linalg.svd: The algorithm failed to converge")
        return real_svd(matrix, *args, **kwargs)

    monkeypatch.setattr(torch.linalg, "svd", failing)
    module = dense_linear(16, 12, seed=21)
    with pytest.warns(RuntimeWarning, match=r"fc: the torch.float32 SVD of the weight failed; retrying in float64"):
        layer = WASILinear.from_module(copy.deepcopy(module), WASIConfig(eps=1.0), name="fc")
    assert layer.left.dtype == torch.float32
    torch.testing.assert_close(layer.left @ layer.right, module.weight, atol=1e-5, rtol=0)


def _nan_qr(monkeypatch):
    real_qr = torch.linalg.qr

    def broken(matrix, *args, **kwargs):
        q, r = real_qr(matrix, *args, **kwargs)
        return torch.full_like(q, float("nan")), r

    monkeypatch.setattr(torch.linalg, "qr", broken)


@pytest.mark.parametrize("mode", COMPRESSING)
def test_qr_returning_nan_falls_back_to_a_valid_basis_and_warns_once_per_layer(monkeypatch, mode):
    model = nn.Sequential(_layer(mode=mode, activation_rank=(2, 3, 4), name="a"),
                          _layer(12, 16, mode=mode, activation_rank=(2, 3, 4), name="b", seed=1))
    _nan_qr(monkeypatch)
    opt = torch.optim.SGD(model.parameters(), lr=1e-2)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for step, batch in enumerate([3, 3, 2, 3]):  # cold, warm, cold again (batch change), warm
            _step(model, randn(batch, 5, 16, seed=step), seed=step)
            opt.step()
            opt.zero_grad()
    messages = [str(w.message) for w in caught if issubclass(w.category, RuntimeWarning)]
    for name in ("a", "b"):
        assert sum(m.startswith(f"{name}: QR of the mode-") for m in messages) == 1, messages
    if mode == "reference":
        assert sum(m.startswith("a: QR of the weight subspace failed") for m in messages) == 1
    for layer in model:
        assert _all_finite(layer)
        for n in range(3):
            assert _orthonormal(getattr(layer, f"basis_{n}"))


def test_factored_reorthonormalisation_is_skipped_when_qr_fails(monkeypatch):
    layer = _layer(mode="weights-only")
    _step(layer, randn(3, 5, 16, seed=1))
    before = (layer.left @ layer.right).detach().clone()
    _nan_qr(monkeypatch)
    with pytest.warns(RuntimeWarning, match="re-orthonormalisation of L failed"):
        _step(layer, randn(3, 5, 16, seed=2))
    torch.testing.assert_close(layer.left @ layer.right, before, atol=0, rtol=0)
    assert _all_finite(layer)


def test_eigenvalues_that_fail_fall_back_to_the_full_mode_rank(monkeypatch):
    def broken(*args, **kwargs):
        raise torch.linalg.LinAlgError("linalg.eigh: The algorithm failed to converge")

    monkeypatch.setattr(torch.linalg, "eigvalsh", broken)
    layer = _layer(activation_eps=0.5)
    with pytest.warns(RuntimeWarning, match="energies could not be computed"):
        _step(layer, randn(3, 5, 16, seed=3))
    assert layer.last_activation_ranks == (3, 5, 15)  # clipped by the product of the other modes
    assert _all_finite(layer)


def test_random_orthonormal_is_orthonormal_reproducible_and_leaves_the_global_rng_alone():
    torch.manual_seed(0)
    state = torch.get_rng_state()
    a = WF.random_orthonormal(50, 20, torch.Generator().manual_seed(1), dtype=torch.float32)
    b = WF.random_orthonormal(50, 20, torch.Generator().manual_seed(1), dtype=torch.float32)
    assert torch.equal(a, b) and _orthonormal(a, atol=1e-6)
    assert torch.equal(torch.get_rng_state(), state)


# ============================================================================ NaN and inf
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
@pytest.mark.parametrize("mode", MODES)
def test_non_finite_training_input_raises_naming_the_layer_and_changes_nothing(mode, bad):
    layer = _layer(mode=mode, activation_rank=(2, 3, 4))
    _step(layer, randn(3, 5, 16, seed=1))
    before = _state(layer)
    x = randn(3, 5, 16, seed=2)
    x[1, 2, 3] = bad
    with pytest.raises(NonFiniteError, match=r"^blocks\.0\.mlp\.fc1: the training input \(shape \(3, 5, 16\)\) "
                                             r"holds NaN or inf; the layer's state is unchanged"):
        layer(x)
    assert issubclass(NonFiniteError, FloatingPointError)
    _assert_same_state(before, _state(layer))
    layer.eval()
    assert not bool(torch.isfinite(layer(x)).all())  # inference is not checked: NaN in, NaN out


def test_non_finite_gradient_raises_in_backward_naming_the_layer_it_reaches_first():
    model = nn.Sequential()
    model.add_module("fc1", WASILinear.from_module(dense_linear(16, 12), WASIConfig(rank=4), name="fc1"))
    model.add_module("fc2", WASILinear.from_module(dense_linear(12, 8), WASIConfig(rank=4), name="fc2"))
    y = model(randn(3, 5, 16))
    with pytest.raises(NonFiniteError, match=r"^fc2: the gradient reaching this layer in backward holds NaN"):
        (y * float("nan")).sum().backward()


@pytest.mark.parametrize("mode", MODES)
def test_skip_policy_lets_a_bad_step_through_without_touching_the_layer(mode):
    layer = _layer(mode=mode, activation_rank=(2, 3, 4), reorth_every=1)
    twin = copy.deepcopy(layer)
    set_nonfinite_policy(layer, "skip")
    opt = torch.optim.SGD(layer.parameters(), lr=1e-2)
    twin_opt = torch.optim.SGD(twin.parameters(), lr=1e-2)
    good = [randn(3, 5, 16, seed=s) for s in range(3)]
    for x in good[:2]:
        for module, optimizer in ((layer, opt), (twin, twin_opt)):
            _step(module, x)
            optimizer.step()
            optimizer.zero_grad()
    before = _state(layer)
    bad = good[2].clone()
    bad[0, 0, 0] = float("nan")
    y = layer(bad)  # no exception: the caller sees a NaN loss and skips the optimizer step
    assert not bool(torch.isfinite(y).all())
    (y * randn(*y.shape)).sum().backward()  # a user loop may run backward before checking: no raise
    assert any(not bool(torch.isfinite(p.grad).all()) for p in layer.parameters())
    opt.zero_grad()
    _assert_same_state(before, _state(layer))  # bases, ranks, step counter, flags untouched
    # the next good step continues exactly as if the bad batch had never been seen
    _step(layer, good[2])
    _step(twin, good[2])
    opt.step()
    twin_opt.step()
    _assert_same_state(_state(twin), _state(layer))


def test_non_finite_parameters_raise_under_every_checking_policy():
    layer = _layer(activation_rank=2)
    with torch.no_grad():
        layer.left[0, 0] = float("inf")
    for policy in ("raise", "skip"):
        set_nonfinite_policy(layer, policy)
        with pytest.raises(NonFiniteError, match=r"parameter 'left' holds NaN or inf .*restore a checkpoint"):
            layer(randn(3, 5, 16))
    set_nonfinite_policy(layer, "off")
    layer(randn(3, 5, 16))  # no checks at all


def test_unknown_nonfinite_policy_is_refused():
    with pytest.raises(ValueError, match=r"non-finite policy must be one of \('raise', 'skip', 'off'\), got 'ignore'"):
        set_nonfinite_policy(_layer(), "ignore")


# ============================================================================ bad input, API
@FAST
@given(features=st.integers(1, 40).filter(lambda f: f != 16), training=st.booleans())
def test_wrong_feature_size_is_named(features, training):
    layer = _layer().train(training)
    with pytest.raises(ValueError, match=rf"^blocks\.0\.mlp\.fc1: input has {features} features in its last dim "
                                         rf"\(shape \(2, 3, {features}\)\), the layer expects 16"):
        layer(torch.zeros(2, 3, features))


@pytest.mark.parametrize("training", [True, False])
def test_wrong_dtypes_get_a_clear_type_error(training):
    layer = _layer().train(training)
    with pytest.raises(TypeError, match=r"input dtype torch\.int64 is not floating point"):
        layer(torch.ones(2, 3, 16, dtype=torch.int64))
    with pytest.raises(TypeError, match=r"input dtype torch\.float64 does not match the layer's torch\.float32; "
                                        r"cast the input"):
        layer(torch.ones(2, 3, 16, dtype=torch.float64))
    with pytest.raises(TypeError, match=r"input dtype torch\.float32 does not match the layer's torch\.bfloat16"):
        copy.deepcopy(layer).bfloat16()(torch.ones(2, 3, 16))


def test_autocast_trains_and_infers_in_the_autocast_dtype():
    layer = _layer(activation_rank=2)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = layer(randn(2, 3, 16))  # training: tests/test_autocast.py checks the gradients
        assert y.dtype == torch.bfloat16 and y.requires_grad
        layer.eval()
        assert layer(randn(2, 3, 16)).dtype == torch.bfloat16


def test_empty_batch_is_refused_in_training_and_passes_through_in_inference():
    layer = _layer()
    with pytest.raises(ValueError, match=r"empty input of shape \(0, 5, 16\)"):
        layer(torch.zeros(0, 5, 16))
    with torch.no_grad():
        assert layer(torch.zeros(0, 5, 16)).shape == (0, 5, 12)


@pytest.mark.parametrize("shape", [(1, 16), (1, 1, 16), (1, 7, 16), (5, 1, 16), (1, 1, 1, 16)])
@pytest.mark.parametrize("mode", MODES)
def test_batch_of_one_and_single_token_match_the_dense_layer_at_full_rank(mode, shape):
    dense = dense_linear(16, 12, dtype=torch.float64, seed=22)
    layer = WASILinear.from_module(copy.deepcopy(dense), WASIConfig(eps=1.0, mode=mode, precondition=False))
    x = randn(*shape, seed=23, dtype=torch.float64)
    x1, x2 = x.clone().requires_grad_(), x.clone().requires_grad_()
    factors = (layer.left.detach().clone(), layer.right.detach().clone()) if layer.left is not None else None
    g = randn(*shape[:-1], 12, seed=24, dtype=torch.float64)
    (dense(x1) * g).sum().backward()
    (layer(x2) * g).sum().backward()
    torch.testing.assert_close(x2.grad, x1.grad, atol=1e-12, rtol=0)
    if layer.weight is not None:
        torch.testing.assert_close(layer.weight.grad, dense.weight.grad, atol=1e-12, rtol=0)
    else:
        left, right = factors
        torch.testing.assert_close(layer.left.grad, dense.weight.grad @ right.T, atol=1e-12, rtol=0)
        torch.testing.assert_close(layer.right.grad, left.T @ dense.weight.grad, atol=1e-12, rtol=0)


@FAST
@given(batch=st.integers(1, 4), tokens=st.integers(1, 6), rank=st.integers(1, 60),
       per_mode=st.booleans())
def test_activation_ranks_larger_than_the_tensor_are_clipped(batch, tokens, rank, per_mode):
    wanted = (rank, rank + 1, rank + 2) if per_mode else rank
    layer = _layer(activation_rank=wanted)
    x = randn(batch, tokens, 16, seed=rank)
    _step(layer, x)
    wanted = wanted if per_mode else (rank,) * 3
    total = x.numel()
    expected = tuple(max(1, min(r, d, total // d)) for r, d in zip(wanted, x.shape))
    assert layer.last_activation_ranks == expected
    for n, (d, r) in enumerate(zip(x.shape, expected)):
        assert getattr(layer, f"basis_{n}").shape == (d, r)
    assert _all_finite(layer)


def test_a_weight_rank_larger_than_the_layer_is_refused():
    with pytest.raises(ValueError, match=r"fc: rank 13 is larger than the layer allows, min\(O, I\) = 12"):
        WASILinear.from_module(dense_linear(16, 12), WASIConfig(rank=13), name="fc")


_NOT_A_FRACTION = st.one_of(
    st.floats(max_value=0.0), st.floats(min_value=1.0, exclude_min=True),
    st.just(float("nan")), st.just(float("inf")), st.just(-float("inf")),
    st.booleans(), st.text(max_size=3), st.none(),
)


@FAST
@given(value=_NOT_A_FRACTION, field=st.sampled_from(["eps", "activation_eps"]))
def test_energy_thresholds_outside_zero_one_are_refused_naming_the_field(value, field):
    if field == "eps" and value is None:
        value = float("nan")
    if field == "activation_eps" and value is None:
        return  # None means "not set" for activation_eps
    with pytest.raises(ValueError, match=rf"^WASIConfig\.{field} must be a number in \(0, 1\], got "):
        WASIConfig(**{field: value})


@FAST
@given(value=st.floats(min_value=0.0, max_value=1.0, exclude_min=True))
def test_every_threshold_in_zero_one_is_accepted(value):
    assert WASIConfig(eps=value, activation_eps=value).eps == value


@pytest.mark.parametrize("field,value,message", [
    ("target", "mlps", r"WASIConfig\.target must be one of \('mlp', 'attention', 'all-linear'\), got 'mlps'"),
    ("mode", "fast", r"WASIConfig\.mode must be one of"),
    ("rank", 0, r"WASIConfig\.rank must be a positive integer, got 0"),
    ("activation_rank", (2, 0, 3), r"WASIConfig\.activation_rank must be a positive integer, got 0"),
    ("activation_rank", (2,), r"needs one rank per input mode"),
])
def test_other_bad_config_values_are_named(field, value, message):
    with pytest.raises(ValueError, match=message):
        WASIConfig(**{field: value})


def test_converting_twice_is_refused_and_leaves_the_model_as_it_was():
    model = wasi.convert(_vit(), WASIConfig(rank=4))
    before = _state(model)
    with pytest.raises(ValueError, match="model is already converted .* call wasi.unconvert first"):
        wasi.convert(model, WASIConfig(rank=2))
    _assert_same_state(before, _state(model))


def test_a_model_with_nothing_to_convert_lists_what_is_supported():
    with pytest.raises(ValueError, match=r"target='mlp' matched no layer\. WASI wraps torch\.nn\.Linear"):
        wasi.convert(nn.Sequential(nn.Conv1d(3, 3, 1)), WASIConfig())


def _vit(seed: int = 0, **overrides) -> nn.Module:
    from wasi.models import build_vit

    torch.manual_seed(seed)
    return build_vit("vit-micro", num_classes=5, **overrides)


# ============================================================================ determinism
@pytest.mark.parametrize("mode", MODES)
def test_same_seed_same_results_including_the_bases_whatever_the_global_rng(mode):
    config = WASIConfig(eps=0.8, mode=mode, activation_eps=0.9 if mode != "weights-only" else None, seed=3)

    def run(global_seed: int) -> dict[str, torch.Tensor]:
        model = wasi.convert(_vit(seed=0), config)
        torch.manual_seed(global_seed)  # the user's RNG: must not change WASI's numbers
        opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
        model.train()
        for step, batch in enumerate([4, 4, 3, 4, 2]):  # batch-size changes force cold restarts
            images = randn(batch, 1, 8, 8, seed=100 + step)
            nn.functional.cross_entropy(model(images), torch.arange(batch) % 5).backward()
            opt.step()
            opt.zero_grad()
        return _state(model)

    first, second = run(1), run(2)
    _assert_same_state(first, second)
    assert any(k.endswith("basis_0") for k in first) == (mode != "weights-only")


def test_wasi_layers_do_not_draw_from_the_global_rng():
    model = wasi.convert(_vit(), WASIConfig(eps=0.8, activation_eps=0.8, target="all-linear"))
    torch.manual_seed(5)
    state = torch.get_rng_state()
    for batch in (4, 3):
        nn.functional.cross_entropy(model(randn(batch, 1, 8, 8)), torch.arange(batch)).backward()
    assert torch.equal(torch.get_rng_state(), state)


def test_the_finiteness_check_and_the_scale_read_the_input_once(monkeypatch):
    # the hot path: one reduction over the input (no copy of it) gives both its finiteness and
    # its scale; the parameters are checked in the same host sync
    calls = []
    real = torch.aminmax

    def counting(t, *args, **kwargs):
        calls.append(t.numel())
        return real(t, *args, **kwargs)

    monkeypatch.setattr(torch, "aminmax", counting)
    layer = _layer(activation_rank=(2, 3, 4))
    x = randn(3, 5, 16)
    for policy in ("raise", "skip", "off"):
        set_nonfinite_policy(layer, policy)
        calls.clear()
        layer(x)
        assert [n for n in calls if n >= x.numel()] == [x.numel()], policy
