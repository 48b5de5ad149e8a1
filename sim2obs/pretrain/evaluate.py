"""Use and judge a pretrained encoder: embeddings files, linear/kNN probes, collapse checks.

* :func:`embed_folder` writes the embeddings file of DESIGN.md: ``/embeddings`` float32 (N, D),
  ``/labels/*`` copied from the shards (incl. ``object_id``), attributes ``model`` (run path and
  checkpoint hash), ``domain``, ``survey``, ``bands``.
* :func:`probe` fits a ridge regression (regularisation chosen by exact leave-one-out on the
  training folds, Golub, Heath & Wahba 1979) and a k-nearest-neighbour regressor from embeddings
  to a label, with K-fold cross-validation, and reports R^2, bias, NMAD and the outlier fraction
  (photo-z conventions for ``redshift``: residuals dz/(1+z), outliers |dz|/(1+z) > 0.15,
  Hildebrandt et al. 2010, A&A 523, A31; other labels: outliers |d| > 0.3, i.e. a factor of 2
  for log10 quantities).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from sim2obs._atomic import atomic_output
from sim2obs.data.dataset import MAD_TO_SIGMA, Normalizer, ShardDataset
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


def embed_folder(run_dir: str | Path, folders, out_file: str | Path, device: str = "cpu",
                 batch_size: int = 256, progress: bool = True) -> Path:
    """Embed every galaxy of ``folders`` with the run's encoder and write the embeddings file."""
    import h5py

    from sim2obs.pretrain.train import checkpoint_hash, load_encoder

    encoder, normalizer, _ = load_encoder(run_dir)
    ds = ShardDataset(folders, bands=normalizer.bands)
    emb = compute_embeddings(encoder, normalizer, ds, batch_size, device, progress)
    labels = folder_labels(ds)
    with h5py.File(ds.files[0], "r") as f:
        domain = str(f.attrs.get("domain", "sim"))
        units = {k: str(f["labels"][k].attrs.get("unit", "")) for k in labels if k in f["labels"]}
    out_file = Path(out_file)
    with atomic_output(out_file) as tmp, h5py.File(tmp, "w") as f:
        f.create_dataset("embeddings", data=emb, track_times=False)
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


def regression_scores(y_true: np.ndarray, y_pred: np.ndarray, label: str) -> ProbeScores:
    """R^2, median bias, NMAD and outlier fraction (photo-z conventions for redshift)."""
    y_true = np.asarray(y_true, dtype=np.float64)
    y_pred = np.asarray(y_pred, dtype=np.float64)
    d = y_pred - y_true
    thresh = 0.3
    if label == "redshift":
        d = d / (1 + y_true)
        thresh = 0.15
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


def knn_fit_predict(x_train, y_train, x_test, k: int = 10) -> np.ndarray:
    """Mean label of the k nearest (Euclidean, standardised features) training galaxies."""
    from scipy.spatial import cKDTree

    xt, xs = _standardise(x_train, x_test)
    k = min(k, len(xt))
    _, idx = cKDTree(xt).query(xs, k=k)
    idx = idx.reshape(len(xs), k)
    return y_train[idx].mean(axis=1)


def probe(embeddings: np.ndarray, y: np.ndarray, label: str, folds: int = 5, seed: int = 0,
          k: int = 10) -> dict[str, ProbeScores]:
    """K-fold cross-validated ridge and kNN probes of ``y`` from ``embeddings``."""
    ok = np.isfinite(y)
    x, y = np.asarray(embeddings, dtype=np.float64)[ok], np.asarray(y, dtype=np.float64)[ok]
    if y.size < 2 * folds:
        raise Sim2ObsValueError(f"only {y.size} galaxies with a finite '{label}': too few to probe")
    order = np.random.default_rng(seed).permutation(y.size)
    fold_of = np.empty(y.size, dtype=int)
    fold_of[order] = np.arange(y.size) % folds
    preds = {"linear": np.empty_like(y), "knn": np.empty_like(y)}
    for f in range(folds):
        tr, te = fold_of != f, fold_of == f
        preds["linear"][te] = ridge_fit_predict(x[tr], y[tr], x[te])
        preds["knn"][te] = knn_fit_predict(x[tr], y[tr], x[te], k)
    return {name: regression_scores(y, p, label) for name, p in preds.items()}


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
