"""`sim2obs gap`, `similar` and `anomalies` end to end on small synthetic shard folders."""

import json

import numpy as np
import pytest

from sim2obs.cli import main
from sim2obs.data.shards import read_folder
from sim2obs.gap.report import check_compatible, markdown_to_html, resample_shard


@pytest.fixture(scope="module")
def sets(tmp_path_factory, make_shards):
    root = tmp_path_factory.mktemp("gap")
    a = make_shards(root / "a", n=48, seed=1, shard_size=24)
    b = make_shards(root / "b", n=48, seed=2, id_offset=1000, noise=0.15)
    return root, a, b


@pytest.fixture(scope="module")
def run(sets):
    from sim2obs.pretrain.train import PretrainConfig, pretrain

    root, a, _ = sets
    cfg = PretrainConfig(epochs=1, batch_size=16, embed_dim=8, proj_hidden=16, proj_dim=8,
                         encoder_kwargs={"width": 8, "depths": [1], "stem_stride": 2})
    return pretrain([a], root / "run", cfg, progress=False)


def test_gap_with_model_writes_design_metrics(sets, run, tmp_path):
    _, a, b = sets
    out = tmp_path / "rep"
    rc = main(["gap", str(a), str(b), "--model", str(run), "--adapted", str(run), "--out", str(out),
               "--n-boot", "5", "--n-perm", "20", "--n-morph", "8"])
    assert rc == 0
    m = json.loads((out / "metrics.json").read_text())
    emb = m["embedding"]
    for key in ("c2st_auc", "sinkhorn", "mmd2", "frechet"):
        assert set(emb[key]) >= {"value", "ci"} and len(emb[key]["ci"]) == 2
    assert 0 <= emb["mmd2"]["p_value"] <= 1
    assert set(emb["prdc"]) >= {"precision", "recall", "density", "coverage"}
    assert m["embedding_adapted"]["c2st_auc"]["value"] == pytest.approx(emb["c2st_auc"]["value"])
    morph = m["morphology"]
    assert "mag_r" in morph and "sersic_n" in morph and "noise_corr_g" in morph
    # set B has 3x the noise: the noise level is the clearest difference
    assert morph["noise_r"]["ks_p_value"] < 1e-3 and morph["noise_r"]["cohen_d"] > 2
    md = (out / "report.md").read_text()
    html = (out / "report.html").read_text()
    assert "Before / after adaptation" in md and "<table>" in html
    for name in ("grid_A.png", "grid_B.png", "embedding_pca.png", "most_A_like.png",
                 "most_B_like.png", "morphology_hist.png", "embedding_adapted_pca.png"):
        assert (out / "figures" / name).is_file(), name
        assert f"figures/{name}" in html


def test_gap_without_model_is_morphology_only(sets, tmp_path):
    _, a, b = sets
    out = tmp_path / "rep"
    assert main(["gap", str(a), str(b), "--out", str(out), "--n-morph", "5"]) == 0
    m = json.loads((out / "metrics.json").read_text())
    assert m["embedding"] is None and "gini" in m["morphology"]
    assert "nothing was embedded" in (out / "report.md").read_text()


def test_gap_refuses_unlike_sets(sets, make_shards, capsys):
    root, a, _ = sets
    c = make_shards(root / "c", n=8, bands=("g", "r", "i", "z"), seed=3)
    d = make_shards(root / "d", n=8, stamp=24, seed=4)
    assert main(["gap", str(a), str(c), "--out", str(root / "x")]) == 1
    err = capsys.readouterr().err
    assert "different bands" in err and str(a) in err and str(c) in err and "--bands g r i" in err
    assert main(["gap", str(a), str(d), "--out", str(root / "x")]) == 1
    err = capsys.readouterr().err
    assert "stamp (32, 32) vs (24, 24)" in err and "--resample" in err
    # --bands selects the common bands; --resample redraws set B on A's grid
    assert main(["gap", str(a), str(c), "--bands", "g", "r", "i", "--out", str(root / "y"),
                 "--n-morph", "3"]) == 0
    assert main(["gap", str(a), str(d), "--resample", "--out", str(root / "z"), "--n-morph", "3"]) == 0
    m = json.loads((root / "z" / "metrics.json").read_text())
    assert m["inputs"]["B"]["resampled_to_A"] is True
    assert "resampled" in (root / "z" / "report.md").read_text()


def test_resample_conserves_flux(sets):
    _, a, _ = sets
    from dataclasses import replace

    s = read_folder(a)
    s = replace(s, images=s.noiseless, noiseless=None, ivar=None)
    r = resample_shard(s, 0.3, (24, 24))
    assert r.images.shape == (48, 3, 24, 24) and r.attrs.pixel_scale_arcsec == 0.3
    # total flux of the noiseless images (the 32 x 0.168" stamp fits in 24 x 0.3")
    # coarser pixels integrate the Lanczos-3 surface: flux to Lanczos' own DC accuracy (~1e-6),
    # stored as float32
    np.testing.assert_allclose(r.images.sum((2, 3)), s.images.sum((2, 3)), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(r.psf.sum((2, 3)), 1, rtol=1e-5)
    # true centre on true centre: each galaxy's centroid keeps its offset from the stamp's true
    # centre, in arcsec (to 0.01", 1/30 of the new pixel)

    def offset(images, scale):
        n = images.shape[-1]
        y, x = np.mgrid[:n, :n]
        w = images.sum(1).astype(np.float64)  # bands summed
        tot = w.sum((1, 2))
        return np.stack([(w * y).sum((1, 2)) / tot, (w * x).sum((1, 2)) / tot], 1) - (n - 1) / 2, scale

    before, after = offset(s.images, 0.168), offset(r.images, 0.3)
    np.testing.assert_allclose(after[0] * after[1], before[0] * before[1], atol=0.01)
    assert check_compatible(s, s) is s


def test_markdown_to_html_is_self_contained():
    h = markdown_to_html("# T\n\n- a **b**\n\n| x | y |\n|---|---|\n| 1 | 2 |\n\n![p](figures/p.png)\n")
    assert "<h1>T</h1>" in h and "<b>b</b>" in h and "<td>1</td>" in h
    assert 'src="figures/p.png"' in h and "http" not in h


def test_similar_and_anomalies(sets, run, tmp_path, capsys):
    from sim2obs.pretrain.evaluate import embed_folder

    _, a, b = sets
    ea = embed_folder(run, [a], tmp_path / "a.h5", progress=False)
    eb = embed_folder(run, [b], tmp_path / "b.h5", progress=False)
    assert main(["similar", str(ea), str(eb), "--query", "5", "-k", "6", "--shards", str(a), str(b),
                 "--out", str(tmp_path / "nn.png")]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[0] == "rank,object_id,distance,file" and len(lines) == 7
    assert lines[1].startswith("0,5,0,")  # the query itself first
    assert (tmp_path / "nn.png").is_file()
    assert main(["similar", str(ea), "--query", "99999"]) == 1
    assert main(["anomalies", str(eb), "--reference", str(ea), "--out", str(tmp_path / "r.csv"),
                 "--shards", str(b), "--grid", str(tmp_path / "top.png"), "--top", "4"]) == 0
    rows = (tmp_path / "r.csv").read_text().strip().splitlines()
    assert rows[0] == "rank,object_id,knn_distance,score" and len(rows) == 49
    scores = [float(r.split(",")[3]) for r in rows[1:]]
    assert scores == sorted(scores, reverse=True)
    assert (tmp_path / "top.png").is_file()


def test_anomalies_ranks_outliers_first():
    from sim2obs.gap.search import anomalies

    rng = np.random.default_rng(0)
    ref = rng.normal(size=(200, 4))
    target = np.concatenate([rng.normal(size=(20, 4)), rng.normal(size=(3, 4)) + 8])
    res = anomalies(target, ref, k=5, metric="euclidean")
    assert set(res["order"][:3]) == {20, 21, 22}
    assert np.median(res["score"][:20]) < 1.5 and res["score"][20:].min() > 3
