"""DANN and the gradient reversal layer: the reversal itself, the lambda schedule, the feature
gradient reversed relative to the discriminator's objective, a trained discriminator's
divergence proxy growing with the mean shift (and ~0 without one), adversarial descent moving
the target toward the source, and errors."""

import math

import pytest
import torch

from sim2obs.adapters import build
from sim2obs.adapters.dann import DANN, balanced_domain_loss
from sim2obs.adapters.grl import GradientReversal, dann_lambda, grad_reverse
from sim2obs.errors import Sim2ObsValueError

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_grad_reverse_is_identity_forward_and_minus_lambda_backward():
    x = torch.randn(4, 3, requires_grad=True)
    y = grad_reverse(x, 0.3)
    assert torch.equal(y, x)
    (y * torch.arange(12.0).view(4, 3)).sum().backward()
    assert torch.allclose(x.grad, -0.3 * torch.arange(12.0).view(4, 3))
    assert "lambd=2.0" in repr(GradientReversal(2.0))
    with pytest.raises(Sim2ObsValueError):
        grad_reverse(x, -1.0)


def test_lambda_schedule():
    assert dann_lambda(0.0) == 0.0
    assert dann_lambda(1.0) == pytest.approx(2 / (1 + math.exp(-10)) - 1)  # 0.99991
    assert dann_lambda(0.5) == pytest.approx(2 / (1 + math.exp(-5)) - 1)
    values = [dann_lambda(p / 10) for p in range(11)]
    assert all(b > a for a, b in zip(values, values[1:], strict=False))
    assert dann_lambda(2.0) == dann_lambda(1.0)  # clamped to [0, 1]
    adapter = DANN(4)
    adapter.set_progress(0.3)
    assert adapter.current_lambda() == pytest.approx(dann_lambda(0.3))
    assert DANN(4, schedule=False, lambda_max=0.5).current_lambda() == 0.5


@pytest.mark.parametrize("progress", [0.0, 0.2, 1.0])
def test_feature_gradient_is_reversed_discriminator_gradient_is_not(clouds, progress):
    x, y = clouds(32, 6, shift=1.0, seed=0, m=20)
    torch.manual_seed(0)
    adapter = DANN(6, hidden=16, dropout=0.0)
    adapter.set_progress(progress)
    lam = adapter.current_lambda()
    fs, ft = x.clone().requires_grad_(True), y.clone().requires_grad_(True)
    adapter(fs, ft).loss.backward()
    adv_params = [p.grad.clone() for p in adapter.parameters()]
    # the discriminator's own objective, without the reversal layer
    adapter.zero_grad()
    gs, gt = x.clone().requires_grad_(True), y.clone().requires_grad_(True)
    logits = adapter.discriminator(torch.cat([gs, gt]))
    balanced_domain_loss(logits[:32], logits[32:])[0].backward()
    assert torch.allclose(fs.grad, -lam * gs.grad, atol=1e-7)
    assert torch.allclose(ft.grad, -lam * gt.grad, atol=1e-7)
    for a, b in zip(adv_params, adapter.parameters(), strict=True):
        assert torch.allclose(a, b.grad)
    if progress == 0.0:
        assert float(fs.grad.abs().max()) == 0.0


def optimal_proxy_a(shift: float) -> float:
    """Proxy A-distance 2 (1 - 2 err) of the Bayes classifier for N(0, 1) vs N(shift, 1)."""
    err = 0.5 * math.erfc(shift / 2 / math.sqrt(2))  # Phi(-shift / 2)
    return 2 * (1 - 2 * err)


def test_trained_discriminator_divergence_grows_with_shift(clouds):
    proxies, js = [], []
    for s in (0.0, 0.5, 1.0, 2.0):
        torch.manual_seed(0)
        adapter = DANN(8, hidden=16, n_layers=1, dropout=0.0)
        opt = torch.optim.AdamW(adapter.parameters(), lr=1e-2, weight_decay=1e-2)
        x, y = clouds(1024, 8, shift=s, seed=1)
        for _ in range(200):  # discriminator only: the features are fixed tensors
            opt.zero_grad()
            adapter(x, y).loss.backward()
            opt.step()
        adapter.eval()
        with torch.no_grad():  # held-out draws: the training-batch numbers overfit
            d = adapter(*clouds(4096, 8, shift=s, seed=2)).diagnostics
        proxies.append(d["proxy_a_distance"])
        js.append(d["divergence"])
    # no shift: held-out proxy A-distance ~0 (its sd is 4 sqrt(0.25 / 8192) ~ 0.02 on 8192
    # held-out points); tolerance 0.1
    assert proxies[0] < 0.1
    assert all(b > a for a, b in zip(proxies, proxies[1:], strict=False)), proxies
    # close to the Bayes classifier's 0.40, 0.77, 1.37
    for s, v in zip((0.5, 1.0, 2.0), proxies[1:], strict=True):
        assert v == pytest.approx(optimal_proxy_a(s), abs=0.15)
    # log 2 - BCE (a JS lower bound) is 0 without a shift and clearly positive at 2 sigma
    assert js[0] == 0.0 and js[3] > 0.2


def test_adversarial_descent_moves_target_toward_source(clouds):
    torch.manual_seed(0)
    adapter = DANN(8, hidden=16, n_layers=1, dropout=0.0)
    adapter.set_progress(1.0)
    x, y = clouds(256, 8, shift=2.0, seed=0)
    delta = torch.zeros(1, 8, requires_grad=True)
    # one optimiser, one loss: the reversal layer makes it a min-max game
    opt = torch.optim.Adam([{"params": adapter.parameters(), "lr": 1e-2},
                            {"params": [delta], "lr": 2e-2}])
    for _ in range(300):
        opt.zero_grad()
        adapter(x, y + delta).loss.backward()
        opt.step()
    before = float((x.mean(0) - y.mean(0)).norm())
    after = float((x.mean(0) - (y + delta.detach()).mean(0)).norm())
    assert after < 0.5 * before, (before, after)  # 2.13 -> 0.52 (0.46-0.66 over seeds 0-4)


def test_diagnostics_and_errors():
    adapter = build("dann", 4, 1, hidden=8)
    out = adapter(torch.randn(6, 4), torch.randn(5, 4))
    assert set(out.diagnostics) == {"domain_loss", "domain_acc", "divergence",
                                    "proxy_a_distance", "lambda"}
    assert out.loss.dim() == 0
    assert not adapter.needs_predictions
    with pytest.raises(Sim2ObsValueError, match="feature_dim=4"):
        adapter(torch.randn(6, 3), torch.randn(5, 3))
    with pytest.raises(Sim2ObsValueError, match="dropout"):
        DANN(4, dropout=1.0)
    with pytest.raises(Sim2ObsValueError, match=r"\[N, D\]"):
        adapter(torch.randn(6), torch.randn(5, 4))
