"""Debiased Sinkhorn divergence between the source and target feature clouds (geomloss).

Feydy et al. (2019, AISTATS, "Interpolating between optimal transport and MMD using Sinkhorn
divergences"), computed by ``geomloss.SamplesLoss("sinkhorn", p, blur, scaling, debias=True)``
with uniform weights 1/N and 1/M::

    S_eps(a, b) = OT_eps(a, b) - (OT_eps(a, a) + OT_eps(b, b)) / 2,
    OT_eps(a, b) = min_pi  <pi, C> + eps KL(pi | a (x) b),    C(x, y) = |x - y|^p / p,
    eps = blur^p.

Note geomloss's cost convention: for p = 2 it is **|x - y|^2 / 2** (``squared_distances / 2``
in geomloss's ``cost_routines``), so S_eps -> W_2^2 / 2 as blur -> 0, and as blur -> infinity
it tends to an MMD with the kernel -C (Feydy et al. 2019), which for p = 2 only sees the
difference of the means. S_eps >= 0, = 0 iff the two measures are equal (it is exactly 0 for
identical point clouds, whatever blur), and it is smooth in the points, with gradient the
(entropic) transport displacement. Its value for two finite samples of one distribution shrinks
as blur grows: small blur behaves like exact OT (W_2 between samples ~ n^(-1/D), large in high
dimension), larger blur like an MMD (~ n^(-1/2); Genevay et al. 2019, AISTATS, "Sample
complexity of Sinkhorn divergences").

**Feature scale (``normalize``).** blur is a length in the units of the points. With
``normalize=True`` (default) both clouds are divided by a *detached* scalar scale

    c = sqrt(2 tr Cov(pooled f_s and f_t))  =  RMS distance between two random pooled points,

so blur is a fraction of the typical inter-point distance whatever the feature width or the
encoder's output scale, and the reported divergence is in units of c^p. Its *value* is invariant
to a global rescaling of the features, so shrinking the encoder's output cannot lower it from one
batch to the next (c is recomputed per batch). c is detached (a constant for autograd): the
gradient is the plain transport gradient of the rescaled clouds, with no term through the batch
statistics. With ``normalize=False`` blur is in the features' own units.

**Defaults.** ``blur = 0.5`` (of c), the scale the gap report uses (half the median pairwise
distance, :func:`sim2obs.gap.embedding.sinkhorn_excess`; for D >~ 10 the median and RMS
distances agree within a few per cent), so the adapter minimises the quantity the report measures.
Smaller blur approaches exact OT, whose mini-batch gradient in high dimension mostly pulls each
target point toward an arbitrary source partner: on N = 256 Gaussian clouds shifted by 1 sigma,
the mean cosine between each point's descent direction and the true shift is 0.69 at blur 0.5 but
0.08 at blur 0.05 for D = 128 (0.92 vs 0.29 for D = 16), while the batch-mean gradient is the same.
Use blur <~ 0.05 only when an OT value is wanted (the benchmark ``benchmarks/adapt.py`` checks
it against exact OT). ``scaling = 0.9`` (geomloss: > 0.9 for accuracy; the gap report's value),
``p = 2``.

**Backend.** ``"tensorized"`` (dense N x M cost matrices, memory ~ 3 N M floats plus the
backward) unless N M > 5000^2 (geomloss's own "auto" threshold) *and* pykeops is importable,
then ``"online"`` (KeOps, linear memory). geomloss's own "auto" would pick "online" above the
threshold even without pykeops and fail, hence the explicit choice. An explicit
``backend="online"`` without pykeops raises :class:`~sim2obs.errors.MissingDependencyError`.

**CPU threads.** geomloss's Sinkhorn loop runs many small kernels; on a shared CPU their
thread start-up can dominate (the gap report runs it single-threaded for that reason):
``num_threads=1`` is ~5x faster at N = 256 on 2 busy cores. Only the forward loop is affected.

Shapes: ``f_s`` [N, D], ``f_t`` [M, D] -> scalar. Diagnostics: ``divergence`` (the loss value,
units of c^p or of the features^p), ``scale`` (c; 1.0 without ``normalize``), ``blur_features``
(blur in the features' units, blur * c).
"""

from __future__ import annotations

import importlib.util
import math

import torch
from torch import Tensor

from sim2obs.adapters.base import Adapter, AdapterOutput
from sim2obs.errors import Sim2ObsValueError, require

BACKENDS = ("auto", "tensorized", "online")
#: N * M above which "auto" switches to KeOps' online backend: geomloss ``SamplesLoss``'s own
#: "auto" threshold (5000^2).
ONLINE_THRESHOLD = 5000**2


def keops_available() -> bool:
    """True when pykeops can be imported (geomloss's ``online`` backend needs it)."""
    return importlib.util.find_spec("pykeops") is not None


def pooled_rms_distance(f_s: Tensor, f_t: Tensor) -> float:
    """sqrt(2 tr Cov) of the pooled clouds (detached) = RMS distance between two pooled points;
    1.0 for a degenerate (constant) batch."""
    with torch.no_grad():
        z = torch.cat([f_s, f_t])
        z = z.float() if z.device.type == "mps" else z.double()  # MPS has no float64
        c = math.sqrt(2.0 * float(z.var(dim=0, unbiased=False).sum()))
    return c if c > 0 and math.isfinite(c) else 1.0


class SinkhornAdapter(Adapter):
    """Debiased Sinkhorn divergence (Feydy et al. 2019) via geomloss; see the module docstring.

    ``blur``: entropic scale (eps = blur^p), a fraction of the RMS inter-point distance when
    ``normalize`` else in feature units. ``scaling``: eps-scaling ratio in (0, 1). ``p``: 1 or 2.
    ``backend``: "auto", "tensorized" or "online". ``num_threads``: torch CPU threads during the
    Sinkhorn loop of CPU tensors (restored afterwards); None leaves torch's setting alone.
    """

    name = "sinkhorn"

    def __init__(self, blur: float = 0.5, scaling: float = 0.9, p: int = 2,
                 backend: str = "auto", normalize: bool = True, *,
                 num_threads: int | None = None) -> None:
        super().__init__()
        if not (blur > 0 and math.isfinite(blur)):
            raise Sim2ObsValueError(f"blur must be > 0, got {blur}")
        if not 0.0 < scaling < 1.0:
            raise Sim2ObsValueError(f"scaling must be in (0, 1), got {scaling}")
        if p not in (1, 2):
            raise Sim2ObsValueError(f"p must be 1 or 2 (geomloss's Sinkhorn costs), got {p}")
        if backend not in BACKENDS:
            raise Sim2ObsValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
        self.blur = float(blur)
        self.scaling = float(scaling)
        self.p = int(p)
        self.backend = backend
        self.normalize = bool(normalize)
        if num_threads is not None and num_threads < 1:
            raise Sim2ObsValueError(f"num_threads must be >= 1 or None, got {num_threads}")
        self.num_threads = num_threads

    def choose_backend(self, n: int, m: int) -> str:
        """The geomloss backend for an N x M problem (see the module docstring)."""
        if self.backend == "online":
            require("pykeops", package="pykeops")
            return "online"
        if self.backend == "auto" and n * m > ONLINE_THRESHOLD and keops_available():
            return "online"
        return "tensorized"

    def forward(self, f_s: Tensor, f_t: Tensor, *, y_s: Tensor | None = None,
                p_s: Tensor | None = None, p_t: Tensor | None = None) -> AdapterOutput:
        from geomloss import SamplesLoss

        self.check_features(f_s, f_t)
        scale = pooled_rms_distance(f_s, f_t) if self.normalize else 1.0
        x, y = (f_s / scale, f_t / scale) if self.normalize else (f_s, f_t)
        backend = self.choose_backend(f_s.shape[0], f_t.shape[0])
        loss_fn = SamplesLoss("sinkhorn", p=self.p, blur=self.blur, scaling=self.scaling,
                              debias=True, backend=backend)
        threads = torch.get_num_threads()
        limit = self.num_threads is not None and x.device.type == "cpu"
        if limit:
            torch.set_num_threads(self.num_threads)
        try:
            loss = loss_fn(x.contiguous(), y.contiguous())
        finally:
            if limit:
                torch.set_num_threads(threads)
        return AdapterOutput(loss, {"divergence": float(loss.detach()), "scale": scale,
                                    "blur_features": self.blur * scale})


__all__ = ["BACKENDS", "ONLINE_THRESHOLD", "SinkhornAdapter", "keops_available",
           "pooled_rms_distance"]
