"""Re-observation: a galaxy seen again under worse seeing, through more dust, at a shallower depth,
with the pixel noise of the view at the level the new observation would have.

The physical augmentations of :mod:`sim2obs.pretrain.augment` each act on the image as it is,
noise included: :class:`~sim2obs.pretrain.augment.PSFDegrade` smooths the noise along with the
galaxy (an extra Gaussian of sigma ~1.3 px keeps ~1/(4 pi sigma^2) ~ 5 % of white-noise
variance: the noise sigma drops to ~0.2-0.3 of the data's for HSC seeing), and
:class:`~sim2obs.pretrain.augment.GalacticReddening` dims it with the galaxy (sky noise is not
behind the dust). Chained, they make views several times *deeper* than the data, so an encoder
trained on them learns on cleaner images than it will embed. :class:`Reobserve` draws the same
three effects and then adds one white-noise field that brings every pixel's noise variance to the
target ``s^2 / ivar``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from sim2obs.errors import Sim2ObsValueError
from sim2obs.pretrain.augment import (
    Augmentation,
    GalacticReddening,
    NoiseResample,
    PSFDegrade,
    _check_batch,
    _like,
    _randn,
    _work_dtype,
    noise_sigma,
)

__all__ = ["Reobserve"]


class Reobserve(Augmentation):
    """Worse seeing, Galactic dust and shallower depth in one step, with consistent noise.

    Per sample (draws from ``generator`` in this order): a noise factor ``s ~ U(noise_factor)``,
    a seeing factor ``f ~ U(seeing_factor)`` (extra Gaussian of sigma ``s_in sqrt(f^2 - 1)`` per
    band, as :class:`~sim2obs.pretrain.augment.PSFDegrade`; skipped without ``fwhm_in_pix``),
    ``E(B-V) ~ U(0, ebv_max)`` (band factors ``d_b = 10^(-0.4 R_b E(B-V))``, as
    :class:`~sim2obs.pretrain.augment.GalacticReddening`; skipped without
    ``extinction_coeffs``), then one N(0, 1) field ``eps``:

        y = d_b (K x) + sqrt(max(s^2 - d_b^2 v_K, 0) / ivar) eps

    ``K x = M_y X M_x^T`` is the blur (zero-padded, flux-conserving) and ``v_K`` at each pixel
    the sum of its squared weights: the fraction of the input's white-noise variance ``1/ivar``
    that the blur and the dimming leave there is ``d_b^2 v_K``, so the output's noise variance is
    ``s^2 / ivar`` at every pixel -- the same depth as the data for ``s = 1``, ``s^2`` times
    shallower otherwise -- and ``ivar / s^2`` is its inverse variance. Part of the noise is now
    correlated on the scale of the extra blur (as in resampled coadds); the per-pixel variance is
    exact for an input with white noise and locally constant ivar. Pixels with ``ivar <= 0`` get
    no noise.

    Shapes: ``x`` (N, B, H, W); ``ivar`` broadcastable to it (the shard's ``/ivar`` for the batch,
    or a per-band (B, 1, 1) value given at construction); ``survey`` (N,) rows of per-survey
    (S, B) tables of ``fwhm_in_pix`` / ``extinction_coeffs``. Apply before geometric transforms.
    """

    context_keys = ("ivar", "survey")

    def __init__(self, fwhm_in_pix: Sequence | Tensor | None = None,
                 extinction_coeffs: Sequence | Tensor | None = None,
                 seeing_factor: tuple[float, float] = (1.0, 1.3), ebv_max: float = 0.05,
                 noise_factor: tuple[float, float] = (1.0, 1.5), ivar: Tensor | float | None = None) -> None:
        super().__init__()
        lo, hi = (float(v) for v in seeing_factor)
        self.psf = None if fwhm_in_pix is None else PSFDegrade(fwhm_in_pix, max_factor=hi, min_factor=lo)
        self.reddening = (None if extinction_coeffs is None
                          else GalacticReddening(extinction_coeffs, ebv_max=ebv_max))
        self.noise = NoiseResample(ivar, factor_range=noise_factor)

    def forward(self, x: Tensor, generator: torch.Generator | None = None,
                ivar: Tensor | None = None, survey: Tensor | None = None, **context) -> Tensor:
        _check_batch(x, "Reobserve")
        n, b, h, w = x.shape
        ivar = self.noise.ivar if ivar is None else ivar
        if ivar is None:
            raise Sim2ObsValueError(
                "Reobserve needs the inverse variance: pass ivar=... to forward (or Compose) or "
                "give it at construction"
            )
        widths = {"fwhm_in_pix": None if self.psf is None else self.psf.fwhm_in_pix.shape[-1],
                  "extinction_coeffs": None if self.reddening is None
                  else self.reddening.extinction_coeffs.shape[-1]}
        for name, width in widths.items():
            if width is not None and width != b:
                raise Sim2ObsValueError(
                    f"Reobserve: {name} has values for {width} bands but the batch has {b} bands"
                )
        wd = _work_dtype(x)
        sigma_in = noise_sigma(ivar, x, "Reobserve")
        s2 = self.noise.draw_factor(n, b, generator, x.device, wd) ** 2  # (N, 1) or (N, B)
        y = x.to(wd)
        kept = torch.ones((), dtype=wd, device=x.device)  # fraction of the noise variance left
        if self.psf is not None:
            sigma = self.psf.draw_sigma(n, generator, x.device, wd, survey)
            m_y, m_x = self.psf.blur_matrices(sigma, h, w)
            with torch.autocast(x.device.type, enabled=False):
                y = torch.matmul(torch.matmul(m_y, y), m_x.transpose(-1, -2))
            # white noise of variance v through M_y X M_x^T: v sum_j M_y[i,j]^2 sum_k M_x[l,k]^2
            kept = m_y.square().sum(-1)[..., :, None] * m_x.square().sum(-1)[..., None, :]
        if self.reddening is not None:
            d = self.reddening.draw_factor(n, generator, x.device, wd, survey)[:, :, None, None]
            y = y * d
            kept = kept * d.square()
        deficit = (s2[:, :, None, None] - kept).clamp_(min=0.0)
        eps = _randn(tuple(x.shape), generator, x.device, wd)
        eps.mul_(deficit.sqrt_() * sigma_in)
        return _like(eps.add_(y), x)

    def extra_repr(self) -> str:
        return f"noise_factor={self.noise.factor_range}"
