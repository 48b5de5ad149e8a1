"""Distances between two sets of embeddings, each with a bootstrap confidence interval.

Every metric takes two arrays ``x`` (N, D) and ``y`` (M, D) (one row per galaxy) and returns a
float; :func:`embedding_gap` runs all of them with bootstrap confidence intervals and returns the
``"embedding"`` block of ``metrics.json`` (DESIGN.md):

* :func:`sinkhorn_divergence` - debiased entropic optimal transport (Feydy et al. 2019, AISTATS),
* :func:`mmd2_unbiased` + :func:`mmd_permutation_test` - kernel two-sample test (Gretton et al.
  2012, JMLR 13, 723),
* :func:`c2st_auc` - classifier two-sample test (Lopez-Paz & Oquab 2017, ICLR),
* :func:`frechet_distance` - Fréchet (2-Wasserstein between Gaussian fits) distance, as FID
  (Heusel et al. 2017, NeurIPS),
* :func:`prdc` - kNN precision/recall (Kynkäänniemi et al. 2019, NeurIPS) and density/coverage
  (Naeem et al. 2020, ICML).

Bootstrap intervals resample both sets with replacement (percentile interval; the random state is
a :class:`numpy.random.Generator` passed in, so results are reproducible).
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from sim2obs.errors import Sim2ObsValueError

# --------------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------------


def _check_pair(x, y, min_n: int = 2) -> tuple[np.ndarray, np.ndarray]:
    x = np.asarray(x, dtype=np.float64)
    y = np.asarray(y, dtype=np.float64)
    if x.ndim != 2 or y.ndim != 2:
        raise Sim2ObsValueError(f"embeddings must be 2-D (N, D); got shapes {x.shape} and {y.shape}")
    if x.shape[1] != y.shape[1]:
        raise Sim2ObsValueError(
            f"the two sets have different embedding sizes D: {x.shape[1]} vs {y.shape[1]} "
            "(embed both with the same model)"
        )
    if len(x) < min_n or len(y) < min_n:
        raise Sim2ObsValueError(f"need at least {min_n} objects per set, got {len(x)} and {len(y)}")
    if not (np.all(np.isfinite(x)) and np.all(np.isfinite(y))):
        raise Sim2ObsValueError("embeddings contain NaN or inf")
    return x, y


def standardise_pair(x, y) -> tuple[np.ndarray, np.ndarray]:
    """Both sets scaled by the mean and standard deviation of their union (per dimension);
    constant dimensions are left at zero."""
    x, y = _check_pair(x, y, 1)
    both = np.concatenate([x, y])
    mu = both.mean(axis=0)
    sd = both.std(axis=0)
    sd[sd == 0] = 1.0
    return (x - mu) / sd, (y - mu) / sd


def bootstrap_ci(stat: Callable[[np.ndarray, np.ndarray], float], nx: int, ny: int,
                 n_boot: int, rng: np.random.Generator, level: float = 0.95
                 ) -> tuple[float, float, np.ndarray]:
    """Percentile bootstrap interval of ``stat(ix, iy)`` over index resamples of both sets.

    ``stat`` receives index arrays (drawn with replacement, sizes ``nx`` and ``ny``) so that
    callers can reuse precomputed matrices. Returns ``(lo, hi, samples)``.
    """
    if n_boot < 1:
        return float("nan"), float("nan"), np.empty(0)
    vals = np.array([stat(rng.integers(0, nx, nx), rng.integers(0, ny, ny)) for _ in range(n_boot)])
    vals = vals[np.isfinite(vals)]
    if vals.size == 0:
        return float("nan"), float("nan"), vals
    a = (1 - level) / 2
    lo, hi = np.quantile(vals, [a, 1 - a])
    return float(lo), float(hi), vals


def _result(value: float, lo: float, hi: float, **extra) -> dict:
    out = {"value": float(value), "ci": [float(lo), float(hi)]}
    out.update({k: (float(v) if isinstance(v, float | np.floating) else v) for k, v in extra.items()})
    return out


# --------------------------------------------------------------------------------------------
# Sinkhorn divergence
# --------------------------------------------------------------------------------------------


def sinkhorn_divergence(x, y, blur: float = 0.5, scaling: float = 0.9, p: int = 2) -> float:
    """Debiased Sinkhorn divergence S_eps(x, y) between the empirical measures of two sets.

    Feydy et al. (2019, AISTATS, "Interpolating between optimal transport and MMD using Sinkhorn
    divergences"): ``S(a, b) = OT_eps(a, b) - (OT_eps(a, a) + OT_eps(b, b)) / 2`` with cost
    ``|x - y|^p / p`` and ``eps = blur^p``; it is >= 0, zero iff a = b, and tends to
    ``W_p^p / p`` as ``blur -> 0``. Computed with ``geomloss.SamplesLoss('sinkhorn', p, blur,
    scaling, debias=True, backend='tensorized')`` (uniform weights).

    x: (N, D), y: (M, D) -> float (units of the features squared for p = 2). Pass standardised
    features (:func:`standardise_pair`) so that no dimension dominates.
    """
    import torch
    from geomloss import SamplesLoss

    x, y = _check_pair(x, y, 1)
    loss = SamplesLoss("sinkhorn", p=p, blur=blur, scaling=scaling, debias=True,
                       backend="tensorized")
    # The many tiny kernels of geomloss's Sinkhorn loop are dominated by thread start-up when
    # torch runs multi-threaded on a busy machine (~100x slower on 2 shared cores): one thread.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with torch.no_grad():
            val = loss(torch.from_numpy(x), torch.from_numpy(y))
    finally:
        torch.set_num_threads(threads)
    return float(val)


def sinkhorn_excess(x, y, blur: float | None = None, scaling: float = 0.9, n_perm: int = 50,
                    n_boot: int = 100, rng: np.random.Generator | None = None,
                    level: float = 0.95) -> dict:
    """Sinkhorn divergence corrected for its finite-sample bias, with a permutation p-value.

    The empirical S_eps of two finite samples of *one* distribution is positive (it shrinks
    only like n^-1/2 to n^-2/D with the sample size), so the raw value cannot be read as "zero
    gap". Reported ``value`` = raw S_eps(x, y) minus ``null_mean``, the mean S_eps over
    ``n_perm`` random relabellings of the pooled sample (same sizes), so equal distributions
    give ~0. ``p_value`` = (1 + #{perm >= raw}) / (1 + n_perm). The interval is the percentile
    bootstrap spread (both sets resampled with replacement) re-centred on ``value``: resampling
    duplicates points and inflates S_eps, which shifts but hardly widens its distribution.
    ``blur`` defaults to half the median pairwise distance of the pooled sample (recorded).
    """
    x, y = _check_pair(x, y)
    rng = rng if rng is not None else np.random.default_rng(0)
    if blur is None:
        blur = 0.5 * median_bandwidth(x, y)
    raw = sinkhorn_divergence(x, y, blur, scaling)
    z = np.concatenate([x, y])
    m = len(x)
    null = []
    for _ in range(n_perm):
        p = rng.permutation(len(z))
        null.append(sinkhorn_divergence(z[p[:m]], z[p[m:]], blur, scaling))
    null = np.asarray(null)
    null_mean = float(null.mean()) if null.size else 0.0
    p_value = float((1 + (null >= raw).sum()) / (1 + n_perm)) if n_perm else float("nan")
    value = raw - null_mean
    lo, hi, boot = bootstrap_ci(lambda ix, iy: sinkhorn_divergence(x[ix], y[iy], blur, scaling),
                                len(x), len(y), n_boot, rng, level)
    if boot.size:
        med = float(np.median(boot))
        lo, hi = value - (med - lo), value + (hi - med)
    return _result(value, lo, hi, p_value=p_value, raw=raw, null_mean=null_mean,
                   blur=float(blur), n_perm=int(n_perm))


# --------------------------------------------------------------------------------------------
# MMD
# --------------------------------------------------------------------------------------------


def _sqdist(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    d = (a * a).sum(1)[:, None] + (b * b).sum(1)[None, :] - 2.0 * a @ b.T
    return np.maximum(d, 0.0)


def median_bandwidth(x, y) -> float:
    """Median heuristic: the median of the pairwise Euclidean distances of the pooled sample
    (Gretton et al. 2012, Sect. 8), computed on at most 2000 points."""
    z = np.concatenate([np.asarray(x, np.float64), np.asarray(y, np.float64)])
    if len(z) > 2000:
        z = z[np.linspace(0, len(z) - 1, 2000).astype(int)]
    d = _sqdist(z, z)[np.triu_indices(len(z), 1)]
    med = float(np.sqrt(np.median(d))) if d.size else 1.0
    return med if med > 0 else 1.0


def _mmd2_from_kernel(k: np.ndarray, ix: np.ndarray, iy: np.ndarray) -> float:
    """Unbiased MMD^2 from the pooled kernel matrix and row indices of the two samples.

    Pairs of the same original point (diagonal, or duplicates after a bootstrap resample) are
    left out of the within-set sums so that resampling does not add a positive bias.
    """
    kxx = k[np.ix_(ix, ix)]
    kyy = k[np.ix_(iy, iy)]
    kxy = k[np.ix_(ix, iy)]
    ox = ix[:, None] != ix[None, :]
    oy = iy[:, None] != iy[None, :]
    if not ox.any() or not oy.any():
        return float("nan")
    return float(kxx[ox].mean() + kyy[oy].mean() - 2.0 * kxy.mean())


def mmd2_unbiased(x, y, bandwidth: float | None = None) -> float:
    """Unbiased estimate of the squared maximum mean discrepancy with a Gaussian kernel.

    Gretton et al. (2012, JMLR 13, 723, Lemma 6)::

        MMD_u^2 = 1/(m(m-1)) sum_{i!=j} k(x_i, x_j) + 1/(n(n-1)) sum_{i!=j} k(y_i, y_j)
                  - 2/(mn) sum_{i,j} k(x_i, y_j),     k(a, b) = exp(-|a - b|^2 / (2 sigma^2))

    with ``sigma`` = :func:`median_bandwidth` unless given. x: (m, D), y: (n, D) -> float; it can
    be slightly negative when the two distributions are equal.
    """
    x, y = _check_pair(x, y)
    sigma = bandwidth or median_bandwidth(x, y)
    z = np.concatenate([x, y])
    k = np.exp(-_sqdist(z, z) / (2 * sigma**2))
    return _mmd2_from_kernel(k, np.arange(len(x)), np.arange(len(x), len(z)))


def mmd_permutation_test(x, y, n_perm: int = 200, rng: np.random.Generator | None = None,
                         bandwidth: float | None = None, n_boot: int = 0, level: float = 0.95
                         ) -> dict:
    """MMD^2 (:func:`mmd2_unbiased`) with a permutation-test p-value and a bootstrap interval.

    Under H0 (same distribution) the domain labels are exchangeable: the p-value is
    ``(1 + #{perm: MMD^2_perm >= MMD^2_obs}) / (1 + n_perm)`` over random relabellings of the
    pooled sample. Returns ``{"value", "ci", "p_value", "bandwidth", "n_perm"}``.
    """
    x, y = _check_pair(x, y)
    rng = rng if rng is not None else np.random.default_rng(0)
    sigma = bandwidth or median_bandwidth(x, y)
    z = np.concatenate([x, y])
    k = np.exp(-_sqdist(z, z) / (2 * sigma**2))
    m, n = len(x), len(z)
    obs = _mmd2_from_kernel(k, np.arange(m), np.arange(m, n))
    count = 0
    for _ in range(n_perm):
        p = rng.permutation(n)
        if _mmd2_from_kernel(k, p[:m], p[m:]) >= obs:
            count += 1
    p_value = (1 + count) / (1 + n_perm)
    lo, hi, _ = bootstrap_ci(lambda ix, iy: _mmd2_from_kernel(k, ix, m + iy), m, n - m,
                             n_boot, rng, level)
    return _result(obs, lo, hi, p_value=float(p_value), bandwidth=float(sigma), n_perm=int(n_perm))


# --------------------------------------------------------------------------------------------
# Classifier two-sample test
# --------------------------------------------------------------------------------------------


def roc_auc(scores, labels) -> float:
    """ROC AUC as the Mann-Whitney U statistic: P(score of a positive > score of a negative),
    ties counted 1/2. scores, labels: (N,), labels in {0, 1}."""
    from scipy.stats import rankdata

    scores = np.asarray(scores, dtype=np.float64)
    labels = np.asarray(labels).astype(bool)
    n1, n0 = int(labels.sum()), int((~labels).sum())
    if n1 == 0 or n0 == 0:
        return float("nan")
    r = rankdata(scores)
    u = r[labels].sum() - n1 * (n1 + 1) / 2
    return float(u / (n1 * n0))


def fit_logistic(x: np.ndarray, t: np.ndarray, l2: float = 1.0) -> tuple[np.ndarray, float]:
    """L2-regularised logistic regression by L-BFGS (scipy): minimises
    ``sum_i log(1 + exp(-s_i (w.x_i + b))) + l2 |w|^2 / 2`` with ``s_i = 2 t_i - 1``.
    x: (N, D), t: (N,) in {0, 1} -> (w (D,), b)."""
    from scipy.optimize import minimize

    s = 2.0 * np.asarray(t, dtype=np.float64) - 1.0
    d = x.shape[1]

    def f(theta):
        w, b = theta[:d], theta[d]
        z = s * (x @ w + b)
        loss = np.logaddexp(0.0, -z).sum() + 0.5 * l2 * w @ w
        g = -s * np.exp(-np.logaddexp(0.0, z))  # d/dm of log(1+exp(-s m)) = -s sigmoid(-s m)
        return loss, np.concatenate([x.T @ g + l2 * w, [g.sum()]])

    res = minimize(f, np.zeros(d + 1), jac=True, method="L-BFGS-B", options={"maxiter": 500})
    return res.x[:d], float(res.x[d])


def stratified_folds(labels, k: int, rng: np.random.Generator) -> np.ndarray:
    """Fold index (0..k-1) per object, each class spread evenly over the folds."""
    labels = np.asarray(labels)
    fold = np.empty(len(labels), dtype=int)
    for c in np.unique(labels):
        idx = np.flatnonzero(labels == c)
        idx = idx[rng.permutation(idx.size)]
        fold[idx] = np.arange(idx.size) % k
    return fold


def c2st_scores(x, y, folds: int = 5, rng: np.random.Generator | None = None, l2: float = 1.0
                ) -> np.ndarray:
    """Out-of-fold probability that each object belongs to ``y`` (the second set).

    A logistic-regression domain classifier is trained with stratified ``folds``-fold cross
    validation on features standardised with each training fold's mean and std; every object
    is scored by the model that did not see it. Returns (N + M,) scores, x first.
    """
    x, y = _check_pair(x, y, folds)
    rng = rng if rng is not None else np.random.default_rng(0)
    z = np.concatenate([x, y])
    t = np.r_[np.zeros(len(x)), np.ones(len(y))]
    fold = stratified_folds(t, folds, rng)
    out = np.empty(len(z))
    for f in range(folds):
        tr, te = fold != f, fold == f
        mu, sd = z[tr].mean(0), z[tr].std(0)
        sd[sd == 0] = 1.0
        w, b = fit_logistic((z[tr] - mu) / sd, t[tr], l2)
        out[te] = 1.0 / (1.0 + np.exp(-(((z[te] - mu) / sd) @ w + b)))
    return out


def c2st_auc(x, y, folds: int = 5, rng: np.random.Generator | None = None, n_boot: int = 0,
             level: float = 0.95, l2: float = 1.0) -> dict:
    """Classifier two-sample test (Lopez-Paz & Oquab 2017): cross-validated ROC AUC of a domain
    classifier. 0.5 = the classifier cannot tell the sets apart; 1 = perfectly separable.

    AUC from :func:`roc_auc` on the out-of-fold scores of :func:`c2st_scores`. The interval
    bootstraps the scored objects (not the fits); ``p_value`` is the one-sided Mann-Whitney
    p-value of the out-of-fold scores (approximate: the folds' models are not independent).
    Returns ``{"value", "ci", "p_value", "folds", "scores"}`` (scores (N + M,) as an array).
    """
    from scipy.stats import mannwhitneyu

    rng = rng if rng is not None else np.random.default_rng(0)
    scores = c2st_scores(x, y, folds, rng, l2)
    m = len(x)
    t = np.r_[np.zeros(m), np.ones(len(scores) - m)]
    auc = roc_auc(scores, t)
    lo, hi, _ = bootstrap_ci(
        lambda ix, iy: roc_auc(np.r_[scores[ix], scores[m + iy]],
                               np.r_[np.zeros(ix.size), np.ones(iy.size)]),
        m, len(scores) - m, n_boot, rng, level)
    p = float(mannwhitneyu(scores[m:], scores[:m], alternative="greater").pvalue)
    return _result(auc, lo, hi, p_value=p, folds=int(folds)) | {"scores": scores}


# --------------------------------------------------------------------------------------------
# Fréchet distance
# --------------------------------------------------------------------------------------------


def frechet_distance(x, y) -> float:
    """Fréchet distance between Gaussian fits of two sets, as FID (Heusel et al. 2017)::

        d^2 = |mu_x - mu_y|^2 + Tr(S_x + S_y - 2 (S_x S_y)^{1/2})

    (the squared 2-Wasserstein distance between N(mu_x, S_x) and N(mu_y, S_y); Dowson & Landau
    1982). Matrix square root by ``scipy.linalg.sqrtm`` (real part; a tiny ridge is added when
    the product is singular). x: (N, D), y: (M, D) -> float, units of the features squared.
    """
    from scipy.linalg import sqrtm

    x, y = _check_pair(x, y)
    mu1, mu2 = x.mean(0), y.mean(0)
    s1 = np.atleast_2d(np.cov(x, rowvar=False))
    s2 = np.atleast_2d(np.cov(y, rowvar=False))
    covmean = sqrtm(s1 @ s2)
    if not np.all(np.isfinite(covmean)):
        eps = 1e-6 * np.eye(len(s1))
        covmean = sqrtm((s1 + eps) @ (s2 + eps))
    covmean = np.real(covmean)
    d2 = float(((mu1 - mu2) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2.0 * np.trace(covmean))
    return max(d2, 0.0)


# --------------------------------------------------------------------------------------------
# precision / recall / density / coverage
# --------------------------------------------------------------------------------------------


def _kth_nn_radius(a: np.ndarray, k: int) -> np.ndarray:
    """Distance from each point of ``a`` to its k-th nearest other point of ``a``."""
    from scipy.spatial import cKDTree

    d, _ = cKDTree(a).query(a, k=k + 1)
    return d[:, -1]


def prdc(real, fake, k: int = 5, chunk: int = 2048) -> dict[str, float]:
    """kNN precision, recall (Kynkäänniemi et al. 2019) and density, coverage (Naeem et al. 2020).

    With r_k(p) the distance from p to its k-th nearest neighbour within its own set and
    B(p, r) the closed ball::

        precision = 1/M sum_j 1[ exists i: y_j in B(x_i, r_k(x_i)) ]      (fake in real manifold)
        recall    = 1/N sum_i 1[ exists j: x_i in B(y_j, r_k(y_j)) ]      (real in fake manifold)
        density   = 1/(kM) sum_j sum_i 1[ y_j in B(x_i, r_k(x_i)) ]
        coverage  = 1/N sum_i 1[ exists j: y_j in B(x_i, r_k(x_i)) ]

    real x: (N, D), fake y: (M, D). Identical sets give 1, 1, >= 1, 1; two samples of one
    distribution give density ~ 1 and coverage ~ 1 - 2^-k for large samples.
    """
    x, y = _check_pair(real, fake, k + 1)
    rx = _kth_nn_radius(x, k)
    ry = _kth_nn_radius(y, k)
    in_x = np.zeros(len(y), dtype=np.int64)     # number of real balls holding each fake point
    covered = np.zeros(len(x), dtype=bool)
    for s in range(0, len(y), chunk):
        d = np.sqrt(_sqdist(x, y[s:s + chunk]))  # (N, c)
        inside = d <= rx[:, None] * (1 + 1e-12)
        in_x[s:s + chunk] = inside.sum(0)
        covered |= inside.any(1)
    recalled = np.zeros(len(x), dtype=bool)
    for s in range(0, len(x), chunk):
        d = np.sqrt(_sqdist(x[s:s + chunk], y))  # (c, M)
        recalled[s:s + chunk] = (d <= ry[None, :] * (1 + 1e-12)).any(1)
    return {
        "precision": float((in_x > 0).mean()),
        "recall": float(recalled.mean()),
        "density": float(in_x.sum() / (k * len(y))),
        "coverage": float(covered.mean()),
    }


def prdc_with_ci(real, fake, k: int = 5, n_boot: int = 0, rng: np.random.Generator | None = None,
                 level: float = 0.95) -> dict[str, dict]:
    """:func:`prdc` with intervals from half-sample subsampling (without replacement).

    A with-replacement bootstrap duplicates points, which collapses the k-NN radii the metrics
    are built on; random halves of both sets (m-out-of-n subsampling) keep the geometry but
    have wider spread than the full-sample value, so the interval is conservative.
    """
    x, y = _check_pair(real, fake, 2 * (k + 1))
    rng = rng if rng is not None else np.random.default_rng(0)
    point = prdc(x, y, k)
    samples = {key: [] for key in point}
    for _ in range(n_boot):
        ix = rng.choice(len(x), len(x) // 2, replace=False)
        iy = rng.choice(len(y), len(y) // 2, replace=False)
        for key, v in prdc(x[ix], y[iy], k).items():
            samples[key].append(v)
    a = (1 - level) / 2
    out = {}
    for key, v in point.items():
        lo, hi = (np.quantile(samples[key], [a, 1 - a]) if n_boot else (np.nan, np.nan))
        out[key] = _result(v, lo, hi)
    out["k"] = int(k)
    return out


# --------------------------------------------------------------------------------------------
# all together
# --------------------------------------------------------------------------------------------


def embedding_gap(x, y, rng: np.random.Generator | None = None, n_boot: int = 100,
                  n_perm: int = 200, folds: int = 5, blur: float | None = None, scaling: float = 0.9,
                  k: int = 5, level: float = 0.95, real: str = "y",
                  return_scores: bool = False) -> dict:
    """All embedding-space distances between set ``x`` (N, D) and set ``y`` (M, D).

    Features are first standardised with the mean and std of the union
    (:func:`standardise_pair`), so every metric is in units of the pooled spread and metrics of
    different encoders are comparable. ``real`` names the set used as the reference ("real")
    manifold of PRDC. Returns the ``"embedding"`` block of ``metrics.json``::

        {"c2st_auc": {"value", "ci", "p_value", "folds"},
         "sinkhorn": {"value", "ci", "p_value", "raw", "null_mean", "blur"},
         "mmd2": {"value", "ci", "p_value", "bandwidth", "n_perm"}, "frechet": {"value", "ci"},
         "prdc": {"precision": {"value", "ci"}, "recall": ..., "density": ..., "coverage": ..., "k"},
         "n": [N, M], "dim": D, "n_boot": n_boot, "level": level}

    With ``return_scores`` also ``(metrics, c2st_scores)`` (out-of-fold P(set y) per object).
    """
    rng = rng if rng is not None else np.random.default_rng(0)
    x, y = standardise_pair(x, y)
    _check_pair(x, y, max(folds, 2 * (k + 1)))
    out: dict = {}
    c2 = c2st_auc(x, y, folds=folds, rng=rng, n_boot=n_boot, level=level)
    scores = c2.pop("scores")
    out["c2st_auc"] = c2

    out["sinkhorn"] = sinkhorn_excess(x, y, blur=blur, scaling=scaling, n_perm=min(n_perm, 50),
                                      n_boot=n_boot, rng=rng, level=level)
    out["mmd2"] = mmd_permutation_test(x, y, n_perm=n_perm, rng=rng, n_boot=n_boot, level=level)
    # resampling with replacement inflates the Fréchet distance (duplicated points shrink the
    # covariances' rank); as for Sinkhorn, the bootstrap spread is re-centred on the estimate
    fd = frechet_distance(x, y)
    lo, hi, boot = bootstrap_ci(lambda ix, iy: frechet_distance(x[ix], y[iy]), len(x), len(y),
                                n_boot, rng, level)
    if boot.size:
        med = float(np.median(boot))
        lo, hi = max(fd - (med - lo), 0.0), fd + (hi - med)
    out["frechet"] = _result(fd, lo, hi)
    ref, other = (y, x) if real == "y" else (x, y)
    out["prdc"] = prdc_with_ci(ref, other, k=k, n_boot=min(n_boot, 50), rng=rng, level=level)
    out["n"] = [int(len(x)), int(len(y))]
    out["dim"] = int(x.shape[1])
    out["n_boot"] = int(n_boot)
    out["level"] = float(level)
    return (out, scores) if return_scores else out
