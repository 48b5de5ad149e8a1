"""Simulation readers: one :class:`~.base.GalaxySource` per simulation kind.

:func:`open_source` turns a source spec (as given to ``sim2obs render --source``) into a source:

=========================  ===================================================================
``mini``                   the built-in mini-universe (500 galaxies, seed 0), built and cached
                           on first use (``$SIM2OBS_CACHE`` or ``~/.cache/sim2obs``)
``mini:DIR``               a mini-universe in DIR (built there with default parameters if DIR
                           does not exist or is empty)
``tng:PATH``               an IllustrisTNG run: its ``output`` folder or the folder above it
``tng-cutout:FILE_OR_DIR`` TNG web-API cutout file(s)
``eagle:PATH``             an EAGLE snapshot (``eagle.EagleSource``)
=========================  ===================================================================
"""

from __future__ import annotations

from pathlib import Path

from sim2obs.errors import Sim2ObsFileNotFoundError, Sim2ObsValueError
from sim2obs.forward_models.simulations.base import DEFAULT_SELECTION, GalaxySource, Selection

__all__ = ["GalaxySource", "Selection", "open_source", "SOURCE_FORMS"]

#: The accepted spec forms, for help texts and error messages.
SOURCE_FORMS = ("mini", "mini:DIR", "tng:PATH", "tng-cutout:FILE_OR_DIR", "eagle:PATH")

#: Size of the default cached mini-universe.
DEFAULT_MINI_GALAXIES = 500


def open_source(
    spec: str,
    snapshot: int | None = None,
    selection: Selection = DEFAULT_SELECTION,
    cache_dir=None,
    n_hint: int | None = None,
    progress: bool = True,
) -> GalaxySource:
    """Open the galaxy source described by ``spec`` (see the module docstring for the forms).

    ``snapshot`` picks the snapshot of ``tng:``/``eagle:`` sources (default: the latest; for a
    mini-universe, its own). ``cache_dir`` overrides where ``mini`` is cached. ``n_hint`` is how
    many galaxies the caller wants: ``mini`` then caches a larger universe if 500 would not
    suffice. ``progress`` shows a progress bar while a mini-universe is built.
    """
    if not isinstance(spec, str) or not spec.strip():
        raise Sim2ObsValueError(f"empty source spec; use one of {', '.join(SOURCE_FORMS)}")
    spec = spec.strip()
    kind, sep, arg = spec.partition(":")
    kind = kind.lower()
    if sep and not arg:
        raise Sim2ObsValueError(f"source '{spec}' needs a path after ':' ({kind}:PATH)")

    if kind == "mini":
        from sim2obs.forward_models.simulations import mini
        from sim2obs.forward_models.simulations.tng import TNGSource

        if not sep:
            n = max(DEFAULT_MINI_GALAXIES, int(n_hint or 0))
            path = mini.default_mini_universe(cache_dir, n_galaxies=n, progress=progress)
        else:
            path = Path(arg).expanduser()
            if mini.read_mini_parameters(path) is None:
                if path.exists() and (not path.is_dir() or any(path.iterdir())):
                    raise Sim2ObsFileNotFoundError(
                        f"'{path}' is not a mini-universe (no mini_universe.json); build one "
                        f"with `sim2obs mini-universe --out {path}` into a new folder, or use "
                        f"tng:{path} for an IllustrisTNG run"
                    )
                n = max(DEFAULT_MINI_GALAXIES, int(n_hint or 0))
                mini.build_mini_universe(path, n_galaxies=n, progress=progress)
        params = mini.read_mini_parameters(path) or {}
        snap = snapshot if snapshot is not None else params.get("parameters", {}).get("snapshot")
        return TNGSource(path, snap, selection, name="mini")

    if kind == "tng":
        from sim2obs.forward_models.simulations.tng import TNGSource

        return TNGSource(arg, snapshot, selection)

    if kind == "tng-cutout":
        from sim2obs.forward_models.simulations.tng import TNGCutoutSource

        return TNGCutoutSource(arg, selection)

    if kind == "eagle":
        from sim2obs.forward_models.simulations.eagle import EagleSource

        return EagleSource(arg, snapshot, selection)

    raise Sim2ObsValueError(
        f"unknown source '{spec}'; valid forms: {', '.join(SOURCE_FORMS)}"
    )
