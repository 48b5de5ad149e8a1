"""Re-observation: a galaxy seen again under worse seeing, through more dust, at a shallower depth,
with the pixel noise of the view at the level the new observation would have.

The physical augmentations of :mod:`sim2obs.pretrain.augment` each act on the image as it is,
noise included: :class:`~sim2obs.pretrain.observing.PSFDegrade` smooths the noise along with the
galaxy (an extra Gaussian of sigma ~1.3 px keeps ~1/(4 pi sigma^2) ~ 5 % of white-noise
variance: the noise sigma drops to ~0.2-0.3 of the data's for HSC seeing), and
:class:`~sim2obs.pretrain.observing.GalacticReddening` dims it with the galaxy (sky noise is not
behind the dust). Chained, they make views several times *deeper* than the data, so an encoder
trained on them learns on cleaner images than it will embed. :class:`Reobserve` draws the same
three effects and then adds one white-noise field that brings every pixel's noise variance to the
target ``s^2 / ivar``. Optionally it first turns the galaxy by an arbitrary position angle, topping
up the noise that bilinear interpolation removed (:func:`bilinear_kept_variance`), which makes
arbitrary rotations usable for training (``pretrain --augment reobserve-rotate``).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from sim2obs.errors import Sim2ObsValueError
from sim2obs.pretrain.augment import (
    Augmentation,
    RandomRotation,
    _check_batch,
    _like,
    _randn,
    _uniform,
    _work_dtype,
    gaussian_kernel,
    toeplitz,
    toeplitz_row_power,
)
from sim2obs.pretrain.observing import (
    GalacticReddening,
    NoiseResample,
    PSFDegrade,
    check_ivar_shape,
    noise_sigma,
)

__all__ = ["Reobserve", "bilinear_kept_variance"]


def _per_stamp_band(ivar: Tensor) -> tuple[Tensor, bool]:
    """``(ivar, varies)``: an ivar map that holds one value per stamp band reduced to (..., 1, 1)
    (one 1/sqrt per stamp band instead of per pixel), and whether it changes within a stamp band
    (masks, Poisson noise of bright sources, coadd depth steps; NaN counts as a change)."""
    if ivar.ndim < 2:  # a scalar, or one value per column: (W,) -> (1, W)
        ivar = ivar.reshape(1, -1) if ivar.ndim == 1 else ivar.reshape(1, 1)
    if ivar.shape[-2:] == (1, 1):
        return ivar, False
    flat = ivar.flatten(-2)
    if bool((flat.amax(-1) == flat.amin(-1)).all()):
        return ivar[..., :1, :1], False
    return ivar, True


def _reflect(u: Tensor, size: int) -> Tensor:
    """``grid_sample``'s reflection of pixel coordinates (align_corners=False: about -0.5 and
    size - 0.5), then clipped to [0, size - 1] as it does."""
    span = float(size)
    a = (u + 0.5).abs()
    flips = torch.floor(a / span)
    extra = torch.fmod(a, span)
    out = torch.where(torch.remainder(flips, 2) == 0, extra, span - extra) - 0.5
    return out.clamp(0.0, size - 1.0)


def _axis_kept(u: Tensor, size: int) -> Tensor:
    """Sum of squared linear-interpolation weights at pixel coordinate(s) ``u``, counting only
    neighbours inside [0, size - 1] (zeros padding: outside ones contribute nothing)."""
    i0 = torch.floor(u)
    f = u - i0
    in0 = ((i0 >= 0) & (i0 <= size - 1)).to(u.dtype)
    in1 = ((i0 + 1 >= 0) & (i0 + 1 <= size - 1)).to(u.dtype)
    return (1.0 - f).square() * in0 + f.square() * in1


def bilinear_kept_variance(theta: Tensor, h: int, w: int, padding_mode: str = "zeros") -> Tensor:
    """Fraction of white-noise variance each output pixel keeps when an (h, w) image is resampled
    bilinearly on ``F.affine_grid(theta)`` (``align_corners=False``) -- the resampling of
    :func:`~sim2obs.pretrain.augment.affine_resample`.

    An output pixel is ``sum_k w_k x_k`` over its (up to) four input neighbours, with separable
    weights ``w = (1 - f, f)`` per axis (``f`` the fractional coordinate); for independent input
    pixels of variance v its variance is ``v sum_k w_k^2 = v [(1 - f_x)^2 + f_x^2][(1 - f_y)^2 +
    f_y^2]``: 1 on the input grid, 1/4 half-way between pixels. Neighbours outside the image
    count as zero (``zeros``) or are moved inside first (``border``, ``reflection``, as
    ``grid_sample`` does). ``theta`` (N, 2, 3) -> (N, 1, h, w).
    """
    n = theta.shape[0]
    grid = F.affine_grid(theta.float(), [n, 1, h, w], align_corners=False)  # (N, h, w, 2): x, y
    u = ((grid[..., 0] + 1.0) * w - 1.0) / 2.0
    v = ((grid[..., 1] + 1.0) * h - 1.0) / 2.0
    if padding_mode == "reflection":
        u, v = _reflect(u, w), _reflect(v, h)
    elif padding_mode == "border":
        u, v = u.clamp(0.0, w - 1.0), v.clamp(0.0, h - 1.0)
    elif padding_mode != "zeros":
        raise Sim2ObsValueError(f"padding_mode '{padding_mode}' unknown; use zeros, border or reflection")
    return (_axis_kept(u, w) * _axis_kept(v, h))[:, None]


class Reobserve(Augmentation):
    """Worse seeing, Galactic dust and shallower depth in one step, with consistent noise.

    Per sample (draws from ``generator`` in this order): a noise factor ``s ~ U(noise_factor)``,
    a seeing factor ``f ~ U(seeing_factor)`` (extra Gaussian of sigma ``s_in sqrt(f^2 - 1)`` per
    band, as :class:`~sim2obs.pretrain.observing.PSFDegrade`; skipped without ``fwhm_in_pix``),
    ``E(B-V) ~ U(0, ebv_max)`` (band factors ``d_b = 10^(-0.4 R_b E(B-V))``, as
    :class:`~sim2obs.pretrain.observing.GalacticReddening`; skipped without
    ``extinction_coeffs``), a sub-pixel shift ``(dx, dy) ~ U(-max_shift, max_shift)^2`` (with
    ``max_shift > 0``), then one N(0, 1) field ``eps``:

        y = d_b (K x) + sqrt(max(s^2 - d_b^2 v_K, 0) / ivar) eps

    ``K x = M_y X M_x^T`` is the blur and the shift in one separable linear map: Toeplitz
    matrices of the 1-D kernels of the transfer function ``exp(-2 pi^2 sigma^2 k^2 - 2 pi i k
    d)`` on the stamp zero-padded by 4 sigma + max_shift (flux-conserving;
    :func:`~sim2obs.pretrain.augment.toeplitz`) -- a band-limited shift as in
    :class:`~sim2obs.pretrain.augment.RandomShift` (which shifts periodically, by separate FFTs,
    with a slightly different Nyquist corner), and the noise its interpolation smooths (a
    half-pixel shift keeps less variance near the stamp's edges) is topped up with the rest.
    ``v_K`` at each pixel is the sum of its squared weights: the fraction of the input's
    white-noise variance ``1/ivar`` that the blur and the dimming leave there is ``d_b^2 v_K``,
    so the output's noise variance is ``s^2 / ivar`` at every pixel -- the same depth as the
    data for ``s = 1``, ``s^2`` times shallower otherwise -- and ``ivar / s^2`` is its inverse
    variance. Where ivar varies within a
    stamp band (masks, Poisson noise of bright sources, depth steps) the variance the blur leaves
    is computed from the whole map instead, ``d_b^2 (M_y o M_y) V (M_x o M_x)^T`` with
    ``V = 1 / ivar`` (0 where masked; one more pair of matrix products), and the added noise brings
    each pixel to ``s^2 / ivar`` where that is reachable. Either way the per-pixel variance is
    exact for independent input pixel noise; part of the noise is now correlated on the scale of
    the extra blur (as in resampled coadds). Pixels with ``ivar <= 0`` get no noise.

    With ``rotate=True`` the galaxy is first turned by a position angle ``~ U(-180, 180)`` deg
    about the stamp centre (bilinear; the corners, which come from outside the stamp, hold no
    galaxy light -- reflecting the stamp would mirror its outskirts and neighbours into them --
    and get sky noise at the nearest edge pixel's ivar), the ivar map with it (nearest pixel),
    and a first noise field restores the variance the interpolation removed
    (:func:`bilinear_kept_variance`: 1/4 to 1 of it), so the rotated stamp has noise of variance
    ``1 / ivar`` again -- slightly correlated between neighbours, which the blur's ``v_K`` (exact
    for white input noise) then slightly underestimates: the final noise sigma comes out ~1-2 %
    high (measured on white noise with HSC seeing).

    Shapes: ``x`` (N, B, H, W); ``ivar`` broadcastable to it (the shard's ``/ivar`` for the batch,
    or a per-band (B, 1, 1) value given at construction); ``survey`` (N,) rows of per-survey
    (S, B) tables of ``fwhm_in_pix`` / ``extinction_coeffs``. Apply before geometric transforms
    (with ``rotate`` or ``max_shift`` it is one itself: it reads ivar at its input, then moves
    pixels, so no transform that reads ivar may follow it).
    """

    context_keys = ("ivar", "survey")

    def __init__(self, fwhm_in_pix: Sequence | Tensor | None = None,
                 extinction_coeffs: Sequence | Tensor | None = None,
                 seeing_factor: tuple[float, float] = (1.0, 1.3), ebv_max: float = 0.05,
                 noise_factor: tuple[float, float] = (1.0, 1.5), ivar: Tensor | float | None = None,
                 rotate: bool = False, max_shift: float = 0.0) -> None:
        super().__init__()
        if not (math.isfinite(max_shift) and max_shift >= 0):
            raise Sim2ObsValueError(f"Reobserve: max_shift must be >= 0 pixels, got {max_shift}")
        self.max_shift = float(max_shift)
        self.rotation = RandomRotation(180.0, padding_mode="zeros") if rotate else None
        self.geometric = bool(rotate) or self.max_shift > 0  # its output pixels moved: no ivar after it
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
        ivar = torch.as_tensor(ivar, device=x.device)
        check_ivar_shape(ivar, x, "Reobserve")
        ivar, varies = _per_stamp_band(ivar)
        sigma_in = noise_sigma(ivar, x, "Reobserve")
        y = x.to(wd)
        if self.rotation is not None:
            y, sigma_in = self._rotate(y, sigma_in, generator)
        s2 = self.noise.draw_factor(n, b, generator, x.device, wd).square()[:, :, None, None]
        blur = None if self.psf is None else self.psf.draw_sigma(n, generator, x.device, wd, survey)
        dust = (None if self.reddening is None
                else self.reddening.draw_factor(n, generator, x.device, wd, survey))  # (N, B)
        shift = (None if self.max_shift == 0.0
                 else _uniform((n, 2), -self.max_shift, self.max_shift, generator, x.device).to(wd))
        with torch.autocast(x.device.type, enabled=False):  # keep wd under a caller's autocast
            if blur is None and shift is None:  # no resampling: every pixel keeps d_b^2 of its noise
                v_y = torch.ones((1, 1, h), dtype=wd, device=x.device)
                v_x = (torch.ones((1, 1, w), dtype=wd, device=x.device) if dust is None
                       else dust.square()[:, :, None].expand(n, b, w))
                if dust is not None:
                    y = y * dust[:, :, None, None]
                m_y = m_x = None
            else:
                pad = (0 if self.psf is None else self.psf._pad()) + math.ceil(self.max_shift)
                sig = torch.zeros((n, b), dtype=wd, device=x.device) if blur is None else blur
                k_y = gaussian_kernel(sig, h + pad, None if shift is None else shift[:, 1])
                k_x = gaussian_kernel(sig, w + pad, None if shift is None else shift[:, 0])
                if dust is not None:  # the dust's dimming, folded into the x kernel
                    k_x = k_x * dust[:, :, None]
                m_y, m_x = toeplitz(k_y, h), toeplitz(k_x, w)
                y = torch.matmul(torch.matmul(m_y, y), m_x.transpose(-1, -2))
                v_y, v_x = toeplitz_row_power(k_y, h), toeplitz_row_power(k_x, w)  # (N, B, h|w)
            eps = _randn(tuple(x.shape), generator, x.device, wd)
            if not varies:
                # sigma_out^2 = s^2 sigma^2 - sigma^2 v_y[i] v_x[l]: one broadcast pass
                # (the constant is copied into a full-size tensor first: addcmul with three
                # broadcast operands runs ~2.5x slower on CPU than in place on a dense one)
                var = sigma_in.expand(n, b, 1, 1).square()
                std = torch.empty((n, b, h, w), dtype=wd, device=x.device).copy_((s2 * var).expand(n, b, h, w))
                std.addcmul_((var[..., 0] * v_y)[..., :, None], v_x[..., None, :], value=-1.0)
                std = std.clamp_(min=0.0).sqrt_()
            else:  # independent noise of variance V through M_y X M_x^T: (M_y o M_y) V (M_x o M_x)^T
                var_in = sigma_in.square().expand(n, b, h, w)
                if m_y is None:
                    kept_var = var_in * v_x[:, :, None, :]
                else:
                    kept_var = torch.matmul(torch.matmul(m_y.square(), var_in), m_x.square().transpose(-1, -2))
                std = (s2 * var_in - kept_var).clamp_(min=0.0).sqrt_()
            out = y.addcmul_(eps, std) if y is not x else torch.addcmul(y, eps, std)
        return _like(out, x)

    def _rotate(self, y: Tensor, sigma_in: Tensor, generator: torch.Generator | None) -> tuple[Tensor, Tensor]:
        """Rotated stamps with their noise topped up to ``sigma_in`` (rotated with them)."""
        n, b, h, w = y.shape
        theta = self.rotation.draw_theta(n, h, w, generator, y.device)
        grid = F.affine_grid(theta.to(y), [n, b, h, w], align_corners=False)
        # corners from outside the stamp: no galaxy (zeros; reflecting would mirror its outskirts
        # and neighbours into them) but sky noise at the nearest edge pixel's level (kept = 0)
        y = F.grid_sample(y, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
        if sigma_in.ndim >= 2 and sigma_in.shape[-2:] != (1, 1):  # a map (or a row/column of one): it turns
            sigma_in = F.grid_sample(sigma_in.expand(n, b, h, w), grid, mode="nearest",
                                     padding_mode="border", align_corners=False)
        kept = bilinear_kept_variance(theta, h, w, "zeros").to(y)  # (N, 1, H, W)
        eps = _randn(tuple(y.shape), generator, y.device, y.dtype)
        return eps.mul_((1.0 - kept).clamp_(min=0.0).sqrt_() * sigma_in).add_(y), sigma_in

    def extra_repr(self) -> str:
        return (f"noise_factor={self.noise.factor_range}, rotate={self.rotation is not None}, "
                f"max_shift={self.max_shift}")
