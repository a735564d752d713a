"""`eigenwatch report`: one self-contained HTML page from SCORES.jsonl files.

Input: files written by `eigenwatch score`, one JSON object per text:
``{"id", "score", "detectors": {name: value}, "alert", "p_value"}`` (higher =
more anomalous; "score" is the combined −log10 conformal p), optionally with
``"spectrum": {"layer", "token_count", "window": W, "dim": d, "sigma2",
"eigenvalues": [W, descending]}``: the text's window with the most eigenvalues
above the calibrated MP edge, eigenvalues over the window's trace_mean and σ²
the calibrated σ² in the same units — exactly what
`spectral_spike.SpectralSpike` hands to `descriptors.count_spikes`.

Each positional file is a set of positives named by its file stem;
``--reference`` holds in-distribution texts (negatives). The page holds an
AUROC table (`combined.auroc`), ROC curves, score histograms and one request's
eigenvalues against the Marchenko–Pastur density the detector uses. PNGs are
rendered with matplotlib's Agg canvas and embedded as base64 data URIs.

numpy at import; matplotlib only inside `render_*` (the sidecar imports
`eigenwatch.monitor` and must stay free of it).
"""

from __future__ import annotations

import base64
import html
import io
import json
import math
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from eigenwatch.kernels import rmt
from eigenwatch.kernels.descriptors import count_spikes, mp_gamma
from eigenwatch.monitor.combined import auroc
from eigenwatch.monitor.files import write_atomic

COMBINED = "score"  # the key of the combined score in a SCORES line (and in our tables)
REQUIRED = '"id", "score", "detectors", "alert"'
MAX_WARNINGS_PER_FILE = 20  # then only a count: a wrong file must not flood the terminal


class ReportError(Exception):
    """A user-facing error: printed as `eigenwatch report: error: ...`, exit 2."""


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


# ---------------------------------------------------------------- input

@dataclass
class Line:
    id: str
    score: float
    detectors: dict[str, float]
    alert: bool
    spectrum: dict | None
    where: str  # "file:line", for captions and error messages


@dataclass
class ScoreSet:
    name: str
    path: Path
    lines: list[Line]
    read: int = 0  # non-blank lines
    skipped: int = 0
    spectra_dropped: int = 0

    def values(self, key: str) -> np.ndarray:
        """Scores of `key` ("score" = combined, else a detector) over the lines that have it."""
        if key == COMBINED:
            return np.array([ln.score for ln in self.lines], dtype=np.float64)
        return np.array([ln.detectors[key] for ln in self.lines if key in ln.detectors], dtype=np.float64)

    def alert_rate(self) -> float:
        return sum(ln.alert for ln in self.lines) / len(self.lines)


def _finite(v) -> bool:
    # bool is an int subclass: `true` is not a score.
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def parse_spectrum(spec) -> dict:
    """Validate a line's "spectrum" object; returns it with eigenvalues as a
    descending float64 array. Raises ValueError naming the field."""
    if not isinstance(spec, dict):
        raise ValueError(f'"spectrum" must be an object, got {type(spec).__name__}')
    for key in ("layer", "token_count", "window", "dim"):
        if not _int(spec.get(key)):
            raise ValueError(f'"spectrum.{key}" must be an integer, got {spec.get(key)!r}')
    window, dim = spec["window"], spec["dim"]
    if window < 2:
        raise ValueError(f'"spectrum.window" must be >= 2 (a spectrum needs 2 rows), got {window}')
    if dim < 1:
        raise ValueError(f'"spectrum.dim" must be >= 1, got {dim}')
    s2 = spec.get("sigma2")
    if not _finite(s2) or s2 <= 0:
        raise ValueError(f'"spectrum.sigma2" must be a finite number > 0, got {s2!r}')
    eigs = spec.get("eigenvalues")
    if not isinstance(eigs, list) or len(eigs) != window:
        got = f"{len(eigs)} values" if isinstance(eigs, list) else type(eigs).__name__
        raise ValueError(f'"spectrum.eigenvalues" must be a list of {window} numbers ("spectrum.window"), got {got}')
    bad = [e for e in eigs if not _finite(e) or e < 0]
    if bad:
        raise ValueError(f'"spectrum.eigenvalues" must be finite numbers >= 0, got {bad[0]!r}')
    out = dict(spec)
    out["eigenvalues"] = np.sort(np.asarray(eigs, dtype=np.float64))[::-1]
    out["sigma2"] = float(s2)
    return out


def _parse_line(obj, where: str) -> tuple[Line | None, str | None, str | None]:
    """(line, why skipped, why the spectrum was dropped)."""
    if not isinstance(obj, dict):
        return None, f"expected a JSON object with {REQUIRED}, got {type(obj).__name__}", None
    rid = obj.get("id")
    if _int(rid):
        rid = str(rid)
    if not isinstance(rid, str) or not rid:
        return None, f'"id" must be a non-empty string, got {rid!r}', None
    score = obj.get("score")
    if not _finite(score):
        return None, f'"score" must be a finite number, got {score!r} (id {rid!r})', None
    dets = obj.get("detectors")
    if not isinstance(dets, dict):
        return None, f'"detectors" must be an object {{name: number}}, got {dets!r} (id {rid!r})', None
    for name, v in dets.items():
        if not _finite(v):
            return None, f'"detectors.{name}" must be a finite number, got {v!r} (id {rid!r})', None
    alert = obj.get("alert")
    if not isinstance(alert, bool):
        return None, f'"alert" must be true or false, got {alert!r} (id {rid!r})', None
    spectrum, dropped = None, None
    if obj.get("spectrum") is not None:
        try:
            spectrum = parse_spectrum(obj["spectrum"])
        except ValueError as exc:
            dropped = f"{exc} (id {rid!r})"
    line = Line(rid, float(score), {k: float(v) for k, v in dets.items()}, alert, spectrum, where)
    return line, None, dropped


def read_scores(path: str | Path, flag: str, name: str | None = None) -> ScoreSet:
    """Read one SCORES.jsonl. Malformed lines are reported (file:line) on
    stderr and skipped; a bad "spectrum" only drops the spectrum. `flag` names
    the command-line argument in errors."""
    path = Path(path)
    try:
        fh = path.open(encoding="utf-8", errors="replace")
    except OSError as exc:
        raise ReportError(f"{flag}: cannot read {str(path)!r}: {exc.strerror or exc}") from None
    sset = ScoreSet(name or path.stem, path, [])
    seen: dict[str, int] = {}
    warned = 0

    def warn(msg: str) -> None:
        nonlocal warned
        warned += 1
        if warned <= MAX_WARNINGS_PER_FILE:
            log(msg)

    try:
        with fh:
            for lineno, text in enumerate(fh, 1):
                if not text.strip():
                    continue
                sset.read += 1
                where = f"{path}:{lineno}"
                try:
                    obj = json.loads(text)
                except json.JSONDecodeError as exc:
                    sset.skipped += 1
                    warn(f"{where}: skipped: not valid JSON ({exc.msg} at column {exc.colno})")
                    continue
                line, why, dropped = _parse_line(obj, where)
                if line is not None and line.id in seen:
                    line, why = None, f"duplicate id {line.id!r} (first on line {seen[line.id]})"
                if line is None:
                    sset.skipped += 1
                    warn(f"{where}: skipped: {why}")
                    continue
                if dropped:
                    sset.spectra_dropped += 1
                    warn(f"{where}: spectrum ignored (scores kept): {dropped}")
                seen[line.id] = lineno
                sset.lines.append(line)
    except OSError as exc:  # e.g. a directory passed as a file, or an I/O error mid-read
        raise ReportError(f"{flag}: cannot read {str(path)!r}: {exc.strerror or exc}") from None
    if warned > MAX_WARNINGS_PER_FILE:
        log(f"{path}: {warned - MAX_WARNINGS_PER_FILE} more problem(s) not shown")
    if not sset.lines:
        raise ReportError(
            f"{flag}: {path} holds no usable score line ({sset.read} line(s) read, {sset.skipped} skipped; "
            f"expected JSON objects with {REQUIRED} as written by `eigenwatch score`)")
    return sset


def name_sets(paths: list[str]) -> list[str]:
    """File stems; where two stems collide, the paths as given (legends must differ)."""
    stems = [Path(p).stem for p in paths]
    return [s if stems.count(s) == 1 else str(p) for s, p in zip(stems, paths)]


# ---------------------------------------------------------------- statistics

def detector_keys(sets: list[ScoreSet]) -> list[str]:
    """Every detector seen (sorted), then the combined score last."""
    keys = sorted({k for s in sets for ln in s.lines for k in ln.detectors} - {COMBINED})
    return keys + [COMBINED]


def key_label(key: str) -> str:
    return "combined" if key == COMBINED else key


def auroc_table(reference: ScoreSet, sets: list[ScoreSet], keys: list[str]) -> dict[str, dict[str, float | None]]:
    """{set name: {key: AUROC of set vs reference, None if either side lacks the key}}."""
    out: dict[str, dict[str, float | None]] = {}
    for s in sets:
        row: dict[str, float | None] = {}
        for k in keys:
            neg, pos = reference.values(k), s.values(k)
            row[k] = auroc(neg, pos) if len(neg) and len(pos) else None
        out[s.name] = row
    return out


def roc_curve(neg, pos) -> tuple[np.ndarray, np.ndarray]:
    """(fpr, tpr) of the threshold rule "score ≥ t" over every distinct score,
    from (0, 0) to (1, 1). Tied scores move both rates in one step (a diagonal
    segment), so the trapezoid area under the curve equals `combined.auroc`."""
    neg, pos = np.asarray(neg, dtype=np.float64), np.asarray(pos, dtype=np.float64)
    s = np.concatenate([pos, neg])
    y = np.concatenate([np.ones(len(pos)), np.zeros(len(neg))])
    order = np.argsort(-s, kind="mergesort")
    s, y = s[order], y[order]
    last = np.r_[np.flatnonzero(np.diff(s)), len(s) - 1]  # last index of each run of equal scores
    tps, fps = np.cumsum(y)[last], np.cumsum(1.0 - y)[last]
    return np.r_[0.0, fps / len(neg)], np.r_[0.0, tps / len(pos)]


@dataclass
class SpectrumView:
    """One window's spectrum in the detector's convention (descriptors.py / rmt.py).

    The window is W token rows of width d, centred over tokens: p = min(W−1, d)
    non-zero eigenvalues, γ = (W−1)/d (`mp_gamma`), and the noise bulk is
    MP(γ, σ²) on [σ²(1−√γ)², σ²(1+√γ)²] (`rmt.mp_edges`). A spike is an
    eigenvalue above the upper edge (`count_spikes`, the spectral_spike rule).
    `rmt.mp_density` is the continuous part of MP normalised to mass 1, so it is
    compared with the histogram of the p non-zero eigenvalues only (the one
    eigenvalue that centring zeroes, and for γ > 1 the W−1−d more, are not noise).
    """

    eigenvalues: np.ndarray  # [W] descending, as in the SCORES line
    window: int
    dim: int
    sigma2: float
    gamma: float = field(init=False)
    p: int = field(init=False)
    lo: float = field(init=False)
    hi: float = field(init=False)
    spikes: int = field(init=False)

    def __post_init__(self):
        self.gamma = mp_gamma(self.window, self.dim)
        self.p = min(self.window - 1, self.dim)
        self.lo, self.hi = rmt.mp_edges(self.gamma, self.sigma2)
        self.spikes = count_spikes(self.eigenvalues, self.window, self.dim, self.sigma2)

    @property
    def nonzero(self) -> np.ndarray:
        return self.eigenvalues[: self.p]

    def density(self, x) -> np.ndarray:
        return rmt.mp_density(x, self.gamma, self.sigma2)

    def curve(self, xmax: float, n: int = 801) -> tuple[np.ndarray, np.ndarray]:
        """The plotted MP density: x on [0, xmax] with both bulk edges as nodes
        (the density has square-root edges a uniform grid would round off)."""
        x = np.unique(np.r_[np.linspace(0.0, xmax, n), self.lo, self.hi])
        return x, self.density(x)


def spectrum_view(spec: dict) -> SpectrumView:
    return SpectrumView(np.asarray(spec["eigenvalues"], dtype=np.float64), int(spec["window"]),
                        int(spec["dim"]), float(spec["sigma2"]))


def pick_request(sets: list[ScoreSet], request: str | None) -> tuple[ScoreSet, Line] | None:
    """The line whose spectrum is shown: `request` (first file that has it), else
    the highest combined score among lines with a spectrum (None if there is none)."""
    if request is not None:
        found = [(s, ln) for s in sets for ln in s.lines if ln.id == request]
        if not found:
            files = ", ".join(str(s.path) for s in sets)
            raise ReportError(f"--request {request!r}: no line with this id in {files}")
        with_spec = [(s, ln) for s, ln in found if ln.spectrum is not None]
        if not with_spec:
            where = ", ".join(ln.where for _, ln in found)
            raise ReportError(
                f"--request {request!r}: found at {where} but without a usable \"spectrum\" field "
                "(it needs `eigenwatch score` output that includes spectra)")
        return with_spec[0]
    best = None
    for s in sets:
        for ln in s.lines:
            if ln.spectrum is not None and (best is None or ln.score > best[1].score):
                best = (s, ln)
    return best


# ---------------------------------------------------------------- figures

def _matplotlib():
    """Figure class + Agg canvas. Imported here only; the Agg canvas is used
    explicitly (no pyplot, no GUI backend probing, no global figure state)."""
    os.environ.setdefault("MPLBACKEND", "Agg")
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError as exc:
        raise ReportError(f"matplotlib is needed for the report's figures: pip install 'eigenwatch[report]' ({exc})") from None
    return Figure, FigureCanvasAgg


def _png(fig, canvas_cls) -> bytes:
    canvas_cls(fig)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    return buf.getvalue()


def _grid(n: int, ncols: int = 3) -> tuple[int, int]:
    ncols = max(1, min(ncols, n))
    return math.ceil(n / ncols), ncols


REF_COLOR = "0.45"


def _color(i: int) -> str:
    return f"C{i % 10}"


def hist_edges(arrays: list[np.ndarray], max_bins: int = 50) -> np.ndarray:
    """Common bin edges; unit bins centred on integers for small-range integer
    scores (spectral_spike is a count: 'auto' bins would split or merge counts)."""
    allv = np.concatenate([a for a in arrays if len(a)])
    lo, hi = float(allv.min()), float(allv.max())
    if hi == lo:
        return np.array([lo - 0.5, hi + 0.5])
    if np.all(allv == np.round(allv)) and hi - lo <= max_bins:
        return np.arange(lo - 0.5, hi + 1.0)
    edges = np.histogram_bin_edges(allv, bins="auto")
    return edges if len(edges) - 1 <= max_bins else np.linspace(lo, hi, max_bins + 1)


def _hist_axes(ax, key: str, reference: ScoreSet | None, sets: list[ScoreSet]) -> None:
    groups = ([(f"reference: {reference.name}", reference.values(key), REF_COLOR, True)] if reference else [])
    groups += [(s.name, s.values(key), _color(i), False) for i, s in enumerate(sets)]
    groups = [g for g in groups if len(g[1])]
    if not groups:
        ax.text(0.5, 0.5, "no values", ha="center", va="center", transform=ax.transAxes)
        return
    edges = hist_edges([v for _, v, _, _ in groups])
    for lab, v, c, is_ref in groups:
        # density=True: sets of different sizes on one scale; the reference filled, sets as outlines.
        if is_ref:
            ax.hist(v, bins=edges, density=True, color=c, alpha=0.35, label=f"{lab} (n={len(v)})")
        else:
            ax.hist(v, bins=edges, density=True, histtype="step", linewidth=1.6, color=c,
                    label=f"{lab} (n={len(v)})")
    ax.set_title(key_label(key), fontsize=10)
    ax.set_ylabel("density")


def render_roc(reference: ScoreSet, sets: list[ScoreSet], keys: list[str], table) -> bytes:
    Figure, Canvas = _matplotlib()
    rows, cols = _grid(len(sets))
    fig = Figure(figsize=(4.2 * cols, 4.0 * rows), layout="constrained")
    axes = fig.subplots(rows, cols, squeeze=False).ravel()
    for ax, s in zip(axes, sets):
        ax.plot([0, 1], [0, 1], color="0.7", linestyle=":", linewidth=1)
        for j, k in enumerate(keys):
            a = table[s.name][k]
            if a is None:
                continue
            fpr, tpr = roc_curve(reference.values(k), s.values(k))
            combined = k == COMBINED
            ax.plot(fpr, tpr, color="black" if combined else _color(j), linewidth=2.2 if combined else 1.3,
                    label=f"{key_label(k)} ({a:.3f})")
        ax.set_xlim(0, 1)
        ax.set_ylim(0, 1.01)
        ax.set_aspect("equal")
        ax.set_xlabel(f"false-alarm rate ({reference.name})")
        ax.set_ylabel("detection rate")
        ax.set_title(f"{s.name} (n={len(s.lines)})", fontsize=10)
        ax.legend(loc="lower right", fontsize=7, title="AUROC", title_fontsize=7)
    for ax in axes[len(sets):]:
        ax.set_visible(False)
    return _png(fig, Canvas)


def render_hist_combined(reference: ScoreSet | None, sets: list[ScoreSet], alert_at: float | None) -> bytes:
    Figure, Canvas = _matplotlib()
    fig = Figure(figsize=(7.5, 3.8), layout="constrained")
    ax = fig.subplots()
    _hist_axes(ax, COMBINED, reference, sets)
    if alert_at is not None:
        ax.axvline(alert_at, color="red", linestyle="--", linewidth=1, label=f"lowest alerting score {alert_at:.3g}")
    ax.set_xlabel("combined score = −log10 conformal p")
    ax.legend(fontsize=8)
    return _png(fig, Canvas)


def render_hist_detectors(reference: ScoreSet | None, sets: list[ScoreSet], detectors: list[str]) -> bytes:
    Figure, Canvas = _matplotlib()
    rows, cols = _grid(len(detectors))
    fig = Figure(figsize=(4.0 * cols, 3.0 * rows + 0.4), layout="constrained")
    axes = fig.subplots(rows, cols, squeeze=False).ravel()
    for ax, k in zip(axes, detectors):
        _hist_axes(ax, k, reference, sets)
    for ax in axes[len(detectors):]:
        ax.set_visible(False)
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="outside lower center", ncols=min(4, len(labels)), fontsize=8)
    return _png(fig, Canvas)


def render_spectrum(view: SpectrumView, title: str) -> bytes:
    """Left: the non-zero eigenvalues' histogram (density, mass 1 over all p of
    them) against MP(γ, σ²), zoomed on the bulk, spikes in red. Right: every
    non-zero eigenvalue by rank on a log scale, so far-out spikes stay visible."""
    Figure, Canvas = _matplotlib()
    fig = Figure(figsize=(11, 4.0), layout="constrained")
    ax, ax2 = fig.subplots(1, 2, width_ratios=[3, 2])
    nz = view.nonzero
    xmax = max(1.3 * view.hi, 1e-12)
    width = view.hi / 20.0  # ~20 bins across [0, λ+]: readable for p from ~16 to 4096
    edges = np.arange(0.0, xmax + width, width)
    bulk, spikes = nz[nz <= view.hi], nz[nz > view.hi]
    w = 1.0 / (view.p * width)  # each eigenvalue adds 1/(p·width): total area 1, like the MP density
    ax.hist([bulk, spikes], bins=edges, weights=[np.full(len(bulk), w), np.full(len(spikes), w)],
            stacked=True, color=["C0", "C3"], alpha=0.75,
            label=[f"eigenvalues ≤ λ+ ({len(bulk)})", f"above λ+ ({len(spikes)})"])
    x, y = view.curve(xmax)
    ax.plot(x, y, color="black", linewidth=1.6, label=f"MP density, γ={view.gamma:.3g}, σ²={view.sigma2:.3g}")
    for edge, name in ((view.lo, "λ−"), (view.hi, "λ+")):
        ax.axvline(edge, color="black", linestyle="--", linewidth=1)
        ax.annotate(f"{name} = {edge:.3g}", (edge, 0.5), xycoords=("data", "axes fraction"),
                    xytext=(-11, 0), textcoords="offset points", rotation=90, va="center", fontsize=8)
    # rug: every eigenvalue that fits the panel (a histogram of ~p values hides single ones)
    inside = nz[nz <= xmax]
    ax.plot(inside, np.zeros_like(inside), "|", markersize=10, color="0.2")
    off = int(np.count_nonzero(nz > xmax))
    ax.set_xlim(0, xmax)
    ax.set_xlabel("eigenvalue / window's mean non-zero eigenvalue"
                  + (f"   ({off} more beyond the right edge)" if off else ""))
    ax.set_ylabel("density")
    ax.legend(fontsize=8, loc="upper right")
    ax.set_title(title, fontsize=10)

    ranks = np.arange(1, view.p + 1)
    pos = nz > 0  # log scale: a rank-deficient window's zeros cannot be drawn
    is_spike = nz > view.hi
    ax2.semilogy(ranks[pos & ~is_spike], nz[pos & ~is_spike], "o", markersize=3, color="C0", label="bulk")
    ax2.semilogy(ranks[pos & is_spike], nz[pos & is_spike], "o", markersize=4, color="C3",
                 label=f"spikes ({view.spikes})")
    ax2.axhline(view.hi, color="black", linestyle="--", linewidth=1, label=f"λ+ = σ²(1+√γ)² = {view.hi:.3g}")
    if view.lo > 0:
        ax2.axhline(view.lo, color="0.5", linestyle=":", linewidth=1, label=f"λ− = {view.lo:.3g}")
    ax2.set_xlabel("rank")
    ax2.set_ylabel("eigenvalue (log)")
    ax2.set_title("all non-zero eigenvalues", fontsize=10)
    ax2.legend(fontsize=8, loc="best")
    return _png(fig, Canvas)


# ---------------------------------------------------------------- HTML

CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Helvetica,Arial,sans-serif;margin:2em auto;max-width:1200px;
color:#222;padding:0 1em}
h1{font-size:1.6em}h2{font-size:1.25em;margin-top:2em;border-bottom:1px solid #ddd}
table{border-collapse:collapse;margin:0.5em 0;font-variant-numeric:tabular-nums}
th,td{border:1px solid #ccc;padding:0.3em 0.6em;text-align:right}th{background:#f3f3f3}
td.name,th.name{text-align:left}td.best{background:#d7f5d7;font-weight:bold}tr.ref td{color:#555;background:#fafafa}
.note{background:#fff6d6;border-left:4px solid #e0b000;padding:0.5em 0.8em}
.caption{color:#333;font-size:0.95em;max-width:1100px}img{max-width:100%;display:block;margin:0.5em 0}
code{background:#f3f3f3;padding:0 0.2em}
"""


def _img(png: bytes, alt: str) -> str:
    return f'<img alt="{html.escape(alt)}" src="data:image/png;base64,{base64.b64encode(png).decode()}">'


def _pct(x: float) -> str:
    return f"{100 * x:.1f}%"


def summary_html(reference: ScoreSet | None, sets: list[ScoreSet], keys: list[str], table) -> str:
    e = html.escape
    head = ['<th class="name">set</th>', "<th>n</th>", "<th>alert rate</th>"]
    if reference is not None:
        head += [f"<th>{e(key_label(k))}</th>" for k in keys]
    rows = []
    if reference is not None:
        cells = [f'<td class="name">reference: {e(reference.name)}</td>', f"<td>{len(reference.lines)}</td>",
                 f'<td title="the empirical false-alarm rate">{_pct(reference.alert_rate())}</td>']
        cells += ["<td>—</td>"] * len(keys)
        rows.append('<tr class="ref">' + "".join(cells) + "</tr>")
    for s in sets:
        cells = [f'<td class="name">{e(s.name)}</td>', f"<td>{len(s.lines)}</td>",
                 f'<td data-set="{e(s.name)}" data-alert-rate="{s.alert_rate()!r}">{_pct(s.alert_rate())}</td>']
        if reference is not None:
            row = table[s.name]
            vals = [v for v in row.values() if v is not None]
            best = max(vals) if vals else None
            for k in keys:
                a = row[k]
                if a is None:
                    cells.append(f'<td title="{e(key_label(k))} missing in this set or the reference">—</td>')
                    continue
                cls = "auc best" if a == best else "auc"
                # data-auroc keeps the exact value (repr) for tools; the cell shows 3 decimals.
                cells.append(f'<td class="{cls}" data-set="{e(s.name)}" data-detector="{e(k)}" '
                             f'data-auroc="{a!r}">{a:.3f}</td>')
        rows.append("<tr>" + "".join(cells) + "</tr>")
    return ("<table id=\"summary\"><thead><tr>" + "".join(head) + "</tr></thead><tbody>"
            + "".join(rows) + "</tbody></table>")


def spectrum_caption(s: ScoreSet, ln: Line, view: SpectrumView) -> str:
    e = html.escape
    sp = ln.spectrum
    above = view.nonzero[view.nonzero > view.hi]
    listed = ", ".join(f"{v:.3g}" for v in above[:12]) + (" …" if len(above) > 12 else "")
    return (
        f"Request <code>{e(ln.id)}</code> from set <b>{e(s.name)}</b> (<code>{e(ln.where)}</code>, combined "
        f"score {ln.score:.3g}, alert {'yes' if ln.alert else 'no'}): layer {sp['layer']}, "
        f"token_count {sp['token_count']}, window W = {view.window} rows of width d = {view.dim}. "
        f"Eigenvalues are those of the token-centred window Gram / d divided by the window's mean non-zero "
        f"eigenvalue; p = min(W−1, d) = {view.p} are non-zero. Marchenko–Pastur law with γ = (W−1)/d = "
        f"{view.gamma:.4g} and the calibrated σ² = {view.sigma2:.4g} (same units): bulk "
        f"[λ−, λ+] = [{view.lo:.4g}, {view.hi:.4g}]. "
        f"<b><span class=\"spikes\">{view.spikes}</span> eigenvalue(s) above λ+</b>"
        + (f" ({listed})" if len(above) else "")
        + " — the count the spectral_spike detector compares with its per-layer threshold."
    )


def build_html(title: str, reference: ScoreSet | None, sets: list[ScoreSet], keys: list[str], table,
               images: dict[str, bytes], picked, view: SpectrumView | None) -> str:
    e = html.escape
    parts = [f"<!DOCTYPE html><html lang=\"en\"><head><meta charset=\"utf-8\"><title>{e(title)}</title>"
             f"<style>{CSS}</style></head><body><h1>{e(title)}</h1>"]
    inputs = [("reference (negatives)", reference)] if reference else []
    inputs += [("positives", s) for s in sets]
    parts.append("<p class=\"caption\">Inputs: " + "; ".join(
        f"{label} <b>{e(s.name)}</b> = <code>{e(str(s.path))}</code> ({len(s.lines)} line(s) used"
        + (f", {s.skipped} skipped" if s.skipped else "")
        + (f", {s.spectra_dropped} spectrum field(s) ignored" if s.spectra_dropped else "") + ")"
        for label, s in inputs) + ". Higher scores are more anomalous.</p>")

    parts.append("<h2>Summary</h2>")
    if reference is None:
        parts.append("<p class=\"note\">No <code>--reference</code> file was given (scores of in-distribution "
                     "texts), so there are no AUROCs and no ROC curves: this report shows alert rates, score "
                     "histograms and the spectrum only.</p>")
    else:
        parts.append(f"<p class=\"caption\">AUROC of each detector (columns; <i>combined</i> is the conformal "
                     f"combined score) for telling each set (rows) from the reference "
                     f"<b>{e(reference.name)}</b>: 0.5 = chance, 1 = perfect separation. The best detector of "
                     f"each row is highlighted. Alert rate = share of lines with <code>\"alert\": true</code>; "
                     f"on the reference it is the empirical false-alarm rate.</p>")
    parts.append(summary_html(reference, sets, keys, table))

    if "roc" in images:
        parts.append("<h2>ROC curves</h2><p class=\"caption\">One panel per set against the reference; one curve "
                     "per detector (the combined score in black), AUROC in the legend.</p>")
        parts.append(_img(images["roc"], "ROC curves"))

    parts.append("<h2>Score distributions</h2><p class=\"caption\">Combined score of "
                 + ("the reference (grey) and " if reference else "") + "each set, as densities "
                 "(sets of different sizes on one scale).</p>")
    parts.append(_img(images["hist_combined"], "combined score histograms"))
    if "hist_detectors" in images:
        parts.append("<p class=\"caption\">Each detector's raw score (its own units).</p>")
        parts.append(_img(images["hist_detectors"], "per-detector score histograms"))

    if picked is None:
        parts.append("<h2>Spectrum</h2><p class=\"note\">No line carries a <code>\"spectrum\"</code> field, "
                     "so no eigenvalue spectrum is shown (it needs <code>eigenwatch score</code> output that "
                     "includes spectra).</p>")
    else:
        s, ln = picked
        parts.append(f"<section id=\"spectrum\" data-request=\"{e(ln.id)}\" data-set=\"{e(s.name)}\" "
                     f"data-spikes=\"{view.spikes}\"><h2>Spectrum of request {e(ln.id)}</h2>")
        parts.append(_img(images["spectrum"], f"eigenvalue spectrum of request {ln.id}"))
        parts.append(f"<p class=\"caption\">{spectrum_caption(s, ln, view)}</p></section>")
    parts.append("</body></html>\n")
    return "".join(parts)


def write_report(path: Path, text: str) -> None:
    try:
        write_atomic(path, text)  # a reader never sees half a report
    except OSError as exc:
        raise ReportError(f"--out: cannot write {str(path)!r}: {exc.strerror or exc}") from None


def text_table(reference: ScoreSet | None, sets: list[ScoreSet], keys: list[str], table) -> str:
    """The summary for the terminal; '*' marks each row's best AUROC."""
    names = [s.name for s in sets] + ([f"reference: {reference.name}"] if reference else [])
    w0 = max(len("set"), *(len(n) for n in names))
    cols = ["n", "alert"] + ([key_label(k) for k in keys] if reference else [])
    widths = [max(6, len(c)) for c in cols]
    out = ["set".ljust(w0) + "  " + "  ".join(c.rjust(w) for c, w in zip(cols, widths))]
    if reference is not None:
        cells = [str(len(reference.lines)), f"{reference.alert_rate():.3f}"] + ["-"] * len(keys)
        out.append(f"reference: {reference.name}".ljust(w0) + "  "
                   + "  ".join(c.rjust(w) for c, w in zip(cells, widths)))
    for s in sets:
        cells = [str(len(s.lines)), f"{s.alert_rate():.3f}"]
        if reference is not None:
            row = table[s.name]
            vals = [v for v in row.values() if v is not None]
            best = max(vals) if vals else None
            cells += ["-" if row[k] is None else f"{row[k]:.3f}" + ("*" if row[k] == best else " ") for k in keys]
        out.append(s.name.ljust(w0) + "  " + "  ".join(c.rjust(w) for c, w in zip(cells, widths)))
    if reference is None:
        out.append("(no --reference: no AUROC; alert rates only)")
    else:
        out.append(f"AUROC vs reference {reference.name}; * = best per row")
    return "\n".join(out)


# ---------------------------------------------------------------- command

def add_report_args(p) -> None:
    p.add_argument("scores", nargs="+", metavar="SCORES.jsonl",
                   help="files written by `eigenwatch score`; each is a set of positives named by its file stem")
    p.add_argument("--out", required=True, metavar="report.html", help="HTML file to write (one self-contained file)")
    p.add_argument("--reference", default=None, metavar="REF_SCORES.jsonl",
                   help="scores of in-distribution texts (negatives); without it: no AUROC / ROC curves")
    p.add_argument("--request", default=None, metavar="ID",
                   help="id of the line whose spectrum is shown (default: the highest combined score with a spectrum)")
    p.add_argument("--title", default="eigenwatch report", metavar="TEXT", help="page title (default %(default)r)")


def make_report(args) -> int:
    names = name_sets(args.scores)
    sets = [read_scores(p, "SCORES.jsonl", n) for p, n in zip(args.scores, names)]
    reference = read_scores(args.reference, "--reference") if args.reference else None
    keys = detector_keys(sets + ([reference] if reference else []))
    table = auroc_table(reference, sets, keys) if reference else {}
    # Positives first: with --request, a positive's line wins over the reference's.
    picked = pick_request(sets + ([reference] if reference else []), args.request)

    images: dict[str, bytes] = {}
    if reference is not None:
        images["roc"] = render_roc(reference, sets, keys, table)
    alerting = [ln.score for s in sets + ([reference] if reference else []) for ln in s.lines if ln.alert]
    images["hist_combined"] = render_hist_combined(reference, sets, min(alerting) if alerting else None)
    if keys[:-1]:
        images["hist_detectors"] = render_hist_detectors(reference, sets, keys[:-1])
    view = None
    if picked is not None:
        view = spectrum_view(picked[1].spectrum)
        images["spectrum"] = render_spectrum(view, f"request {picked[1].id}: layer {picked[1].spectrum['layer']}")
    page = build_html(args.title, reference, sets, keys, table, images, picked, view)
    out = Path(args.out)
    if out.is_dir():
        raise ReportError(f"--out: {str(out)!r} is a directory; give a file name such as report.html")
    write_report(out, page)
    print(text_table(reference, sets, keys, table), flush=True)
    log(f"eigenwatch report: wrote {out} ({len(images)} figure(s), {len(page) // 1024} KiB)")
    return 0


def report(args) -> int:
    try:
        return make_report(args)
    except ReportError as exc:
        log(f"eigenwatch report: error: {exc}")
        return 2
