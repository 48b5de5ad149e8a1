"""Encoders: shapes for several band counts and stamp sizes, config round trip, errors, gradients."""

from __future__ import annotations

import json

import pytest
import torch

from sim2obs import encoders
from sim2obs.errors import Sim2ObsKeyError, Sim2ObsValueError

TINY = {
    "resnet": dict(width=8, depths=(1, 1, 1)),
    "vit": dict(image_size=32, patch_size=8, dim=32, depth=2, heads=2),
}


def _n_params(m: torch.nn.Module) -> int:
    return sum(p.numel() for p in m.parameters())


@pytest.mark.parametrize("bands", [1, 3, 5])
@pytest.mark.parametrize("stamp", [16, 40, 64])
@pytest.mark.parametrize("name", ["resnet", "vit"])
def test_output_shape(name, bands, stamp):
    torch.manual_seed(0)
    enc = encoders.build(name, bands, embed_dim=24, **TINY[name]).eval()
    with torch.no_grad():
        z = enc(torch.randn(3, bands, stamp, stamp))
    assert z.shape == (3, 24)
    assert torch.isfinite(z).all()
    assert enc.embed_dim == 24 and enc.in_bands == bands


def test_resnet_odd_and_rectangular_stamps():
    enc = encoders.build("resnet", 2, embed_dim=8, **TINY["resnet"]).eval()
    with torch.no_grad():
        assert enc(torch.randn(2, 2, 33, 17)).shape == (2, 8)
        assert enc(torch.randn(2, 2, 101, 101)).shape == (2, 8)


@pytest.mark.parametrize("name", ["resnet", "vit"])
def test_config_round_trip(name):
    torch.manual_seed(1)
    enc = encoders.build(name, 4, embed_dim=16, **TINY[name]).eval()
    cfg = json.loads(json.dumps(enc.config()))  # checkpoints store it as JSON
    assert cfg["name"] == name and cfg["in_bands"] == 4 and cfg["embed_dim"] == 16
    twin = encoders.build(**cfg).eval()
    twin.load_state_dict(enc.state_dict(), strict=True)
    x = torch.randn(2, 4, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(twin(x), enc(x))
    assert twin.config() == enc.config()


def test_param_counts_reasonable():
    resnet = encoders.build("resnet", 5)
    vit = encoders.build("vit", 5)
    for enc in (resnet, vit):
        assert 5e5 < _n_params(enc) < 2e7, _n_params(enc)
    narrow = _n_params(encoders.build("resnet", 5, width=16))
    wide = _n_params(encoders.build("resnet", 5, width=32))
    assert 3.5 < wide / narrow < 4.1  # conv weights scale with width^2
    deeper = _n_params(encoders.build("vit", 5, depth=12))
    assert deeper > 1.7 * _n_params(vit)  # transformer blocks dominate


def test_unknown_name_lists_names():
    with pytest.raises(Sim2ObsKeyError) as info:
        encoders.build("resnext", 3)
    assert isinstance(info.value, KeyError)
    assert "resnet" in str(info.value) and "vit" in str(info.value)
    assert encoders.names() == ["resnet", "vit"]


def test_error_messages():
    with pytest.raises(Sim2ObsValueError, match="unknown argument"):
        encoders.build("resnet", 3, widht=8)
    with pytest.raises(Sim2ObsValueError, match="norm"):
        encoders.build("resnet", 3, norm="layer")
    enc = encoders.build("resnet", 3, **TINY["resnet"])
    with pytest.raises(Sim2ObsValueError, match="built for 3 bands but got 5"):
        enc(torch.randn(1, 5, 32, 32))
    with pytest.raises(Sim2ObsValueError, match="at least 16x16"):
        enc(torch.randn(1, 3, 8, 8))
    with pytest.raises(Sim2ObsValueError, match=r"\(N, B, H, W\)"):
        enc(torch.randn(3, 32, 32))
    vit = encoders.build("vit", 3, **TINY["vit"])
    with pytest.raises(Sim2ObsValueError, match="multiples of 8; got 36x36"):
        vit(torch.randn(1, 3, 36, 36))
    with pytest.raises(Sim2ObsValueError, match="divisible by heads"):
        encoders.build("vit", 3, dim=30, heads=4)
    with pytest.raises(Sim2ObsValueError, match="multiple of patch_size"):
        encoders.build("vit", 3, image_size=30, patch_size=8)


@pytest.mark.parametrize("name,extra", [
    ("resnet", {}), ("resnet", {"norm": "group"}),
    ("vit", {}), ("vit", {"pos_embed": "sincos", "pool": "mean"}),
])
def test_gradient_flows(name, extra):
    torch.manual_seed(2)
    enc = encoders.build(name, 3, embed_dim=8, **{**TINY[name], **extra}).train()
    x = torch.randn(2, 3, 32, 32, requires_grad=True)
    enc(x).pow(2).sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    grads = [p.grad for p in enc.parameters() if p.requires_grad]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    assert sum(float(g.abs().sum()) for g in grads) > 0


def test_groupnorm_batch_of_one():
    enc = encoders.build("resnet", 2, embed_dim=8, norm="group", **TINY["resnet"]).train()
    assert enc(torch.randn(1, 2, 16, 16)).shape == (1, 8)


def test_vit_position_embeddings_for_other_grids():
    torch.manual_seed(3)
    enc = encoders.build("vit", 2, embed_dim=8, **TINY["vit"]).eval()
    pos = enc.position_embedding(4, 4)
    assert pos.shape == (1, 17, 32)
    torch.testing.assert_close(pos, enc.pos_embed)  # native grid: the table itself
    assert enc.position_embedding(6, 3).shape == (1, 19, 32)
    with torch.no_grad():
        assert enc(torch.randn(2, 2, 48, 24)).shape == (2, 8)
    sincos = encoders.build("vit", 2, embed_dim=8, pos_embed="sincos", **TINY["vit"])
    assert sincos.pos_embed is None
    assert sincos.position_embedding(5, 5).shape == (1, 26, 32)


@pytest.mark.parametrize("name", ["resnet", "vit"])
def test_channels_last_and_bf16_autocast_cpu(name):
    torch.manual_seed(4)
    enc = encoders.build(name, 3, embed_dim=8, **TINY[name]).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        ref = enc(x)
        enc_cl = enc.to(memory_format=torch.channels_last)
        out_cl = enc_cl(x.contiguous(memory_format=torch.channels_last))
        torch.testing.assert_close(out_cl, ref, rtol=1e-4, atol=1e-4)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out_bf = enc_cl(x.contiguous(memory_format=torch.channels_last))
    assert out_bf.shape == (2, 8) and torch.isfinite(out_bf).all()
    rel = (out_bf.float() - ref).norm() / ref.norm()
    assert rel < 0.1


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("name", ["resnet", "vit"])
def test_cuda_bf16(name):
    enc = encoders.build(name, 3, embed_dim=8, **TINY[name]).cuda()
    x = torch.randn(4, 3, 32, 32, device="cuda").contiguous(memory_format=torch.channels_last)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        z = enc(x)
    z.float().sum().backward()
    assert z.shape == (4, 8) and torch.isfinite(z).all()
