"""Survey specifications: pixel scale, bands, depth, noise and PSF of each imaging survey.

Each built-in survey is one TOML file in ``surveys/data/``. Values that ``surveycodex`` provides
(pixel scale, gain, zeropoint, sky brightness, exposure time, median PSF FWHM -- each with its
reference in surveycodex's YAML) are taken from it; the file adds what surveycodex lacks (read
noise, number of exposures, PSF profile and seeing scatter, the speclite filter curve), each line
with its source. A user survey is a TOML or YAML file with the same keys, where every band
gives its values explicitly (see README "Defining your own survey").

Objects are immutable: ``spec.with_bands(["g", "r"])`` or ``dataclasses.replace`` return new ones.
"""

from __future__ import annotations

import dataclasses
import math
import tomllib
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

from sim2obs.errors import Sim2ObsDataError, Sim2ObsFileNotFoundError, Sim2ObsKeyError

_DATA = resources.files(__package__) / "data"
_PSF_KINDS = ("moffat", "kolmogorov", "gaussian", "airy")


@dataclass(frozen=True)
class Band:
    """One photometric band of a survey.

    Attributes
    ----------
    name : band label used in shards and on the command line ('g', 'VIS', 'F814W')
    filter : speclite filter name ('hsc2017-g') or 'galsim:FILE' for GalSim's shipped bandpasses
    zeropoint_mag : AB magnitude that yields 1 electron per second (surveycodex convention)
    sky_mag_arcsec2 : mean sky surface brightness, AB mag/arcsec^2
    exposure_s : total exposure time of the coadd (s)
    n_exposures : number of exposures in the coadd (read noise adds once per exposure)
    psf_fwhm_arcsec : median PSF FWHM
    read_noise_e : read noise per exposure per native pixel (electrons)
    gain_e_per_adu : detector gain
    native_pixel_scale_arcsec : detector pixel scale when the band is resampled onto the survey
        grid (e.g. Euclid NISP at 0.3" on the 0.1" VIS grid); None when the same
    effective_wavelength_nm : effective wavelength of the filter (informational)
    """

    name: str
    filter: str
    zeropoint_mag: float
    sky_mag_arcsec2: float
    exposure_s: float
    n_exposures: int
    psf_fwhm_arcsec: float
    read_noise_e: float
    gain_e_per_adu: float
    native_pixel_scale_arcsec: float | None = None
    effective_wavelength_nm: float | None = None

    def __post_init__(self) -> None:
        for key in ("zeropoint_mag", "sky_mag_arcsec2", "exposure_s", "psf_fwhm_arcsec",
                    "read_noise_e", "gain_e_per_adu"):
            value = getattr(self, key)
            if not isinstance(value, int | float) or not math.isfinite(value):
                raise Sim2ObsDataError(f"band '{self.name}': '{key}' must be a finite number, got {value!r}")
        if self.exposure_s <= 0 or self.psf_fwhm_arcsec <= 0 or self.gain_e_per_adu <= 0:
            raise Sim2ObsDataError(
                f"band '{self.name}': exposure_s, psf_fwhm_arcsec and gain_e_per_adu must be positive"
            )
        if self.read_noise_e < 0 or int(self.n_exposures) < 1:
            raise Sim2ObsDataError(f"band '{self.name}': read_noise_e >= 0 and n_exposures >= 1 required")
        object.__setattr__(self, "n_exposures", int(self.n_exposures))

    def nmgy_to_electrons(self) -> float:
        """Electrons collected in the whole coadd per nanomaggy of source flux.

        A source of AB magnitude m gives 10^(-0.4 (m - ZP)) e-/s (zeropoint definition), and
        f[nmgy] = 10^(-0.4 (m - 22.5)) (SDSS nanomaggy definition), so
        e-/nmgy = 10^(0.4 (ZP - 22.5)) * t_exp.
        """
        return 10 ** (0.4 * (self.zeropoint_mag - 22.5)) * self.exposure_s

    def sky_electrons_per_pixel(self, pixel_scale_arcsec: float) -> float:
        """Mean sky electrons per output pixel of the coadd."""
        sky_nmgy = 10 ** (-0.4 * (self.sky_mag_arcsec2 - 22.5)) * pixel_scale_arcsec**2
        return sky_nmgy * self.nmgy_to_electrons()

    def read_variance_e2(self, pixel_scale_arcsec: float) -> float:
        """Read-noise variance per output pixel (e-^2), summed over the exposures.

        When the band is resampled from larger native pixels, the noise per unit area is kept
        (variance scales with the pixel-area ratio); pixel-to-pixel correlation is ignored here
        and added by the 'correlated_noise' realism effect.
        """
        var = self.n_exposures * self.read_noise_e**2
        if self.native_pixel_scale_arcsec:
            var *= (pixel_scale_arcsec / self.native_pixel_scale_arcsec) ** 2
        return var


@dataclass(frozen=True)
class PSFModel:
    """PSF profile family of a survey.

    ``kind``: 'kolmogorov' or 'moffat' (ground), 'airy' (space: Airy of the obscured aperture
    convolved with a Gaussian so the total FWHM equals the band's FWHM), or 'gaussian'.
    ``seeing_scatter_dex``: lognormal width of per-galaxy FWHM for ``--realism observed``.
    ``correlated_noise``: 'resampled' (ground coadds, Lanczos resampling correlations) or
    'cosmos' (GalSim's measured HST/ACS COSMOS correlation function).
    """

    kind: str = "kolmogorov"
    moffat_beta: float = 4.765
    seeing_scatter_dex: float = 0.08
    correlated_noise: str = "resampled"

    def __post_init__(self) -> None:
        if self.kind not in _PSF_KINDS:
            raise Sim2ObsDataError(f"PSF kind '{self.kind}' unknown; use one of {_PSF_KINDS}")
        if self.correlated_noise not in ("resampled", "cosmos"):
            raise Sim2ObsDataError(
                f"correlated_noise '{self.correlated_noise}' unknown; use 'resampled' or 'cosmos'"
            )
        if self.moffat_beta <= 1 or self.seeing_scatter_dex < 0:
            raise Sim2ObsDataError("PSF moffat_beta must be > 1 and seeing_scatter_dex >= 0")


@dataclass(frozen=True)
class SurveySpec:
    """An imaging survey: a pixel grid, its bands and PSF model, with the references used."""

    name: str
    title: str
    pixel_scale_arcsec: float
    mirror_diameter_m: float
    obscuration: float
    space: bool
    psf: PSFModel
    bands: tuple[Band, ...]
    references: dict = field(default_factory=dict, compare=False)
    source_file: str = ""

    def __post_init__(self) -> None:
        if not self.bands:
            raise Sim2ObsDataError(f"survey '{self.name}' has no bands")
        if self.pixel_scale_arcsec <= 0:
            raise Sim2ObsDataError(f"survey '{self.name}': pixel_scale_arcsec must be positive")
        names = [b.name for b in self.bands]
        if len(set(names)) != len(names):
            raise Sim2ObsDataError(f"survey '{self.name}': duplicate band names {names}")
        object.__setattr__(self, "bands", tuple(self.bands))

    @property
    def band_names(self) -> tuple[str, ...]:
        return tuple(b.name for b in self.bands)

    def band(self, name: str) -> Band:
        """The band called ``name``; unknown names raise with the list of valid ones."""
        for b in self.bands:
            if b.name == name:
                return b
        raise Sim2ObsKeyError(
            f"survey '{self.name}' has no band '{name}'; its bands are {list(self.band_names)}"
        )

    def with_bands(self, names) -> SurveySpec:
        """A new spec restricted to (and ordered as) ``names``."""
        return dataclasses.replace(self, bands=tuple(self.band(n) for n in names))

    def replace(self, **changes) -> SurveySpec:
        return dataclasses.replace(self, **changes)


def available_surveys() -> list[str]:
    """Names of the built-in surveys."""
    return sorted(p.name[:-5] for p in _DATA.iterdir() if p.name.endswith(".toml"))


def get_survey(name_or_path: str | Path) -> SurveySpec:
    """A built-in survey by name (``hsc``, ``sdss``, ...) or a user survey file (TOML/YAML)."""
    text = str(name_or_path)
    path = Path(text)
    if path.suffix.lower() in (".toml", ".yaml", ".yml"):
        if not path.is_file():
            raise Sim2ObsFileNotFoundError(f"survey file '{path}' does not exist")
        return load_survey_file(path)
    key = text.lower()
    if key not in available_surveys():
        raise Sim2ObsKeyError(
            f"unknown survey '{name_or_path}'; built-in surveys are {available_surveys()}, or "
            "pass the path of a .toml/.yaml survey file"
        )
    with (_DATA / f"{key}.toml").open("rb") as fh:
        return _from_dict(tomllib.load(fh), f"sim2obs/forward_models/surveys/data/{key}.toml")


def load_survey_file(path: str | Path) -> SurveySpec:
    """Read a user survey from TOML or YAML (same keys as the built-in files)."""
    path = Path(path)
    try:
        if path.suffix.lower() == ".toml":
            with path.open("rb") as fh:
                data = tomllib.load(fh)
        else:
            import yaml

            with path.open() as fh:
                data = yaml.safe_load(fh)
    except (tomllib.TOMLDecodeError, ValueError) as exc:
        raise Sim2ObsDataError(f"survey file '{path}' is not valid: {exc}") from exc
    if not isinstance(data, dict):
        raise Sim2ObsDataError(f"survey file '{path}' must contain a mapping of keys")
    return _from_dict(data, str(path))


def _codex(name: str, where: str):
    import surveycodex

    try:
        return surveycodex.get_survey(name)
    except ValueError as exc:
        raise Sim2ObsDataError(f"{where}: surveycodex has no survey '{name}' ({exc})") from exc


def _from_dict(data: dict, where: str) -> SurveySpec:
    def need(d: dict, key: str, ctx: str):
        if key not in d:
            raise Sim2ObsDataError(f"{where}: missing key '{key}' in {ctx}")
        return d[key]

    name = str(need(data, "name", "the top level"))
    codex_name = data.get("surveycodex")
    codex = _codex(codex_name, where) if codex_name else None
    refs: dict = {}
    if codex is not None:
        refs[codex_name] = codex.references

    def top(key: str, codex_attr: str, unit: str):
        if key in data:
            return float(data[key])
        if codex is None:
            raise Sim2ObsDataError(f"{where}: missing key '{key}' (no 'surveycodex' entry to take it from)")
        return float(getattr(codex, codex_attr).to_value(unit))

    pixel_scale = top("pixel_scale_arcsec", "pixel_scale", "arcsec")
    psf_d = data.get("psf", {})
    psf = PSFModel(**{k: v for k, v in psf_d.items()})
    bands_d = need(data, "bands", "the top level")
    if not isinstance(bands_d, dict) or not bands_d:
        raise Sim2ObsDataError(f"{where}: 'bands' must be a table of bands")
    bands = []
    for bname, bd in bands_d.items():
        ctx = f"band '{bname}'"
        bcodex_name = bd.get("surveycodex", codex_name)
        bcodex = _codex(bcodex_name, where) if bcodex_name else None
        if bcodex_name and bcodex_name not in refs:
            refs[bcodex_name] = bcodex.references
        filt = None
        if bcodex is not None:
            cband = bd.get("surveycodex_band", bname)
            try:
                filt = bcodex.get_filter(cband)
            except ValueError as exc:
                raise Sim2ObsDataError(f"{where}: {ctx}: {exc}") from exc

        def val(key, attr, unit, bd=bd, filt=filt, ctx=ctx):
            if key in bd:
                return float(bd[key])
            if filt is None:
                raise Sim2ObsDataError(f"{where}: {ctx} needs '{key}' (no surveycodex entry)")
            return float(getattr(filt, attr).to_value(unit))

        exposure = val("exposure_s", "full_exposure_time", "s")
        n_exp = int(bd.get("n_exposures", 1))
        if bd.get("exposure_is_per_exposure", False) and "exposure_s" not in bd:
            exposure *= n_exp
        if "gain_e_per_adu" in bd:
            gain = float(bd["gain_e_per_adu"])
        elif "gain_e_per_adu" in data:
            gain = float(data["gain_e_per_adu"])
        elif bcodex is not None:
            gain = float(bcodex.gain.to_value("electron / adu"))
        else:
            raise Sim2ObsDataError(f"{where}: {ctx} needs 'gain_e_per_adu'")
        read_noise = bd.get("read_noise_e", data.get("read_noise_e"))
        if read_noise is None:
            raise Sim2ObsDataError(f"{where}: {ctx} needs 'read_noise_e' (per exposure, electrons)")
        wl = bd.get("effective_wavelength_nm")
        if wl is None and filt is not None and filt.effective_wavelength is not None:
            wl = float(filt.effective_wavelength.to_value("nm"))
        bands.append(Band(
            name=str(bname),
            filter=str(need(bd, "filter", ctx)),
            zeropoint_mag=val("zeropoint_mag", "zeropoint", "mag"),
            sky_mag_arcsec2=val("sky_mag_arcsec2", "sky_brightness", "mag / arcsec2"),
            exposure_s=exposure,
            n_exposures=n_exp,
            psf_fwhm_arcsec=val("psf_fwhm_arcsec", "psf_fwhm", "arcsec"),
            read_noise_e=float(read_noise),
            gain_e_per_adu=gain,
            native_pixel_scale_arcsec=bd.get("native_pixel_scale_arcsec"),
            effective_wavelength_nm=wl,
        ))
    diameter = data.get("mirror_diameter_m")
    if diameter is None:
        diameter = float(codex.mirror_diameter.to_value("m")) if codex else 0.0
    obsc = data.get("obscuration")
    if obsc is None:
        obsc = float(codex.obscuration.value) if codex else 0.0
    space = bool(data.get("space", False))
    if psf.kind == "airy" and diameter <= 0:
        raise Sim2ObsDataError(f"{where}: an 'airy' PSF needs 'mirror_diameter_m'")
    return SurveySpec(
        name=name,
        title=str(data.get("title", name)),
        pixel_scale_arcsec=pixel_scale,
        mirror_diameter_m=float(diameter),
        obscuration=float(obsc),
        space=space,
        psf=psf,
        bands=tuple(bands),
        references=refs,
        source_file=where,
    )
