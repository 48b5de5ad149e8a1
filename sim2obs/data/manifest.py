"""A manifest file per shard folder: what every shard holds, without opening it.

``FOLDER/manifest.json`` lists, for every shard file ``NAME-00000.h5`` of the folder: its name,
number of objects, size in bytes, modification time (ns), SHA-256 checksum, survey, bands, pixel
scale, stamp size, domain, whether it has ``/ivar``, and its object ids (int64, delta-encoded,
zlib-compressed, base64; a few bytes per object). Folder-level fields: format name and version,
sim2obs version, checksum algorithm, totals, and the survey/bands when all shards agree.

* Written atomically (temporary file + rename, :func:`sim2obs._atomic.atomic_output`), so a
  reader sees the old or the new manifest, never half of one. One writer at a time: the process
  that rendered or ingested the folder updates it at the end (``render_to_shards``,
  ``write_ingested``), or ``sim2obs manifest DIR``. A manifest that misses shards written later
  by another process is only stale, not wrong: readers check every entry.
* An entry is *fresh* when the file's size and ``st_mtime_ns`` equal the recorded ones. Readers
  (:func:`shard_entries`, used by the datasets) take fresh entries from the manifest and open
  only the other shard files, so a folder of 10^4 shards with an up-to-date manifest opens with
  10^4 ``stat`` calls and no HDF5 file opened.
* Updating re-hashes only new or changed shards; ``rebuild=True`` (``--rebuild``) re-reads all.
* :func:`verify_folder` (``sim2obs manifest DIR --verify``) re-hashes every shard and reports
  checksum or size mismatches, missing shards and shards the manifest does not list.

A shard that cannot be read (truncated by a crash of a tool that wrote it in place, damaged on
disk, or copied incompletely) raises :class:`Sim2ObsDataError` naming the file and the fix:
re-create it (rerun the same ``sim2obs render``, which re-renders missing shards; or
``sim2obs ingest ... --overwrite``), then ``sim2obs manifest DIR --rebuild``.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import zlib
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from sim2obs._atomic import atomic_output
from sim2obs.data.shards import SHARD_PATTERN, list_shards
from sim2obs.errors import Sim2ObsDataError, Sim2ObsValueError

MANIFEST_NAME = "manifest.json"
FORMAT_NAME = "sim2obs-shard-manifest"
FORMAT_VERSION = 1
CHECKSUM_ALGORITHM = "sha256"
_HASH_BLOCK_BYTES = 8 * 2**20


def fix_hint(folder: str | Path) -> str:
    """The standard advice for a damaged shard in ``folder``."""
    return (
        "delete it and re-create it (rerun the same `sim2obs render` command, which re-renders "
        "missing shards, or `sim2obs ingest ... --overwrite`), then run "
        f"`sim2obs manifest {folder} --rebuild`"
    )


def unreadable_shard_error(path: str | Path, exc: BaseException) -> Sim2ObsDataError:
    """The error for a shard file that HDF5 cannot open or read."""
    path = Path(path)
    return Sim2ObsDataError(
        f"'{path}' is not a readable HDF5 shard ({exc}); it is truncated or corrupt: "
        f"{fix_hint(path.parent)}"
    )


def open_shard(path: str | Path):
    """``h5py.File(path, 'r')``, with a clear :class:`Sim2ObsDataError` when it is unreadable."""
    import h5py

    try:
        return h5py.File(path, "r")
    except OSError as exc:
        raise unreadable_shard_error(path, exc) from exc


def encode_ids(ids: np.ndarray) -> str:
    """int64 ids -> base64 of zlib-compressed little-endian deltas (sorted ids: ~2 bytes each)."""
    ids = np.asarray(ids, dtype=np.int64)
    deltas = np.diff(ids, prepend=np.int64(0)).astype("<i8")
    return base64.b64encode(zlib.compress(deltas.tobytes(), 6)).decode("ascii")


def decode_ids(text: str) -> np.ndarray:
    """Inverse of :func:`encode_ids`."""
    raw = zlib.decompress(base64.b64decode(text.encode("ascii")))
    return np.cumsum(np.frombuffer(raw, dtype="<i8")).astype(np.int64)


def file_checksum(path: str | Path) -> str:
    """SHA-256 hex digest of a file, read in 8 MiB blocks."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(_HASH_BLOCK_BYTES):
            h.update(block)
    return h.hexdigest()


@dataclass(frozen=True)
class ShardEntry:
    """What the manifest records about one shard file."""

    name: str
    n_objects: int
    size_bytes: int
    mtime_ns: int
    sha256: str | None
    survey: str | None
    bands: tuple[str, ...]
    pixel_scale_arcsec: float
    stamp: tuple[int, int]
    domain: str | None
    has_ivar: bool
    object_ids_encoded: str

    def __post_init__(self) -> None:
        object.__setattr__(self, "bands", tuple(str(b) for b in self.bands))
        object.__setattr__(self, "stamp", tuple(int(s) for s in self.stamp))

    def object_ids(self) -> np.ndarray:
        """The shard's ``/labels/object_id`` (int64, file order)."""
        ids = decode_ids(self.object_ids_encoded)
        if ids.size != self.n_objects:
            raise Sim2ObsDataError(
                f"manifest entry '{self.name}' lists {ids.size} object ids for {self.n_objects} "
                "objects; rebuild it with `sim2obs manifest DIR --rebuild`"
            )
        return ids

    def is_fresh(self, stat: os.stat_result) -> bool:
        """True when the file still has the recorded size and modification time."""
        return stat.st_size == self.size_bytes and stat.st_mtime_ns == self.mtime_ns

    def to_dict(self) -> dict:
        d = asdict(self)
        d["bands"] = list(self.bands)
        d["stamp"] = list(self.stamp)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> ShardEntry:
        return cls(**{k: d[k] for k in cls.__dataclass_fields__})

    @classmethod
    def from_file(cls, path: str | Path, checksum: bool = True) -> ShardEntry:
        """Read the entry of ``path`` from the file itself (opens it; hashes it if asked)."""
        path = Path(path)
        stat = path.stat()
        f = open_shard(path)
        try:
            with f:
                missing = [k for k in ("images", "labels/object_id") if k not in f]
                missing += [f"attribute {k}" for k in ("bands",) if k not in f.attrs]
                if missing:
                    raise Sim2ObsDataError(
                        f"'{path}' is not a sim2obs shard (no {', '.join(missing)}; see DESIGN.md, "
                        "'Shard format')"
                    )
                bands = tuple(
                    b.decode() if isinstance(b, bytes | np.bytes_) else str(b) for b in f.attrs["bands"]
                )
                shape = f["images"].shape
                ids = np.asarray(f["labels/object_id"][()], dtype=np.int64)
                survey = f.attrs.get("survey")
                domain = f.attrs.get("domain")
                entry = cls(
                    name=path.name, n_objects=int(shape[0]), size_bytes=int(stat.st_size),
                    mtime_ns=int(stat.st_mtime_ns), sha256=None,
                    survey=None if survey is None else str(survey), bands=bands,
                    pixel_scale_arcsec=float(f.attrs.get("pixel_scale_arcsec", np.nan)),
                    stamp=tuple(shape[2:4]), domain=None if domain is None else str(domain),
                    has_ivar="ivar" in f, object_ids_encoded=encode_ids(ids),
                )
        except (OSError, KeyError, RuntimeError) as exc:  # damaged metadata or data inside
            raise unreadable_shard_error(path, exc) from exc
        if ids.size != entry.n_objects:
            raise Sim2ObsDataError(
                f"'{path}': /labels/object_id has {ids.size} entries for {entry.n_objects} images; "
                f"{fix_hint(path.parent)}"
            )
        if checksum:
            entry = _with_checksum(entry, path)
        return entry


def _with_checksum(entry: ShardEntry, path: Path) -> ShardEntry:
    return ShardEntry(**{**entry.__dict__, "sha256": file_checksum(path)})


@dataclass
class Manifest:
    """The entries of one folder, by file name (in name order)."""

    folder: Path
    entries: dict[str, ShardEntry]

    @property
    def n_objects(self) -> int:
        return sum(e.n_objects for e in self.entries.values())

    def to_dict(self) -> dict:
        from sim2obs import __version__

        entries = [self.entries[k] for k in sorted(self.entries)]

        def common(attr):
            vals = {json.dumps(getattr(e, attr)) for e in entries}
            return getattr(entries[0], attr) if len(vals) == 1 else None

        return {
            "format": FORMAT_NAME,
            "format_version": FORMAT_VERSION,
            "sim2obs_version": __version__,
            "checksum_algorithm": CHECKSUM_ALGORITHM,
            "n_shards": len(entries),
            "n_objects": self.n_objects,
            "survey": common("survey") if entries else None,
            "bands": (list(common("bands") or ()) or None) if entries else None,
            "shards": [e.to_dict() for e in entries],
        }

    def write(self) -> Path:
        """Write ``FOLDER/manifest.json`` atomically; returns its path."""
        path = self.folder / MANIFEST_NAME
        with atomic_output(path) as tmp:
            tmp.write_text(json.dumps(self.to_dict(), indent=1) + "\n")
        return path


def manifest_path(folder: str | Path) -> Path:
    return Path(folder) / MANIFEST_NAME


def load_manifest(folder: str | Path, strict: bool = True) -> Manifest | None:
    """The folder's manifest, or None when there is none.

    An unreadable or foreign manifest raises :class:`Sim2ObsDataError` (with the fix), or gives
    None with ``strict=False`` (readers then open the shard files, which is only slower).
    """
    folder = Path(folder)
    path = manifest_path(folder)
    if not path.is_file():
        return None
    try:
        d = json.loads(path.read_text())
        if d.get("format") != FORMAT_NAME:
            raise ValueError(f"format is {d.get('format')!r}, not {FORMAT_NAME!r}")
        if int(d.get("format_version", -1)) > FORMAT_VERSION:
            raise ValueError(f"format version {d['format_version']} is newer than this sim2obs "
                             f"reads ({FORMAT_VERSION}); upgrade sim2obs")
        entries = {e["name"]: ShardEntry.from_dict(e) for e in d["shards"]}
    except (OSError, ValueError, KeyError, TypeError) as exc:
        if not strict:
            return None
        raise Sim2ObsDataError(
            f"'{path}' is not a readable sim2obs manifest ({exc}); recreate it with "
            f"`sim2obs manifest {folder} --rebuild`"
        ) from exc
    return Manifest(folder, entries)


@dataclass(frozen=True)
class UpdateReport:
    """What :func:`update_manifest` did."""

    path: Path
    n_shards: int
    n_objects: int
    n_reused: int
    n_read: int
    n_removed: int
    skipped: tuple[str, ...] = ()


def _threads(n_jobs: int) -> int:
    return max(1, min(8, os.cpu_count() or 1, n_jobs))


def update_manifest(
    folder: str | Path,
    rebuild: bool = False,
    on_error: str = "raise",
    log: Callable[[str], None] | None = None,
) -> UpdateReport:
    """Create or update ``FOLDER/manifest.json`` for the shard files now in the folder.

    Fresh entries (same size and mtime) are kept as they are; new or changed shards are opened
    and hashed (several files at a time); entries of deleted shards are dropped.
    ``rebuild=True`` ignores the old manifest (also when it is unreadable). ``on_error='skip'``
    leaves unreadable shards out (and logs them) instead of raising: what the render and ingest
    hooks use, so that a damaged neighbour does not fail a finished run; readers then report it.
    """
    if on_error not in ("raise", "skip"):
        raise Sim2ObsValueError(f"on_error must be 'raise' or 'skip', got {on_error!r}")
    folder = Path(folder)
    paths = list_shards(folder)
    old = None if rebuild else load_manifest(folder, strict=False)
    old_entries = old.entries if old is not None else {}
    entries: dict[str, ShardEntry] = {}
    todo: list[Path] = []
    for p in paths:
        e = old_entries.get(p.name)
        if e is not None and e.sha256 and e.is_fresh(p.stat()):
            entries[p.name] = e
        else:
            todo.append(p)

    def read(p: Path) -> ShardEntry | Sim2ObsDataError:
        try:
            return ShardEntry.from_file(p, checksum=True)
        except Sim2ObsDataError as exc:
            return exc

    skipped = []
    if todo:
        with ThreadPoolExecutor(_threads(len(todo))) as pool:  # hashlib and h5py release the GIL
            for p, res in zip(todo, pool.map(read, todo), strict=True):
                if isinstance(res, Sim2ObsDataError):
                    if on_error == "raise":
                        raise res
                    skipped.append(p.name)
                    if log:
                        log(f"manifest: left out {res}")
                else:
                    entries[p.name] = res
    manifest = Manifest(folder, dict(sorted(entries.items())))
    path = manifest.write()
    removed = len(set(old_entries) - {p.name for p in paths})
    return UpdateReport(path, len(entries), manifest.n_objects, n_reused=len(paths) - len(todo),
                        n_read=len(todo) - len(skipped), n_removed=removed, skipped=tuple(skipped))


def shard_entries(folder: str | Path) -> tuple[list[tuple[Path, ShardEntry]], int]:
    """``([(path, entry) ...] in file-name order, number taken from the manifest)``.

    Entries come from the manifest when it lists the file with its current size and mtime, and
    from opening the file otherwise (no checksum then). Raises like :func:`list_shards` for a
    missing or empty folder, and :class:`Sim2ObsDataError` naming the file and the fix for an
    unreadable shard.
    """
    folder = Path(folder)
    paths = list_shards(folder)
    manifest = load_manifest(folder, strict=False)
    known = manifest.entries if manifest is not None else {}
    out = []
    n_manifest = 0
    for p in paths:
        e = known.get(p.name)
        try:
            stat = p.stat()
        except FileNotFoundError as exc:  # deleted between listing and stat
            raise Sim2ObsDataError(f"shard '{p}' disappeared while the folder was read") from exc
        if e is not None and e.is_fresh(stat):
            n_manifest += 1
        else:
            e = ShardEntry.from_file(p, checksum=False)
        out.append((p, e))
    return out, n_manifest


def verify_folder(folder: str | Path, log: Callable[[str], None] | None = None) -> list[str]:
    """Re-hash every shard of ``folder`` against its manifest; returns the problems found (one
    line each, naming the file and the fix), empty when everything matches.

    Raises :class:`Sim2ObsDataError` when the folder has no (readable) manifest.
    """
    folder = Path(folder)
    manifest = load_manifest(folder, strict=True)
    if manifest is None:
        raise Sim2ObsDataError(
            f"'{folder}' has no {MANIFEST_NAME}; create one with `sim2obs manifest {folder}`"
        )
    present = {p.name: p for p in folder.iterdir() if SHARD_PATTERN.match(p.name)}
    problems = []
    for name in sorted(set(manifest.entries) - set(present)):
        problems.append(f"'{folder / name}' is listed in the manifest but missing: re-render it "
                        f"(rerun the same `sim2obs render`), or run `sim2obs manifest {folder}` "
                        "to drop it")
    for name in sorted(set(present) - set(manifest.entries)):
        problems.append(f"'{present[name]}' is not in the manifest (written after it): run "
                        f"`sim2obs manifest {folder}` to add it")
    listed = [n for n in sorted(manifest.entries) if n in present]

    def check(name: str) -> str | None:
        e = manifest.entries[name]
        path = present[name]
        size = path.stat().st_size
        if size != e.size_bytes:
            return (f"'{path}' has {size} bytes but the manifest recorded {e.size_bytes} (truncated "
                    f"or replaced): {fix_hint(folder)}; if it was replaced on purpose, only run "
                    f"`sim2obs manifest {folder} --rebuild`")
        if e.sha256 is None:
            return f"'{path}' has no checksum in the manifest: run `sim2obs manifest {folder} --rebuild`"
        digest = file_checksum(path)
        if digest != e.sha256:
            return (f"'{path}': checksum mismatch (sha256 {digest[:12]}... but the manifest "
                    f"recorded {e.sha256[:12]}...): the file is corrupt or was changed after the "
                    f"manifest was written: {fix_hint(folder)}; if it was replaced on purpose, "
                    f"only run `sim2obs manifest {folder} --rebuild`")
        return None

    with ThreadPoolExecutor(_threads(len(listed))) as pool:
        problems.extend(p for p in pool.map(check, listed) if p)
    if log:
        log(f"verified {len(listed)} shard(s) of '{folder}' ({CHECKSUM_ALGORITHM}): "
            f"{len(problems)} problem(s)")
    return problems


def check_folders(folders: Iterable[str | Path]) -> None:
    """:func:`verify_folder` on each folder; raises one :class:`Sim2ObsDataError` listing every
    problem (at most 20 shown)."""
    problems = [p for f in folders for p in verify_folder(f)]
    if problems:
        shown = "\n  ".join(problems[:20])
        more = f"\n  ... and {len(problems) - 20} more" if len(problems) > 20 else ""
        raise Sim2ObsDataError(f"{len(problems)} problem(s) found:\n  {shown}{more}")
