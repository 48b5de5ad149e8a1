"""Multi-kernel MMD^2: direct double sums, agreement with the gap report's MMD, ~0 for one
distribution, growth with a mean shift, descent toward the source, errors."""

import numpy as np
import pytest
import torch

from sim2obs.adapters import build
from sim2obs.adapters.mmd import MMDAdapter
from sim2obs.errors import Sim2ObsValueError
from sim2obs.gap.embedding import median_bandwidth, mmd2_unbiased

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def direct_mmd2(x: np.ndarray, y: np.ndarray, sigma2s: list[float], unbiased: bool) -> float:
    """Gretton et al. (2012) estimators written as explicit loops over pairs."""

    def k(a, b):
        d2 = float(((a - b) ** 2).sum())
        return sum(np.exp(-d2 / (2 * s2)) for s2 in sigma2s) / len(sigma2s)

    n, m = len(x), len(y)
    sxx = sum(k(x[i], x[j]) for i in range(n) for j in range(n) if not (unbiased and i == j))
    syy = sum(k(y[i], y[j]) for i in range(m) for j in range(m) if not (unbiased and i == j))
    sxy = sum(k(x[i], y[j]) for i in range(n) for j in range(m))
    if unbiased:
        return sxx / (n * (n - 1)) + syy / (m * (m - 1)) - 2 * sxy / (n * m)
    return sxx / n**2 + syy / m**2 - 2 * sxy / (n * m)


@pytest.mark.parametrize("estimator", ["unbiased", "biased"])
def test_direct_double_sum(estimator):
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(5, 3)), rng.normal(0.7, 1.3, size=(6, 3))
    adapter = MMDAdapter(n_kernels=3, kernel_mul=2.0, estimator=estimator)
    out = adapter(torch.from_numpy(x), torch.from_numpy(y))
    sigma = median_bandwidth(x, y)
    assert out.diagnostics["bandwidth"] == pytest.approx(sigma)
    # the 3 squared bandwidths are sigma^2 * 2^(-1, 0, 1)
    assert adapter.sigma2s(sigma) == pytest.approx([sigma**2 / 2, sigma**2, 2 * sigma**2])
    expected = direct_mmd2(x, y, adapter.sigma2s(sigma), estimator == "unbiased")
    assert float(out.loss) == pytest.approx(expected, rel=1e-10)
    # a fixed bandwidth is used as given
    fixed = MMDAdapter(n_kernels=2, kernel_mul=4.0, estimator=estimator, bandwidth=1.5)
    expected = direct_mmd2(x, y, [1.5**2 / 2, 1.5**2 * 2], estimator == "unbiased")
    assert float(fixed(torch.from_numpy(x), torch.from_numpy(y)).loss) == pytest.approx(
        expected, rel=1e-10)


def test_single_kernel_equals_gap_report_mmd(clouds):
    x, y = clouds(60, 5, shift=0.5, seed=3)
    ours = float(MMDAdapter(n_kernels=1)(x.double(), y.double()).loss)
    assert ours == pytest.approx(mmd2_unbiased(x.numpy(), y.numpy()), rel=1e-9)


def test_same_distribution_near_zero_and_monotone_growth(clouds):
    values = [MMDAdapter()(*clouds(256, 8, shift=s, seed=1)).diagnostics["mmd2"]
              for s in (0.0, 0.5, 1.0, 2.0)]
    # unbiased MMD^2 of two n = 256 samples of N(0, I_8): mean 0, sd ~0.0009 over seeds;
    # tolerance 0.003 (3.5 sd), while a 0.5-sigma shift gives ~0.007
    assert abs(values[0]) < 0.003
    assert all(b > a for a, b in zip(values, values[1:], strict=False)), values
    # the biased estimator is >= 0 and larger by the O(1/n) diagonal terms
    x, y = clouds(256, 8, seed=1)
    biased = MMDAdapter(estimator="biased")(x, y).diagnostics["mmd2"]
    assert biased > values[0] and biased > 0


def test_identical_clouds_exact():
    x = torch.randn(64, 8, generator=torch.Generator().manual_seed(0))
    assert float(MMDAdapter(estimator="biased")(x, x).loss) == pytest.approx(0.0, abs=1e-6)


def test_descent_moves_target_toward_source(clouds, descend):
    x, y = clouds(256, 8, shift=2.0, seed=5)
    before, after = descend(MMDAdapter(), x, y, steps=15, lr=25.0)
    assert after < 0.25 * before, (before, after)
    # the gradient w.r.t. the target points has a component along -shift
    yy = y.clone().requires_grad_(True)
    MMDAdapter()(x, yy).loss.backward()
    assert float(yy.grad[:, 0].mean()) > 0  # descent moves the cloud toward -e_0 (the source)


def test_errors():
    with pytest.raises(Sim2ObsValueError, match="estimator"):
        MMDAdapter(estimator="linear")
    with pytest.raises(Sim2ObsValueError, match="n_kernels"):
        MMDAdapter(n_kernels=0)
    with pytest.raises(Sim2ObsValueError, match="bandwidth"):
        MMDAdapter(bandwidth=-1.0)
    with pytest.raises(Sim2ObsValueError, match="dimensions differ"):
        build("mmd", 4, 1)(torch.zeros(5, 4), torch.zeros(5, 3))
