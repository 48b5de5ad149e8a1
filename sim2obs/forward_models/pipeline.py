"""Render a galaxy source into shard files, on one process, a local pool of workers, or a Dask
cluster.

Shards hold ``shard_size`` galaxies in source order; each is written atomically and a rerun
skips shards that are already complete (after checking they were made with the same settings).
Every galaxy's randomness derives from (seed, object_id), so the bytes written do not depend on
the number of workers. Workers limit OpenMP/BLAS threads to one each (``threadpoolctl`` in the
pool initializer, plus GalSim's own OpenMP setting): otherwise two processes run slower than one.

With ``dask=`` (``'local:N'`` or a scheduler address) there is one Dask task per shard: the task
gets the small :class:`RenderJob` and the shard's object ids, loads the particles itself from the
simulation files, renders, and writes the shard atomically (:func:`render_shard`, the same code
as the local path, hence the same bytes); only a small summary goes back to the client. A task
whose worker dies is rerun by the scheduler; since a shard only appears under its name once
complete, a half-done attempt leaves at most a hidden temporary file.
"""

from __future__ import annotations

import json
import multiprocessing as mp
import uuid
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
from sim2obs.errors import Sim2ObsError, Sim2ObsValueError, require
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


def _limit_threads() -> None:
    """One OpenMP/BLAS thread in this process (parallelism comes from running processes)."""
    import galsim
    from threadpoolctl import threadpool_limits

    threadpool_limits(limits=1)
    galsim.set_omp_threads(1)


def _init_worker(job: RenderJob) -> None:
    """Pool initializer: one thread per worker for OpenMP/BLAS, and the job kept in a global."""
    global _WORKER_JOB
    _limit_threads()
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
    dask=None,
) -> list[Path]:
    """Render ``ids`` of ``job.source`` into ``out_dir/NAME-00000.h5``...; returns shard paths.

    Complete shards from an earlier identical run are kept (resume). ``dask`` runs one Dask task
    per shard instead of the local pool: ``'local:N'`` (a ``LocalCluster`` of N single-threaded
    worker processes, closed at the end), a scheduler address (``'tcp://host:8786'``; the
    workers must see ``out_dir`` and the simulation files at the same paths), or a
    ``distributed.Client``. It excludes ``workers > 1``. Needs ``pip install "sim2obs[dask]"``.
    """
    from tqdm.auto import tqdm

    if dask is not None and workers != 1:
        raise Sim2ObsValueError("--dask and --workers > 1 are exclusive: the Dask workers do the work")
    if dask is not None:
        require("distributed", extra="dask", package="dask[distributed]")

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
    def shard_cfg(index: int) -> dict:
        return {"job": provenance, "shard_index": index, "n_shards": len(chunks),
                "shard_size": int(shard_size)}

    try:
        if dask is not None:
            tasks = [(i, chunks[i], paths[i], shard_cfg(i)) for i in todo]
            for summary in _render_shards_dask(job, tasks, dask, bar):
                _log_skipped(log, summary)
        else:
            for i, results in _render_shards(job, [chunks[i] for i in todo], workers, bar):
                summary = _write_rendered(job, chunks[todo[i]], results, paths[todo[i]],
                                          shard_cfg(todo[i]))
                _log_skipped(log, summary)
    finally:
        bar.close()
    from sim2obs.data.manifest import update_manifest

    update_manifest(out_dir, on_error="skip", log=log)  # manifest.json: counts, ids, checksums
    return paths


def _log_skipped(log: Callable[[str], None] | None, summary: dict) -> None:
    skipped = summary["skipped"]
    if skipped and log:
        log(f"shard {summary['shard_index']}: skipped {len(skipped)} galaxies with too few star "
            f"particles after dropping wind particles "
            f"(ids {skipped[:5]}{'...' if len(skipped) > 5 else ''})")


def _write_rendered(job: RenderJob, ids: np.ndarray, results: Sequence[RenderedGalaxy | None],
                    path: Path, shard_cfg: dict) -> dict:
    """Assemble the rendered galaxies of one shard and write it atomically; returns a summary
    ``{"path", "shard_index", "n", "skipped"}`` (``None`` results are skipped galaxies)."""
    rendered = [r for r in results if r is not None]
    skipped = [int(c) for c, r in zip(ids, results, strict=True) if r is None]
    if not rendered:
        raise Sim2ObsValueError(
            f"every galaxy of shard {shard_cfg.get('shard_index')} has too few star particles; "
            "lower --min-particles"
        )
    cfg = {**shard_cfg, "skipped_object_ids": skipped}
    write_shard(path, assemble_shard(job, rendered, cfg))
    return {"path": str(path), "shard_index": shard_cfg.get("shard_index"),
            "n": len(rendered), "skipped": skipped}


def render_shard(job: RenderJob, ids: Sequence[int], path: str | Path, shard_cfg: dict) -> dict:
    """Render ``ids`` in this process and write them as one shard at ``path`` (atomically).

    ``shard_cfg`` is the shard's provenance (``job``, ``shard_index``, ``n_shards``,
    ``shard_size``); the ids of skipped galaxies are added to it. Returns a small summary
    ``{"path", "shard_index", "n", "skipped"}``. This is what a Dask task runs.
    """
    ids = np.asarray(ids, dtype=np.int64)
    results = [job.render(int(oid)) for oid in ids]
    return _write_rendered(job, ids, results, Path(path), shard_cfg)


def _dask_render_task(job: RenderJob, ids: np.ndarray, path: str, shard_cfg: dict) -> dict:
    """Body of one Dask task: one thread for OpenMP/BLAS, render and write one shard.

    Errors of sim2obs (bad settings, an empty shard) are returned rather than raised so that
    Dask does not retry them; anything else (I/O trouble, a crash) is raised and retried.
    """
    _limit_threads()
    try:
        return render_shard(job, ids, path, shard_cfg)
    except Sim2ObsError as exc:
        return {"error": exc}


def _dask_client(dask):
    """(client, cluster or None) for ``'local:N'``, a scheduler address, or a Client."""
    distributed = require("distributed", extra="dask", package="dask[distributed]")
    if isinstance(dask, distributed.Client):
        return dask, None
    spec = str(dask).strip()
    if spec.startswith("local:"):
        try:
            n = int(spec[len("local:"):])
        except ValueError:
            n = 0
        if n < 1:
            raise Sim2ObsValueError(f"--dask {spec!r}: expected local:N with N >= 1 worker processes")
        import logging

        cluster = distributed.LocalCluster(n_workers=n, threads_per_worker=1, processes=True,
                                           dashboard_address=None, silence_logs=logging.ERROR)
        try:
            return distributed.Client(cluster), cluster
        except BaseException:
            cluster.close()
            raise
    if "://" not in spec:
        raise Sim2ObsValueError(
            f"--dask {spec!r}: expected local:N or a scheduler address such as tcp://host:8786"
        )
    try:
        return distributed.Client(spec, timeout="30s"), None
    except OSError as exc:
        raise Sim2ObsValueError(f"--dask {spec!r}: cannot reach the Dask scheduler ({exc})") from exc


def _render_shards_dask(job: RenderJob, tasks: list, dask, bar, retries: int = 2) -> Iterator[dict]:
    """Submit one task per shard; yield each shard's summary as it completes."""
    if not tasks:
        return
    import distributed

    client, cluster = _dask_client(dask)
    own_client = client is not dask
    futures = []
    try:
        for _index, ids, path, cfg in tasks:
            futures.append(client.submit(
                _dask_render_task, job, np.asarray(ids, dtype=np.int64), str(path), cfg,
                key=f"sim2obs-render-{Path(path).name}-{uuid.uuid4().hex}", retries=retries))
        for future in distributed.as_completed(futures):
            summary = future.result()
            if "error" in summary:
                raise summary["error"]
            bar.update(summary["n"] + len(summary["skipped"]))
            yield summary
    finally:
        pending = [f for f in futures if not f.done()]
        if pending:
            client.cancel(pending)
        if own_client:
            client.close()
        if cluster is not None:
            cluster.close()


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
