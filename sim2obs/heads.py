"""Stellar-population regression heads with uncertainties.

* :class:`GaussianHead` — multi-output heteroscedastic regression: for each of ``L`` labels a
  mean ``mu`` and a log standard deviation ``log_sigma`` (Nix & Weigend 1994; Kendall & Gal
  2017, NeurIPS). Shapes: features ``[N, F]`` -> ``(mu [N, L], log_sigma [N, L])``.
* :func:`gaussian_nll` — the matching negative log-likelihood, with NaN labels masked (a galaxy
  without, say, a metallicity still trains the other outputs).
* :class:`LabelScaler` — labels are standardised with source-training statistics, stored in the
  checkpoint, so the head works in units of one standard deviation and predictions are mapped back.
* :func:`mixture_moments`, :func:`mixture_quantiles` — a deep ensemble (Lakshminarayanan et al.
  2017, NeurIPS) is the equal-weight mixture of its members' Gaussians; its percentiles are
  found by bisection on the mixture CDF.
* :func:`conformal_interval_scale` — post-hoc calibration of each interval level separately:
  split conformal prediction with a normalised nonconformity score (Papadopoulos et al. 2002,
  ECML; Lei et al. 2018, JASA 113, 1094): the factor by which an interval's two half-widths are
  stretched so that it covers the wanted fraction of held-out data. One factor per label *and*
  level, so heavy-tailed residuals can need a wider 95 % but not a wider 68 % interval — a single
  sigma factor cannot do both.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor, nn

from sim2obs.errors import Sim2ObsDataError, Sim2ObsValueError

#: log-sigma is clamped to this range (in standardised units) for numerical stability:
#: sigma between ~0.002 and ~20 standard deviations of the label.
LOG_SIGMA_MIN, LOG_SIGMA_MAX = -6.0, 3.0


class GaussianHead(nn.Module):
    """MLP ``[N, F] -> (mu [N, L], log_sigma [N, L])`` for standardised labels.

    ``hidden = 0`` gives a linear head. The output layer starts with small weights so that the
    initial predictions are ~N(0, 1), the standardised prior.
    """

    def __init__(self, in_dim: int, n_labels: int, hidden: int = 128, dropout: float = 0.0) -> None:
        super().__init__()
        if in_dim < 1 or n_labels < 1:
            raise Sim2ObsValueError(f"GaussianHead needs in_dim >= 1 and n_labels >= 1, got "
                                    f"{in_dim}, {n_labels}")
        self.n_labels = n_labels
        layers: list[nn.Module] = []
        d = in_dim
        if hidden > 0:
            layers += [nn.Linear(in_dim, hidden), nn.ReLU(inplace=True)]
            if dropout > 0:
                layers.append(nn.Dropout(dropout))
            d = hidden
        self.body = nn.Sequential(*layers)
        self.out = nn.Linear(d, 2 * n_labels)
        nn.init.normal_(self.out.weight, std=1e-3)
        nn.init.zeros_(self.out.bias)

    def forward(self, h: Tensor) -> tuple[Tensor, Tensor]:
        o = self.out(self.body(h))
        mu, log_sigma = o[:, : self.n_labels], o[:, self.n_labels:]
        return mu, log_sigma.clamp(LOG_SIGMA_MIN, LOG_SIGMA_MAX)


def gaussian_nll(mu: Tensor, log_sigma: Tensor, y: Tensor) -> Tensor:
    """Mean Gaussian negative log-likelihood over the finite entries of ``y`` (``[N, L]``).

    ``0.5 ((y - mu) / sigma)^2 + log sigma + 0.5 log(2 pi)`` per entry; NaN labels are masked;
    returns 0 (with a gradient path) if no label is finite.
    """
    if mu.shape != y.shape or log_sigma.shape != y.shape:
        raise Sim2ObsValueError(f"shapes differ: mu {tuple(mu.shape)}, log_sigma "
                                f"{tuple(log_sigma.shape)}, labels {tuple(y.shape)}")
    mask = torch.isfinite(y)
    y0 = torch.where(mask, y, torch.zeros_like(y))
    z = (y0 - mu) * torch.exp(-log_sigma)
    nll = 0.5 * z * z + log_sigma + 0.5 * math.log(2 * math.pi)
    n = mask.sum()
    return (nll * mask).sum() / n.clamp(min=1)


@dataclass(frozen=True)
class LabelScaler:
    """Per-label standardisation ``(y - mean) / std`` with statistics from the source training set."""

    names: tuple[str, ...]
    mean: tuple[float, ...]
    std: tuple[float, ...]

    def __post_init__(self) -> None:
        if not (len(self.names) == len(self.mean) == len(self.std)) or not self.names:
            raise Sim2ObsValueError("LabelScaler needs one mean and std per label name")
        bad = [n for n, m, s in zip(self.names, self.mean, self.std, strict=True)
               if not (math.isfinite(m) and math.isfinite(s) and s > 0)]
        if bad:
            raise Sim2ObsDataError(f"labels {bad} have no finite spread in the training data; "
                                   "drop them from --labels")

    @classmethod
    def fit(cls, names, y: np.ndarray) -> LabelScaler:
        """Statistics of ``y`` (``[N, L]``, NaN ignored)."""
        y = np.asarray(y, dtype=np.float64)
        names = tuple(names)
        missing = [n for n, c in zip(names, y.T, strict=True) if np.isfinite(c).sum() < 2]
        if missing:
            raise Sim2ObsDataError(f"labels {missing} have fewer than 2 finite values in the "
                                   "source training data; drop them from --labels")
        return cls(names, tuple(float(v) for v in np.nanmean(y, 0)),
                   tuple(float(v) for v in np.nanstd(y, 0)))

    def transform(self, y: np.ndarray) -> np.ndarray:
        return ((np.asarray(y, np.float64) - np.array(self.mean)) / np.array(self.std)).astype(np.float32)

    def inverse_mean(self, mu: np.ndarray) -> np.ndarray:
        return np.asarray(mu, np.float64) * np.array(self.std) + np.array(self.mean)

    def inverse_sigma(self, sigma: np.ndarray) -> np.ndarray:
        return np.asarray(sigma, np.float64) * np.array(self.std)

    def to_dict(self) -> dict:
        return {"names": list(self.names), "mean": list(self.mean), "std": list(self.std)}

    @classmethod
    def from_dict(cls, d: dict) -> LabelScaler:
        return cls(tuple(d["names"]), tuple(d["mean"]), tuple(d["std"]))


def mixture_moments(mu: np.ndarray, sigma: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean and standard deviation of an equal-weight Gaussian mixture over axis 0.

    ``mu``, ``sigma``: ``[K, N, L]`` -> ``[N, L]`` each; variance = E[sigma^2 + mu^2] - mean^2.
    """
    mean = mu.mean(0)
    var = (sigma**2 + mu**2).mean(0) - mean**2
    return mean, np.sqrt(np.maximum(var, 0.0))


def mixture_quantiles(mu: np.ndarray, sigma: np.ndarray, q: float, iters: int = 60) -> np.ndarray:
    """Quantile ``q`` of an equal-weight Gaussian mixture (``[K, N, L]`` -> ``[N, L]``) by
    bisection on its CDF (exact to ~1e-15 of the bracket after 60 halvings)."""
    from scipy.special import ndtr

    if not 0.0 < q < 1.0:
        raise Sim2ObsValueError(f"quantile must be in (0, 1), got {q}")
    lo = (mu - 10 * sigma).min(0)
    hi = (mu + 10 * sigma).max(0)
    for _ in range(iters):
        mid = 0.5 * (lo + hi)
        cdf = ndtr((mid[None] - mu) / sigma).mean(0)
        below = cdf < q
        lo = np.where(below, mid, lo)
        hi = np.where(below, hi, mid)
    return 0.5 * (lo + hi)


#: Central intervals reported by inference: name -> (lower, upper) probability, the Gaussian
#: mass within +-1 and +-2 sigma (Phi(-1), Phi(1); Phi(-2), Phi(2)).
INTERVALS: dict[str, tuple[float, float]] = {
    "68": (0.15865525393145707, 0.8413447460685429),
    "95": (0.022750131948179195, 0.9772498680518208),
}
#: Nominal coverage of each interval (0.6827, 0.9545).
NOMINAL: dict[str, float] = {k: hi - lo for k, (lo, hi) in INTERVALS.items()}


def conformal_interval_scale(y: np.ndarray, centre: np.ndarray, lo: np.ndarray, hi: np.ndarray,
                             level: float, min_n: int = 10) -> np.ndarray:
    """Per-label factor ``s`` (``[L]``) such that ``[c - s (c - lo), c + s (hi - c)]`` covers a
    fraction ``level`` of held-out ``y`` (all arrays ``[N, L]``, NaN labels ignored).

    Split conformal prediction (Lei et al. 2018, JASA 113, 1094) with the normalised score
    ``r = (y - c) / (hi - c)`` above the centre and ``(c - y) / (c - lo)`` below it
    (Papadopoulos et al. 2002): ``s`` is the ``ceil((n + 1) level)``-th smallest ``r``, which
    gives coverage ``>= level`` on exchangeable new data (and ``< level + 1/(n+1)`` without ties).
    With ``k > n`` the largest ``r`` is used; labels with fewer than ``min_n`` finite values keep
    ``s = 1`` (the uncalibrated interval).
    """
    if not 0.0 < level < 1.0:
        raise Sim2ObsValueError(f"coverage level must be in (0, 1), got {level}")
    y, c = np.asarray(y, np.float64), np.asarray(centre, np.float64)
    up, down = np.asarray(hi, np.float64) - c, c - np.asarray(lo, np.float64)
    if np.any(up <= 0) or np.any(down <= 0):
        raise Sim2ObsValueError("interval bounds must lie on either side of the centre (lo < c < hi)")
    with np.errstate(invalid="ignore"):
        r = np.where(y >= c, (y - c) / up, (c - y) / down)
    out = np.ones(y.shape[1])
    for j in range(y.shape[1]):
        rj = np.sort(r[np.isfinite(r[:, j]), j])
        n = rj.size
        if n >= min_n:
            k = min(math.ceil((n + 1) * level), n)
            out[j] = float(rj[k - 1])
    return out


def interval_coverage(y: np.ndarray, lo: np.ndarray, hi: np.ndarray) -> np.ndarray:
    """Fraction of finite ``y`` inside ``[lo, hi]``, per label (``[L]``; NaN if none finite)."""
    ok = np.isfinite(y)
    inside = (y >= lo) & (y <= hi) & ok
    n = ok.sum(0)
    return np.where(n > 0, inside.sum(0) / np.maximum(n, 1), np.nan)
