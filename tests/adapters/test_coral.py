"""Deep CORAL: hand-computed value, ~0 for one distribution, growth with a covariance shift,
descent toward the source covariance, and clear errors.

CORAL compares centred covariances, so it is blind to a mean shift (checked below); the
"controlled shift" of the other adapters' tests is a change of the target's standard deviation
from 1 to 1 + s here.
"""

import pytest
import torch

from sim2obs.adapters import build
from sim2obs.adapters.coral import CORAL, covariance
from sim2obs.errors import Sim2ObsValueError

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_hand_computed_value():
    # source: corners of a 2x2 square -> centred +-1, C_s = 4/3 I; target: unit square -> 1/3 I
    f_s = torch.tensor([[0.0, 0.0], [2.0, 0.0], [0.0, 2.0], [2.0, 2.0]])
    f_t = torch.tensor([[0.0, 0.0], [1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
    assert torch.allclose(covariance(f_s), torch.eye(2) * 4 / 3)
    out = CORAL()(f_s, f_t)
    # ||C_s - C_t||_F^2 = ||I||_F^2 = 2; / (4 d^2) = 2 / 16
    assert float(out.loss) == pytest.approx(0.125, rel=1e-6)
    assert out.diagnostics["cov_frobenius"] == pytest.approx(2**0.5, rel=1e-6)
    assert out.diagnostics["divergence"] == pytest.approx(0.125, rel=1e-6)


def test_covariance_matches_torch_cov(clouds):
    x, _ = clouds(50, 4, seed=3)
    assert torch.allclose(covariance(x), torch.cov(x.T), atol=1e-5)


def test_same_distribution_near_zero_and_growth(clouds):
    d = 8
    values = [float(CORAL()(*clouds(256, d, seed=1, scale=1.0 + s)).loss)
              for s in (0.0, 0.5, 1.0, 2.0)]
    # two samples of N(0, I_8), n = 256: E||C_s - C_t||_F^2 ~ 2 (d^2 + d) / n = 0.56, so the
    # loss is ~ 0.56 / 256 = 0.002; tolerance 0.005 (the 0.5-sigma change gives ~0.05)
    assert values[0] < 0.005
    assert all(b > a for a, b in zip(values, values[1:], strict=False)), values
    assert values[1] > 5 * values[0]


def test_blind_to_mean_shift(clouds):
    x, y = clouds(128, 8, seed=2)
    assert float(CORAL()(x, y).loss) == pytest.approx(float(CORAL()(x, y + 3.0).loss), rel=1e-4)


def test_descent_moves_target_covariance_toward_source(clouds):
    x, y = clouds(256, 8, seed=4, scale=2.0)
    log_s = torch.zeros((), requires_grad=True)
    opt = torch.optim.SGD([log_s], lr=0.5)
    gap0 = float((covariance(x) - covariance(y)).norm())
    coral = CORAL()
    for _ in range(30):
        opt.zero_grad()
        coral(x, y * log_s.exp()).loss.backward()
        opt.step()
    gap1 = float((covariance(x) - covariance(y * log_s.exp().detach())).norm())
    assert gap1 < 0.15 * gap0  # 8.8 -> 0.75 (the sampling floor of two n = 256 covariances)
    # and the gradient w.r.t. the target features themselves points inward (shrinks them)
    yy = y.clone().requires_grad_(True)
    coral(x, yy).loss.backward()
    assert float((yy.grad * yy.detach()).sum()) > 0  # descent (-grad) reduces |y|


def test_errors():
    coral = build("coral", 4, 1)
    with pytest.raises(Sim2ObsValueError, match=r"\[N, D\]"):
        coral(torch.zeros(5), torch.zeros(5, 4))
    with pytest.raises(Sim2ObsValueError, match="dimensions differ"):
        coral(torch.zeros(5, 4), torch.zeros(5, 3))
    with pytest.raises(Sim2ObsValueError, match="at least 2"):
        coral(torch.zeros(1, 4), torch.zeros(5, 4))
