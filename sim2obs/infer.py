"""Stellar-population inference with an adapted run: estimates with calibrated 68 % intervals.

:func:`predict` returns, per galaxy and label, the ensemble mean and the 16th/84th percentiles
of the (mixture) predictive distribution, its distances from the mean stretched by the run's
calibration factor for that interval (68 % or 95 %).
:func:`infer` writes them as the predictions CSV of ``DESIGN.md`` (``object_id``, then per label
``NAME``, ``NAME_p16``, ``NAME_p84``, and ``NAME_true`` when the input has truth), optionally a
FITS table, and -- when truth is present -- scores (bias, NMAD, outlier fraction, R^2, the
coverage of the 68 % and 95 % intervals) and a predicted-vs-true figure.
"""

from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from sim2obs._atomic import atomic_output
from sim2obs.data.dataset import ENCODER_BANDS_HINT, ShardDataset
from sim2obs.errors import Sim2ObsValueError
from sim2obs.heads import (
    INTERVALS,
    LabelScaler,
    interval_coverage,
    mixture_moments,
    mixture_quantiles,
)

#: Percentiles of a Gaussian at -1 and +1 sigma (Phi(-1), Phi(1)), and at -2 and +2 sigma.
(P16, P84), (P02, P98) = INTERVALS["68"], INTERVALS["95"]


@dataclass(frozen=True)
class Predictions:
    """Per-galaxy estimates: ``mean``, ``p16``, ``p84``, ``p02``, ``p98``, ``truth`` are
    ``[N, L]`` arrays in label units (truth NaN where unknown)."""

    object_id: np.ndarray
    labels: tuple[str, ...]
    units: dict
    mean: np.ndarray
    p16: np.ndarray
    p84: np.ndarray
    p02: np.ndarray
    p98: np.ndarray
    truth: np.ndarray

    def __post_init__(self) -> None:
        n, nl = len(self.object_id), len(self.labels)
        for k in ("mean", "p16", "p84", "p02", "p98", "truth"):
            if getattr(self, k).shape != (n, nl):
                raise Sim2ObsValueError(f"Predictions.{k} must be [{n}, {nl}]")

    @property
    def has_truth(self) -> bool:
        return bool(np.isfinite(self.truth).any())


@torch.no_grad()
def predict(run_dir: str | Path, folders, device: str = "cpu", batch_size: int = 256,
            progress: bool = True) -> Predictions:
    """Predictions of the adapted run ``run_dir`` for every galaxy of the shard ``folders``."""
    from tqdm.auto import tqdm

    from sim2obs.adapters.loop import interval_scales, load_adapted
    from sim2obs.pretrain.evaluate import folder_labels
    from sim2obs.pretrain.train import resolve_device

    model, ckpt = load_adapted(run_dir)
    dev = resolve_device(device)
    model = model.to(dev)
    scaler = LabelScaler.from_dict(ckpt["label_scaler"])
    scale = interval_scales(ckpt)
    ds = ShardDataset(folders, bands=model.normalizer.bands, bands_hint=ENCODER_BANDS_HINT)
    run_stamp = ckpt.get("stamp")
    if run_stamp is not None and tuple(run_stamp) != ds.stamp:
        raise Sim2ObsValueError(f"'{run_dir}' was trained on {tuple(run_stamp)} stamps but {folders} "
                                f"has {ds.stamp}; ingest/render with --stamp {run_stamp[0]}")
    mus, sigmas = [], []
    for s in tqdm(range(0, len(ds), batch_size), desc="infer", disable=not progress):
        images, ivar = ds.raw_many(np.arange(s, min(len(ds), s + batch_size)))
        _, mu, log_sigma = model(torch.from_numpy(images).to(dev), ivar)
        mus.append(mu.cpu().numpy().astype(np.float64))
        sigmas.append(log_sigma.exp().cpu().numpy().astype(np.float64))
    mu, sigma = np.concatenate(mus, 1), np.concatenate(sigmas, 1)
    mean, _ = mixture_moments(mu, sigma)

    def q(p: float, lvl: str) -> np.ndarray:  # calibrated: distances from the mean scaled per level
        return scaler.inverse_mean(mean + scale[lvl] * (mixture_quantiles(mu, sigma, p) - mean))

    p16, p84 = q(P16, "68"), q(P84, "68")
    # the levels are calibrated separately; keep the 95 % interval around the 68 % one
    p02, p98 = np.minimum(q(P02, "95"), p16), np.maximum(q(P98, "95"), p84)
    have = folder_labels(ds)
    truth = np.stack([have[n].astype(np.float64) if n in have else np.full(len(ds), np.nan)
                      for n in scaler.names], axis=1)
    import h5py

    with h5py.File(ds.files[0], "r") as f:
        units = {n: str(f["labels"][n].attrs.get("unit", "")) for n in scaler.names if n in f["labels"]}
    ds.close()
    return Predictions(object_id=ds.object_id.copy(), labels=scaler.names, units=units,
                       mean=scaler.inverse_mean(mean), p16=p16, p84=p84, p02=p02, p98=p98, truth=truth)


def scores(pred: Predictions) -> dict[str, dict[str, float]]:
    """Per label with truth: bias, NMAD, outlier fraction, R^2 (photo-z conventions for
    redshift, as in :func:`sim2obs.pretrain.evaluate.regression_scores`) and the coverage of the
    68 % and 95 % intervals."""
    from sim2obs.pretrain.evaluate import regression_scores

    out = {}
    for j, name in enumerate(pred.labels):
        ok = np.isfinite(pred.truth[:, j])
        if ok.sum() < 3:
            continue
        s = regression_scores(pred.truth[ok, j], pred.mean[ok, j], name)
        c68 = interval_coverage(pred.truth[ok, j:j + 1], pred.p16[ok, j:j + 1], pred.p84[ok, j:j + 1])
        c95 = interval_coverage(pred.truth[ok, j:j + 1], pred.p02[ok, j:j + 1], pred.p98[ok, j:j + 1])
        out[name] = {"n": s.n, "bias": s.bias, "nmad": s.nmad, "outlier_fraction": s.outlier_fraction,
                     "r2": s.r2, "coverage_68": float(c68[0]), "coverage_95": float(c95[0])}
    return out


def write_csv(pred: Predictions, path: str | Path) -> Path:
    """The predictions CSV (atomically)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    cols = ["object_id"]
    for n in pred.labels:
        cols += [n, f"{n}_p16", f"{n}_p84"] + ([f"{n}_true"] if pred.has_truth else [])
    with atomic_output(path) as tmp, open(tmp, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(cols)
        for i, oid in enumerate(pred.object_id):
            row: list = [int(oid)]
            for j, _ in enumerate(pred.labels):
                row += [f"{pred.mean[i, j]:.6g}", f"{pred.p16[i, j]:.6g}", f"{pred.p84[i, j]:.6g}"]
                if pred.has_truth:
                    row.append(f"{pred.truth[i, j]:.6g}")
            w.writerow(row)
    return path


def write_fits(pred: Predictions, path: str | Path) -> Path:
    """The same table as FITS (astropy), with units in the column metadata."""
    from astropy.table import Table

    t = Table()
    t["object_id"] = pred.object_id
    for j, n in enumerate(pred.labels):
        unit = pred.units.get(n) or None
        for suffix, arr in (("", pred.mean), ("_p16", pred.p16), ("_p84", pred.p84)):
            t[n + suffix] = arr[:, j]
            t[n + suffix].description = f"{n} {'estimate' if not suffix else suffix[1:] + ' percentile'}"
            t[n + suffix].meta["unit_text"] = unit or ""
        if pred.has_truth:
            t[n + "_true"] = pred.truth[:, j]
    path = Path(path)
    with atomic_output(path) as tmp:
        t.write(tmp, format="fits", overwrite=True)
    return path


def predicted_vs_true(pred: Predictions, path: str | Path, title: str = "") -> Path:
    """One panel per label with truth: estimate with 68 % interval vs truth, the 1:1 line and
    the scores in the corner."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    sc = scores(pred)
    names = [n for n in pred.labels if n in sc]
    if not names:
        raise Sim2ObsValueError("the input has no truth labels to plot against")
    fig = Figure(figsize=(4.2 * len(names), 4.2))
    FigureCanvasAgg(fig)
    for k, n in enumerate(names):
        j = pred.labels.index(n)
        ax = fig.add_subplot(1, len(names), k + 1)
        ok = np.isfinite(pred.truth[:, j])
        t, m = pred.truth[ok, j], pred.mean[ok, j]
        err = np.stack([m - pred.p16[ok, j], pred.p84[ok, j] - m])
        ax.errorbar(t, m, yerr=np.maximum(err, 0), fmt=".", ms=2, alpha=0.4, elinewidth=0.5)
        lo, hi = np.nanmin([t.min(), m.min()]), np.nanmax([t.max(), m.max()])
        ax.plot([lo, hi], [lo, hi], "k--", lw=1)
        s = sc[n]
        ax.text(0.03, 0.97, f"NMAD {s['nmad']:.3f}\nbias {s['bias']:+.3f}\nR$^2$ {s['r2']:.2f}\n"
                f"68% cov. {s['coverage_68']:.2f}", transform=ax.transAxes, va="top", fontsize=9)
        unit = pred.units.get(n, "")
        ax.set_xlabel(f"true {n}" + (f" [{unit}]" if unit else ""))
        ax.set_ylabel(f"predicted {n}")
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    path = Path(path)
    with atomic_output(path) as tmp:
        fig.savefig(tmp, format="png", dpi=100)
    return path


def infer(run_dir: str | Path, folders, out_csv: str | Path, fits: str | Path | None = None,
          plot: str | Path | None = None, device: str = "cpu", progress: bool = True
          ) -> tuple[Predictions, dict]:
    """Predict, write the CSV (and FITS), and when truth exists score and plot; returns
    ``(predictions, scores)`` (scores empty without truth)."""
    pred = predict(run_dir, folders, device=device, progress=progress)
    write_csv(pred, out_csv)
    if fits is not None:
        write_fits(pred, fits)
    sc = scores(pred) if pred.has_truth else {}
    if sc and plot is not None:
        predicted_vs_true(pred, plot, title=f"{Path(run_dir).name} on {', '.join(map(str, folders))}")
    return pred, sc
