"""Flux calibration conventions against hand-computed values."""

import pytest

from sim2obs.data import ingest
from sim2obs.data.calibration import NJY_PER_NMGY, flux_scale, hst_ab_zeropoint, zeropoint_to_nmgy


def _lk(d):
    return lambda k: d.get(k)


def test_units_bunit():
    assert flux_scale(_lk({"BUNIT": "nanomaggy"}))[0] == 1.0
    assert flux_scale(_lk({"BUNIT": "nJy"}))[0] == pytest.approx(1 / 3631)      # 3631 nJy = 1 nmgy
    assert flux_scale(_lk({"BUNIT": "uJy"}))[0] == pytest.approx(1000 / 3631)


def test_units_zeropoints():
    # ZP 27: 1 count = 10^(-0.4*4.5) nmgy = 0.015848932 nmgy
    assert flux_scale(_lk({"MAGZERO": 27.0}))[0] == pytest.approx(0.0158489319, rel=1e-8)
    assert flux_scale(_lk({"MAGZP": 22.5}))[0] == pytest.approx(1.0)
    # FLUXMAG0 = 1e11 -> ZP = 27.5 -> 10^(-0.4*5) = 0.01
    scale, rec = flux_scale(_lk({"FLUXMAG0": 1e11}))
    assert scale == pytest.approx(0.01) and rec["zeropoint"] == pytest.approx(27.5)
    assert flux_scale(_lk({}), zeropoint=25.0)[0] == pytest.approx(0.1)          # 10^(-1)


def test_units_hst_photflam():
    # ACS/WFC F814W-like: PHOTFLAM 7.0332e-20, PHOTPLAM 8045.0; by hand:
    # -2.5 log10(7.0332e-20) = 47.8821; -21.10 -> 26.7821; -5 log10(8045) = -19.5277 -> 7.2545;
    # +18.692 -> 25.9465 (STScI quotes 25.94 for F814W)
    zp = 25.9465
    assert hst_ab_zeropoint(7.0332e-20, 8045.0) == pytest.approx(zp, abs=1e-3)
    scale, rec = flux_scale(_lk({"PHOTFLAM": 7.0332e-20, "PHOTPLAM": 8045.0, "PHOTZPT": -21.10}))
    assert scale == pytest.approx(10 ** (-0.4 * (zp - 22.5)), rel=1e-3)
    assert rec["zeropoint"] == pytest.approx(zp, abs=1e-3)
    with pytest.raises(LookupError, match="PHOTPLAM"):
        flux_scale(_lk({"PHOTFLAM": 7e-20}))
    with pytest.raises(LookupError, match="--zeropoint"):
        flux_scale(_lk({"BUNIT": "ADU"}))


def test_nanomaggy_definition_and_import_path():
    """22.5 mag AB is 1 nanomaggy = 3631 nJy; counts at ZP 22.5 are already nanomaggies; the
    functions are still importable from sim2obs.data.ingest (0.2)."""
    assert zeropoint_to_nmgy(22.5) == 1.0
    assert zeropoint_to_nmgy(25.0) == pytest.approx(10 ** -1.0, rel=1e-12)
    assert NJY_PER_NMGY == 3631.0
    assert ingest.flux_scale is flux_scale and ingest.hst_ab_zeropoint is hst_ab_zeropoint
