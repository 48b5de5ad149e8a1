"""Render a galaxy source into shard files, on one process or a local pool of workers.

Shards hold ``shard_size`` galaxies in source order; each is written atomically and a rerun
skips shards that are already complete (after checking they were made with the same settings).
Every galaxy's randomness derives from (seed, object_id), so the bytes written do not depend on
the number of workers. Workers limit OpenMP/BLAS threads to one each (``threadpoolctl`` in the
pool initializer, plus GalSim's own OpenMP setting): otherwise two processes run slower than one.
"""

from __future__ import annotations

import json
import multiprocessing as mp
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from sim2obs.data.shards import (
    Shard,
    ShardAttrs,
    is_complete,
    read_shard,
    shard_filename,
    write_shard,
)
from sim2obs.errors import Sim2ObsError, Sim2ObsValueError
from sim2obs.forward_models.galaxy import LABEL_UNITS
from sim2obs.forward_models.render import RenderConfig, RenderedGalaxy, render_galaxy
from sim2obs.forward_models.surveys import SurveySpec

DEFAULT_SHARD_SIZE = 1000


@dataclass(frozen=True)
class RenderJob:
    """What to render: picklable, sent once to each worker."""

    source: object  # a GalaxySource (simulations.base)
    survey: SurveySpec
    config: RenderConfig
    seed: int

    def render(self, object_id: int) -> RenderedGalaxy | None:
        """The rendered galaxy, or None when it has too few star particles once wind particles
        are dropped (the catalogue count includes them); such galaxies are skipped."""
        from sim2obs.forward_models.simulations.base import InsufficientParticlesError

        try:
            galaxy = self.source.load(int(object_id))
        except InsufficientParticlesError:
            return None
        try:
            return render_galaxy(galaxy, self.survey, self.config, self.seed)
        except Sim2ObsError as exc:
            raise type(exc)(f"object {object_id}: {exc}") from exc

    def provenance(self) -> dict:
        return {
            "survey": self.survey.name,
            "survey_file": self.survey.source_file,
            "bands": list(self.survey.band_names),
            "render": self.config.to_dict(),
            "source": self.source.describe(),
            "seed": int(self.seed),
        }


_WORKER_JOB: RenderJob | None = None


def _init_worker(job: RenderJob) -> None:
    """Pool initializer: one thread per worker for OpenMP/BLAS, and the job kept in a global."""
    global _WORKER_JOB
    import galsim
    from threadpoolctl import threadpool_limits

    threadpool_limits(limits=1)
    galsim.set_omp_threads(1)
    _WORKER_JOB = job


def _render_in_worker(object_id: int) -> RenderedGalaxy:
    assert _WORKER_JOB is not None
    return _WORKER_JOB.render(object_id)


def label_units(labels: Sequence[str]) -> dict[str, str]:
    units = dict(LABEL_UNITS)
    for key in labels:
        if key.startswith("mag_"):
            units[key] = "mag (AB, noiseless total)"
        elif key.startswith("psf_fwhm_"):
            units[key] = "arcsec"
        elif key.endswith("_deg"):
            units[key] = "deg"
    units["object_id"] = ""
    return {k: units.get(k, "") for k in labels}


def assemble_shard(job: RenderJob, rendered: Sequence[RenderedGalaxy], shard_config: dict) -> Shard:
    """Stack rendered galaxies into a :class:`Shard` (PSF stored once when it is constant)."""
    keys = sorted(set().union(*(r.labels for r in rendered)))
    labels = {k: np.array([r.labels.get(k, np.nan) for r in rendered], dtype=np.float64) for k in keys}
    labels["object_id"] = np.array([r.object_id for r in rendered], dtype=np.int64)
    psf = np.stack([r.psf for r in rendered])
    if np.all(psf == psf[:1]):
        psf = psf[:1]
    spectra = None
    wave = None
    if job.config.spectra:
        spectra = np.stack([r.spectrum for r in rendered])
        from sim2obs.forward_models.photometry import band_flux_table

        table = band_flux_table(tuple(b.filter for b in job.survey.bands), None)
        wave = table.library.wavelength_angstrom  # rest frame; observed = (1+z) * this
    return Shard(
        images=np.stack([r.image for r in rendered]),
        ivar=np.stack([r.ivar for r in rendered]),
        psf=psf,
        noiseless=np.stack([r.noiseless for r in rendered]) if job.config.store_noiseless else None,
        spectra=spectra,
        wavelength_angstrom=wave,
        labels=labels,
        label_units=label_units(list(labels)),
        attrs=ShardAttrs(
            survey=job.survey.name, bands=job.survey.band_names,
            pixel_scale_arcsec=job.survey.pixel_scale_arcsec, domain="sim",
            source=getattr(job.source, "name", "unknown"), seed=job.seed, config=shard_config,
        ),
    )


def plan_shards(ids: np.ndarray, shard_size: int) -> list[np.ndarray]:
    """Split object ids into consecutive shards."""
    if shard_size < 1:
        raise Sim2ObsValueError(f"shard size must be >= 1, got {shard_size}")
    return [ids[i:i + shard_size] for i in range(0, len(ids), shard_size)]


def _check_resumable(path: Path, provenance: dict, ids: np.ndarray) -> bool:
    """True when ``path`` is a complete shard made with the same settings and objects."""
    if not is_complete(path):
        return False
    shard = read_shard(path, with_noiseless=False)
    old = shard.attrs.config.get("job")
    expected = np.setdiff1d(ids, shard.attrs.config.get("skipped_object_ids", []))
    if old != json.loads(json.dumps(provenance, sort_keys=True)) or not np.array_equal(
            np.sort(shard.labels["object_id"]), np.sort(expected)):
        raise Sim2ObsValueError(
            f"'{path}' exists but was rendered with other settings or objects; render into a new "
            "--out folder, or delete the old shards to replace them"
        )
    return True


def render_to_shards(
    job: RenderJob,
    ids: np.ndarray,
    out_dir: str | Path,
    name: str | None = None,
    shard_size: int = DEFAULT_SHARD_SIZE,
    workers: int = 1,
    progress: bool = True,
    log: Callable[[str], None] | None = None,
) -> list[Path]:
    """Render ``ids`` of ``job.source`` into ``out_dir/NAME-00000.h5``...; returns shard paths.

    Complete shards from an earlier identical run are kept (resume).
    """
    from tqdm.auto import tqdm

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    name = name or job.survey.name
    ids = np.asarray(ids, dtype=np.int64)
    if ids.size == 0:
        raise Sim2ObsValueError("no galaxies to render: the source selection is empty")
    provenance = job.provenance()
    chunks = plan_shards(ids, shard_size)
    paths = [out_dir / shard_filename(name, i) for i in range(len(chunks))]
    todo = [i for i, (p, c) in enumerate(zip(paths, chunks, strict=True))
            if not _check_resumable(p, provenance, c)]
    if log and len(todo) < len(chunks):
        log(f"resuming: {len(chunks) - len(todo)} of {len(chunks)} shards already complete")
    n_todo = sum(len(chunks[i]) for i in todo)
    bar = tqdm(total=n_todo, desc=f"render {job.survey.name}", unit="gal", disable=not progress)
    try:
        for i, results in _render_shards(job, [chunks[i] for i in todo], workers, bar):
            rendered = [r for r in results if r is not None]
            skipped = [int(c) for c, r in zip(chunks[todo[i]], results, strict=True) if r is None]
            if skipped and log:
                log(f"shard {todo[i]}: skipped {len(skipped)} galaxies with too few star particles "
                    f"after dropping wind particles (ids {skipped[:5]}{'...' if len(skipped) > 5 else ''})")
            if not rendered:
                raise Sim2ObsValueError(
                    f"every galaxy of shard {todo[i]} has too few star particles; lower --min-particles"
                )
            shard_cfg = {"job": provenance, "shard_index": todo[i], "n_shards": len(chunks),
                         "shard_size": int(shard_size), "skipped_object_ids": skipped}
            write_shard(paths[todo[i]], assemble_shard(job, rendered, shard_cfg))
    finally:
        bar.close()
    return paths


def _render_shards(job: RenderJob, chunks: list[np.ndarray], workers: int, bar) -> Iterator:
    """Yield (index in chunks, [RenderedGalaxy...]) one shard at a time (memory flat in N)."""
    if workers < 1:
        raise Sim2ObsValueError(f"--workers must be >= 1, got {workers}")
    if workers == 1 or sum(len(c) for c in chunks) <= 1:
        for i, chunk in enumerate(chunks):
            out = []
            for oid in chunk:
                out.append(job.render(oid))
                bar.update(1)
            yield i, out
        return
    import galsim  # noqa: F401  (import before forking so workers inherit it loaded)

    methods = mp.get_all_start_methods()
    ctx = mp.get_context("fork" if "fork" in methods else "spawn")
    # One ordered stream over every galaxy of every shard: workers never wait while the parent
    # writes a shard; shards are cut from the stream as their galaxies arrive.
    all_ids = [int(x) for chunk in chunks for x in chunk]
    with ctx.Pool(workers, initializer=_init_worker, initargs=(job,)) as pool:
        stream = pool.imap(_render_in_worker, all_ids, chunksize=1)
        for i, chunk in enumerate(chunks):
            out = []
            for _ in range(len(chunk)):
                out.append(next(stream))
                bar.update(1)
            yield i, out
