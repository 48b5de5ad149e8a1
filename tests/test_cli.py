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


def test_every_option_of_every_command_is_explained():
    """README promises that `sim2obs COMMAND --help` explains every option."""
    import argparse

    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    bare = [(name, a.option_strings or a.dest) for name, p in sub.choices.items() for a in p._actions
            if not isinstance(a, argparse._HelpAction) and not (a.help or "").strip()]
    assert bare == []
    # and every option that has a default states it (the formatter adds it where the text does not)
    for name, p in sub.choices.items():
        text = " ".join(p.format_help().split())
        fmt = p._get_formatter()
        for a in p._actions:
            if a.option_strings and not any(a.default is v for v in (None, False, argparse.SUPPRESS)):
                assert "default" in fmt._get_help_string(a).lower(), (name, a.option_strings)
        assert "(default: 16) (default" not in text
    pretrain_help = " ".join(sub.choices["pretrain"].format_help().split())
    assert "(default: 50)" in pretrain_help and "(default: auto)" in pretrain_help
    render_help = " ".join(sub.choices["render"].format_help().split())
    assert "(default: 0)" in render_help  # --seed: a default of 0 is still a default


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


# ----------------------------------------------------------------------------------------------
# probe
# ----------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def probe_run(synthetic_folders, tmp_path_factory):
    from sim2obs.pretrain.train import PretrainConfig, pretrain

    cfg = PretrainConfig(epochs=1, batch_size=16, embed_dim=8, proj_hidden=16, proj_dim=8,
                         encoder_kwargs={"width": 8, "depths": [1], "stem_stride": 2})
    return pretrain([synthetic_folders[0]], tmp_path_factory.mktemp("probe") / "run", cfg,
                    progress=False)


def test_probe_help_states_every_default(capsys):
    parser = build_parser()
    probe_parser = next(a for a in parser._actions if a.dest == "command").choices["probe"]
    for action in probe_parser._actions:
        if action.option_strings and action.dest != "help":
            assert action.help and "default" in action.help, action.option_strings
    with pytest.raises(SystemExit):
        parser.parse_args(["probe", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    for phrase in ("--out FILE.json", "(default: 5)", "(default: log_mstar)", "(default: 256)",
                   "k = 10", "leave-one-out", "grouped by object_id", "1e-3 to 1e4"):
        assert phrase in text, phrase
    from sim2obs.pretrain.evaluate import KNN_K, RIDGE_ALPHAS

    assert KNN_K == 10 and len(RIDGE_ALPHAS) == 15
    assert (min(RIDGE_ALPHAS), max(RIDGE_ALPHAS)) == pytest.approx((1e-3, 1e4))


@pytest.mark.parametrize("folds,message", [
    ("0", "--folds must be an integer >= 2"),
    ("1", "--folds must be an integer >= 2"),
    ("200", "--folds 200 needs at least 200 galaxies with a finite 'log_mstar', only 96 available"),
])
def test_probe_bad_folds_fail_in_one_line_before_embedding(probe_run, synthetic_folders, folds,
                                                           message, capsys, monkeypatch):
    import sim2obs.pretrain.evaluate as evaluate

    def no_embedding(*args, **kwargs):
        raise AssertionError("embeddings computed before the --folds check")

    monkeypatch.setattr(evaluate, "compute_embeddings", no_embedding)
    capsys.readouterr()
    assert main(["probe", str(probe_run), str(synthetic_folders[0]), "--folds", folds]) == 1
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1, err


def test_probe_two_surveys_counts_galaxies_and_writes_json(probe_run, synthetic_folders, tmp_path,
                                                           capsys):
    import json

    import sim2obs

    folders = [str(f) for f in synthetic_folders]  # the same 96 galaxies seen by two surveys
    out_json = tmp_path / "probe.json"
    capsys.readouterr()
    assert main(["probe", str(probe_run), *folders, "--label", "log_mstar", "redshift",
                 "--folds", "3", "--batch-size", "50", "--out", str(out_json)]) == 0
    out = capsys.readouterr().out
    assert "192 stamps of 96 galaxies, 3-fold cross-validation grouped by galaxy" in out
    assert "N = 192 embeddings" in out and "(N = 192)" in out
    assert "dz/(1+z)" in out and "> 0.15" in out and "> 0.3 dex" in out
    res = json.loads(out_json.read_text())
    assert res["sim2obs_version"] == sim2obs.__version__
    assert res["n_stamps"] == 192 and res["n_galaxies"] == 96 and res["folds"] == 3
    assert res["seed"] == 0 and res["labels"] == ["log_mstar", "redshift"] and res["knn_k"] == 10
    assert res["run"] == str(probe_run.resolve())
    for name in ("pretrained", "random-init"):
        c = res["collapse"][name]
        assert c["n_embeddings"] == 192 and c["dim"] == 8
        assert c["embedding_std"] > 0 and 1 <= c["effective_rank"] <= 8
        for label, unit in (("log_mstar", "dex"), ("redshift", "dz/(1+z)")):
            sc = res["scores"][label]
            assert sc["residual_unit"] == unit and sc["n_galaxies"] == 96
            for kind in ("linear", "knn"):
                assert set(sc[name][kind]) == {"r2", "bias", "nmad", "outlier_fraction", "n"}
                assert sc[name][kind]["n"] == 192
    assert res["scores"]["redshift"]["outlier_threshold"] == 0.15
    assert [p.name for p in tmp_path.iterdir()] == ["probe.json"]  # no temporary file left
    # the same seed gives the same folds and the same scores
    assert main(["probe", str(probe_run), *folders, "--label", "log_mstar", "redshift",
                 "--folds", "3", "--out", str(tmp_path / "again.json")]) == 0
    again = json.loads((tmp_path / "again.json").read_text())
    assert again["scores"] == res["scores"]


def test_ctrl_c_says_what_is_kept_for_the_command(synthetic_folders, tmp_path, capsys, monkeypatch):
    """Ctrl-C names what survives and how to go on, per command (not the render message)."""
    import sim2obs.pretrain.train as train

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(train, "pretrain", interrupted)
    run = tmp_path / "run"
    argv = ["pretrain", str(synthetic_folders[0]), "--out", str(run)]
    assert main(argv) == 130
    assert "no epoch had finished" in capsys.readouterr().err
    run.mkdir()
    (run / "checkpoint.pt").write_bytes(b"")
    assert main(argv) == 130
    err = capsys.readouterr().err
    assert "last finished epoch" in err and "shards" not in err
    assert f"sim2obs pretrain {synthetic_folders[0]} --resume {run}" in err
    # under torchrun (rank 0 of 2 on one node) the way on keeps the number of processes
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    assert main(argv) == 130
    assert f"torchrun --nproc_per_node 2 -m sim2obs pretrain {synthetic_folders[0]} --resume {run}" in capsys.readouterr().err
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "1")  # one process per node on 2 nodes: the user's launch
    assert main(argv) == 130
    assert "the same torchrun launch of `sim2obs pretrain" in capsys.readouterr().err
    monkeypatch.delenv("WORLD_SIZE")
    monkeypatch.delenv("LOCAL_WORLD_SIZE")
    monkeypatch.setattr("sim2obs.gap.search.load_many", interrupted)
    assert main(["anomalies", str(tmp_path / "e.h5"), "--reference", str(tmp_path / "r.h5"),
                 "--out", str(tmp_path / "a.csv")]) == 130
    assert "may be incomplete: run the command again" in capsys.readouterr().err


def test_probe_label_of_some_folders_or_object_id_says_what_to_do(probe_run, synthetic_folders, capsys):
    """A label only some folders have names those folders (probe them alone); object_id is refused
    as a label (it is the identifier)."""
    hsc, lsst = (str(f) for f in synthetic_folders)
    capsys.readouterr()
    assert main(["probe", str(probe_run), hsc, lsst, "--label", "psf_fwhm_z"]) == 1
    err = capsys.readouterr().err
    assert f"'psf_fwhm_z' is in ['{lsst}'] but not in ['{hsc}']" in err
    assert f"sim2obs probe RUN {lsst} --label psf_fwhm_z" in err and "'object_id'" not in err
    assert main(["probe", str(probe_run), hsc, "--label", "object_id"]) == 1
    assert "object_id is the galaxies' identifier" in capsys.readouterr().err
