"""Use and judge a pretrained encoder: embeddings files, linear/kNN probes, collapse checks.

* :func:`embed_folder` writes the embeddings file of DESIGN.md: ``/embeddings`` float32 (N, D),
  ``/labels/*`` copied from the shards (incl. ``object_id``), attributes ``model`` (run path and
  checkpoint hash), ``domain``, ``survey``, ``bands``; and ``/survey`` (N,) bytes, each row's
  survey (with several folders one ``object_id`` appears once per survey).
* :func:`probe` fits a ridge regression (regularisation chosen by exact leave-one-out on the
  training folds, Golub, Heath & Wahba 1979) and a k-nearest-neighbour regressor from embeddings
  to a label, with K-fold cross-validation grouped by galaxy (every stamp of one ``object_id``,
  e.g. the HSC and the LSST rendering of one simulated galaxy, in the same fold), and reports R^2,
  bias, NMAD and the outlier fraction (photo-z conventions for ``redshift``: residuals dz/(1+z),
  outliers |dz|/(1+z) > 0.15, Hildebrandt et al. 2010, A&A 523, A31; other labels: outliers
  |d| > 0.3, i.e. a factor of 2 for log10 quantities, whose residuals are in dex).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from sim2obs._atomic import atomic_output
from sim2obs.data.dataset import ENCODER_BANDS_HINT, MAD_TO_SIGMA, Normalizer, ShardDataset
from sim2obs.errors import Sim2ObsDataError, Sim2ObsValueError

NMAD_SCALE = MAD_TO_SIGMA  # MAD -> sigma for a Gaussian


@torch.no_grad()
def compute_embeddings(encoder: torch.nn.Module, normalizer: Normalizer, dataset: ShardDataset,
                       batch_size: int = 256, device: str | torch.device = "cpu",
                       progress: bool = False) -> np.ndarray:
    """(N, D) float32 embeddings of every item of ``dataset`` (in dataset order); ``device``
    as for pretraining (``auto``, ``cpu``, ``cuda``, ``cuda:N``, ``mps``)."""
    from tqdm.auto import tqdm

    if tuple(normalizer.bands) != tuple(dataset.bands):
        raise Sim2ObsValueError(
            f"the encoder was trained on bands {list(normalizer.bands)} but the data gives "
            f"{list(dataset.bands)}"
        )
    from sim2obs.pretrain.train import resolve_device

    dev = device if isinstance(device, torch.device) else resolve_device(device)
    encoder = encoder.to(dev).eval()
    out = []
    for start in tqdm(range(0, len(dataset), batch_size), desc="embed", disable=not progress):
        idx = range(start, min(len(dataset), start + batch_size))
        items = [dataset.raw(i) for i in idx]  # masked pixels -> 0 if the encoder was trained so
        x = torch.from_numpy(np.stack([normalizer.mask(it["image"], it.get("ivar")) for it in items])).to(dev)
        out.append(encoder(normalizer(x)).float().cpu().numpy())
    return np.concatenate(out).astype(np.float32)


def folder_labels(dataset: ShardDataset) -> dict[str, np.ndarray]:
    """All labels present in every shard of the dataset, in dataset order, with units."""
    import h5py

    keys = None
    for path in dataset.files:
        with h5py.File(path, "r") as f:
            k = set(f["labels"].keys())
        keys = k if keys is None else keys & k
    labels: dict[str, np.ndarray] = {}
    cache: dict[int, dict] = {}
    for key in sorted(keys or ()):
        vals = np.empty(len(dataset), dtype=np.int64 if key == "object_id" else np.float64)
        for fi in np.unique(dataset.file_of):
            if fi not in cache:
                with h5py.File(dataset.files[fi], "r") as f:
                    cache[fi] = {k: f["labels"][k][()] for k in keys}
            sel = dataset.file_of == fi
            vals[sel] = cache[fi][key][dataset.row_of[sel]]
        labels[key] = vals
    return labels


def _missing_labels_message(dataset: ShardDataset, missing: list[str], values: dict) -> str:
    """Which folders lack each missing label (a label some folders have: probe those alone)."""
    import h5py

    has: dict[str, set[str]] = {lab: set() for lab in missing}
    folders = []
    for path in dataset.files:
        folder = str(Path(path).parent)
        folders.append(folder)
        with h5py.File(path, "r") as f:
            for lab in missing:
                if lab in f["labels"]:
                    has[lab].add(folder)
    available = sorted(k for k in values if k != "object_id")
    parts = []
    for lab in missing:
        if has[lab]:
            lacking = sorted(set(folders) - has[lab])
            parts.append(f"'{lab}' is in {sorted(has[lab])} but not in {lacking}: probe those folders "
                         f"alone (`sim2obs probe RUN {' '.join(sorted(has[lab]))} --label {lab}`)")
        else:
            parts.append(f"'{lab}' is in none of the shards")
    return "; ".join(parts) + f". Labels every folder has: {available}"


def other_stamp_note(meta: dict, dataset: ShardDataset) -> str | None:
    """A note when ``dataset``'s stamps differ in size from those the run was trained on
    (``meta``: the checkpoint's metadata; None for runs that did not record it). Both encoders
    accept any size (global pooling; the ViT interpolates its position table), but another
    field of view shows the galaxy and its surroundings at another relative scale than the
    encoder learned, so such embeddings are not comparable with the training set's."""
    trained = (meta.get("data") or {}).get("stamp") or meta.get("stamp")  # pretrain | adapt run
    if trained is None or tuple(trained) == tuple(dataset.stamp):
        return None
    return (f"note: these stamps are {dataset.stamp[0]}x{dataset.stamp[1]} pixels but the encoder "
            f"was trained on {trained[0]}x{trained[1]}; it runs on them, but their embeddings are "
            f"not comparable with those of {trained[0]}x{trained[1]} stamps: render or cut the "
            "stamps to the training size")


def _encoder_and_shards(run_dir: str | Path, folders, log: Callable[[str], None] | None):
    """``(encoder, normaliser, shards)``: the run's encoder and the shards to embed, read in its
    bands; ``log`` gets a note when the stamps' size is not the training one."""
    from sim2obs.pretrain.train import load_encoder

    encoder, normalizer, meta = load_encoder(run_dir)
    ds = ShardDataset(folders, bands=normalizer.bands, bands_hint=ENCODER_BANDS_HINT)
    note = other_stamp_note(meta, ds)
    if note and log:
        log(note)
    return encoder, normalizer, ds


def embed_folder(run_dir: str | Path, folders, out_file: str | Path, device: str = "cpu",
                 batch_size: int = 256, progress: bool = True,
                 log: Callable[[str], None] | None = None) -> Path:
    """Embed every galaxy of ``folders`` with the run's encoder and write the embeddings file
    (``log`` gets a note when the stamps' size is not the training one)."""
    import h5py

    from sim2obs.pretrain.train import checkpoint_hash

    encoder, normalizer, ds = _encoder_and_shards(run_dir, folders, log)
    emb = compute_embeddings(encoder, normalizer, ds, batch_size, device, progress)
    labels = folder_labels(ds)
    with h5py.File(ds.files[0], "r") as f:
        domain = str(f.attrs.get("domain", "sim"))
        units = {k: str(f["labels"][k].attrs.get("unit", "")) for k in labels if k in f["labels"]}
    out_file = Path(out_file)
    with atomic_output(out_file) as tmp, h5py.File(tmp, "w") as f:
        f.create_dataset("embeddings", data=emb, track_times=False)
        # each row's survey: with several folders the same object_id appears once per survey
        f.create_dataset("survey", data=np.asarray(ds.surveys, dtype=object)[ds.file_of].astype("S"),
                         track_times=False)
        g = f.create_group("labels")
        for k, v in labels.items():
            d = g.create_dataset(k, data=v, track_times=False)
            d.attrs["unit"] = units.get(k, "")
        f.attrs["model"] = f"{Path(run_dir).resolve()}@{checkpoint_hash(run_dir)}"
        f.attrs["domain"] = domain
        f.attrs["survey"] = ",".join(sorted(set(ds.surveys)))
        f.attrs["bands"] = list(ds.bands)
    ds.close()
    return out_file


def read_embeddings(path: str | Path) -> tuple[np.ndarray, dict[str, np.ndarray], dict]:
    """``(embeddings, labels, attrs)`` of an embeddings file."""
    import h5py

    path = Path(path)
    if not path.is_file():
        raise Sim2ObsDataError(f"embeddings file '{path}' does not exist; make it with `sim2obs embed`")
    with h5py.File(path, "r") as f:
        if "embeddings" not in f:
            raise Sim2ObsDataError(f"'{path}' has no /embeddings: not a sim2obs embeddings file")
        labels = {k: f["labels"][k][()] for k in f.get("labels", {})}
        return f["embeddings"][()], labels, dict(f.attrs)


# --------------------------------------------------------------------------------------------
# Probes
# --------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class ProbeScores:
    """Cross-validated scores of one regressor on one label."""

    r2: float
    bias: float
    nmad: float
    outlier_fraction: float
    n: int

    def as_row(self) -> str:
        return (f"R2 {self.r2:6.3f}  bias {self.bias:+.4f}  NMAD {self.nmad:.4f}  "
                f"outliers {100 * self.outlier_fraction:5.1f} %")

    def as_dict(self) -> dict[str, float | int | None]:
        """The scores as JSON-ready numbers (a non-finite value, e.g. R^2 of a constant label,
        becomes ``None``)."""
        return {k: (v if isinstance(v, int) or np.isfinite(v) else None)
                for k, v in (("r2", self.r2), ("bias", self.bias), ("nmad", self.nmad),
                             ("outlier_fraction", self.outlier_fraction), ("n", self.n))}


OUTLIER_THRESHOLD = 0.3
"""Outlier if |prediction - truth| > 0.3 (a factor of 2 for log10 quantities)."""
PHOTOZ_OUTLIER_THRESHOLD = 0.15
"""Photo-z outlier if |dz|/(1+z) > 0.15 (Hildebrandt et al. 2010, A&A 523, A31)."""

_UNIT_SUFFIXES = {"_gyr": "Gyr", "_kpc": "kpc", "_deg": "deg", "_arcsec": "arcsec"}


def outlier_threshold(label: str) -> float:
    """The outlier threshold :func:`regression_scores` applies to ``label``'s residuals."""
    return PHOTOZ_OUTLIER_THRESHOLD if label == "redshift" else OUTLIER_THRESHOLD


def residual_unit(label: str, unit: str = "") -> str:
    """Unit of the bias and NMAD that :func:`regression_scores` gives for ``label``.

    ``dz/(1+z)`` (dimensionless) for ``redshift``; ``dex`` for ``log_*`` labels (differences of
    log10 values); ``mag`` for ``mag_*``; otherwise the label's own unit: ``unit`` (the shard's
    ``unit`` attribute) when given, else one read from the name (``age_gyr`` -> Gyr,
    ``r_half_kpc`` -> kpc, ...), else ``""`` (unknown).
    """
    if label == "redshift":
        return "dz/(1+z)"
    if label.startswith("log_"):
        return "dex"
    if label.startswith("mag_"):
        return "mag"
    if unit:
        return unit
    return next((u for suf, u in _UNIT_SUFFIXES.items() if label.endswith(suf)), "")


def score_conventions(label: str, unit: str = "") -> str:
    """One line that says what :func:`regression_scores` measures for ``label``: the residual,
    its unit and the outlier definition (for a table header)."""
    thr = outlier_threshold(label)
    if label == "redshift":
        return (f"bias, NMAD of dz/(1+z) = (prediction - truth) / (1 + truth); "
                f"outlier: |dz|/(1+z) > {thr:g}; R2 on the label")
    u = residual_unit(label, unit)
    u_text = f" {u}" if u else ""
    return (f"bias, NMAD of prediction - truth in {u or 'the label units'}; "
            f"outlier: |prediction - truth| > {thr:g}{u_text}; R2 on the label")


def regression_scores(y_true: np.ndarray, y_pred: np.ndarray, label: str) -> ProbeScores:
    """R^2, median bias, NMAD and outlier fraction (photo-z conventions for redshift).

    With residuals ``d = y_pred - y_true`` (for ``redshift``: ``d = (y_pred - y_true) /
    (1 + y_true)``, Δz/(1+z)): ``bias = median(d)``, ``NMAD = 1.4826 median(|d - bias|)``,
    outlier fraction = mean(|d| > t) with ``t`` = :func:`outlier_threshold` (0.15 for redshift,
    0.3 otherwise), and ``R^2 = 1 - sum (y_pred - y_true)^2 / sum (y_true - mean y_true)^2`` on
    the label itself. Units: :func:`residual_unit`.
    """
    y_true = np.asarray(y_true, dtype=np.float64)
    y_pred = np.asarray(y_pred, dtype=np.float64)
    d = y_pred - y_true
    thresh = outlier_threshold(label)
    if label == "redshift":
        d = d / (1 + y_true)
    ss_res = np.sum((y_pred - y_true) ** 2)
    ss_tot = np.sum((y_true - y_true.mean()) ** 2)
    bias = float(np.median(d))
    return ProbeScores(
        r2=float(1 - ss_res / ss_tot) if ss_tot > 0 else float("nan"),
        bias=bias,
        nmad=float(NMAD_SCALE * np.median(np.abs(d - bias))),
        outlier_fraction=float(np.mean(np.abs(d) > thresh)),
        n=int(y_true.size),
    )


def _standardise(train: np.ndarray, test: np.ndarray):
    mu = train.mean(axis=0)
    sd = train.std(axis=0)
    sd[sd == 0] = 1.0
    return (train - mu) / sd, (test - mu) / sd


RIDGE_ALPHAS = tuple(np.logspace(-3, 4, 15))


def ridge_fit_predict(x_train, y_train, x_test, alphas=RIDGE_ALPHAS) -> np.ndarray:
    """Ridge regression on standardised features, alpha by exact leave-one-out error
    (closed form via the SVD: r_loo = r / (1 - H_ii))."""
    xt, xs = _standardise(x_train, x_test)
    ym = y_train.mean()
    u, s, vt = np.linalg.svd(xt, full_matrices=False)
    uty = u.T @ (y_train - ym)
    best, best_err = alphas[0], np.inf
    for a in alphas:
        f = s**2 / (s**2 + a)
        fitted = u @ (f * uty)
        h = np.einsum("ij,j,ij->i", u, f, u)
        loo = (y_train - ym - fitted) / np.clip(1 - h, 1e-12, None)
        err = np.mean(loo**2)
        if err < best_err:
            best, best_err = a, err
    coef = vt.T @ ((s / (s**2 + best)) * uty)
    return xs @ coef + ym


KNN_K = 10
"""Neighbours of the kNN probe."""


def knn_fit_predict(x_train, y_train, x_test, k: int = KNN_K) -> np.ndarray:
    """Mean label of the k nearest (Euclidean, standardised features) training galaxies."""
    from scipy.spatial import cKDTree

    xt, xs = _standardise(x_train, x_test)
    k = min(k, len(xt))
    _, idx = cKDTree(xt).query(xs, k=k)
    idx = idx.reshape(len(xs), k)
    return y_train[idx].mean(axis=1)


def check_folds(folds: int, n_groups: int | None = None, label: str = "") -> None:
    """Raise :class:`Sim2ObsValueError` unless ``folds`` >= 2 and, when ``n_groups`` is given,
    ``n_groups`` >= ``folds`` (every fold must hold at least one galaxy to test on)."""
    if isinstance(folds, bool) or not isinstance(folds, int | np.integer) or folds < 2:
        raise Sim2ObsValueError(
            f"--folds must be an integer >= 2 (K-fold cross-validation), got {folds!r}"
        )
    if n_groups is not None and n_groups < folds:
        what = f" with a finite '{label}'" if label else ""
        fix = f"; use --folds {n_groups} or less" if n_groups >= 2 else ""
        raise Sim2ObsValueError(
            f"too few galaxies to probe: --folds {folds} needs at least {folds} galaxies{what}, "
            f"only {n_groups} available{fix}"
        )


def group_folds(groups: np.ndarray, folds: int, seed: int = 0, label: str = "") -> np.ndarray:
    """Fold index (0 .. folds-1) of every row, whole groups at a time.

    The distinct values of ``groups`` (galaxies: ``object_id``), numbered in order of first
    appearance, are shuffled with ``numpy.random.default_rng(seed).permutation`` and dealt
    round-robin to the folds, so every row of one group is in the same fold, the folds hold
    ``floor`` or ``ceil`` of ``n_groups / folds`` groups each, and the assignment is a function
    of ``(groups, folds, seed)``. With one row per group this is the ordinary shuffled K-fold
    split: with ``perm = default_rng(seed).permutation(N)``, row ``perm[m]`` is in fold
    ``m mod folds``. Raises :func:`check_folds`'s error (naming ``label``) when there are fewer
    groups than folds.
    """
    _, first, inv = np.unique(np.asarray(groups), return_index=True, return_inverse=True)
    n_groups = len(first)
    check_folds(folds, n_groups, label)
    rank = np.empty(n_groups, dtype=int)
    rank[np.argsort(first, kind="stable")] = np.arange(n_groups)  # order of first appearance
    perm = np.random.default_rng(seed).permutation(n_groups)
    fold_of_group = np.empty(n_groups, dtype=int)
    fold_of_group[perm] = np.arange(n_groups) % folds
    return fold_of_group[rank[inv.ravel()]]


def probe(embeddings: np.ndarray, y: np.ndarray, label: str, folds: int = 5, seed: int = 0,
          k: int = KNN_K, groups: np.ndarray | None = None) -> dict[str, ProbeScores]:
    """K-fold cross-validated ridge and kNN probes of ``y`` from ``embeddings``.

    Rows with a non-finite ``y`` are left out. Each fold in turn is predicted by a ridge
    regression (:func:`ridge_fit_predict`, alpha by exact leave-one-out on the other folds) and a
    ``k``-nearest-neighbour mean (:func:`knn_fit_predict`) fitted on the other folds; the scores
    (:func:`regression_scores`) are computed once on all out-of-fold predictions.

    ``groups`` (N,): the galaxy of every row, normally ``object_id``. Rows of one group are
    always in the same fold (:func:`group_folds`), so the same galaxy rendered by several surveys
    is never both trained and tested on (that leak inflates R^2). Default: every row its own
    group. Raises :class:`Sim2ObsValueError` if ``folds`` < 2 or there are fewer groups with a
    finite ``y`` than folds. Returns ``{"linear": scores, "knn": scores}``.
    """
    check_folds(folds)  # before the data are looked at
    if k < 1:
        raise Sim2ObsValueError(f"probe: k (kNN neighbours) must be >= 1, got {k}")
    y = np.asarray(y, dtype=np.float64)
    ok = np.isfinite(y)
    x, y = np.asarray(embeddings, dtype=np.float64)[ok], y[ok]
    if groups is None:
        groups = np.arange(y.size)
    elif len(groups) != len(ok):
        raise Sim2ObsValueError(f"probe: {len(groups)} groups for {len(ok)} rows")
    else:
        groups = np.asarray(groups)[ok]
    fold_of = group_folds(groups, folds, seed, label)
    preds = {"linear": np.empty_like(y), "knn": np.empty_like(y)}
    for f in range(folds):
        tr, te = fold_of != f, fold_of == f
        preds["linear"][te] = ridge_fit_predict(x[tr], y[tr], x[te])
        preds["knn"][te] = knn_fit_predict(x[tr], y[tr], x[te], k)
    return {name: regression_scores(y, p, label) for name, p in preds.items()}


def _json_ready(obj):
    if isinstance(obj, ProbeScores):
        return obj.as_dict()
    if isinstance(obj, dict):
        return {str(k): _json_ready(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_json_ready(v) for v in obj]
    if isinstance(obj, Path):
        return str(obj)
    if isinstance(obj, bool | np.bool_):
        return bool(obj)
    if isinstance(obj, int | np.integer):
        return int(obj)
    if isinstance(obj, float | np.floating):
        return float(obj) if np.isfinite(obj) else None
    return obj


def write_probe_json(path: str | Path, result: dict) -> Path:
    """Write the probe command's ``result`` to ``path`` as JSON, atomically (a reader never sees
    half a file); :class:`ProbeScores` become dicts and non-finite numbers ``null``."""
    import json

    path = Path(path)
    with atomic_output(path) as tmp:
        tmp.write_text(json.dumps(_json_ready(result), indent=2, allow_nan=False) + "\n")
    return path


def probe_run(run_dir: str | Path, folders, labels=("log_mstar",), folds: int = 5, seed: int = 0,
              device: str = "cpu", batch_size: int = 256,
              log: Callable[[str], None] | None = None) -> dict:
    """``sim2obs probe``: the run's encoder and a random-init one of the same architecture,
    probed for each label (:func:`probe`, folds grouped by ``object_id``), with the collapse
    checks; returns the result :func:`write_probe_json` writes (scores as :class:`ProbeScores`).

    The folds and the number of galaxies with each label are checked before any embedding is
    computed; ``log`` gets a note when the stamps' size is not the training one."""
    import h5py

    from sim2obs import __version__
    from sim2obs.pretrain.losses import effective_rank, embedding_std
    from sim2obs.pretrain.train import checkpoint_hash

    check_folds(folds)  # before anything is loaded
    if batch_size < 1:
        raise Sim2ObsValueError(f"--batch-size must be >= 1, got {batch_size}")
    labels = list(labels)
    encoder, normalizer, ds = _encoder_and_shards(run_dir, folders, log)
    try:
        values = folder_labels(ds)
        if "object_id" in labels:
            raise Sim2ObsValueError(
                "object_id is the galaxies' identifier, not a quantity to predict; probe a label "
                f"such as {[k for k in sorted(values) if k != 'object_id'][:6]}"
            )
        missing = [lab for lab in labels if lab not in values]
        if missing:
            raise Sim2ObsValueError(_missing_labels_message(ds, missing, values))
        ids = np.asarray(ds.object_id)
        counts = {}  # label -> (stamps, galaxies) with a finite value
        for lab in labels:
            ok = np.isfinite(values[lab])
            counts[lab] = (int(ok.sum()), len(np.unique(ids[ok])))
            check_folds(folds, counts[lab][1], lab)
        with h5py.File(ds.files[0], "r") as f:
            units = {lab: str(f["labels"][lab].attrs.get("unit", "")) for lab in labels}
        rand_enc, _ = random_init_encoder(run_dir, seed=seed)
        emb = {name: compute_embeddings(enc, normalizer, ds, batch_size=batch_size, device=device)
               for name, enc in (("pretrained", encoder), ("random-init", rand_enc))}
    finally:
        ds.close()
    collapse = {}
    for name, e in emb.items():
        t = torch.from_numpy(e)
        collapse[name] = {"embedding_std": embedding_std(t, normalize=True),
                          "effective_rank": effective_rank(t), "dim": int(e.shape[1]),
                          "n_embeddings": int(e.shape[0])}
    scores = {}
    for lab in labels:
        scores[lab] = {"residual_unit": residual_unit(lab, units[lab]),
                       "outlier_threshold": outlier_threshold(lab),
                       "conventions": score_conventions(lab, units[lab]),
                       "n_stamps": counts[lab][0], "n_galaxies": counts[lab][1]}
        for name, e in emb.items():
            scores[lab][name] = probe(e, values[lab], lab, folds=folds, seed=seed, k=KNN_K, groups=ids)
    return {"sim2obs_version": __version__, "run": Path(run_dir).resolve(),
            "checkpoint_hash": checkpoint_hash(run_dir),
            "folders": [Path(f).resolve() for f in folders], "labels": labels,
            "folds": folds, "seed": seed, "knn_k": KNN_K,
            "n_stamps": len(ids), "n_galaxies": len(np.unique(ids)),
            "collapse": collapse, "scores": scores}


def random_init_encoder(run_dir: str | Path, seed: int = 0):
    """The run's encoder architecture with random weights drawn from ``seed`` (the probe's
    baseline), and the run's normaliser."""
    from sim2obs import encoders
    from sim2obs.pretrain.train import load_encoder

    with torch.random.fork_rng(devices=[]):  # the caller's global RNG is left as it was
        _, normalizer, ckpt = load_encoder(run_dir)
        torch.manual_seed(seed)
        enc = encoders.build(**ckpt["encoder_config"]).eval()
    return enc, normalizer
