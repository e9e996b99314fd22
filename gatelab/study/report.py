"""``gatelab report STUDY_DIR``: one self-contained HTML page and its markdown twin, from the store.

Per base config (task): a table of the headline test metric (validation's where the trials never read
test: ``train.score_test = false``) as mean ± standard deviation over the
seeds (n − 1 in the denominator) beside the task's trivial baseline, with ranks; a paired comparison
of every group against a reference group (same seeds; the mean paired difference with a percentile
bootstrap 95 % confidence interval, 10 000 resamples, and the exact two-sided Wilcoxon signed-rank
p-value: with n seeds the smallest attainable p is 2/2^n, so two seeds can never reach 0.05); the
learning curves (validation metric against step, every trial, one colour per group); and the
gradient flow ‖∂L/∂h_t‖ by lag of chosen trials' final weights on the first 64 test (or validation)
sequences
(:func:`gatelab.diagnostics.gradient_flow`, drawn by :func:`gatelab.diagnostics.plot_norm_vs_lag`).

The page needs no network to view: figures are inline SVG (learning curves) and base64 PNG
(gradient flow), the styles inline, and there is no script. The store is the source of truth for
every number in the tables; the curves come from each trial's ``metrics.jsonl`` and the gradient
flow from its checkpoint. Figures need matplotlib (the ``report`` extra); without it the report
holds the tables and says so.
"""

from __future__ import annotations

import base64
import html
import io
import json
import math
import re
import statistics
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ..checkpoint import atomic_write
from .store import STORE_NAME, Store

__all__ = ["write_report", "group_rows", "Group", "bootstrap_ci", "wilcoxon_signed_rank", "paired_comparison"]

BOOTSTRAP_RESAMPLES = 10_000
FLOW_ITEMS = 64
MIN_PAIRS = 3  # fewer paired seeds: the comparison reports wins, not a verdict


@dataclass
class Group:
    """The trials of one configuration over its seeds, on one base config."""

    base: str
    label: str
    trials: list[dict[str, Any]] = field(default_factory=list)
    rank: int | None = None

    @property
    def done(self) -> list[dict[str, Any]]:
        return [t for t in self.trials if t["status"] == "done"]

    @property
    def values(self) -> list[float]:
        return [t["value"] for t in self.done]

    @property
    def mean(self) -> float | None:
        return statistics.fmean(self.values) if self.values else None

    @property
    def std(self) -> float | None:
        return statistics.stdev(self.values) if len(self.values) > 1 else None

    @property
    def metric(self) -> str | None:
        return self.done[0]["metric"] if self.done else None

    @property
    def split(self) -> str:
        """"test", or "validation" where the trials never read the test split (``train.score_test = false``)."""
        return "test" if all("test" in (t["final"] or {}) for t in self.done) else "validation"

    @property
    def higher_is_better(self) -> bool:
        return bool(self.done and self.done[0]["higher_is_better"])

    @property
    def baseline(self) -> float | None:
        return statistics.fmean(t["baseline"] for t in self.done) if self.done else None

    def count(self, status: str) -> int:
        return sum(t["status"] == status for t in self.trials)


def group_rows(store: Store) -> dict[str, list[Group]]:
    """The study's trials as groups per base config, in the study's order, ranked within each base:
    groups with fewer diverged or failed seeds first, then by the mean (best first)."""
    bases: dict[str, dict[str, Group]] = {}
    for t in store.trials():
        bases.setdefault(t["base"], {}).setdefault(t["label"], Group(t["base"], t["label"])).trials.append(t)
    out = {}
    for base, groups in bases.items():
        ranked = [g for g in groups.values() if g.mean is not None]
        sign = -1 if any(g.higher_is_better for g in ranked) else 1
        ranked.sort(key=lambda g: (g.count("diverged") + g.count("failed"), sign * g.mean))
        for k, g in enumerate(ranked, 1):
            g.rank = k
        out[base] = list(groups.values())
    return out


# -- statistics -------------------------------------------------------------------------------------


def bootstrap_ci(diffs: Sequence[float], *, level: float = 0.95, resamples: int = BOOTSTRAP_RESAMPLES,
                 seed: int = 0) -> tuple[float, float]:
    """Percentile bootstrap confidence interval of the mean of ``diffs`` (resampled with replacement)."""
    d = np.asarray(diffs, dtype=np.float64)
    if d.size == 0:
        raise ValueError("bootstrap_ci: no differences")
    rng = np.random.default_rng(seed)
    means = d[rng.integers(0, d.size, size=(resamples, d.size))].mean(axis=1)
    lo, hi = np.quantile(means, [(1 - level) / 2, (1 + level) / 2])
    return float(lo), float(hi)


def wilcoxon_signed_rank(diffs: Sequence[float]) -> tuple[float, float, int]:
    """``(W+, p, n)``: Wilcoxon's signed-rank statistic of the paired differences, its exact two-sided
    p-value (every sign pattern enumerated, ties given average ranks; zeros dropped, as Wilcoxon did)
    and the number of non-zero differences; a normal approximation beyond 20 of them."""
    d = np.asarray([x for x in diffs if x != 0], dtype=np.float64)
    n = int(d.size)
    if n == 0:
        return 0.0, 1.0, 0
    order = np.abs(d)
    ranks = np.empty(n)
    sorted_idx = np.argsort(order, kind="stable")
    i = 0
    while i < n:  # average ranks over ties
        j = i
        while j + 1 < n and order[sorted_idx[j + 1]] == order[sorted_idx[i]]:
            j += 1
        ranks[sorted_idx[i:j + 1]] = (i + j) / 2 + 1
        i = j + 1
    w_plus = float(ranks[d > 0].sum())
    centre = ranks.sum() / 2
    if n <= 20:
        signs = (np.arange(2**n)[:, None] >> np.arange(n)) & 1  # (2^n, n): every assignment of signs
        w = signs @ ranks
        p = float(np.mean(np.abs(w - centre) >= abs(w_plus - centre) - 1e-9))
    else:
        var = (ranks**2).sum() / 4
        z = (abs(w_plus - centre) - 0.5) / math.sqrt(var)
        p = float(math.erfc(z / math.sqrt(2)))
    return w_plus, min(p, 1.0), n


def paired_comparison(groups: list[Group], reference: str | None) -> tuple[Group | None, list[dict[str, Any]]]:
    """Every group against ``reference`` (a label; default the first group) over the seeds both
    finished: n, mean difference (group − reference), bootstrap CI, Wilcoxon p, and a verdict."""
    ref = next((g for g in groups if g.label == reference), None) if reference else (groups[0] if groups else None)
    if ref is None or not ref.done:
        return ref, []
    by_seed = {t["seed"]: t["value"] for t in ref.done}
    rows = []
    for g in groups:
        if g is ref:
            continue
        pairs = [(t["value"], by_seed[t["seed"]]) for t in g.done if t["seed"] in by_seed]
        row: dict[str, Any] = {"label": g.label, "n": len(pairs)}
        if pairs:
            diffs = [a - b for a, b in pairs]
            lo, hi = bootstrap_ci(diffs)
            w, p, _ = wilcoxon_signed_rank(diffs)
            better = (lo > 0) if ref.higher_is_better else (hi < 0)
            worse = (hi < 0) if ref.higher_is_better else (lo > 0)
            wins = sum((a > b) if ref.higher_is_better else (a < b) for a, b in pairs)
            if len(pairs) < MIN_PAIRS:  # too few for an interval to mean anything: say what happened
                verdict = f"better on {wins} of {len(pairs)} seeds (too few pairs to judge)"
            else:
                verdict = "better" if better else "worse" if worse else "no clear difference"
            row.update(diff=statistics.fmean(diffs), lo=lo, hi=hi, w=w, p=p, verdict=verdict)
        rows.append(row)
    return ref, rows


# -- figures ---------------------------------------------------------------------------------------


def _curves(group: list[Group], study_dir: Path) -> dict[str, list[tuple[list[int], list[float]]]]:
    out: dict[str, list[tuple[list[int], list[float]]]] = {}
    for g in group:
        for t in g.trials:
            path = study_dir / t["run_dir"] / "metrics.jsonl"
            metric = t.get("metric")
            if not path.is_file():
                continue
            lines = [json.loads(s) for s in path.read_text().splitlines() if s.strip()]
            if metric is None and lines:
                metric = next((k for k in ("accuracy", "mse", "bpc", "mae") if k in lines[0]), None)
            pts = [(ln["step"], ln[metric]) for ln in lines if metric in ln and math.isfinite(ln[metric])]
            if pts:
                out.setdefault(g.label, []).append(([p[0] for p in pts], [p[1] for p in pts]))
    return out


def _learning_curves_svg(bases: dict[str, list[Group]], study_dir: Path) -> str | None:
    from matplotlib.backends.backend_svg import FigureCanvasSVG
    from matplotlib.figure import Figure

    from ..diagnostics.plots import line_style

    panels = {base: _curves(groups, study_dir) for base, groups in bases.items()}
    panels = {b: c for b, c in panels.items() if c}
    if not panels:
        return None
    fig = Figure(figsize=(5.2 * len(panels), 3.9), layout="constrained")
    FigureCanvasSVG(fig)
    axes = fig.subplots(1, len(panels), squeeze=False)[0]
    for ax, (base, curves) in zip(axes, panels.items()):
        groups = bases[base]
        metric = next((g.metric for g in groups if g.metric), "metric")
        for j, (label, runs) in enumerate(curves.items()):
            for k, (steps, values) in enumerate(runs):
                ax.plot(steps, values, linewidth=1.3, alpha=0.85, label=label if k == 0 else None, **line_style(j))
        every = [v for runs in curves.values() for _, vs in runs for v in vs]
        if metric != "accuracy" and every and min(every) > 0:
            ax.set_yscale("log")
        base_value = next((t["baselines"]["val"].get(metric) for g in groups for t in g.done
                           if (t["baselines"] or {}).get("val")), None)  # the curves are validation's
        if base_value is not None:
            ax.axhline(base_value, color="grey", linestyle=":", linewidth=1, label="baseline (validation)")
        ax.set_title(base)
        ax.set_xlabel("step")
        ax.set_ylabel(f"validation {metric}")
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=6, ncol=2 if len(curves) > 8 else 1)
    buf = io.StringIO()
    fig.savefig(buf, format="svg")
    text = buf.getvalue()
    return re.sub(r"\s*<metadata>.*?</metadata>", "", text[text.index("<svg"):], flags=re.S)  # no date, no RDF


def _gradient_flow_png(bases: dict[str, list[Group]], study_dir: Path, chosen: Any) -> tuple[bytes | None, list[str]]:
    from ..diagnostics import gradient_flow, plot_norm_vs_lag
    from ..tasks import collate
    from ..train import load_model

    notes: list[str] = []
    panels: dict[str, dict[str, np.ndarray]] = {}
    tasks: dict[str, Any] = {}
    for base, groups in bases.items():
        for g in groups:
            if chosen == "none" or (isinstance(chosen, list) and g.label not in chosen) or not g.done:
                continue
            t = min(g.done, key=lambda t: t["seed"])
            run = study_dir / t["run_dir"]
            ckpt = run / "best.pt" if (run / "best.pt").exists() else run / "last.pt"
            try:
                model, config, _ = load_model(ckpt)
                if base not in tasks:
                    tasks[base] = config.task.build()
                task = tasks[base]
                # the split the trial was scored on: never test where the trial was not to read it
                split = task.split("test") if g.split == "test" and len(task.split("test")) else task.split("val")
                batch = collate([split[i] for i in range(min(FLOW_ITEMS, len(split)))])
                flow = gradient_flow(model, batch)
                panels.setdefault(base, {})[f"{g.label} (seed {t['seed']})"] = flow.by_lag()
            except Exception as err:  # a figure must not stop the report; say why it is missing
                notes.append(f"{base} / {g.label}: no gradient flow ({type(err).__name__}: {err})")
    if not panels:
        return None, notes
    with tempfile.TemporaryDirectory() as tmp:
        path = plot_norm_vs_lag(panels, Path(tmp) / "flow.png", ylabel="‖∂L/∂h_t‖ (last layer)",
                                title="gradient flow of the final weights, by lag")
        return Path(path).read_bytes(), notes


# -- the page --------------------------------------------------------------------------------------


def _fmt(x: float | None, digits: int = 4) -> str:
    return "—" if x is None else f"{x:.{digits}g}"


def _table_rows(groups: list[Group]) -> tuple[list[str], list[list[str]]]:
    metric = next((g.metric for g in groups if g.metric), "metric")
    better = "higher" if any(g.higher_is_better for g in groups) else "lower"
    split = "test" if all(g.split == "test" for g in groups) else "validation"
    header = ["rank", "configuration", f"{split} {metric}, mean ± std ({better} is better)", "seeds", "baseline",
              "beats baseline", "diverged", "failed", "params", "engine", "s/epoch"]
    rows = []
    for g in sorted(groups, key=lambda g: (g.rank is None, g.rank or 0)):
        done = g.done
        value = "—" if g.mean is None else f"{g.mean:.4f} ± {g.std:.4f}" if g.std is not None else f"{g.mean:.4f}"
        rows.append([
            str(g.rank or "—"), g.label or "(base)", value, f"{len(done)}/{len(g.trials)}", _fmt(g.baseline),
            f"{sum(bool(t['beats_baseline']) for t in done)}/{len(done)}" if done else "—",
            str(g.count("diverged")), str(g.count("failed")),
            f"{done[0]['parameters']:,}" if done and done[0]["parameters"] is not None else "—",
            ",".join(done[0]["engines"] or []) if done else "—",
            _fmt(statistics.fmean(t["seconds_per_epoch"] for t in done if t["seconds_per_epoch"] is not None), 3)
            if any(t["seconds_per_epoch"] is not None for t in done) else "—",
        ])
    return header, rows


def _paired_rows(ref: Group | None, rows: list[dict[str, Any]]) -> tuple[list[str], list[list[str]]]:
    header = ["configuration", "pairs", "mean difference (config − reference)", "bootstrap 95 % CI", "Wilcoxon p",
              "verdict"]
    out = []
    for r in rows:
        if r["n"] == 0:
            out.append([r["label"], "0", "—", "—", "—", "no common seed finished"])
            continue
        out.append([r["label"], str(r["n"]), f"{r['diff']:+.4g}", f"[{r['lo']:+.4g}, {r['hi']:+.4g}]", f"{r['p']:.3g}",
                    r["verdict"]])
    return header, out


def _md_table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(c.replace("|", "\\|") for c in row) + " |" for row in rows]
    return "\n".join(lines)


def _html_table(header: list[str], rows: list[list[str]], cls: str) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in row) + "</tr>" for row in rows)
    return f'<table class="{cls}"><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>'


_CSS = """
body{font-family:system-ui,-apple-system,'Segoe UI',sans-serif;max-width:1200px;margin:2em auto;padding:0 1em;color:#222}
table{border-collapse:collapse;margin:0.6em 0 1.4em;font-size:0.9em}
th,td{border:1px solid #ccc;padding:0.25em 0.6em;text-align:right}
th{background:#f2f2f2} td:nth-child(2),th:nth-child(2){text-align:left}
table.paired td:first-child{text-align:left}
figure{margin:1em 0} figure svg,figure img{max-width:100%;height:auto}
figcaption,.note{color:#555;font-size:0.9em} code{background:#f5f5f5;padding:0 0.2em}
"""


def write_report(study_dir: str | Path, *, reference: str | None = None, gradient_flow: Any = None,
                 figures: bool = True) -> dict[str, Path]:
    """Write ``report.html`` (self-contained) and ``report.md`` (figures in ``report_files/``) into
    ``study_dir`` from its store; returns their paths. ``reference``: the label of the group the
    paired comparison is against (default: the study's ``reference``, else the first group);
    ``gradient_flow``: ``"first_seed"`` (default: each group's lowest finished seed), ``"none"`` or a
    list of group labels."""
    study_dir = Path(study_dir)
    if not (study_dir / STORE_NAME).is_file():
        raise FileNotFoundError(f"{study_dir / STORE_NAME}: no study store here (run gatelab sweep STUDY.toml first)")
    with Store(study_dir / STORE_NAME) as store:
        study = json.loads(store.meta("study") or "{}")
        name = store.meta("name") or study_dir.name
        description = store.meta("description") or ""
        last = json.loads(store.meta("last_sweep") or "{}")
        bases = group_rows(store)
        counts = store.counts()
        trials = store.trials()
    reference = reference or study.get("reference")
    chosen = gradient_flow or study.get("report", {}).get("gradient_flow", "first_seed")
    files = study_dir / "report_files"
    notes: list[str] = []
    svg = png = None
    if figures:
        try:
            import matplotlib  # noqa: F401
        except ImportError:
            notes.append("figures need matplotlib, part of gatelab's report extra: pip install 'gatelab[report]'")
        else:
            svg = _learning_curves_svg(bases, study_dir)
            png, more = _gradient_flow_png(bases, study_dir, chosen)
            notes += more
            if svg:
                atomic_write(files / "learning_curves.svg", svg)
            if png:
                atomic_write(files / "gradient_flow.png", png)

    machine = next((t["machine"] for t in trials if t.get("machine")), {}) or {}
    vers = next((t["versions"] for t in trials if t.get("versions")), {}) or {}
    status = ", ".join(f"{v} {k}" for k, v in counts.items() if v)
    facts = (f"{len(trials)} trials ({status}); machine {machine.get('host', '?')} ({machine.get('cpus', '?')} CPUs, "
             f"{machine.get('platform', '?')}); gatelab {vers.get('gatelab', '?')}, torch {vers.get('torch', '?')}"
             + (f"; last sweep {last['wall_seconds']:.0f} s on {last['workers']} workers x {last['threads']} threads"
                if last else ""))
    stats_note = ("Mean ± standard deviation over the seeds (n − 1). Ranks: fewer diverged or failed seeds first, then the "
                  "mean. Paired comparison: the mean difference over the seeds both configurations finished, with a "
                  f"percentile bootstrap 95 % confidence interval ({BOOTSTRAP_RESAMPLES:,} resamples) and the exact "
                  "two-sided Wilcoxon signed-rank p-value; with n pairs the smallest possible p is 2/2^n, so fewer "
                  "than 6 seeds cannot reach p < 0.05: read the interval. 'better'/'worse': the interval excludes 0 (given "
                  f"at least {MIN_PAIRS} pairs; with fewer, the seeds on which the configuration did better).")
    md = [f"# Study {name}", "", description, "", facts, "", stats_note, ""]
    page = [f"<h1>Study {html.escape(name)}</h1>", f"<p>{html.escape(description)}</p>",
            f'<p class="note">{html.escape(facts)}</p>', f'<p class="note">{html.escape(stats_note)}</p>']
    for base, groups in bases.items():
        task = groups[0].trials[0]["task"]
        header, rows = _table_rows(groups)
        md += [f"## {base} (task {task})", "", _md_table(header, rows), ""]
        page += [f"<h2>{html.escape(base)} <small>(task {html.escape(task)})</small></h2>",
                 _html_table(header, rows, "results")]
        ref, paired = paired_comparison(groups, reference)
        if ref is not None and paired:
            ph, pr = _paired_rows(ref, paired)
            md += [f"Paired against **{ref.label}** (same seeds):", "", _md_table(ph, pr), ""]
            page += [f"<p>Paired against <b>{html.escape(ref.label)}</b> (same seeds):</p>", _html_table(ph, pr, "paired")]
        problems = [t for g in groups for t in g.trials if t["status"] in ("failed", "diverged")]
        if problems:
            items = [f"{t['name']}: {t['status']}, {t['reason']}" for t in problems]
            md += ["Not finished:", "", *[f"- {i}" for i in items], ""]
            page.append("<ul>" + "".join(f"<li>{html.escape(i)}</li>" for i in items) + "</ul>")
    if svg:
        md += ["## Learning curves", "", "![learning curves](report_files/learning_curves.svg)", ""]
        page += ["<h2>Learning curves</h2>", f"<figure>{svg}<figcaption>validation metric against step, every trial "
                 "(one colour per configuration); dotted: the validation split's trivial baseline</figcaption></figure>"]
    if png:
        md += ["## Gradient flow", "", "![gradient flow](report_files/gradient_flow.png)", ""]
        data = base64.b64encode(png).decode()
        page += ["<h2>Gradient flow</h2>", f'<figure><img alt="gradient flow" src="data:image/png;base64,{data}">'
                 f"<figcaption>‖∂L/∂h_t‖ by lag (steps back from the end) for the final weights on the first "
                 f"{FLOW_ITEMS} test sequences; dotted: 10⁻³ of the largest value (the memory horizon)</figcaption></figure>"]
    if notes:
        md += ["Notes:", "", *[f"- {n}" for n in notes], ""]
        page.append("<ul class=\"note\">" + "".join(f"<li>{html.escape(n)}</li>" for n in notes) + "</ul>")
    command = f"gatelab report {study_dir}"
    md += [f"Regenerate: `{command}` (the sweep: `gatelab sweep {study_dir / 'study.toml'} --out {study_dir}`)", ""]
    page.append(f'<p class="note">Regenerate: <code>{html.escape(command)}</code></p>')
    doc = ("<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
           f"<title>Study {html.escape(name)}</title><style>{_CSS}</style></head><body>\n"
           + "\n".join(page) + "\n</body></html>\n")
    atomic_write(study_dir / "report.html", doc)
    atomic_write(study_dir / "report.md", "\n".join(md))
    return {"html": study_dir / "report.html", "markdown": study_dir / "report.md"}
