"""Physically motivated augmentations for batches of multi-band galaxy stamps.

Every augmentation is a small ``nn.Module`` acting on a batch ``x`` of shape ``(N, B, H, W)``
(calibrated flux per pixel, nanomaggies; see the shard format in DESIGN.md) on any device, and
returns a tensor of the same shape, dtype and device::

    y = aug(x, generator)                    # generator: torch.Generator or None (global RNG)
    y = Compose([RandomRot90Flip(), RandomShift(0.5)])(x, generator)

Random parameters (one set per sample, sometimes per band) are drawn from ``generator`` on the
generator's own device and then moved to ``x.device``, so a seeded generator gives the same
result every time; on a GPU pass a CUDA generator to avoid host-to-device copies of noise
fields. Half-precision inputs are processed in float32 internally and cast back.

Some augmentations need per-batch context (``NoiseResample`` the inverse variance ``ivar``,
``RedshiftDimming`` optionally the redshift of each galaxy); they list the keyword names in
``context_keys`` and :class:`Compose` passes those keywords on. Such maps are aligned with the
pixels of the input batch, so :class:`Compose` refuses to put a transform using ``ivar`` after a
geometric one.

=====================  =================================================================
augmentation           physics / what it conserves
=====================  =================================================================
RandomRot90Flip        the 8 dihedral symmetries of the pixel grid; exact (a permutation)
RandomRotation         arbitrary position angle (bilinear); flux to ~1e-3 for a centred source
RandomShift            sub-pixel centring errors (Fourier phase shift: flux exact, periodic)
RandomCropResize       crop + zoom back (apparent size); flux conserved with conserve_flux
PSFDegrade             worse seeing: extra Gaussian blur; flux conserved, FWHM to target
NoiseResample          deeper-to-shallower noise: adds noise so sigma -> factor * sigma
GalacticReddening      Milky-Way dust: flux * 10^(-0.4 R_b E(B-V)) per band
RedshiftDimming        move to higher z: shrink by D_A ratio, dim by (1+z)^4 in surface brightness
=====================  =================================================================

The last four are in :mod:`sim2obs.pretrain.observing` (importable from here as well); this
module holds the base classes, the random-draw and resampling helpers and the geometric ones.
PSFDegrade and GalacticReddening lower the pixel noise along with the galaxy (an extra blur of
~1.3 px sigma leaves ~0.25x the noise sigma). For views at the data's noise level, use
:class:`sim2obs.pretrain.reobserve.Reobserve`, which draws the same effects and tops the noise
up to the target (the training default).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from sim2obs.errors import Sim2ObsValueError

#: FWHM = 2 sqrt(2 ln 2) sigma for a Gaussian.
FWHM_PER_SIGMA = 2.0 * math.sqrt(2.0 * math.log(2.0))

#: the observing-condition augmentations, loaded from sim2obs.pretrain.observing on first use
_OBSERVING_PUBLIC = ("PSFDegrade", "NoiseResample", "GalacticReddening", "RedshiftDimming",
                     "extinction_coefficients")

__all__ = [
    "Augmentation", "Compose", "RandomRot90Flip", "RandomRotation", "RandomShift",
    "RandomCropResize", *_OBSERVING_PUBLIC, "gaussian_kernel", "toeplitz", "toeplitz_row_power",
]


# --------------------------------------------------------------------------------------------
# Random draws and resampling helpers
# --------------------------------------------------------------------------------------------

def _gen_device(generator: torch.Generator | None, device: torch.device) -> torch.device:
    return generator.device if generator is not None else device


def _uniform(shape: tuple[int, ...], low: float, high: float, generator: torch.Generator | None,
             device: torch.device) -> Tensor:
    """Uniform draws in [low, high) as float32 on ``device`` (drawn on the generator's device)."""
    u = torch.rand(shape, generator=generator, device=_gen_device(generator, device))
    return (low + (high - low) * u).to(device)


def _randint(high: int, shape: tuple[int, ...], generator: torch.Generator | None,
             device: torch.device) -> Tensor:
    r = torch.randint(high, shape, generator=generator, device=_gen_device(generator, device))
    return r.to(device)


# --------------------------------------------------------------------------------------------
# Separable linear maps of a stamp: M_y X M_x^T with Toeplitz matrices of a periodic kernel
# --------------------------------------------------------------------------------------------

def gaussian_kernel(sigma: Tensor, n_pad: int, shift: Tensor | None = None) -> Tensor:
    """Periodic 1-D kernels (N, B, n_pad) of the transfer functions ``exp(-2 pi^2 sigma^2 k^2)
    exp(-2 pi i k d)`` (k in cycles per pixel): a Gaussian blur of ``sigma`` (N, B) pixels,
    followed by a band-limited shift of ``d = shift`` (N,) pixels when given (content moves to
    +d; the sign convention of :class:`RandomShift`). Sums to 1 (the transfer is 1 at k = 0).
    On the Nyquist frequency of an even ``n_pad`` the phase is replaced by its real (Hermitian)
    part ``cos(pi d)``, as :class:`RandomShift` does, so the kernel is real."""
    freq = torch.fft.rfftfreq(n_pad, device=sigma.device, dtype=sigma.dtype)
    gain = torch.exp((-2.0 * math.pi**2) * sigma.square()[..., None] * freq**2)
    if shift is None:
        return torch.fft.irfft(gain, n=n_pad)
    if sigma.ndim != 2 or shift.shape != (sigma.shape[0],):
        raise Sim2ObsValueError(
            f"gaussian_kernel: a shift needs sigma (N, B) and shift (N,), got {tuple(sigma.shape)} "
            f"and {tuple(shift.shape)}"
        )
    angle = ((-2.0 * math.pi) * shift.to(sigma.dtype)[:, None, None] * freq).expand_as(gain).clone()
    if n_pad % 2 == 0:  # Nyquist bin: its real (Hermitian) part, set here rather than left to irfft
        gain = gain.clone()
        gain[..., -1] = gain[..., -1] * torch.cos(angle[..., -1])
        angle[..., -1] = 0.0
    return torch.fft.irfft(torch.polar(gain, angle), n=n_pad)


@functools.lru_cache(maxsize=64)  # one small index per (stamp size, padding, device) in use
def _toeplitz_index(n: int, n_pad: int, device: torch.device) -> Tensor:
    """r[t] = k[(n - 1 - t) mod n_pad], t < 2n - 1: every value a Toeplitz matrix of the periodic
    kernel k needs, in the order that ``unfold`` windows read them."""
    return (n - 1 - torch.arange(2 * n - 1, device=device)) % n_pad


def toeplitz(kernel: Tensor, n: int) -> Tensor:
    """(..., n, n) matrices ``M[i, j] = k[(i - j) mod n_pad]`` of periodic kernels ``k``
    (..., n_pad), n_pad >= n: the 1-D convolution of an n-pixel axis zero-padded to n_pad and
    cropped back, as a matrix. For a kernel from a separable transfer function ``T(k_y) T(k_x)``,
    ``M_y X M_x^T`` is the same linear map as multiplying the 2-D FFT of the zero-padded stamp by
    it and cropping: flux that leaves the stamp is lost, none wraps around (as long as the kernel
    has decayed within ``n_pad - n`` pixels; a band-limited shift's sinc tail does not, and its
    remainder wraps through the padding as in a periodic FFT shift)."""
    if kernel.shape[-1] < n:
        raise Sim2ObsValueError(f"toeplitz: a periodic kernel of {kernel.shape[-1]} < {n} pixels would wrap")
    index = _toeplitz_index(n, kernel.shape[-1], kernel.device)
    # windows w[a, j] = r[a + j] = k[(n - 1 - a - j) mod n_pad]; M[i, j] = w[n - 1 - i, j]
    return kernel[..., index].unfold(-1, n, 1).flip(-2)


def toeplitz_row_power(kernel: Tensor, n: int) -> Tensor:
    """(..., n) sums of squares of the rows of :func:`toeplitz(kernel, n) <toeplitz>`, without
    building the matrices: ``sum_j M[i, j]^2``, the fraction of white input noise variance that
    output pixel i keeps (windowed sums of k^2 from a float64 cumulative sum; float32 on MPS)."""
    exact = torch.float32 if kernel.device.type == "mps" else torch.float64  # MPS has no float64
    r = kernel[..., _toeplitz_index(n, kernel.shape[-1], kernel.device)].to(exact).square()
    c = F.pad(torch.cumsum(r, dim=-1), (1, 0))  # c[m] = sum_{t < m} r[t]
    i = torch.arange(n, device=kernel.device)
    # row i of M holds r[n - 1 - i + j], j < n: the window [n - 1 - i, 2n - 1 - i)
    return (c[..., 2 * n - 1 - i] - c[..., n - 1 - i]).to(kernel.dtype)


def _randn(shape: tuple[int, ...], generator: torch.Generator | None, device: torch.device,
           dtype: torch.dtype) -> Tensor:
    r = torch.randn(shape, generator=generator, device=_gen_device(generator, device), dtype=dtype)
    return r.to(device)


def _work_dtype(x: Tensor) -> torch.dtype:
    """float32 for half/bfloat16 inputs (FFT and grid_sample want it), else the input dtype."""
    return torch.float32 if x.dtype in (torch.float16, torch.bfloat16) else x.dtype


def _like(out: Tensor, x: Tensor) -> Tensor:
    """Cast ``out`` to the dtype and memory format of ``x``."""
    out = out.to(x.dtype)
    if x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous():
        out = out.contiguous(memory_format=torch.channels_last)
    return out


def _check_batch(x: Tensor, name: str) -> None:
    if x.ndim != 4 or not torch.is_floating_point(x):
        raise Sim2ObsValueError(
            f"{name}: expects a floating-point (N, B, H, W) batch, got "
            f"{tuple(x.shape)} of dtype {x.dtype}"
        )


def _survey_rows(table: Tensor, survey: Tensor | None, n: int, name: str) -> Tensor:
    """Per-sample rows of a parameter table: ``table`` (B,) for one survey or (S, B) for S
    surveys; ``survey`` (N,) integer indices into its rows (the ``survey`` context of a batch
    that mixes surveys). Returns (1, B) -- one row for every sample -- or (N, B)."""
    if table.ndim == 1:
        return table[None, :]
    if table.shape[0] == 1 and survey is None:
        return table
    if survey is None:
        raise Sim2ObsValueError(
            f"{name} holds values for {table.shape[0]} surveys: pass survey=... (N,) row indices "
            "for the batch (Compose and the training loop pass the batch's 'survey')"
        )
    survey = torch.as_tensor(survey).reshape(-1)
    if survey.numel() != n or survey.dtype.is_floating_point or survey.dtype == torch.bool:
        raise Sim2ObsValueError(
            f"{name}: survey must be {n} integer row indices (one per sample), got "
            f"{survey.numel()} of dtype {survey.dtype}"
        )
    # checked on any device (on a GPU a bad index would be a device-side assert instead)
    if survey.numel() and not (0 <= int(survey.min()) and int(survey.max()) < table.shape[0]):
        raise Sim2ObsValueError(
            f"{name}: survey indices {int(survey.min())}..{int(survey.max())} outside the "
            f"{table.shape[0]} rows of its table"
        )
    return table[survey.to(table.device)]


def _rounded(t: Tensor, digits: int = 3) -> list:
    """Nested list of a (B,) or (S, B) table's values, rounded (for ``extra_repr``)."""
    return np.round(t.detach().cpu().numpy().astype(float), digits).tolist()


def _table(values, name: str, what: str) -> Tensor:
    """float32 (B,) or (S, B) parameter table from a sequence or array; refuses other shapes."""
    if isinstance(values, Tensor):
        values = values.detach().cpu().numpy()
    t = torch.as_tensor(np.asarray(values, dtype=float), dtype=torch.float32)
    if t.ndim == 0:
        t = t.reshape(1)
    if t.ndim > 2 or t.numel() == 0:
        raise Sim2ObsValueError(
            f"{name}: {what} must be one value per band (B,) or one row per survey (S, B), got "
            f"shape {tuple(t.shape)}"
        )
    return t


def affine_resample(x: Tensor, theta: Tensor, supersample: int = 1,
                    padding_mode: str = "zeros") -> Tensor:
    """Resample ``x`` (N, B, H, W) on an affine grid: ``y(p) = x(theta [p; 1])``.

    ``theta`` (N, 2, 3) maps output to input coordinates in the normalised [-1, 1] frame of
    ``F.affine_grid`` (pixel centres, ``align_corners=False``). Values are bilinearly
    interpolated; with ``supersample = m > 1`` each output pixel averages an m x m grid of
    sub-pixel samples (pixel integration), which keeps flux when the image is shrunk.
    """
    n, b, h, w = x.shape
    xf = x.to(_work_dtype(x))
    m = int(supersample)
    grid = F.affine_grid(theta.to(xf), [n, b, h * m, w * m], align_corners=False)
    out = F.grid_sample(xf, grid, mode="bilinear", padding_mode=padding_mode, align_corners=False)
    if m > 1:
        out = F.avg_pool2d(out, m)
    return _like(out, x)


# --------------------------------------------------------------------------------------------
# Base class and composition
# --------------------------------------------------------------------------------------------

class Augmentation(nn.Module):
    """Base class: ``forward(x (N, B, H, W), generator=None, **context) -> (N, B, H, W)``.

    ``geometric`` marks transforms that move pixels; ``context_keys`` names the per-batch
    keyword arguments a transform reads (e.g. ``('ivar',)``).
    """

    geometric: bool = False
    context_keys: tuple[str, ...] = ()

    def forward(self, x: Tensor, generator: torch.Generator | None = None, **context) -> Tensor:
        raise NotImplementedError


class Compose(nn.Module):
    """Apply augmentations in order, sharing one generator: ``(N, B, H, W) -> (N, B, H, W)``.

    Keyword context (``ivar=...``, ``redshift=...``) goes to the transforms whose
    ``context_keys`` name it. Pixel-aligned context (``ivar``) is only valid before any geometric
    transform, so such an order raises :class:`Sim2ObsValueError` at construction.
    """

    def __init__(self, transforms: Sequence[Callable]) -> None:
        super().__init__()
        self.transforms = list(transforms)
        self.layers = nn.ModuleList([t for t in self.transforms if isinstance(t, nn.Module)])
        moved = None
        for t in self.transforms:
            # a transform may read ivar at its own input (aligned) even if it then moves pixels
            if moved and "ivar" in getattr(t, "context_keys", ()):
                raise Sim2ObsValueError(
                    f"Compose: {type(t).__name__} reads the pixel-aligned 'ivar' map but comes after "
                    f"the geometric transform {moved}; put it before every geometric transform"
                )
            if getattr(t, "geometric", False):
                moved = moved or type(t).__name__

    def forward(self, x: Tensor, generator: torch.Generator | None = None, **context) -> Tensor:
        for t in self.transforms:
            keys = getattr(t, "context_keys", ())
            x = t(x, generator, **{k: context[k] for k in keys if k in context})
        return x

    def __repr__(self) -> str:
        inner = ",\n  ".join(repr(t) for t in self.transforms)
        return f"Compose([\n  {inner}\n])"


# --------------------------------------------------------------------------------------------
# Geometric augmentations
# --------------------------------------------------------------------------------------------

class RandomRot90Flip(Augmentation):
    """One of the 8 symmetries of the square (rotations by k * 90 deg, optionally mirrored).

    Physics: a galaxy's position angle and handedness on the sky carry no information about its
    stellar population, and the pixel grid is invariant under these 8 operations, so the result
    is an exact permutation of pixels (flux, noise and PSF statistics unchanged, apart from the
    PSF's own orientation). Each sample gets its own symmetry, uniformly. Non-square stamps only
    get the 4 symmetries that keep their shape (k even).
    """

    geometric = True

    def __init__(self) -> None:
        super().__init__()
        self._perms: dict[tuple, Tensor] = {}  # (H, W, device) -> (8, H*W) source-pixel tables

    def _perm_table(self, h: int, w: int, device: torch.device) -> Tensor:
        """Row c: the flat source index of every output pixel under symmetry c (c >= 4:
        mirrored, then rotated by (c % 4) * 90 deg); odd c only for square stamps. Cached."""
        key = (h, w, device)
        table = self._perms.get(key)
        if table is None:
            grid = torch.arange(h * w).view(h, w)
            rows = []
            for c in range(8):
                if h != w and c % 2:
                    rows.append(torch.zeros(h * w, dtype=torch.long))  # never drawn (shape change)
                    continue
                g = grid.flip(-1) if c >= 4 else grid
                rows.append(torch.rot90(g, c % 4, dims=(-2, -1)).reshape(-1))
            table = torch.stack(rows).to(device)
            self._perms[key] = table
        return table

    def forward(self, x: Tensor, generator: torch.Generator | None = None, **context) -> Tensor:
        _check_batch(x, "RandomRot90Flip")
        n, b, h, w = x.shape
        square = h == w
        code = _randint(8 if square else 4, (n,), generator, x.device)
        if not square:
            code = code * 2  # 0, 2, 4, 6: k in {0, 2}, with or without flip
        # one gather over the whole batch: an exact pixel permutation per sample
        index = self._perm_table(h, w, x.device)[code][:, None, :].expand(n, b, h * w)
        out = x.reshape(n, b, h * w).gather(2, index).view(n, b, h, w)
        return _like(out, x)


class RandomRotation(Augmentation):
    """Rotation by an arbitrary angle theta ~ U(-degrees, degrees) about the stamp centre.

    Physics: position angle on the sky is arbitrary. Maths: ``y(p) = x(R(theta)^-1 p)`` with
    bilinear interpolation (``F.grid_sample``); corners that come from outside the stamp are
    ``padding_mode`` ('zeros', 'border' or 'reflection'). Bilinear interpolation slightly smooths
    the image and its noise; flux of a source well inside the stamp is kept to ~1e-3.
    """

    geometric = True

    def __init__(self, degrees: float = 180.0, padding_mode: str = "zeros") -> None:
        super().__init__()
        if padding_mode not in ("zeros", "border", "reflection"):
            raise Sim2ObsValueError(
                f"RandomRotation: padding_mode '{padding_mode}' unknown; use zeros, border or reflection"
            )
        self.degrees = float(degrees)
        self.padding_mode = padding_mode

    def forward(self, x: Tensor, generator: torch.Generator | None = None, **context) -> Tensor:
        _check_batch(x, "RandomRotation")
        n, _, h, w = x.shape
        theta = self.draw_theta(n, h, w, generator, x.device)
        return affine_resample(x, theta, padding_mode=self.padding_mode)

    def draw_theta(self, n: int, h: int, w: int, generator: torch.Generator | None,
                   device: torch.device) -> Tensor:
        """(N, 2, 3) affine matrices (``F.affine_grid`` convention) of N random rotations."""
        angle = torch.deg2rad(_uniform((n,), -self.degrees, self.degrees, generator, device))
        c, s = torch.cos(angle), torch.sin(angle)
        zero = torch.zeros_like(c)
        # rotation in pixel units expressed in the normalised frame (aspect ratio h / w)
        return torch.stack([
            torch.stack([c, -s * h / w, zero], dim=1),
            torch.stack([s * w / h, c, zero], dim=1),
        ], dim=1)

    def extra_repr(self) -> str:
        return f"degrees={self.degrees}, padding_mode={self.padding_mode!r}"


class RandomShift(Augmentation):
    """Sub-pixel translation by (dx, dy) ~ U(-max_shift, max_shift)^2 pixels per sample.

    Physics: the centring of a cutout on its galaxy is uncertain at the sub-pixel level.
    ``method='fourier'`` multiplies the 2-D FFT by ``exp(-2 pi i (k_x dx + k_y dy))``
    (k in cycles per pixel): an exact band-limited shift that keeps total flux exactly and wraps
    periodically at the edges. ``method='bilinear'`` interpolates (zeros enter at the edge, the
    image is slightly smoothed).
    """

    geometric = True

    def __init__(self, max_shift: float = 1.0, method: str = "fourier") -> None:
        super().__init__()
        if method not in ("fourier", "bilinear"):
            raise Sim2ObsValueError(f"RandomShift: method '{method}' unknown; use fourier or bilinear")
        if max_shift < 0:
            raise Sim2ObsValueError(f"RandomShift: max_shift must be >= 0, got {max_shift}")
        self.max_shift = float(max_shift)
        self.method = method

    def forward(self, x: Tensor, generator: torch.Generator | None = None, **context) -> Tensor:
        _check_batch(x, "RandomShift")
        n, _, h, w = x.shape
        d = _uniform((n, 2), -self.max_shift, self.max_shift, generator, x.device)
        dx, dy = d[:, 0], d[:, 1]
        if self.method == "bilinear":
            one, zero = torch.ones_like(dx), torch.zeros_like(dx)
            theta = torch.stack([
                torch.stack([one, zero, -2.0 * dx / w], dim=1),
                torch.stack([zero, one, -2.0 * dy / h], dim=1),
            ], dim=1)
            return affine_resample(x, theta)
        xf = x.to(_work_dtype(x))
        # Real FFT (half spectrum along W); the phase is separable, exp(-2 pi i k_y dy) times
        # exp(-2 pi i k_x dx), built from (N, H) and (N, W//2+1) factors. The result equals
        # Re(ifft2(fft2(x) * phase)) with the full complex FFT: on Nyquist frequencies (k = -1/2
        # for an even size) that real part keeps the Hermitian part of the phase, cos(pi dy) on
        # the Nyquist row and cos(pi (dx + dy)) at the Nyquist corner; irfft2 takes the real
        # part of the Nyquist column itself.
        ky = torch.fft.fftfreq(h, device=x.device, dtype=xf.dtype)
        kx = torch.fft.rfftfreq(w, device=x.device, dtype=xf.dtype)
        ang_y = -2.0 * math.pi * ky[None, :] * dy.to(xf)[:, None]
        ang_x = -2.0 * math.pi * kx[None, :] * dx.to(xf)[:, None]
        mag_y = torch.ones_like(ang_y)
        if h % 2 == 0:
            mag_y[:, h // 2] = torch.cos(ang_y[:, h // 2])
            ang_y[:, h // 2] = 0.0
        phase = torch.polar(mag_y, ang_y)[:, :, None] * torch.polar(torch.ones_like(ang_x), ang_x)[:, None, :]
        if h % 2 == 0 and w % 2 == 0:
            phase[:, h // 2, w // 2] = torch.cos(math.pi * (dx + dy)).to(phase)
        spec = torch.fft.rfft2(xf)
        spec.mul_(phase[:, None])
        out = torch.fft.irfft2(spec, s=(h, w))
        return _like(out, x)

    def extra_repr(self) -> str:
        return f"max_shift={self.max_shift}, method={self.method!r}"


class RandomCropResize(Augmentation):
    """Crop a random square window and resize it back to the full stamp (zoom by 1/s).

    The window side is ``s * H`` with ``s ~ U(scale)``, ``0 < s <= 1``; with ``jitter`` its centre
    is drawn uniformly so the window stays inside the stamp, otherwise it is centred. Maths:
    ``y(p) = c * x(s p + t)`` (bilinear). Physics: a change of apparent size (as for a galaxy at
    another distance, without the dimming -- see :class:`RedshiftDimming`). With
    ``conserve_flux=True`` (default) ``c = s^2`` so that pixel values stay flux per pixel and the
    total flux of the cropped region is kept; otherwise ``c = 1`` (surface brightness kept).
    """

    geometric = True

    def __init__(self, scale: tuple[float, float] = (0.8, 1.0), jitter: bool = True,
                 conserve_flux: bool = True) -> None:
        super().__init__()
        lo, hi = (float(v) for v in scale)
        if not 0 < lo <= hi <= 1:
            raise Sim2ObsValueError(f"RandomCropResize: need 0 < scale[0] <= scale[1] <= 1, got {scale}")
        self.scale = (lo, hi)
        self.jitter = bool(jitter)
        self.conserve_flux = bool(conserve_flux)

    def forward(self, x: Tensor, generator: torch.Generator | None = None, **context) -> Tensor:
        _check_batch(x, "RandomCropResize")
        n = x.shape[0]
        s = _uniform((n,), *self.scale, generator, x.device)
        if self.jitter:
            t = (2.0 * _uniform((n, 2), 0.0, 1.0, generator, x.device) - 1.0) * (1.0 - s)[:, None]
        else:
            t = torch.zeros(n, 2, device=x.device)
        zero = torch.zeros_like(s)
        theta = torch.stack([
            torch.stack([s, zero, t[:, 0]], dim=1),
            torch.stack([zero, s, t[:, 1]], dim=1),
        ], dim=1)
        out = affine_resample(x, theta)
        if self.conserve_flux:
            out = _like(out.to(_work_dtype(x)) * (s**2).to(_work_dtype(x))[:, None, None, None], x)
        return out

    def extra_repr(self) -> str:
        return f"scale={self.scale}, jitter={self.jitter}, conserve_flux={self.conserve_flux}"


# --------------------------------------------------------------------------------------------
# Observing-condition augmentations live in sim2obs.pretrain.observing; importable from here too
# --------------------------------------------------------------------------------------------

_OBSERVING = (*_OBSERVING_PUBLIC, "check_ivar_shape", "noise_sigma",
              "_reset_pad_cache")  # the last: PSFDegrade's load hook, named in pickles before 0.2.2


def __getattr__(name: str):
    """``from sim2obs.pretrain.augment import PSFDegrade`` (and the other observing-condition
    augmentations) keeps working: they are loaded from :mod:`sim2obs.pretrain.observing` on first
    use (a lazy import: that module builds on this one)."""
    if name in _OBSERVING:
        from sim2obs.pretrain import observing

        return getattr(observing, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted({*globals(), *_OBSERVING})
