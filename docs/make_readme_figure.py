"""Make ``docs/mock_grid.png``, the README's picture: three mini-universe galaxies rendered by
every survey sim2obs knows, over the same patch of sky.

    python docs/make_readme_figure.py            # ~1 minute on 2 CPU cores, no network

Colour composites (Lupton et al. 2004 asinh stretch, via ``astropy.visualization``) of each
survey's bands nearest to i, r, g (single-band HST-COSMOS in grey), in surface brightness
(nmgy/arcsec^2) with one stretch per galaxy for all surveys, so depth (noise) and resolution
differ as they would in the data. Deterministic: same script, same pixels.
"""

from __future__ import annotations

import math
import tempfile
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from sim2obs.forward_models.render import RenderConfig, render_galaxy  # noqa: E402
from sim2obs.forward_models.simulations import open_source  # noqa: E402
from sim2obs.forward_models.simulations.mini import build_mini_universe  # noqa: E402
from sim2obs.forward_models.surveys import get_survey  # noqa: E402
from sim2obs.plots import default_rgb_bands, lupton_composite  # noqa: E402

SURVEYS = ["sdss", "des", "hsc", "lsst", "euclid", "hst-cosmos"]  # worst to best resolution
FOV_ARCSEC = 12.0
REDSHIFT = 0.1
SEED = 0
Q = 8.0  # Lupton softening
STRETCH_FRACTION = 0.05  # linear part of the stretch, as a fraction of the galaxy's peak surface brightness


def pick(galaxies):
    """A massive quiescent galaxy, the most massive star-forming one, and a small star-former."""
    sf = sorted((g for g in galaxies if g.labels["log_ssfr"] > -11), key=lambda g: g.labels["log_mstar"])
    q = sorted((g for g in galaxies if g.labels["log_ssfr"] <= -11), key=lambda g: g.labels["log_mstar"])
    chosen = ([q[-1]] if q else []) + ([sf[-1], sf[len(sf) // 3]] if len(sf) >= 2 else sf)
    return chosen[:3]


OUT = Path(__file__).resolve().parent / "mock_grid.png"


def main(out: Path = OUT) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        uni = build_mini_universe(Path(tmp) / "mini", n_galaxies=40, seed=SEED, progress=False)
        source = open_source(f"tng:{uni}", progress=False)
        galaxies = pick([source.load(int(i)) for i in source.ids()])
    fig, axes = plt.subplots(len(galaxies), len(SURVEYS), figsize=(2.0 * len(SURVEYS), 2.15 * len(galaxies)))
    for r, gal in enumerate(galaxies):
        cuts, stretch = {}, None
        for name in SURVEYS:
            spec = get_survey(name)
            stamp = int(math.ceil(FOV_ARCSEC / spec.pixel_scale_arcsec))
            cuts[name] = render_galaxy(gal, spec, RenderConfig(stamp=stamp, redshift=REDSHIFT,
                                                               orientation="random"), seed=SEED + r)
            if name == "hsc":  # the galaxy's peak surface brightness at ground-based seeing
                stretch = STRETCH_FRACTION * float(cuts[name].noiseless.max()) / spec.pixel_scale_arcsec**2
        for c, name in enumerate(SURVEYS):
            spec, cut = get_survey(name), cuts[name]
            names = list(spec.band_names)
            rgb = default_rgb_bands(names, [b.effective_wavelength_nm for b in spec.bands])
            planes = [cut.image[names.index(b)] / spec.pixel_scale_arcsec**2 for b in rgb]
            img = lupton_composite(planes, stretch=stretch, q=Q)
            ax = axes[r, c]
            ax.imshow(img, origin="lower")
            ax.set_xticks([])
            ax.set_yticks([])
            if r == 0:
                ax.set_title(f"{name} ({''.join(rgb[::-1]) if len(rgb) > 1 else rgb[0]})", fontsize=9)
            if c == 0:
                lab = gal.labels
                ax.set_ylabel(f"log M* {lab['log_mstar']:.1f}\nlog sSFR {lab['log_ssfr']:.1f}", fontsize=8)
    fig.suptitle(f"sim2obs mini-universe galaxies at z = {REDSHIFT}, {FOV_ARCSEC:.0f}\" across, "
                 "as six surveys see them", fontsize=10)
    fig.tight_layout()
    fig.savefig(out, dpi=80)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
