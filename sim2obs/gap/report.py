"""``sim2obs gap``: measure the gap between two shard folders and write a report.

:func:`run_gap` writes into ``REPORT/``:

* ``metrics.json`` - ``{"embedding": {...} | null, "embedding_adapted": {...} (with an adapted
  run), "morphology": {...}, "inputs": {...}}`` (DESIGN.md, "Gap metrics"),
* ``report.md`` and ``report.html`` (self-contained HTML; images referenced from ``figures/``),
* ``figures/*.png`` - image grids of both sets, a PCA map of the embeddings coloured by set (UMAP
  too when ``umap`` is importable), histograms of the morphology statistics, the domain
  classifier's most typical galaxies of each set.

The two folders must have the same bands, pixel scale and stamp size; otherwise the error names
both, and ``resample=True`` redraws set B on set A's pixel grid (:func:`resample_shard`).
"""

from __future__ import annotations

import html
import json
import math
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import numpy as np

from sim2obs._atomic import atomic_output
from sim2obs.data.shards import Shard, read_folder
from sim2obs.errors import Sim2ObsDataError

# --------------------------------------------------------------------------------------------
# inputs
# --------------------------------------------------------------------------------------------


def subset(shard: Shard, idx, bands=None) -> Shard:
    """Rows ``idx`` (and optionally only ``bands``, in that order) of an in-memory shard."""
    idx = np.asarray(idx, dtype=int)
    if bands is None:
        bsel = slice(None)
        attrs = shard.attrs
    else:
        missing = [b for b in bands if b not in shard.bands]
        if missing:
            raise Sim2ObsDataError(
                f"'{shard.path}' has no band(s) {missing}; its bands are {list(shard.bands)}")
        bsel = [shard.bands.index(b) for b in bands]
        attrs = replace(shard.attrs, bands=tuple(bands))
    psf = shard.psf[idx] if shard.psf.shape[0] > 1 else shard.psf
    return Shard(
        images=shard.images[idx][:, bsel], psf=psf[:, bsel],
        labels={k: v[idx] for k, v in shard.labels.items()}, attrs=attrs,
        ivar=None if shard.ivar is None else shard.ivar[idx][:, bsel],
        label_units=shard.label_units, path=shard.path,
    )


def resample_shard(shard: Shard, pixel_scale: float, stamp: tuple[int, int],
                   psf_size: int | None = None) -> Shard:
    """Redraw every cutout of ``shard`` on a grid of ``pixel_scale`` arcsec and ``stamp`` pixels.

    Each band image (flux in nanomaggies per pixel) becomes the surface of a
    ``galsim.InterpolatedImage`` (Lanczos-3) with its true centre on the new stamp's true centre
    (:func:`sim2obs.data.resample.resample_flux`): sampled at the new pixel centres when they are
    finer (the input already includes its pixel response) and integrated over each new pixel when
    they are coarser, as a coarser detector would collect it; total flux is conserved either way.
    Noise becomes spatially correlated and its per-pixel level changes: sampling keeps a fraction
    of the surface's (depending on the sub-pixel phase), integrating smooths it with the
    interpolant and both pixel responses (0.45-0.8 of a plain sum's variance for ratios 1-2;
    :func:`sim2obs.data.resample.resample_variance`); ``ivar`` is dropped (it no longer describes
    independent pixels). The PSF images are resampled
    the same way and renormalised.
    """
    from sim2obs.data.resample import resample_flux, true_centre_source

    old = shard.attrs.pixel_scale_arcsec
    ny, nx = stamp

    def redraw(arr, nx_, ny_):
        arr = np.where(np.isfinite(arr), arr, 0.0).astype(np.float64)
        centre = (true_centre_source(arr.shape[0], ny_, old, pixel_scale),
                  true_centre_source(arr.shape[1], nx_, old, pixel_scale))
        return resample_flux(arr, old, pixel_scale, (ny_, nx_), centre, interpolant="lanczos3")

    n, b = shard.images.shape[:2]
    images = np.empty((n, b, ny, nx), np.float32)
    for i in range(n):
        for k in range(b):
            images[i, k] = redraw(shard.images[i, k], nx, ny)
    p = psf_size or shard.psf.shape[-1]
    psf = np.empty(shard.psf.shape[:2] + (p, p), np.float32)
    for i in range(shard.psf.shape[0]):
        for k in range(b):
            im = redraw(shard.psf[i, k], p, p)
            psf[i, k] = im / im.sum() if im.sum() != 0 else im
    cfg = dict(shard.attrs.config or {})
    cfg["resampled_from_pixel_scale_arcsec"] = old
    attrs = replace(shard.attrs, pixel_scale_arcsec=float(pixel_scale), config=cfg)
    return Shard(images=images, psf=psf, labels=dict(shard.labels), attrs=attrs, ivar=None,
                 label_units=shard.label_units, path=shard.path)


def check_compatible(a: Shard, b: Shard, resample: bool = False) -> Shard:
    """Set B, made comparable with A, or a clear error naming both sets.

    Band lists must match (select common bands with ``bands=``); pixel scale and stamp size
    must match unless ``resample`` (then B is redrawn on A's grid).
    """
    if tuple(a.bands) != tuple(b.bands):
        common = [x for x in a.bands if x in b.bands]
        raise Sim2ObsDataError(
            f"the two sets have different bands: '{a.path}' {list(a.bands)} vs '{b.path}' "
            f"{list(b.bands)}; compare common bands with --bands {' '.join(common) or '...'}"
        )
    differ = []
    if not math.isclose(a.attrs.pixel_scale_arcsec, b.attrs.pixel_scale_arcsec, rel_tol=1e-6):
        differ.append(f"pixel scale {a.attrs.pixel_scale_arcsec}\" vs {b.attrs.pixel_scale_arcsec}\"")
    if a.images.shape[2:] != b.images.shape[2:]:
        differ.append(f"stamp {a.images.shape[2:]} vs {b.images.shape[2:]} pixels")
    if not differ:
        return b
    if not resample:
        raise Sim2ObsDataError(
            f"'{a.path}' and '{b.path}' differ in {'; '.join(differ)}: comparing them would "
            "measure the pixel grids, not the galaxies. Pass --resample to redraw set B on set "
            "A's grid (flux-conserving GalSim interpolation)"
        )
    return resample_shard(b, a.attrs.pixel_scale_arcsec, a.images.shape[2:], a.psf.shape[-1])


class _MemoryDataset:
    """The part of ShardDataset that compute_embeddings uses, over an in-memory shard."""

    def __init__(self, shard: Shard, bands):
        missing = [x for x in bands if x not in shard.bands]
        if missing:
            raise Sim2ObsDataError(
                f"the encoder needs bands {list(bands)} but '{shard.path}' has {list(shard.bands)}"
            )
        self.bands = tuple(bands)
        self._idx = [shard.bands.index(x) for x in bands]
        self._images = shard.images
        self._ivar = shard.ivar

    def __len__(self) -> int:
        return len(self._images)

    def raw(self, i: int) -> dict:
        img = np.asarray(self._images[i][self._idx], dtype=np.float32)
        ivar = None if self._ivar is None else np.asarray(self._ivar[i][self._idx], dtype=np.float32)
        return {"image": np.where(np.isfinite(img), img, 0.0).astype(np.float32), "ivar": ivar}


def embed_shard(run_dir, shard: Shard, device: str = "cpu") -> np.ndarray:
    """(N, D) embeddings of an in-memory shard with the encoder of ``run_dir``."""
    from sim2obs.pretrain.evaluate import compute_embeddings
    from sim2obs.pretrain.train import load_encoder

    encoder, normalizer, _ = load_encoder(run_dir)
    return compute_embeddings(encoder, normalizer, _MemoryDataset(shard, normalizer.bands),
                              device=device)


# --------------------------------------------------------------------------------------------
# figures
# --------------------------------------------------------------------------------------------


def _save(fig, path: Path) -> Path:
    with atomic_output(path) as tmp:
        fig.savefig(tmp, format="png", dpi=100)
    return path


def _figure(w, h):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(w, h))
    FigureCanvasAgg(fig)
    return fig


def pca_2d(z: np.ndarray) -> np.ndarray:
    """First two principal components of standardised ``z`` (N, D) -> (N, 2)."""
    z = np.asarray(z, dtype=np.float64)
    sd = z.std(0)
    sd[sd == 0] = 1
    z = (z - z.mean(0)) / sd
    _, _, vt = np.linalg.svd(z, full_matrices=False)
    return z @ vt[:2].T


def embedding_map(ea, eb, names, path: Path) -> list[Path]:
    """PCA (and UMAP if importable) scatter of both sets' embeddings, coloured by set."""
    z = np.concatenate([ea, eb])
    maps = [("PCA", pca_2d(z))]
    try:
        import umap

        maps.append(("UMAP", umap.UMAP(random_state=0).fit_transform(z)))
    except ImportError:
        pass
    out = []
    for title, xy in maps:
        fig = _figure(5, 4.5)
        ax = fig.add_subplot()
        n = len(ea)
        ax.scatter(*xy[:n].T, s=6, alpha=0.6, label=f"A: {names[0]}")
        ax.scatter(*xy[n:].T, s=6, alpha=0.6, label=f"B: {names[1]}")
        ax.set_title(f"{title} of the embeddings")
        ax.legend(fontsize=8)
        p = path.with_name(f"{path.stem}_{title.lower()}.png")
        out.append(_save(fig, p))
    return out


def morphology_histograms(sa: dict, sb: dict, names, path: Path) -> Path | None:
    keys = [k for k in sa if k != "object_id" and k in sb]
    if not keys:
        return None
    cols = 4
    rows = math.ceil(len(keys) / cols)
    fig = _figure(3.2 * cols, 2.4 * rows)
    for i, k in enumerate(keys):
        ax = fig.add_subplot(rows, cols, i + 1)
        a, b = sa[k][np.isfinite(sa[k])], sb[k][np.isfinite(sb[k])]
        both = np.concatenate([a, b])
        if both.size == 0:
            ax.set_title(f"{k} (no data)", fontsize=8)
            continue
        lo, hi = np.quantile(both, [0.01, 0.99])
        bins = np.linspace(lo, hi if hi > lo else lo + 1, 25)
        ax.hist(a, bins=bins, histtype="step", density=True, label=names[0])
        ax.hist(b, bins=bins, histtype="step", density=True, label=names[1])
        ax.set_title(k, fontsize=8)
        ax.tick_params(labelsize=6)
        if i == 0:
            ax.legend(fontsize=6)
    fig.tight_layout()
    return _save(fig, path)


# --------------------------------------------------------------------------------------------
# the run
# --------------------------------------------------------------------------------------------


def _set_name(shard: Shard, letter: str) -> str:
    return f"{letter} ({shard.attrs.domain}, {shard.attrs.source}, {shard.attrs.survey})"


def run_gap(dir_a, dir_b, out, model=None, adapted=None, resample: bool = False, bands=None,
            n_boot: int = 100, n_perm: int = 200, n_morph: int | None = 300, seed: int = 0,
            device: str = "cpu", log: Callable[[str], None] | None = None) -> dict:
    """Compare shard folders ``dir_a`` and ``dir_b``; write metrics.json, report.md,
    report.html and figures/ into ``out``; return the metrics dictionary."""
    from sim2obs.gap.embedding import embedding_gap
    from sim2obs.gap.morphology import morphology_gap
    from sim2obs.plots import image_grid

    log = log or (lambda msg: None)
    out = Path(out)
    figs = out / "figures"
    figs.mkdir(parents=True, exist_ok=True)
    a = read_folder(dir_a, with_noiseless=False)
    b = read_folder(dir_b, with_noiseless=False)
    if bands:
        a, b = subset(a, np.arange(len(a)), bands), subset(b, np.arange(len(b)), bands)
    resampled = not (math.isclose(a.attrs.pixel_scale_arcsec, b.attrs.pixel_scale_arcsec)
                     and a.images.shape[2:] == b.images.shape[2:])
    b = check_compatible(a, b, resample)
    names = (_set_name(a, "A"), _set_name(b, "B"))
    real = "y" if b.attrs.domain == "real" or a.attrs.domain != "real" else "x"
    rng = np.random.default_rng(seed)
    metrics: dict = {"inputs": {
        "A": {"path": str(dir_a), "n": len(a), "domain": a.attrs.domain, "survey": a.attrs.survey,
              "source": a.attrs.source},
        "B": {"path": str(dir_b), "n": len(b), "domain": b.attrs.domain, "survey": b.attrs.survey,
              "source": b.attrs.source, "resampled_to_A": bool(resample and resampled)},
        "bands": list(a.bands), "pixel_scale_arcsec": a.attrs.pixel_scale_arcsec,
        "stamp": list(a.images.shape[2:]), "seed": seed, "n_boot": n_boot, "n_perm": n_perm,
        "prdc_reference": "B" if real == "y" else "A",
    }}
    figures: dict[str, list[str]] = {}

    # image grids of both sets
    for letter, s in (("A", a), ("B", b)):
        p = image_grid(s, figs / f"grid_{letter}.png", n=16, per_band=False,
                       title=f"set {names[0 if letter == 'A' else 1]}")
        figures.setdefault("grids", []).append(p.name)

    # embeddings
    metrics["embedding"] = None
    for key, run in (("embedding", model), ("embedding_adapted", adapted)):
        if run is None:
            continue
        log(f"embedding both sets with {run}")
        ea, eb = embed_shard(run, a, device), embed_shard(run, b, device)
        log(f"embedding metrics ({n_boot} bootstrap resamples, {n_perm} permutations)")
        m, scores = embedding_gap(ea, eb, rng=np.random.default_rng(seed), n_boot=n_boot,
                                  n_perm=n_perm, real=real, return_scores=True)
        m["model"] = str(run)
        metrics[key] = m
        suffix = "" if key == "embedding" else "_adapted"
        figures.setdefault("maps" + suffix, []).extend(
            p.name for p in embedding_map(ea, eb, names, figs / f"embedding{suffix}.png"))
        # the classifier's most confident galaxies of each set (scores = P(set B))
        na = len(a)
        top_a = np.argsort(scores[:na])[:8]
        top_b = np.argsort(-scores[na:])[:8]
        pa = image_grid(subset(a, top_a), figs / f"most_A_like{suffix}.png", n=8, per_band=False,
                        title=f"most A-like of set A (P(B) {scores[:na][top_a].max():.2f} or less)")
        pb = image_grid(subset(b, top_b), figs / f"most_B_like{suffix}.png", n=8, per_band=False,
                        title=f"most B-like of set B (P(B) {scores[na:][top_b].min():.2f} or more)")
        figures.setdefault("classifier" + suffix, []).extend([pa.name, pb.name])

    # morphology
    log(f"morphology of up to {n_morph} galaxies per set (statmorph)")
    comp, sa, sb = morphology_gap(a, b, n_max=n_morph, rng=rng)
    metrics["morphology"] = comp
    h = morphology_histograms(sa, sb, names, figs / "morphology_hist.png")
    if h:
        figures["histograms"] = [h.name]

    _write_json(out / "metrics.json", metrics)
    md = render_markdown(metrics, names, figures, resampled=bool(resample and resampled))
    _write_text(out / "report.md", md)
    _write_text(out / "report.html", markdown_to_html(md, title="sim2obs gap report"))
    log(f"wrote {out / 'metrics.json'}, report.md, report.html and {len(list(figs.iterdir()))} figures")
    return metrics


def _jsonable(obj):
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return _jsonable(obj.tolist())
    if isinstance(obj, np.integer):
        return int(obj)
    if isinstance(obj, float | np.floating):
        return float(obj) if math.isfinite(obj) else None
    return obj


def _write_text(path: Path, text: str) -> None:
    with atomic_output(path) as tmp:
        tmp.write_text(text)


def _write_json(path: Path, obj) -> None:
    _write_text(path, json.dumps(_jsonable(obj), indent=2) + "\n")


# --------------------------------------------------------------------------------------------
# report text
# --------------------------------------------------------------------------------------------

_READ = {
    "c2st_auc": "domain-classifier ROC AUC: 0.5 = indistinguishable, 1 = separable",
    "sinkhorn": "Sinkhorn divergence minus its same-distribution level (0 = no gap)",
    "mmd2": "MMD^2, Gaussian kernel (0 = no gap); p from a permutation test",
    "frechet": "Fréchet distance of Gaussian fits (FID-like; > 0 even for equal sets)",
}


def _fmt(v) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        if not math.isfinite(v):
            return "-"
        return f"{v:.3g}" if abs(v) < 1e4 else f"{v:.3e}"
    return str(v)


def _ci(d) -> str:
    ci = d.get("ci") or [None, None]
    return f"[{_fmt(ci[0])}, {_fmt(ci[1])}]"


def _embedding_table(m: dict) -> list[str]:
    lines = ["| metric | value | 95 % CI | p-value | reading |", "|---|---|---|---|---|"]
    for key in ("c2st_auc", "sinkhorn", "mmd2", "frechet"):
        d = m[key]
        lines.append(f"| {key} | {_fmt(d['value'])} | {_ci(d)} | {_fmt(d.get('p_value'))} | "
                     f"{_READ[key]} |")
    for key in ("precision", "recall", "density", "coverage"):
        d = m["prdc"][key]
        lines.append(f"| {key} (k={m['prdc']['k']}) | {_fmt(d['value'])} | {_ci(d)} | - | "
                     "1 = matched manifolds (density ~ 1) |")
    return lines


def render_markdown(metrics: dict, names, figures: dict, resampled: bool = False) -> str:
    inp = metrics["inputs"]
    lines = [
        "# sim2obs gap report", "",
        f"- **Set A**: {names[0]} - `{inp['A']['path']}`, {inp['A']['n']} galaxies",
        f"- **Set B**: {names[1]} - `{inp['B']['path']}`, {inp['B']['n']} galaxies",
        f"- bands {', '.join(inp['bands'])}; pixel scale {inp['pixel_scale_arcsec']}\"; "
        f"stamp {inp['stamp'][0]} x {inp['stamp'][1]}",
        f"- confidence intervals: {inp['n_boot']} bootstrap resamples; permutation tests: "
        f"{inp['n_perm']} relabellings; seed {inp['seed']}",
    ]
    if resampled:
        lines.append("- **Set B was resampled** onto set A's pixel grid (GalSim Lanczos-3 "
                     "interpolation, flux conserved); its noise is now spatially correlated, so "
                     "noise statistics compare the resampling as much as the data.")
    lines += ["", "## Images", ""]
    lines += [f"![{p}](figures/{p})" for p in figures.get("grids", [])]
    lines += ["", "## Embedding space", ""]
    if metrics.get("embedding") is None:
        lines.append("No model was given (`--model RUN`): nothing was embedded, and this report "
                     "covers pixel and morphology statistics only.")
    else:
        for key, title in (("embedding", "Pretrained encoder"),
                           ("embedding_adapted", "Adapted encoder")):
            if metrics.get(key) is None:
                continue
            m = metrics[key]
            lines += [f"### {title}: `{m['model']}`", "",
                      f"{m['n'][0]} vs {m['n'][1]} galaxies, {m['dim']}-d embeddings, features "
                      f"standardised by the pooled mean and std. PRDC takes set "
                      f"{inp['prdc_reference']} as the reference.", ""]
            lines += _embedding_table(m)
            suffix = "" if key == "embedding" else "_adapted"
            lines.append("")
            lines += [f"![{p}](figures/{p})" for p in figures.get("maps" + suffix, [])]
            lines += ["", "What gives each set away: the galaxies the domain classifier is most "
                      "sure about (out-of-fold scores).", ""]
            lines += [f"![{p}](figures/{p})" for p in figures.get("classifier" + suffix, [])]
            lines.append("")
        if metrics.get("embedding_adapted") is not None:
            lines += ["### Before / after adaptation", "",
                      "| metric | before | after |", "|---|---|---|"]
            for key in ("c2st_auc", "sinkhorn", "mmd2", "frechet"):
                lines.append(f"| {key} | {_fmt(metrics['embedding'][key]['value'])} {_ci(metrics['embedding'][key])} | "
                             f"{_fmt(metrics['embedding_adapted'][key]['value'])} {_ci(metrics['embedding_adapted'][key])} |")
            lines.append("")
    lines += ["## Pixel and morphology statistics", "",
              "Measured on the detection band (r, else i, else the middle band) with photutils "
              "segmentation and statmorph; magnitudes from the flux in the central segment. "
              "KS: two-sample Kolmogorov-Smirnov; AD: Anderson-Darling (p capped to "
              "[0.001, 0.25]); d: Cohen's d (B - A) / pooled std; W/std: 1-Wasserstein "
              "distance / pooled std.", "",
              "| statistic | n A / B | median A | median B | KS | KS p | AD p | d | W/std |",
              "|---|---|---|---|---|---|---|---|---|"]
    morph = metrics.get("morphology") or {}
    for key, d in morph.items():
        if key == "refused":
            continue
        med = d.get("median", [None, None])
        lines.append(f"| {key} | {d['n'][0]} / {d['n'][1]} | {_fmt(med[0])} | {_fmt(med[1])} | "
                     f"{_fmt(d.get('ks_statistic'))} | {_fmt(d.get('ks_p_value'))} | "
                     f"{_fmt(d.get('ad_p_value'))} | {_fmt(d.get('cohen_d'))} | "
                     f"{_fmt(d.get('wasserstein_std'))} |")
    for what, reason in (morph.get("refused") or {}).items():
        lines.append(f"\n**{what} not compared**: {reason}")
    lines.append("")
    lines += [f"![{p}](figures/{p})" for p in figures.get("histograms", [])]
    lines += ["", "Machine-readable numbers: `metrics.json`.", ""]
    return "\n".join(lines)


def markdown_to_html(md: str, title: str = "report") -> str:
    """The small Markdown subset :func:`render_markdown` writes, as one HTML page."""
    import re

    def inline(text: str) -> str:
        t = html.escape(text)
        t = re.sub(r"\*\*(.+?)\*\*", r"<b>\1</b>", t)
        t = re.sub(r"`(.+?)`", r"<code>\1</code>", t)
        return t

    body, in_list, table = [], False, []

    def flush_table():
        if not table:
            return
        rows = [r for r in table if not re.fullmatch(r"\|(-+\|)+", r.replace(" ", ""))]
        out = ["<table>"]
        for i, r in enumerate(rows):
            cells = [c.strip() for c in r.strip("|").split("|")]
            tag = "th" if i == 0 else "td"
            out.append("<tr>" + "".join(f"<{tag}>{inline(c)}</{tag}>" for c in cells) + "</tr>")
        out.append("</table>")
        body.extend(out)
        table.clear()

    for line in md.splitlines():
        if line.startswith("|"):
            table.append(line)
            continue
        flush_table()
        if line.startswith("- "):
            if not in_list:
                body.append("<ul>")
                in_list = True
            body.append(f"<li>{inline(line[2:])}</li>")
            continue
        if in_list:
            body.append("</ul>")
            in_list = False
        m = re.fullmatch(r"!\[(.*?)\]\((.*?)\)", line.strip())
        if m:
            body.append(f'<p><img src="{html.escape(m.group(2))}" alt="{html.escape(m.group(1))}" '
                        'style="max-width:100%"></p>')
        elif line.startswith("#"):
            level = len(line) - len(line.lstrip("#"))
            body.append(f"<h{level}>{inline(line[level:].strip())}</h{level}>")
        elif line.strip():
            body.append(f"<p>{inline(line)}</p>")
    flush_table()
    if in_list:
        body.append("</ul>")
    style = ("body{font-family:sans-serif;max-width:1100px;margin:auto;padding:1em}"
             "table{border-collapse:collapse;font-size:0.9em}td,th{border:1px solid #bbb;"
             "padding:3px 6px;text-align:right}th{background:#eee}code{background:#f4f4f4}")
    return (f"<!DOCTYPE html>\n<html><head><meta charset='utf-8'><title>{html.escape(title)}"
            f"</title><style>{style}</style></head><body>\n" + "\n".join(body)
            + "\n</body></html>\n")


__all__ = ["check_compatible", "embed_shard", "markdown_to_html", "render_markdown",
           "resample_shard", "run_gap", "subset"]
