"""kNN backends for similarity search and anomalies: exact cKDTree, optional faiss."""

import importlib.util

import numpy as np
import pytest

from sim2obs.errors import MissingDependencyError, Sim2ObsValueError
from sim2obs.gap.search import anomalies, knn


def test_exact_knn_by_brute_force():
    rng = np.random.default_rng(0)
    ref, q = rng.normal(size=(300, 6)), rng.normal(size=(20, 6))
    d, idx = knn(ref, q, 5, backend="exact")
    brute = np.linalg.norm(q[:, None, :] - ref[None, :, :], axis=2)
    np.testing.assert_array_equal(idx, np.argsort(brute, axis=1)[:, :5])
    np.testing.assert_allclose(d, np.sort(brute, axis=1)[:, :5], rtol=1e-5)
    with pytest.raises(Sim2ObsValueError, match="backend"):
        knn(ref, q, 5, backend="annoy")


def test_anomalies_rank_outliers_first():
    rng = np.random.default_rng(1)
    ref = rng.normal(size=(400, 4))
    target = np.vstack([rng.normal(size=(50, 4)), rng.normal(size=(3, 4)) + 8.0])
    out = anomalies(target, ref, k=5, metric="euclidean", backend="exact")
    assert set(out["order"][:3]) == {50, 51, 52}
    assert np.median(out["score"][:50]) == pytest.approx(1.0, abs=0.35)


@pytest.mark.skipif(importlib.util.find_spec("faiss") is None,
                    reason='optional: pip install "sim2obs[faiss]"')
def test_faiss_matches_exact():
    rng = np.random.default_rng(2)
    ref, q = rng.normal(size=(500, 8)), rng.normal(size=(30, 8))
    de, ie = knn(ref, q, 7, backend="exact")
    df, i_f = knn(ref, q, 7, backend="faiss")
    np.testing.assert_array_equal(ie, i_f)
    np.testing.assert_allclose(de, df, rtol=1e-4)


def test_faiss_missing_message(monkeypatch):
    import importlib

    real_import = importlib.import_module

    def fake(name, *a, **k):
        if name == "faiss":
            raise ImportError("no faiss")
        return real_import(name, *a, **k)

    monkeypatch.setattr(importlib, "import_module", fake)
    with pytest.raises(MissingDependencyError, match=r'pip install "sim2obs\[faiss\]"'):
        knn(np.zeros((3, 2)), np.zeros((1, 2)), 1, backend="faiss")
