"""Similarity search and anomaly ranking over embeddings files (exact kNN: scipy cKDTree, or a
flat faiss index from the optional ``faiss`` extra for large sets).

* :func:`similar` - the k nearest neighbours of one object among one or more embeddings files
  (sim and real together: which simulated galaxies look like this real one?).
* :func:`anomalies` - objects ranked by their mean distance to the k nearest objects of a
  reference set (real galaxies far from every simulated one: where the simulation has no
  counterpart), normalised by the reference set's own typical kNN distance.

Distances are Euclidean on L2-normalised embeddings (``metric='cosine'``, the geometry
contrastive encoders are trained in) or on raw embeddings (``metric='euclidean'``). Exact kNN
scales to ~10^5 objects on a CPU; beyond that an approximate index would be needed.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from sim2obs.errors import Sim2ObsKeyError, Sim2ObsValueError


def _prepare(e: np.ndarray, metric: str) -> np.ndarray:
    e = np.asarray(e, dtype=np.float64)
    if metric == "cosine":
        norm = np.linalg.norm(e, axis=1, keepdims=True)
        return e / np.where(norm > 0, norm, 1.0)
    if metric == "euclidean":
        return e
    raise Sim2ObsValueError(f"metric must be 'cosine' or 'euclidean', got '{metric}'")


def load_many(files) -> tuple[np.ndarray, np.ndarray, np.ndarray, list[dict]]:
    """Concatenate embeddings files: ``(embeddings, object_id, file_index, attrs per file)``."""
    from sim2obs.pretrain.evaluate import read_embeddings

    embs, ids, which, attrs = [], [], [], []
    for i, f in enumerate(files):
        e, labels, a = read_embeddings(f)
        if "object_id" not in labels:
            raise Sim2ObsValueError(f"'{f}' has no /labels/object_id")
        if embs and e.shape[1] != embs[0].shape[1]:
            raise Sim2ObsValueError(
                f"'{f}' has {e.shape[1]}-d embeddings but '{files[0]}' has {embs[0].shape[1]}-d: "
                "embed every set with the same model")
        embs.append(e)
        ids.append(labels["object_id"])
        which.append(np.full(len(e), i))
        attrs.append(a)
    models = {str(a.get("model", "")) for a in attrs}
    if len(models) > 1:
        raise Sim2ObsValueError(f"the embeddings files come from different models {sorted(models)}")
    return np.concatenate(embs), np.concatenate(ids), np.concatenate(which), attrs


#: Above this many reference objects, ``backend='auto'`` uses faiss when it is installed.
FAISS_AUTO_MIN = 100_000
KNN_BACKENDS = ("auto", "exact", "faiss")


def knn(reference: np.ndarray, queries: np.ndarray, k: int, backend: str = "auto"):
    """Exact k nearest neighbours (Euclidean): ``(distances (Q, k), indices (Q, k))``.

    ``exact``: scipy ``cKDTree`` (fine up to ~1e5 objects on a CPU); ``faiss``: a flat (exact)
    faiss index (Johnson, Douze & Jégou 2019, IEEE TBD 7, 535), much faster for large sets, from
    the optional extra ``pip install "sim2obs[faiss]"``; ``auto``: faiss above
    :data:`FAISS_AUTO_MIN` reference objects when installed, else exact.
    """
    if backend not in KNN_BACKENDS:
        raise Sim2ObsValueError(f"unknown kNN backend '{backend}'; use one of {list(KNN_BACKENDS)}")
    ref = np.ascontiguousarray(reference, dtype=np.float32)
    q = np.ascontiguousarray(np.atleast_2d(queries), dtype=np.float32)
    k = int(min(k, len(ref)))
    use_faiss = backend == "faiss"
    if backend == "auto" and len(ref) >= FAISS_AUTO_MIN:
        import importlib.util

        use_faiss = importlib.util.find_spec("faiss") is not None
    if use_faiss:
        from sim2obs.errors import require

        faiss = require("faiss", extra="faiss", package="faiss-cpu")
        index = faiss.IndexFlatL2(ref.shape[1])
        index.add(ref)
        d2, idx = index.search(q, k)
        return np.sqrt(np.clip(d2, 0, None)).astype(np.float64), idx.astype(np.int64)
    from scipy.spatial import cKDTree

    d, idx = cKDTree(ref).query(q, k=k)
    return np.asarray(d, dtype=np.float64).reshape(len(q), k), np.asarray(idx).reshape(len(q), k)


def similar(files, query_id: int, k: int = 16, metric: str = "cosine",
            query_file: int | None = None, backend: str = "auto") -> list[dict]:
    """The ``k`` nearest neighbours of object ``query_id`` (itself first, distance 0).

    ``files``: embeddings files; the query is the first object with that id (in the file of
    index ``query_file`` when given). Returns rows ``{"object_id", "file", "distance"}``.
    """
    files = [Path(f) for f in ([files] if isinstance(files, str | Path) else files)]
    e, ids, which, _ = load_many(files)
    hit = ids == int(query_id)
    if query_file is not None:
        hit &= which == query_file
    if not hit.any():
        raise Sim2ObsKeyError(f"object_id {query_id} is not in {[str(f) for f in files]}")
    z = _prepare(e, metric)
    q = int(np.flatnonzero(hit)[0])
    k = min(int(k), len(z))
    d, idx = knn(z, z[q], k, backend)
    d, idx = d[0], idx[0]
    return [{"object_id": int(ids[i]), "file": str(files[which[i]]), "distance": float(di)}
            for di, i in zip(d, idx, strict=True)]


def anomalies(target: np.ndarray, reference: np.ndarray, k: int = 5, metric: str = "cosine",
              backend: str = "auto") -> dict[str, np.ndarray]:
    """Anomaly score of every ``target`` object (N, D) against ``reference`` (M, D).

    ``knn_distance`` = mean distance to the k nearest reference objects; ``score`` = that over
    the median of the same quantity for reference objects among themselves (leaving each out),
    so ~1 = as close to the reference as its own members are, >> 1 = no counterpart.
    Returns ``{"knn_distance", "score", "order"}`` (order: indices by decreasing score).
    """
    t, r = _prepare(target, metric), _prepare(reference, metric)
    if t.shape[1] != r.shape[1]:
        raise Sim2ObsValueError(f"embedding sizes differ: {t.shape[1]} vs {r.shape[1]}")
    if len(r) < k + 1:
        raise Sim2ObsValueError(f"the reference set has {len(r)} objects; need more than k={k}")
    d, _ = knn(r, t, k, backend)
    dist = d.mean(1)
    dr, _ = knn(r, r, k + 1, backend)
    scale = float(np.median(dr[:, 1:].mean(1)))
    score = dist / scale if scale > 0 else dist
    return {"knn_distance": dist, "score": score, "order": np.argsort(-score, kind="stable")}


def shards_by_id(folders, ids, bands=None):
    """An in-memory shard of the objects ``ids`` (in that order) found in shard ``folders``.

    The folders must share bands, pixel scale and stamp (else the first folder's grid is used
    and objects elsewhere are skipped). Objects not found are skipped; returns None if none.
    """
    from sim2obs.data.shards import read_folder
    from sim2obs.gap.report import subset

    shards = [read_folder(f, with_noiseless=False) for f in folders]
    first = shards[0]
    picked = []
    for oid in ids:
        for s in shards:
            if (s.bands != first.bands or s.images.shape[2:] != first.images.shape[2:]):
                continue
            hit = np.flatnonzero(s.labels["object_id"] == int(oid))
            if hit.size:
                picked.append(subset(s, hit[:1]))
                break
    if not picked:
        return None
    from sim2obs.data.shards import Shard

    keys = set.intersection(*(set(p.labels) for p in picked))
    return Shard(images=np.concatenate([p.images for p in picked]),
                 psf=np.concatenate([np.broadcast_to(p.psf, (1,) + p.psf.shape[1:]) for p in picked]),
                 labels={k: np.concatenate([p.labels[k] for p in picked]) for k in keys},
                 attrs=first.attrs, label_units=first.label_units, path=first.path)
