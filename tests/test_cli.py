"""The command line end to end on a tiny mini-universe: mini-universe -> render -> show."""

import h5py
import numpy as np
import pytest

from sim2obs.cli import build_parser, main


@pytest.fixture(scope="module")
def tiny_universe(tmp_path_factory):
    out = tmp_path_factory.mktemp("mini")
    assert main(["mini-universe", "--out", str(out), "--n-galaxies", "6", "--seed", "1", "--quiet"]) == 0
    return out


def test_help_texts_explain(capsys):
    parser = build_parser()
    for cmd in ("render", "mini-universe", "show"):
        with pytest.raises(SystemExit):
            parser.parse_args([cmd, "--help"])
        text = capsys.readouterr().out
        assert "usage: sim2obs" in text and len(text) > 300


def test_render_and_show(tiny_universe, tmp_path, capsys):
    out = tmp_path / "mocks"
    rc = main(["render", "--source", f"tng:{tiny_universe}", "--snapshot", "99", "--survey", "sdss",
               "--bands", "g", "r", "i", "--n", "4", "--stamp", "32", "--out", str(out),
               "--seed", "2", "--quiet", "--realism", "observed", "--realism-effects", "seeing",
               "stars"])
    assert rc == 0
    with h5py.File(out / "sdss-00000.h5") as f:
        assert f["images"].shape == (4, 3, 32, 32)
        assert list(f.attrs["bands"]) == ["g", "r", "i"]
        assert f["psf"].shape[0] == 4  # per-galaxy seeing -> one PSF per galaxy
        assert np.all(np.isfinite(f["images"][()]))
    png = tmp_path / "grid.png"
    assert main(["show", str(out), "--out", str(png), "--n", "3"]) == 0
    assert png.read_bytes()[:4] == b"\x89PNG"
    # rerun: resumes (nothing to do), same bytes
    before = (out / "sdss-00000.h5").read_bytes()
    assert main(["render", "--source", f"tng:{tiny_universe}", "--snapshot", "99", "--survey", "sdss",
                 "--bands", "g", "r", "i", "--n", "4", "--stamp", "32", "--out", str(out),
                 "--seed", "2", "--quiet", "--realism", "observed", "--realism-effects", "seeing",
                 "stars"]) == 0
    assert (out / "sdss-00000.h5").read_bytes() == before
    assert "already complete" in capsys.readouterr().err


@pytest.mark.parametrize("args,message", [
    (["--survey", "nosuch"], "unknown survey 'nosuch'"),
    (["--survey", "hsc", "--bands", "K"], "has no band 'K'"),
    (["--survey", "hsc", "--stamp", "10"], "--stamp"),
    (["--survey", "hsc", "--source", "tng:/no/such/dir"], "/no/such/dir"),
    (["--survey", "hsc", "--source", "weird:x"], "valid forms"),
    (["--survey", "hsc", "--realism-effects", "stars"], "--realism observed"),
])
def test_errors_are_clear(tiny_universe, tmp_path, capsys, args, message):
    base = ["render", "--source", f"tng:{tiny_universe}", "--n", "1", "--out", str(tmp_path / "o"),
            "--quiet"]
    assert main(base + args) == 1
    err = capsys.readouterr().err
    assert message in err
    assert "Traceback" not in err


def test_threads_option_limits_torch_and_blas(tiny_universe, tmp_path):
    import torch
    from threadpoolctl import threadpool_info, threadpool_limits

    before = torch.get_num_threads()
    try:
        with threadpool_limits(limits=None):  # restores the BLAS pools afterwards
            # any command: the limits are set before it runs (this one fails cleanly, no folder)
            assert main(["--threads", "1", "manifest", str(tiny_universe / "none"), "--rebuild"]) in (0, 1)
            assert torch.get_num_threads() == 1
            assert all(p["num_threads"] == 1 for p in threadpool_info())
    finally:
        torch.set_num_threads(before)
    with pytest.raises(SystemExit):
        build_parser().parse_args(["--threads", "x", "render"])
    with pytest.raises(SystemExit):
        main(["--threads", "0", "manifest", str(tmp_path)])
