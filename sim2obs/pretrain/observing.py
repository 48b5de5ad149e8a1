"""Observing-condition augmentations: worse seeing, shallower depth, Galactic dust, higher
redshift -- each a small ``nn.Module`` on a batch ``(N, B, H, W)`` with the conventions of
:mod:`sim2obs.pretrain.augment` (the base classes, random-draw helpers and geometric transforms),
from where they can also be imported.

=====================  =================================================================
augmentation           physics / what it conserves
=====================  =================================================================
PSFDegrade             worse seeing: extra Gaussian blur; flux conserved, FWHM to target
NoiseResample          deeper-to-shallower noise: adds noise so sigma -> factor * sigma
GalacticReddening      Milky-Way dust: flux * 10^(-0.4 R_b E(B-V)) per band
RedshiftDimming        move to higher z: shrink by D_A ratio, dim by (1+z)^4 in surface brightness
=====================  =================================================================

PSFDegrade and GalacticReddening lower the pixel noise along with the galaxy; for views at the
data's noise level use :class:`sim2obs.pretrain.reobserve.Reobserve` (the training default).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch
from torch import Tensor, nn

from sim2obs.errors import MissingDependencyError, Sim2ObsValueError
from sim2obs.pretrain.augment import (
    FWHM_PER_SIGMA,
    Augmentation,
    _check_batch,
    _like,
    _randn,
    _rounded,
    _survey_rows,
    _table,
    _uniform,
    _work_dtype,
    affine_resample,
    gaussian_kernel,
    toeplitz,
)

__all__ = ["PSFDegrade", "NoiseResample", "GalacticReddening", "RedshiftDimming", "extinction_coefficients",
           "check_ivar_shape", "noise_sigma"]

def _reset_pad_cache(module: nn.Module, incompatible_keys) -> None:
    """load_state_dict post-hook: fwhm_in_pix may have changed, recompute the padding."""
    module._pad_cache = None


class PSFDegrade(Augmentation):
    """Re-observe under worse seeing: convolve with an extra Gaussian per band.

    The input PSF of band b is treated as a Gaussian of FWHM ``fwhm_in_pix[b]`` (sigma
    ``s_in = FWHM / 2.3548``). A factor ``f ~ U(min_factor, max_factor)`` is drawn per sample
    (the same for all bands: seeing degrades coherently; ``per_band=True`` draws one per band)
    and the image is convolved with a Gaussian of

        sigma_extra = sqrt(s_out^2 - s_in^2) = s_in sqrt(f^2 - 1),

    since Gaussian widths add in quadrature, so the PSF FWHM becomes ``f * fwhm_in``. The
    convolution multiplies the FFT by the exact Gaussian transfer function
    ``exp(-2 pi^2 sigma^2 |k|^2)`` on a zero-padded stamp (padding ``4 sigma_extra``: no
    wrap-around; flux leaving the stamp is lost, as it would be in a real cutout). The transfer
    function is 1 at k = 0, so flux is conserved. The transfer function is separable in k_y and
    k_x, so the same linear map is applied as two batched matrix products ``M_y X M_x^T`` with
    Toeplitz matrices built from its 1-D periodic kernel (cheaper than 2-D FFTs of the padded
    stamps; see :func:`toeplitz`). For non-Gaussian PSFs (Moffat, Kolmogorov) the
    FWHM of the result is close to, not exactly, ``f * fwhm_in``. Noise is smoothed too (its
    amplitude drops and it becomes correlated): follow with :class:`NoiseResample` to restore a
    noise level if needed.

    A batch mixing surveys (different seeing and pixel scales) takes ``fwhm_in_pix`` as an
    (S, B) table, one row per survey, and ``forward(x, generator, survey=...)`` with the (N,)
    row of each sample; a (B,) vector serves every sample.
    """

    context_keys = ("survey",)

    def __init__(self, fwhm_in_pix: Sequence[float] | Tensor, max_factor: float = 1.5,
                 min_factor: float = 1.0, per_band: bool = False) -> None:
        super().__init__()
        fwhm = _table(fwhm_in_pix, "PSFDegrade", "fwhm_in_pix")
        if not bool((fwhm > 0).all()):
            raise Sim2ObsValueError(f"PSFDegrade: fwhm_in_pix must be positive per band, got {fwhm.tolist()}")
        if not 1.0 <= min_factor <= max_factor:
            raise Sim2ObsValueError(
                f"PSFDegrade: need 1 <= min_factor <= max_factor (got {min_factor}, {max_factor}); "
                "a PSF cannot be made sharper by convolution"
            )
        self.register_buffer("fwhm_in_pix", fwhm)
        self.min_factor, self.max_factor = float(min_factor), float(max_factor)
        self.per_band = bool(per_band)
        self._pad_cache: int | None = None  # from fwhm_in_pix (no device sync per call)
        self.register_load_state_dict_post_hook(_reset_pad_cache)

    @classmethod
    def from_survey(cls, spec, max_factor: float = 1.5, pixel_scale_arcsec: float | None = None,
                    **kwargs) -> PSFDegrade:
        """Input FWHMs from a :class:`~sim2obs.forward_models.surveys.SurveySpec`'s bands."""
        scale = pixel_scale_arcsec or spec.pixel_scale_arcsec
        return cls([b.psf_fwhm_arcsec / scale for b in spec.bands], max_factor=max_factor, **kwargs)

    def forward(self, x: Tensor, generator: torch.Generator | None = None,
                survey: Tensor | None = None, **context) -> Tensor:
        _check_batch(x, "PSFDegrade")
        n, b, h, w = x.shape
        if self.fwhm_in_pix.shape[-1] != b:
            raise Sim2ObsValueError(
                f"PSFDegrade was given {self.fwhm_in_pix.shape[-1]} band FWHMs but the batch has {b} bands"
            )
        wd = _work_dtype(x)
        sigma = self.draw_sigma(n, generator, x.device, wd, survey)
        m_y, m_x = self.blur_matrices(sigma, h, w)
        with torch.autocast(x.device.type, enabled=False):  # keep wd under a caller's autocast
            out = torch.matmul(torch.matmul(m_y, x.to(wd)), m_x.transpose(-1, -2))
        return _like(out, x)

    def draw_sigma(self, n: int, generator: torch.Generator | None, device: torch.device,
                   dtype: torch.dtype, survey: Tensor | None = None) -> Tensor:
        """(N, B) sigmas (pixels) of the extra Gaussian: one seeing factor per sample (per sample
        and band with ``per_band``) drawn from ``generator``."""
        b = self.fwhm_in_pix.shape[-1]
        s_in = _survey_rows(self.fwhm_in_pix.to(device) / FWHM_PER_SIGMA, survey, n, "PSFDegrade")
        f = _uniform((n, b if self.per_band else 1), self.min_factor, self.max_factor, generator, device)
        return (s_in * torch.sqrt(f**2 - 1.0)).to(dtype)  # (N, B)

    def blur_matrices(self, sigma: Tensor, h: int, w: int) -> tuple[Tensor, Tensor]:
        """``(M_y (N, B, h, h), M_x (N, B, w, w))``: the blur of an (h, w) stamp by Gaussians of
        ``sigma`` (N, B) is ``M_y X M_x^T``."""
        pad = self._pad()
        k_y = gaussian_kernel(sigma, h + pad)
        k_x = k_y if w == h else gaussian_kernel(sigma, w + pad)
        m_y = toeplitz(k_y, h)
        m_x = m_y if w == h else toeplitz(k_x, w)
        return m_y, m_x

    def _pad(self) -> int:
        """Zero padding (pixels) that holds 4 sigma of the widest extra Gaussian."""
        if self._pad_cache is None:
            s_max = float(self.fwhm_in_pix.max()) / FWHM_PER_SIGMA * math.sqrt(self.max_factor**2 - 1.0)
            self._pad_cache = int(math.ceil(4.0 * s_max))
        return self._pad_cache

    def extra_repr(self) -> str:
        return (f"fwhm_in_pix={_rounded(self.fwhm_in_pix)}, "
                f"factor=U({self.min_factor}, {self.max_factor}), per_band={self.per_band}")


def check_ivar_shape(ivar: Tensor, x: Tensor, name: str) -> None:
    """Refuse an ivar that does not broadcast to the batch ``x`` (naming the transform)."""
    try:
        fits = torch.broadcast_shapes(ivar.shape, x.shape) == x.shape
    except RuntimeError:
        fits = False
    if not fits:
        raise Sim2ObsValueError(
            f"{name}: ivar of shape {tuple(ivar.shape)} does not broadcast to the batch {tuple(x.shape)}"
        )


def noise_sigma(ivar, x: Tensor, name: str) -> Tensor:
    """Pixel noise sigma ``1 / sqrt(ivar)`` in ``x``'s working dtype, on ivar's own shape (a
    per-band ivar stays small; it must broadcast to ``x``), 0 where ivar <= 0 or is NaN (no data:
    no noise is added there)."""
    ivar = torch.as_tensor(ivar, device=x.device).to(_work_dtype(x))
    check_ivar_shape(ivar, x, name)
    return torch.rsqrt(ivar).nan_to_num_(nan=0.0, posinf=0.0, neginf=0.0)  # rsqrt: inf/nan at <= 0


class NoiseResample(Augmentation):
    """Re-realise noise at a shallower depth: add Gaussian noise of variance ``alpha / ivar``.

    The pixel noise of the input has variance ``1 / ivar`` (nmgy^2). A noise factor
    ``s ~ U(factor_range)`` is drawn per sample (per sample and band with ``per_band``) and
    ``alpha = s^2 - 1``; the output

        y = x + sqrt(alpha / ivar) * eps,   eps ~ N(0, 1) independent per pixel,

    has noise variance ``(1 + alpha) / ivar = s^2 / ivar``: the noise standard deviation becomes
    ``s`` times the input's (the image looks like an exposure ``s^2`` times shorter, for
    background-limited data), and the matching inverse variance is ``ivar / s^2``. Pixels with
    ``ivar == 0`` (no data / masked) are left untouched. The added noise is white: correlated
    input noise (resampled coadds) keeps its correlated part, which is slightly diluted.

    ``ivar`` broadcastable to ``(N, B, H, W)`` -- typically the shard's ``/ivar`` for the batch --
    is passed to ``forward(x, generator, ivar=...)``; the ``ivar`` given at construction (e.g.
    a per-band ``(B, 1, 1)`` survey value) is the default. Apply before geometric transforms so
    the map stays aligned with the pixels.
    """

    context_keys = ("ivar",)

    def __init__(self, ivar: Tensor | float | None = None,
                 factor_range: tuple[float, float] = (1.0, 2.0), per_band: bool = False) -> None:
        super().__init__()
        lo, hi = (float(v) for v in factor_range)
        if not 1.0 <= lo <= hi:
            raise Sim2ObsValueError(
                f"NoiseResample: need 1 <= factor_range[0] <= factor_range[1], got {factor_range} "
                "(noise can be added, not removed)"
            )
        self.factor_range = (lo, hi)
        self.per_band = bool(per_band)
        self.register_buffer("ivar", None if ivar is None else torch.as_tensor(ivar, dtype=torch.float32))

    def forward(self, x: Tensor, generator: torch.Generator | None = None,
                ivar: Tensor | None = None, **context) -> Tensor:
        _check_batch(x, "NoiseResample")
        ivar = self.ivar if ivar is None else ivar
        if ivar is None:
            raise Sim2ObsValueError(
                "NoiseResample needs the inverse variance: pass ivar=... to forward (or Compose) "
                "or give it at construction"
            )
        n, b = x.shape[:2]
        wd = _work_dtype(x)
        sigma_in = noise_sigma(ivar, x, "NoiseResample")
        s = self.draw_factor(n, b, generator, x.device, wd)
        sqrt_alpha = torch.sqrt(s**2 - 1.0)[:, :, None, None]
        sigma_add = sigma_in * sqrt_alpha  # sqrt(alpha) / sqrt(ivar)
        eps = _randn(tuple(x.shape), generator, x.device, wd)
        eps.mul_(sigma_add)
        return _like(eps.add_(x.to(wd)), x)

    def draw_factor(self, n: int, b: int, generator: torch.Generator | None, device: torch.device,
                    dtype: torch.dtype) -> Tensor:
        """(N, 1) noise factors s (N, B with ``per_band``) drawn from ``generator``."""
        return _uniform((n, b if self.per_band else 1), *self.factor_range, generator, device).to(dtype)

    def extra_repr(self) -> str:
        return f"factor_range={self.factor_range}, per_band={self.per_band}"


# --------------------------------------------------------------------------------------------
# Astrophysical augmentations
# --------------------------------------------------------------------------------------------

def extinction_coefficients(filter_names: Sequence[str], r_v: float = 3.1,
                            sfd_scale: float = 0.86, reference: str = "flat_fnu") -> np.ndarray:
    """Band extinction coefficients ``R_b = A_b / E(B-V)`` for speclite filter names.

    Maths: with the Fitzpatrick (1999, PASP 111, 63) curve ``a(lambda) = A_lambda / E(B-V)`` for
    ``R_V = r_v`` (``extinction.fitzpatrick99``), the band value in the small-extinction limit is
    the photon-weighted mean over the band,

        R_b = sfd_scale * int a(lambda) S(lambda) T(lambda) lambda dlambda
                        / int S(lambda) T(lambda) lambda dlambda,

    with T the filter response and S the reference spectrum in f_lambda: ``'flat_fnu'`` (AB-flat,
    S = lambda^-2) or ``'flat_flambda'`` (S = 1). ``sfd_scale = 0.86`` gives coefficients per
    E(B-V) of the Schlegel, Finkbeiner & Davis (1998) map, following the recalibration of
    Schlafly & Finkbeiner (2011, ApJ 737, 103; their Table 6 lists such coefficients, e.g. SDSS
    ugriz 4.239, 3.303, 2.285, 1.698, 1.263, which this reproduces to ~3 %); use 1.0 for
    coefficients per true E(B-V). Filter names are those of
    :func:`sim2obs.forward_models.photometry.load_filter` (speclite names or ``galsim:FILE``).

    Needs the optional package ``extinction`` (``pip install extinction``).
    """
    try:
        import extinction
    except ImportError as exc:
        raise MissingDependencyError(
            "extinction_coefficients needs the optional package 'extinction' "
            f"({exc}). Install it with: pip install extinction"
        ) from exc
    from sim2obs.forward_models.photometry import load_filter

    if reference not in ("flat_fnu", "flat_flambda"):
        raise Sim2ObsValueError(f"reference '{reference}' unknown; use 'flat_fnu' or 'flat_flambda'")
    out = []
    for name in filter_names:
        filt = load_filter(name)
        wave = np.asarray(filt.wavelength, dtype=float)  # Angstrom
        resp = np.asarray(filt.response, dtype=float)
        if wave.min() < 910.0 or wave.max() > 60000.0:
            raise Sim2ObsValueError(
                f"filter '{name}' spans {wave.min():.0f}-{wave.max():.0f} Å, outside the 910-60000 Å "
                "range of the Fitzpatrick (1999) curve"
            )
        a_over_ebv = extinction.fitzpatrick99(wave, r_v, r_v)  # A_lambda for A_V = R_V, i.e. E(B-V)=1
        spec = wave**-2 if reference == "flat_fnu" else np.ones_like(wave)
        weight = spec * resp * wave
        trapz = getattr(np, "trapezoid", None) or np.trapz  # numpy < 2 has only trapz
        out.append(sfd_scale * trapz(a_over_ebv * weight, wave) / trapz(weight, wave))
    return np.asarray(out, dtype=float)


class GalacticReddening(Augmentation):
    """Milky-Way foreground extinction: ``y_b = x_b * 10^(-0.4 R_b E(B-V))``.

    ``E(B-V) ~ U(ebv_min, ebv_max)`` is drawn per sample; ``R_b`` are the band coefficients
    (see :func:`extinction_coefficients`; per SFD E(B-V) by default). Physics: foreground dust
    dims and reddens every pixel of a galaxy by the same band-dependent factor, so a
    representation should not confuse it with intrinsic colour (Hayat et al. 2021, ApJL 911, L33,
    use this augmentation for SDSS; coefficients after Schlafly & Finkbeiner 2011). The flux
    ratio between bands changes by exactly ``10^(-0.4 (R_b - R_c) E(B-V))``.

    A batch mixing surveys (different filter curves for the same band names) takes
    ``extinction_coeffs`` as an (S, B) table, one row per survey, and ``forward(x, generator,
    survey=...)`` with the (N,) row of each sample; a (B,) vector serves every sample.
    """

    context_keys = ("survey",)

    def __init__(self, extinction_coeffs: Sequence[float] | Tensor, ebv_max: float = 0.1,
                 ebv_min: float = 0.0) -> None:
        super().__init__()
        r = _table(extinction_coeffs, "GalacticReddening", "extinction_coeffs")
        if not 0.0 <= ebv_min <= ebv_max:
            raise Sim2ObsValueError(f"GalacticReddening: need 0 <= ebv_min <= ebv_max, got {ebv_min}, {ebv_max}")
        self.register_buffer("extinction_coeffs", r)
        self.ebv_min, self.ebv_max = float(ebv_min), float(ebv_max)

    @classmethod
    def from_survey(cls, spec, ebv_max: float = 0.1, **kwargs) -> GalacticReddening:
        """Coefficients from a :class:`~sim2obs.forward_models.surveys.SurveySpec`'s filters."""
        return cls(extinction_coefficients([b.filter for b in spec.bands]), ebv_max=ebv_max, **kwargs)

    def forward(self, x: Tensor, generator: torch.Generator | None = None,
                survey: Tensor | None = None, **context) -> Tensor:
        _check_batch(x, "GalacticReddening")
        n, b = x.shape[:2]
        if self.extinction_coeffs.shape[-1] != b:
            raise Sim2ObsValueError(
                f"GalacticReddening has {self.extinction_coeffs.shape[-1]} band coefficients but the "
                f"batch has {b} bands"
            )
        wd = _work_dtype(x)
        factor = self.draw_factor(n, generator, x.device, wd, survey)
        return _like(x.to(wd) * factor[:, :, None, None], x)

    def draw_factor(self, n: int, generator: torch.Generator | None, device: torch.device,
                    dtype: torch.dtype, survey: Tensor | None = None) -> Tensor:
        """(N, B) flux factors ``10^(-0.4 R_b E(B-V))``, one E(B-V) per sample from ``generator``."""
        r = _survey_rows(self.extinction_coeffs.to(device, dtype), survey, n, "GalacticReddening")
        ebv = _uniform((n, 1), self.ebv_min, self.ebv_max, generator, device).to(dtype)
        return torch.pow(10.0, -0.4 * r * ebv)

    def extra_repr(self) -> str:
        return (f"R={_rounded(self.extinction_coeffs)}, "
                f"ebv=U({self.ebv_min}, {self.ebv_max})")


class RedshiftDimming(Augmentation):
    """Move a galaxy from redshift z to z + dz: shrink it and dim its surface brightness.

    ``dz ~ U(min_dz, max_dz)`` per sample. With angular-diameter distances ``D_A`` of the
    cosmology (astropy, default Planck 2015 as for TNG):

        angular scale    s = D_A(z) / D_A(z + dz)   (< 1 below z ~ 1.6, where D_A peaks)
        surface bright.  SB -> SB * ((1 + z) / (1 + z + dz))^4     (Tolman dimming)
        total flux       F -> F * s^2 ((1 + z) / (1 + z + dz))^4 = F * (D_L(z) / D_L(z + dz))^2

    Implementation: ``y(p) = ((1+z)/(1+z+dz))^4 * x(p / s)`` about the stamp centre, each output
    pixel averaging sub-pixel bilinear samples (so the flux is integrated, not aliased).
    Simplifications (documented, deliberately ignored): no k-correction or band shifting (the
    galaxy keeps its observed colours), no evolution, and the PSF and noise already in ``x`` are
    shrunk and dimmed with it -- apply to noiseless images, or follow with
    :class:`PSFDegrade` and :class:`NoiseResample`.

    ``z_in`` is the redshift of the input stamps; ``forward(x, generator, redshift=z)`` with a
    (N,) tensor overrides it per galaxy (e.g. the shard's ``/labels/redshift``).
    """

    geometric = True
    context_keys = ("redshift",)
    _Z_TABLE_MAX = 6.0

    def __init__(self, z_in: float = 0.1, max_dz: float = 0.2, min_dz: float = 0.0,
                 cosmology: str = "Planck15", max_supersample: int = 4) -> None:
        super().__init__()
        if not z_in > 0:
            raise Sim2ObsValueError(f"RedshiftDimming: z_in must be > 0, got {z_in}")
        if not 0.0 <= min_dz <= max_dz:
            raise Sim2ObsValueError(f"RedshiftDimming: need 0 <= min_dz <= max_dz, got {min_dz}, {max_dz}")
        if z_in + max_dz > self._Z_TABLE_MAX:
            raise Sim2ObsValueError(f"RedshiftDimming: z_in + max_dz must be <= {self._Z_TABLE_MAX}")
        from sim2obs.forward_models.photometry import get_cosmology

        cosmo = get_cosmology(cosmology)
        z = np.linspace(0.0, self._Z_TABLE_MAX, 2401)
        d_a = np.asarray(cosmo.angular_diameter_distance(z).to_value("Mpc"), dtype=np.float64)
        # CPU float64 tables, not buffers: the per-galaxy factors are computed on the CPU (N
        # numbers; MPS has no float64), whatever device the images are on
        self._z_grid = torch.as_tensor(z, dtype=torch.float64)
        self._da_grid = torch.as_tensor(d_a, dtype=torch.float64)
        self.z_in, self.min_dz, self.max_dz = float(z_in), float(min_dz), float(max_dz)
        self.cosmology = cosmology
        self.max_supersample = int(max_supersample)

    def angular_diameter_distance(self, z: Tensor) -> Tensor:
        """D_A(z) in Mpc by linear interpolation of a 0.0025-spaced table (float64, on the CPU)."""
        zg, dg = self._z_grid, self._da_grid
        z = torch.as_tensor(z).detach().cpu().to(torch.float64).clamp(0.0, self._Z_TABLE_MAX)
        i = torch.searchsorted(zg, z).clamp(1, zg.numel() - 1)
        t = (z - zg[i - 1]) / (zg[i] - zg[i - 1])
        return dg[i - 1] + t * (dg[i] - dg[i - 1])

    def factors(self, z: Tensor, dz: Tensor) -> tuple[Tensor, Tensor]:
        """(angular scale s, surface-brightness factor) for moving from z to z + dz: float64 on
        the CPU, (N,) each."""
        z, dz = (torch.as_tensor(v).detach().cpu().double() for v in (z, dz))
        s = self.angular_diameter_distance(z) / self.angular_diameter_distance(z + dz)
        sb = ((1.0 + z) / (1.0 + z + dz)) ** 4
        return s, sb

    def forward(self, x: Tensor, generator: torch.Generator | None = None,
                redshift: Tensor | None = None, **context) -> Tensor:
        _check_batch(x, "RedshiftDimming")
        n = x.shape[0]
        if redshift is None:
            z = torch.full((n,), self.z_in, dtype=torch.float64)
        else:
            z = torch.as_tensor(redshift).detach().cpu().to(torch.float64).reshape(-1)
            if z.numel() != n or not bool((z > 0).all()) or bool((z + self.max_dz > self._Z_TABLE_MAX).any()):
                raise Sim2ObsValueError(
                    f"RedshiftDimming: redshift must be (N={n},) with 0 < z <= "
                    f"{self._Z_TABLE_MAX - self.max_dz}"
                )
        dz = _uniform((n,), self.min_dz, self.max_dz, generator, x.device).cpu().double()
        s, sb = self.factors(z, dz)
        inv = (1.0 / s).float().to(x.device)
        zero = torch.zeros_like(inv)
        theta = torch.stack([
            torch.stack([inv, zero, zero], dim=1),
            torch.stack([zero, inv, zero], dim=1),
        ], dim=1)
        m = int(min(self.max_supersample, max(1, math.ceil(float(inv.max())))))
        out = affine_resample(x, theta, supersample=m)
        wd = _work_dtype(x)
        return _like(out.to(wd) * sb.to(device=x.device, dtype=wd)[:, None, None, None], x)

    def extra_repr(self) -> str:
        return (f"z_in={self.z_in}, dz=U({self.min_dz}, {self.max_dz}), "
                f"cosmology={self.cosmology!r}")
