"""Flux calibration of real cutouts: header keywords -> a multiplier to nanomaggies.

Conventions (first that applies; :func:`flux_scale` records which was used): a zeropoint given
by the user; ``BUNIT`` in nanomaggies, nJy, uJy or Jy; ``MAGZERO``/``MAGZP``/``ZEROPNT``/``ZP``
(counts with that AB zeropoint); ``FLUXMAG0`` (ZP = 2.5 log10 FLUXMAG0, HSC/LSST pipelines);
HST ``PHOTFLAM`` with ``PHOTPLAM`` (an STmag zeropoint turned into AB).
"""

from __future__ import annotations

import math

#: 1 nanomaggy = 3.631 uJy = 3631 nJy: a maggy is the flux of an AB magnitude 0 source, 3631 Jy
#: (Oke & Gunn 1983, ApJ 266, 713; SDSS "nanomaggies" convention, Finkbeiner et al. 2004, AJ 128,
#: 2577), so m_AB = 22.5 - 2.5 log10(f / nmgy).
NJY_PER_NMGY = 3631.0
#: STmag zeropoint of HST's PHOTFLAM calibration: m_ST = -2.5 log10(f_lambda) - 21.10 (f_lambda in
#: erg/s/cm^2/A; Koornneef et al. 1986; STScI ACS/WFC3 zeropoint documentation, PHOTZPT keyword).
_PHOTZPT_DEFAULT = -21.10
#: AB - ST at pivot wavelength lambda_p (A): m_AB = m_ST - 5 log10(lambda_p) + 18.692 (Sirianni et
#: al. 2005, PASP 117, 1049, eq. 11 with c in A/s).
_AB_MINUS_ST_CONST = 18.692



def zeropoint_to_nmgy(zp: float) -> float:
    """Multiplier from counts with AB zeropoint ``zp`` to nanomaggies: 10^(-0.4 (zp - 22.5))."""
    return 10 ** (-0.4 * (float(zp) - 22.5))


def hst_ab_zeropoint(photflam: float, photplam: float, photzpt: float = _PHOTZPT_DEFAULT) -> float:
    """AB zeropoint of an HST image in counts/s from PHOTFLAM (erg/s/cm^2/Å per count/s) and the
    pivot wavelength PHOTPLAM (Å): ZP_ST = -2.5 log10 PHOTFLAM + PHOTZPT, then
    ZP_AB = ZP_ST - 5 log10 PHOTPLAM + 18.692."""
    return -2.5 * math.log10(photflam) + photzpt - 5 * math.log10(photplam) + _AB_MINUS_ST_CONST


def flux_scale(lookup, zeropoint: float | None = None) -> tuple[float, dict]:
    """(multiplier to nanomaggies, record of what was used) from header keywords.

    ``lookup(key)`` returns a header value or None. Raises :class:`LookupError` when no known
    convention applies (the caller names the file).
    """
    if zeropoint is not None:
        return zeropoint_to_nmgy(zeropoint), {"method": "user zeropoint", "zeropoint": float(zeropoint)}
    bunit = lookup("BUNIT")
    if bunit is not None:
        unit = str(bunit).strip().lower().replace(" ", "")
        factors = {"nanomaggy": 1.0, "nanomaggies": 1.0, "nmgy": 1.0,
                   "njy": 1 / NJY_PER_NMGY, "nanojansky": 1 / NJY_PER_NMGY,
                   "ujy": 1e3 / NJY_PER_NMGY, "microjy": 1e3 / NJY_PER_NMGY,
                   "jy": 1e9 / NJY_PER_NMGY}
        if unit in factors:
            return factors[unit], {"method": "BUNIT", "BUNIT": str(bunit)}
    for key in ("MAGZERO", "MAGZP", "ZEROPNT", "ZP"):
        val = lookup(key)
        if val is not None:
            return zeropoint_to_nmgy(float(val)), {"method": key, key: float(val)}
    val = lookup("FLUXMAG0")
    if val is not None:
        if not float(val) > 0:
            raise LookupError(f"FLUXMAG0 = {val} is not positive")
        zp = 2.5 * math.log10(float(val))
        return zeropoint_to_nmgy(zp), {"method": "FLUXMAG0", "FLUXMAG0": float(val), "zeropoint": zp}
    photflam = lookup("PHOTFLAM")
    if photflam is not None:
        plam = lookup("PHOTPLAM")
        if plam is None:
            raise LookupError("PHOTFLAM without PHOTPLAM (pivot wavelength): cannot form an AB "
                              "zeropoint; pass --zeropoint")
        zpt = lookup("PHOTZPT")
        zpt = _PHOTZPT_DEFAULT if zpt is None else float(zpt)
        zp = hst_ab_zeropoint(float(photflam), float(plam), zpt)
        return zeropoint_to_nmgy(zp), {"method": "PHOTFLAM", "PHOTFLAM": float(photflam),
                                       "PHOTPLAM": float(plam), "PHOTZPT": zpt, "zeropoint": zp}
    raise LookupError(
        f"no flux calibration in the header (BUNIT={bunit!r}; no MAGZERO, MAGZP, FLUXMAG0 or "
        "PHOTFLAM+PHOTPLAM): pass --zeropoint ZP (22.5 if the pixels are already nanomaggies), "
        "or --uncalibrated"
    )
