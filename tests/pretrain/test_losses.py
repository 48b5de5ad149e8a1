"""Self-supervised losses, heads and collapse diagnostics against hand-computed values."""

from __future__ import annotations

import math
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch

from sim2obs.errors import Sim2ObsValueError
from sim2obs.pretrain.heads import PredictionHead, ProjectionHead
from sim2obs.pretrain.losses import NTXentLoss, VICRegLoss, effective_rank, embedding_std

REPO = Path(__file__).resolve().parents[2]


def _ntxent_numpy(z1, z2, t):
    """NT-Xent written out view by view (Chen et al. 2020, eq. 1)."""
    z = np.concatenate([z1, z2]).astype(float)
    u = z / np.linalg.norm(z, axis=1, keepdims=True)
    n = len(z1)
    losses = []
    for i in range(2 * n):
        j = (i + n) % (2 * n)
        num = math.exp(u[i] @ u[j] / t)
        den = sum(math.exp(u[i] @ u[k] / t) for k in range(2 * n) if k != i)
        losses.append(-math.log(num / den))
    return sum(losses) / len(losses)


# ------------------------------------------------------------------------------ NT-Xent

def test_ntxent_closed_form_identical_orthogonal_views():
    # views e1, e2, e1, e2: each has its positive at cosine 1 and two negatives at cosine 0,
    # so every l_i = -log(e^{1/t} / (e^{1/t} + 2)) = log(1 + 2 e^{-1/t})
    t = 0.5
    z = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    loss = NTXentLoss(temperature=t)(z, z.clone())
    assert float(loss) == pytest.approx(math.log(1 + 2 * math.exp(-1 / t)), rel=1e-6)


def test_ntxent_hand_computed_tiny_batch():
    z1 = np.array([[1.0, 0.0], [0.0, 2.0]])
    z2 = np.array([[0.6, 0.8], [-1.0, 1.0]])
    for t in (0.1, 0.5, 1.0):
        got = NTXentLoss(t)(torch.tensor(z1, dtype=torch.float32), torch.tensor(z2, dtype=torch.float32))
        assert float(got) == pytest.approx(_ntxent_numpy(z1, z2, t), rel=1e-5)


def test_ntxent_symmetric_scale_invariant_and_single_pair():
    torch.manual_seed(0)
    z1, z2 = torch.randn(6, 5), torch.randn(6, 5)
    loss = NTXentLoss(0.2)
    assert float(loss(z1, z2)) == pytest.approx(float(loss(z2, z1)), rel=1e-6)
    assert float(loss(3 * z1, 0.5 * z2)) == pytest.approx(float(loss(z1, z2)), rel=1e-5)
    # one pair has no negatives: the softmax over the single other view is 1
    assert float(loss(z1[:1], z2[:1])) == pytest.approx(0.0, abs=1e-7)
    aligned = loss(z1, z1 + 1e-3 * torch.randn(6, 5))
    assert aligned < loss(z1, z2)


def test_ntxent_bf16_inputs_and_gradient():
    torch.manual_seed(1)
    z1 = torch.randn(4, 8, requires_grad=True)
    z2 = torch.randn(4, 8)
    loss = NTXentLoss(0.1)(z1.bfloat16(), z2.bfloat16())
    assert loss.dtype == torch.float32
    loss.backward()
    assert torch.isfinite(z1.grad).all() and z1.grad.abs().sum() > 0


@pytest.mark.parametrize("make", [lambda: NTXentLoss(0.1), lambda: VICRegLoss()], ids=["ntxent", "vicreg"])
def test_losses_are_float32_under_a_callers_autocast(make):
    """Called inside bf16 autocast (as a training step would), the loss equals its float32 value
    to float32 rounding: the logits / covariance matmuls do not drop to bf16 (they did before
    0.2.2: NT-Xent 0.5 % off on this batch)."""
    g = torch.Generator().manual_seed(3)
    z1, z2 = torch.randn(64, 32, generator=g), torch.randn(64, 32, generator=g)
    loss = make()
    exact = loss(z1, z2)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        inside = loss(z1, z2)
    exact, inside = (v[0] if isinstance(v, tuple) else v for v in (exact, inside))
    assert inside.dtype == torch.float32
    assert float(inside) == pytest.approx(float(exact), rel=1e-6)


def test_single_process_path_never_touches_distributed(monkeypatch):
    import torch.distributed as dist

    def boom(*args, **kwargs):
        raise AssertionError("torch.distributed was touched")

    for name in ("is_available", "is_initialized", "get_rank", "get_world_size", "all_gather"):
        monkeypatch.setattr(dist, name, boom)
    z1, z2 = torch.randn(4, 3), torch.randn(4, 3)
    NTXentLoss(0.2)(z1, z2)
    VICRegLoss()(z1, z2)


def test_gather_without_process_group_equals_local():
    torch.manual_seed(2)
    z1, z2 = torch.randn(5, 4), torch.randn(5, 4)
    assert float(NTXentLoss(0.3, gather=True)(z1, z2)) == pytest.approx(float(NTXentLoss(0.3)(z1, z2)))
    a, _ = VICRegLoss(gather=True)(z1, z2)
    b, _ = VICRegLoss()(z1, z2)
    assert float(a) == pytest.approx(float(b))


_DDP_SCRIPT = textwrap.dedent("""
    import sys, torch, torch.distributed as dist
    from sim2obs.pretrain.losses import NTXentLoss, VICRegLoss
    rank, store, out = int(sys.argv[1]), sys.argv[2], sys.argv[3]
    dist.init_process_group("gloo", init_method="file://" + store, rank=rank, world_size=2)
    torch.manual_seed(0)
    z1, z2 = torch.randn(8, 4), torch.randn(8, 4)
    res = {}
    for name, fn in (("ntxent", lambda a, b: NTXentLoss(0.5, gather=True)(a, b)),
                     ("vicreg", lambda a, b: VICRegLoss(gather=True)(a, b)[0])):
        l1 = z1[rank * 4:(rank + 1) * 4].clone().requires_grad_()
        l2 = z2[rank * 4:(rank + 1) * 4].clone().requires_grad_()
        loss = fn(l1, l2)
        loss.backward()
        res[name] = (loss.detach(), l1.grad, l2.grad)
    torch.save(res, out)
    dist.barrier()
    dist.destroy_process_group()
""")


def test_ddp_gather_matches_global_batch(tmp_path):
    """Two gloo ranks with half the batch each reproduce the global-batch loss and gradient."""
    script = tmp_path / "ddp.py"
    script.write_text(_DDP_SCRIPT)
    env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""),
               OMP_NUM_THREADS="1")
    procs = [
        subprocess.Popen([sys.executable, str(script), str(r), str(tmp_path / "store"),
                          str(tmp_path / f"r{r}.pt")], env=env, stderr=subprocess.PIPE, text=True)
        for r in range(2)
    ]
    for p in procs:
        _, err = p.communicate(timeout=120)
        if p.returncode != 0 and "gloo" in err.lower() and "not" in err.lower():
            pytest.skip(f"gloo backend unavailable: {err[-300:]}")
        assert p.returncode == 0, err[-2000:]
    res = [torch.load(tmp_path / f"r{r}.pt") for r in range(2)]
    torch.manual_seed(0)
    z1, z2 = torch.randn(8, 4, requires_grad=True), torch.randn(8, 4, requires_grad=True)
    for name, fn in (("ntxent", lambda a, b: NTXentLoss(0.5)(a, b)),
                     ("vicreg", lambda a, b: VICRegLoss()(a, b)[0])):
        z1.grad = z2.grad = None
        full = fn(z1, z2)
        full.backward()
        mean_local = (res[0][name][0] + res[1][name][0]) / 2
        assert float(mean_local) == pytest.approx(float(full.detach()), rel=1e-5)
        for r in range(2):
            # backward of all_gather sums every rank's loss into the local slice: with DDP's
            # gradient averaging over 2 ranks this equals the global-batch gradient
            sl = slice(r * 4, (r + 1) * 4)
            torch.testing.assert_close(res[r][name][1], 2 * z1.grad[sl], rtol=1e-4, atol=1e-6)
            torch.testing.assert_close(res[r][name][2], 2 * z2.grad[sl], rtol=1e-4, atol=1e-6)


def test_ntxent_errors():
    with pytest.raises(Sim2ObsValueError, match="temperature"):
        NTXentLoss(0.0)
    with pytest.raises(Sim2ObsValueError, match="same shape"):
        NTXentLoss()(torch.randn(3, 2), torch.randn(4, 2))


# ------------------------------------------------------------------------------ VICReg

def test_vicreg_invariance_term():
    z1 = torch.tensor([[0.0, 0.0], [1.0, 1.0]])
    z2 = torch.tensor([[1.0, 0.0], [1.0, 3.0]])
    _, terms = VICRegLoss()(z1, z2)
    assert float(terms["invariance"]) == pytest.approx((1 + 0 + 0 + 4) / 4)
    _, same = VICRegLoss()(z1, z1.clone())
    assert float(same["invariance"]) == 0.0


def test_vicreg_constant_embeddings_variance_is_std_coeff():
    z = torch.ones(6, 3) * 0.7  # complete collapse: std 0 in every dimension
    eps = 1e-4
    total, terms = VICRegLoss(sim_coeff=25, std_coeff=25, cov_coeff=1, eps=eps)(z, z.clone())
    assert float(terms["variance"]) == pytest.approx(1 - math.sqrt(eps), rel=1e-6)
    assert float(terms["covariance"]) == 0.0
    assert float(total) == pytest.approx(25 * (1 - math.sqrt(eps)), rel=1e-6)


def test_vicreg_variance_zero_and_covariance_hand_value():
    # values +-1 in both dimensions: Var = 2 (N - 1 = 1) so the hinge is 0; C = [[2, 2], [2, 2]],
    # off-diagonal squares 2 * 4 = 8, divided by D = 2 -> 4 per branch, 8 for the two branches
    z = torch.tensor([[1.0, 1.0], [-1.0, -1.0]])
    total, terms = VICRegLoss(sim_coeff=25, std_coeff=25, cov_coeff=1)(z, z.clone())
    assert float(terms["variance"]) == 0.0
    assert float(terms["covariance"]) == pytest.approx(8.0)
    assert float(total) == pytest.approx(8.0)
    # decorrelated dimensions: covariance 0
    zd = torch.tensor([[1.0, 1.0], [-1.0, 1.0], [1.0, -1.0], [-1.0, -1.0]])
    _, t2 = VICRegLoss()(zd, zd.clone())
    assert float(t2["covariance"]) == pytest.approx(0.0, abs=1e-7)


def test_vicreg_total_is_weighted_sum_and_differentiable():
    torch.manual_seed(3)
    z1 = torch.randn(16, 8, requires_grad=True)
    z2 = torch.randn(16, 8)
    loss = VICRegLoss(sim_coeff=2.0, std_coeff=3.0, cov_coeff=0.5)
    total, t = loss(z1, z2)
    expect = 2.0 * t["invariance"] + 3.0 * t["variance"] + 0.5 * t["covariance"]
    assert float(total.detach()) == pytest.approx(float(expect), rel=1e-6)
    total.backward()
    assert torch.isfinite(z1.grad).all()
    with pytest.raises(Sim2ObsValueError, match="at least 2"):
        loss(torch.randn(1, 4), torch.randn(1, 4))


# ------------------------------------------------------------------------------ heads

@pytest.mark.parametrize("n_layers", [1, 2, 3])
def test_projection_head_shapes(n_layers):
    head = ProjectionHead(16, 32, 8, n_layers=n_layers)
    assert head(torch.randn(5, 16)).shape == (5, 8)
    n_bn = sum(isinstance(m, torch.nn.BatchNorm1d) for m in head.modules())
    assert n_bn == n_layers - 1
    n_lin = sum(isinstance(m, torch.nn.Linear) for m in head.modules())
    assert n_lin == n_layers


def test_projection_head_options_and_errors():
    head = ProjectionHead(16, 32, 8, n_layers=2, last_bn=True).train()
    z = head(torch.randn(64, 16))
    torch.testing.assert_close(z.mean(0), torch.zeros(8), atol=1e-5, rtol=0)
    assert ProjectionHead(4, 4, 4, batch_norm=False)(torch.randn(1, 4)).shape == (1, 4)
    with pytest.raises(Sim2ObsValueError, match="n_layers"):
        ProjectionHead(4, 4, 4, n_layers=0)
    assert PredictionHead(8, 4)(torch.randn(3, 8)).shape == (3, 8)
    assert PredictionHead(8, 4, 6)(torch.randn(3, 8)).shape == (3, 6)


# ------------------------------------------------------------------------------ diagnostics

def test_effective_rank():
    g = torch.Generator().manual_seed(4)
    gauss = torch.randn(512, 32, generator=g)
    assert effective_rank(gauss) > 0.9 * 32
    rank1 = torch.randn(100, 1, generator=g) @ torch.randn(1, 32, generator=g)
    assert effective_rank(rank1) == pytest.approx(1.0, abs=1e-4)  # float32 round-off
    # k equal singular values: entropy log k, effective rank exactly k
    q, _ = torch.linalg.qr(torch.randn(50, 5, generator=g, dtype=torch.float64))
    assert effective_rank(q @ torch.eye(5, 12, dtype=torch.float64)) == pytest.approx(5.0, rel=1e-9)
    assert effective_rank(torch.zeros(4, 3)) == 0.0
    assert effective_rank(torch.ones(10, 4), center=True) == 0.0


def test_embedding_std():
    g = torch.Generator().manual_seed(5)
    z = 2.0 * torch.randn(4000, 16, generator=g)
    assert embedding_std(z) == pytest.approx(2.0, rel=0.03)
    assert embedding_std(torch.ones(10, 4)) == 0.0
    assert embedding_std(torch.randn(4000, 64, generator=g), normalize=True) == pytest.approx(
        1 / math.sqrt(64), rel=0.05
    )
