"""DeepJDOT (regression): the cost and plan against POT on a tiny example (NaN labels masked),
the torch Sinkhorn fallback against POT's, zero for identical clouds, growth with a mean shift,
descent toward the source, gradients, and clear errors."""

import numpy as np
import ot
import pytest
import torch
from scipy.spatial.distance import cdist

from sim2obs.adapters import build
from sim2obs.adapters import jdot as jdot_module
from sim2obs.adapters.jdot import JDOT, masked_label_cost, sinkhorn_plan
from sim2obs.errors import Sim2ObsValueError

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def tiny_problem():
    rng = np.random.default_rng(0)
    f_s, f_t = rng.normal(size=(6, 3)), rng.normal(0.5, 1.0, size=(5, 3))
    y_s, p_t = rng.normal(size=(6, 2)), rng.normal(size=(5, 2))
    y_s[1, 0] = np.nan  # one missing label
    y_s[4, :] = np.nan  # a source row with no label at all
    return f_s, f_t, y_s, p_t


def hand_cost(f_s, f_t, y_s, p_t, alpha, lambda_t):
    lab = np.zeros((len(y_s), len(p_t)))
    for i in range(len(y_s)):
        for j in range(len(p_t)):
            ok = np.isfinite(y_s[i])
            lab[i, j] = ((y_s[i, ok] - p_t[j, ok]) ** 2).sum()
    return alpha * cdist(f_s, f_t, "sqeuclidean") + lambda_t * lab


def test_cost_plan_and_loss_match_pot():
    f_s, f_t, y_s, p_t = tiny_problem()
    adapter = JDOT(alpha=0.7, lambda_t=2.0, solver="emd")
    t = [torch.from_numpy(a) for a in (f_s, f_t, y_s, p_t)]
    c_feat, c_lab = adapter.costs(*t)
    expected_c = hand_cost(f_s, f_t, y_s, p_t, 0.7, 2.0)
    assert np.allclose((c_feat + c_lab).numpy(), expected_c, atol=1e-10)
    # the source row without labels costs its features only
    assert np.allclose(c_lab[4].numpy(), 0.0)
    gamma_pot = ot.emd(ot.unif(6), ot.unif(5), expected_c)
    gamma = adapter.plan(c_feat + c_lab).numpy()
    assert np.allclose(gamma, gamma_pot, atol=1e-12)
    out = adapter(t[0], t[1], y_s=t[2], p_t=t[3])
    assert float(out.loss) == pytest.approx(float((gamma_pot * expected_c).sum()), rel=1e-10)
    assert out.diagnostics["feature_cost"] + out.diagnostics["label_cost"] == pytest.approx(
        out.diagnostics["divergence"])


def test_masked_label_cost_has_no_nan():
    y = torch.tensor([[1.0, float("nan")], [float("nan"), float("nan")]])
    p = torch.tensor([[0.0, 5.0], [2.0, -1.0], [1.0, 1.0]])
    c = masked_label_cost(y, p)
    assert torch.equal(c, torch.tensor([[1.0, 1.0, 0.0], [0.0, 0.0, 0.0]]))


def test_sinkhorn_fallback_matches_pot_and_approaches_emd(monkeypatch):
    f_s, f_t, y_s, p_t = tiny_problem()
    c = hand_cost(f_s, f_t, y_s, p_t, 1.0, 1.0)
    eps = 0.05 * c.mean()
    ours = sinkhorn_plan(torch.from_numpy(c), eps).numpy()
    pot = ot.sinkhorn(ot.unif(6), ot.unif(5), c, eps, method="sinkhorn_log", stopThr=1e-12,
                      numItermax=10000)
    assert np.allclose(ours, pot, atol=1e-7)
    assert np.allclose(ours.sum(1), 1 / 6, atol=1e-7) and np.allclose(ours.sum(0), 1 / 5)
    # without POT, "auto" falls back to the entropic plan; at eps = 1 % of the mean cost its loss
    # is within 2 % of the exact one
    monkeypatch.setattr(jdot_module, "pot_available", lambda: False)
    fallback = JDOT()
    assert fallback.resolved_solver() == "sinkhorn"
    t = [torch.from_numpy(a) for a in (f_s, f_t, y_s, p_t)]
    exact = float((ot.emd(ot.unif(6), ot.unif(5), c) * c).sum())
    assert float(fallback(t[0], t[1], y_s=t[2], p_t=t[3]).loss) == pytest.approx(exact, rel=0.02)


def _labelled(clouds, shift, seed, n=256, d=8):
    w = torch.randn(d, 2, generator=torch.Generator().manual_seed(9)) / d**0.5
    x, y = clouds(n, d, shift=shift, seed=seed)
    return x, y, w


def test_identical_zero_same_distribution_floor_and_growth(clouds):
    x, _, w = _labelled(clouds, 0.0, 1)
    perm = torch.randperm(256, generator=torch.Generator().manual_seed(0))
    out = JDOT()(x, x[perm], y_s=x @ w, p_t=(x @ w)[perm])
    assert abs(float(out.loss)) < 1e-5  # the plan is the permutation
    values = []
    for s in (0.0, 0.5, 1.0, 2.0):
        x, y, w = _labelled(clouds, s, 1)
        values.append(JDOT()(x, y, y_s=x @ w, p_t=y @ w).diagnostics["divergence"])
    # exact OT between two n = 256 samples of one distribution is not ~0 in D = 8 (it shrinks
    # like n^(-2/D)): ~4.7 here, against 2 D + 2 |w|^2 ~ 17 for a random pairing; tolerance:
    # below a third of the random-pairing cost
    assert values[0] < 17 / 3
    assert all(b > a for a, b in zip(values, values[1:], strict=False)), values


def test_descent_moves_target_toward_source(clouds, descend):
    x, y, w = _labelled(clouds, 2.0, 5)
    # for a translation delta the loss is quadratic with Hessian 2 (I + w w^T) (features and
    # labels p_t = (y + delta) w): lr 0.2 keeps plain SGD stable
    before, after = descend(JDOT(), x, y, steps=10, lr=0.2,
                            extra=lambda yy: {"y_s": x @ w, "p_t": yy @ w})
    assert after < 0.25 * before, (before, after)


def test_gradients_reach_target_features_and_predictions_not_labels(clouds):
    x, y, w = _labelled(clouds, 1.0, 2, n=32)
    f_t = y.clone().requires_grad_(True)
    p_t = (y @ w).requires_grad_(True)
    y_s = x @ w
    JDOT()(x, f_t, y_s=y_s, p_t=p_t).loss.backward()
    assert f_t.grad is not None and float(f_t.grad[:, 0].mean()) > 0
    assert p_t.grad is not None and float(p_t.grad.abs().sum()) > 0
    assert y_s.grad is None


def test_errors():
    adapter = build("jdot", 4, 2)
    assert adapter.needs_predictions
    f_s, f_t = torch.zeros(5, 4), torch.zeros(6, 4)
    with pytest.raises(Sim2ObsValueError, match="missing: y_s and p_t"):
        adapter(f_s, f_t)
    with pytest.raises(Sim2ObsValueError, match="missing: p_t"):
        adapter(f_s, f_t, y_s=torch.zeros(5, 2))
    with pytest.raises(Sim2ObsValueError, match=r"y_s must have shape \[5, L\]"):
        adapter(f_s, f_t, y_s=torch.zeros(4, 2), p_t=torch.zeros(6, 2))
    with pytest.raises(Sim2ObsValueError, match=r"p_t must have shape \[6, 2\]"):
        adapter(f_s, f_t, y_s=torch.zeros(5, 2), p_t=torch.zeros(6, 3))
    with pytest.raises(Sim2ObsValueError, match="NaN or inf"):
        adapter(f_s, f_t, y_s=torch.zeros(5, 2), p_t=torch.full((6, 2), float("nan")))
    with pytest.raises(Sim2ObsValueError, match="dimensions differ"):
        adapter(f_s, torch.zeros(6, 3), y_s=torch.zeros(5, 2), p_t=torch.zeros(6, 2))
    with pytest.raises(Sim2ObsValueError, match="solver"):
        JDOT(solver="greedy")
    with pytest.raises(Sim2ObsValueError, match="alpha"):
        JDOT(alpha=-1.0)
