"""Debiased Sinkhorn divergence: exact zero for identical clouds, small for one distribution,
growth with a mean shift, agreement with exact OT at small blur (and geomloss's |x-y|^2/2 cost
convention), scale handling, descent toward the source, backend choice and errors."""

import ot
import pytest
import torch

from sim2obs.adapters import build
from sim2obs.adapters.sinkhorn import (
    ONLINE_THRESHOLD,
    SinkhornAdapter,
    keops_available,
    pooled_rms_distance,
)
from sim2obs.errors import MissingDependencyError, Sim2ObsValueError

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_identical_clouds_give_zero(clouds):
    x, _ = clouds(128, 8, seed=0)
    for blur in (0.05, 0.5):
        assert abs(float(SinkhornAdapter(blur=blur)(x, x.clone()).loss)) < 1e-5


def test_same_distribution_small_and_monotone_growth(clouds):
    values = [SinkhornAdapter()(*clouds(256, 8, shift=s, seed=1)).diagnostics["divergence"]
              for s in (0.0, 0.5, 1.0, 2.0)]
    # default blur 0.5 (of the RMS distance c): two n = 256 samples of N(0, I_8) give a
    # finite-sample floor of 0.008 +- 0.001 c^2 over seeds; tolerance 0.015 c^2, and under a
    # tenth of the 2-sigma value (~0.12 c^2)
    assert 0 <= values[0] < 0.015
    assert values[0] < 0.1 * values[3]
    assert all(b > a for a, b in zip(values, values[1:], strict=False)), values
    # near-OT blur: monotone too (a translation adds exactly |shift|^2 / 2 to W_2^2 / 2, up to
    # the difference of the sample means)
    small = [SinkhornAdapter(blur=0.05)(*clouds(256, 8, shift=s, seed=1)).diagnostics["divergence"]
             for s in (0.0, 0.5, 1.0, 2.0)]
    assert all(b > a for a, b in zip(small, small[1:], strict=False)), small


def test_small_blur_matches_exact_ot_with_half_squared_cost(clouds):
    x, y = clouds(64, 8, shift=0.5, seed=0)
    x, y = x.double(), y.double()
    m = ot.dist(x.numpy(), y.numpy())  # squared Euclidean
    w2 = ot.emd2(ot.unif(64), ot.unif(64), m)
    out = SinkhornAdapter(blur=0.01, scaling=0.95)(x, y)
    value = out.diagnostics["divergence"] * out.diagnostics["scale"] ** 2  # back to feature units
    # geomloss's p = 2 cost is |x - y|^2 / 2: S -> W_2^2 / 2 (0.3 % here), not W_2^2
    assert value == pytest.approx(w2 / 2, rel=0.01)
    assert abs(value - w2) > 0.4 * w2
    # normalize=False with the same blur in feature units gives the same number
    raw = SinkhornAdapter(blur=out.diagnostics["blur_features"], scaling=0.95, normalize=False)
    assert float(raw(x, y).loss) == pytest.approx(value, rel=1e-6)


def test_normalisation_makes_the_value_scale_free(clouds):
    x, y = clouds(128, 8, shift=1.0, seed=2)
    a = SinkhornAdapter()(x, y)
    b = SinkhornAdapter()(10 * x, 10 * y)
    assert float(b.loss) == pytest.approx(float(a.loss), rel=1e-4)
    assert b.diagnostics["scale"] == pytest.approx(10 * a.diagnostics["scale"], rel=1e-5)
    # c = sqrt(2 tr Cov) ~ sqrt(2 * 8) for unit Gaussians (plus the shift's share)
    assert pooled_rms_distance(x, y) == pytest.approx((2 * 8.25) ** 0.5, rel=0.1)


def test_descent_moves_target_toward_source(clouds, descend):
    x, y = clouds(256, 8, shift=2.0, seed=5)
    before, after = descend(SinkhornAdapter(), x, y, steps=8, lr=10.0)
    assert after < 0.25 * before, (before, after)
    yy = y.clone().requires_grad_(True)
    SinkhornAdapter()(x, yy).loss.backward()
    assert float(yy.grad[:, 0].mean()) > 0  # descent moves the target toward -e_0 (the source)


def test_backend_choice_and_threads():
    adapter = SinkhornAdapter(num_threads=1)
    assert adapter.choose_backend(256, 256) == "tensorized"
    big = int(ONLINE_THRESHOLD**0.5) + 1
    assert adapter.choose_backend(big, big) == ("online" if keops_available() else "tensorized")
    before = torch.get_num_threads()
    adapter(torch.randn(16, 4), torch.randn(16, 4))
    assert torch.get_num_threads() == before


@pytest.mark.skipif(keops_available(), reason="pykeops is installed")
def test_online_backend_without_keops_says_how_to_install():
    with pytest.raises(MissingDependencyError, match="pykeops"):
        SinkhornAdapter(backend="online")(torch.randn(8, 3), torch.randn(8, 3))


def test_errors():
    for kwargs in ({"blur": 0.0}, {"scaling": 1.0}, {"p": 3}, {"backend": "multiscale"},
                   {"num_threads": 0}):
        with pytest.raises(Sim2ObsValueError):
            SinkhornAdapter(**kwargs)
    with pytest.raises(Sim2ObsValueError, match="dimensions differ"):
        build("sinkhorn", 4, 1)(torch.zeros(5, 4), torch.zeros(5, 3))
