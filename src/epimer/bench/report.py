"""Tables and plots of a benchmark run: ``results.md`` (shaped like the paper's Tables 2, 3,
4 and 6) and PNG figures (per-task bars, scale sweep), from the ``results.json`` data.

Figures over seeds are ``mean ± standard deviation`` (sample deviation, n − 1) when a run
has several seeds. Accuracies are fractions in [0, 1], printed with three decimals as in the
paper.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

#: Display names (the paper's where it has one).
NAMES = {
    "pretrained": "Pretrained + heads (linear probe)",
    "finetuned": "Fine-tuned (individual)",
    "weight_average": "Weight average (AM)",
    "task_arithmetic": "Task arithmetic",
    "ties": "TIES",
    "dare": "DARE",
    "fisher_average": "Fisher averaging",
    "tsv_m": "TSV-M",
    "iso_c": "Iso-C",
    "iso_cts": "Iso-CTS",
    "epimer": "EpiMer",
}


def display(label: str) -> str:
    """The display name of a row label (``epimer (fisher_norm=global)`` keeps its suffix)."""
    head, _, rest = label.partition(" ")
    return NAMES.get(head, head) + (f" {rest}" if rest else "")


@dataclass
class Row:
    """One method (or reference) over every seed of a run."""

    label: str
    group: str  # "reference", "flat" or "curvature"
    avg: list[float] = field(default_factory=list)
    worst: list[float] = field(default_factory=list)
    normalized: list[float] = field(default_factory=list)
    per_task: dict[str, list[float]] = field(default_factory=dict)
    scales: list[float | None] = field(default_factory=list)
    merge_seconds: list[float] = field(default_factory=list)
    auto_avg: list[float] = field(default_factory=list)
    auto_scales: list[float] = field(default_factory=list)
    auto_worst: list[float] = field(default_factory=list)
    title: str = ""  # the displayed name, where it is not `display(label)`

    @property
    def name(self) -> str:
        return self.title or display(self.label)


def _add(row: Row, entry: dict[str, Any]) -> None:
    row.avg.append(entry["avg"])
    row.worst.append(entry["worst"])
    row.normalized.append(entry["normalized"])
    for task, acc in entry["test"].items():
        row.per_task.setdefault(task, []).append(acc)


def rows(results: dict[str, Any]) -> list[Row]:
    """Reference rows, then every method in the order of the run, aggregated over seeds."""
    needs = {m["label"]: m["needs_fisher"] for m in results["methods"]}
    titles = results.get("reference_titles", {})  # the causal-LM benchmark's base has no probe heads
    out: dict[str, Row] = {r: Row(r, "reference", title=titles.get(r, "")) for r in ("pretrained", "finetuned")}
    for run in results["runs"]:
        for ref in ("pretrained", "finetuned"):
            _add(out[ref], run["references"][ref])
        for m in run["methods"]:
            row = out.setdefault(m["label"], Row(m["label"], "curvature" if needs.get(m["label"]) else "flat"))
            _add(row, m)
            row.scales.append(m["scale"])
            row.merge_seconds.append(m["merge_seconds"])
            auto = m.get("auto") or {}
            if auto.get("scale") is not None:
                row.auto_scales.append(auto["scale"])
            if auto.get("avg") is not None:
                row.auto_avg.append(auto["avg"])
                row.auto_worst.append(auto["worst"])
    return list(out.values())


def mean_std(xs: Sequence[float]) -> tuple[float, float | None]:
    """Mean and sample standard deviation (None for fewer than two values)."""
    m = sum(xs) / len(xs)
    if len(xs) < 2:
        return m, None
    return m, math.sqrt(sum((x - m) ** 2 for x in xs) / (len(xs) - 1))


def fmt(xs: Sequence[float], digits: int = 3) -> str:
    """``.912 ± .004`` (no spread for one value), ``–`` for none; paper style without the 0."""
    if not xs:
        return "–"
    m, s = mean_std(xs)

    def short(v: float) -> str:
        text = f"{v:.{digits}f}"
        return text[1:] if text.startswith("0.") else text

    return short(m) if s is None else f"{short(m)} ± {short(s)}"


def _scales(xs: Sequence[float | None]) -> str:
    vals = [x for x in xs if x is not None]
    return ", ".join(f"{x:.3g}" for x in vals) if vals else "–"


def _seconds(xs: Sequence[float]) -> str:
    return f"{sorted(xs)[len(xs) // 2]:.1f}" if xs else "–"


# ------------------------------------------------------------------------------ markdown


def _table(header: Sequence[str], body: Sequence[Sequence[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(r) + " |" for r in body]
    return lines + [""]


def comparison(results: dict[str, Any]) -> tuple[list[str], list[list[str]]]:
    """The headline table (paper Table 2 plus worst task, normalized accuracy, scale, time):
    header and body rows of strings. Shared by ``results.md`` and the demo's printout."""
    header = ["Method", "Avg acc", "Normalized", "Worst task", "Scale (val)", "Avg acc, scale auto",
              "Auto scale", "Merge s"]
    body: list[list[str]] = []
    for group, title in (("reference", "Baselines"), ("flat", "Flat-geometry methods"),
                         ("curvature", "Curvature-aware methods")):
        members = [r for r in rows(results) if r.group == group]
        if not members:
            continue
        body.append([f"*{title}*"] + [""] * (len(header) - 1))
        for r in members:
            body.append([r.name, fmt(r.avg), fmt(r.normalized), fmt(r.worst), _scales(r.scales),
                         fmt(r.auto_avg), _scales(r.auto_scales), _seconds(r.merge_seconds)])
    if not any(r.auto_avg for r in rows(results)):  # scale: auto was not scored: drop its empty column
        col = header.index("Avg acc, scale auto")
        header = header[:col] + header[col + 1:]
        body = [b[:col] + b[col + 1:] for b in body]
    return header, body


def _config_lines(results: dict[str, Any]) -> list[str]:
    cfg = results["config"]
    ft, fs = cfg["finetune"], cfg["fisher"]
    seeds = ", ".join(str(s) for s in cfg["seeds"])
    return [
        f"- Model: `{results['model']}`; tasks ({len(cfg['tasks'])}): {', '.join(cfg['tasks'])}; seeds: {seeds}.",
        f"- Probe: {ft['probe_shots'] or 'all'} training texts per class, L2 from {ft['probe_l2']} on validation. "
        f"Fine-tuning: {ft['steps']} AdamW steps, batch {ft['batch_size']}, lr {ft['lr']:g}, "
        f"max length {ft['max_length']}, training split capped at {ft['max_train'] or 'none'}, "
        f"word embeddings {'frozen' if ft['freeze_word_embeddings'] else 'trained'}.",
        f"- Fisher: {fs['estimator']} estimator on a fraction {fs['fraction']:g} of each training split (seed "
        f"{fs['seed']}). rank_fraction {cfg['rank_fraction']:g} for every method that has it (TSV-M and EpiMer "
        f"at matched rank).",
        f"- Scale chosen on validation (average accuracy over tasks, at most {cfg['max_val'] or 'all'} texts "
        f"per task) from {sorted(set(cfg['scale_grid']) | {1.0})}; test accuracy at that scale (at most "
        f"{cfg['max_test'] or 'all'} texts per task).",
        _machine_line(results),
    ]


def _machine_line(results: dict[str, Any]) -> str:
    env = results["environment"]
    return (f"- Machine: {env['system']} {env['machine']}, {env.get('cpus', '?')} CPUs, {env['torch_threads']} torch "
            f"threads; epimer {env['epimer']}, torch {env['torch']}, transformers {env['transformers']}, Python "
            f"{env['python']}. Wall time {results.get('wall_seconds', 0.0):.0f} s.")


def markdown(results: dict[str, Any]) -> str:
    """``results.md``: setup, the headline table, the per-task, worst-task and scale-sweep tables."""
    tasks = results["config"]["tasks"]
    all_rows = rows(results)
    lines = ["# Merging benchmark results", "", *_config_lines(results), ""]

    lines += ["## Average test accuracy (paper Table 2)", ""]
    lines += _table(*comparison(results))
    lines += ["Normalized: mean over tasks of merged / fine-tuned test accuracy. Merge s: median wall "
              "time of one merge (scale 1) with `merge_state_dicts`.", ""]

    lines += _per_task_lines(results, all_rows, "Test accuracy per task (paper Table 6)")
    lines += _worst_lines(results, all_rows)
    lines += _sweep_lines(results)
    lines += paired_lines(results)

    lines += ["## Per-task models", ""]
    body = []
    for t in tasks:
        info = [run["tasks"][t] for run in results["runs"]]
        probe = [run["references"]["pretrained"]["test"][t] for run in results["runs"]]
        tuned = [run["references"]["finetuned"]["test"][t] for run in results["runs"]]
        body.append([t, str(info[0]["n_train"]), str(info[0]["n_val"]), str(info[0]["n_test"]), fmt(probe), fmt(tuned),
                     f"{sum(i['finetune'].get('seconds', 0.0) for i in info) / len(info):.0f}"])
    lines += _table(["Task", "Train", "Val (scored)", "Test (scored)", "Probe test acc", "Fine-tuned test acc",
                     "Fine-tune s"], body)
    lines += ["![per-task test accuracy](per_task.png)", "", "![scale sweep](scale_sweep.png)", ""]
    lines += _study_lines(results)
    return "\n".join(lines)


def _per_task_lines(results: dict[str, Any], all_rows: Sequence[Row], title: str) -> list[str]:
    tasks = results["config"]["tasks"]
    header = ["Method", *tasks, "Avg"]
    body = [[r.name, *(fmt(r.per_task.get(t, [])) for t in tasks), fmt(r.avg)] for r in all_rows]
    return [f"## {title}", "", *_table(header, body)]


def _worst_lines(results: dict[str, Any], all_rows: Sequence[Row], unit: str = "accuracy") -> list[str]:
    body = []
    for r in all_rows:
        if r.group == "reference":
            continue
        worst_names = sorted({m["worst_task"] for run in results["runs"] for m in run["methods"]
                              if m["label"] == r.label})
        body.append([r.name, fmt(r.worst), ", ".join(worst_names), fmt(r.auto_worst)])
    header = ["Method", f"Worst task {unit[:3] if unit == 'accuracy' else unit}", "Worst task", "Worst, scale auto"]
    if not any(r.auto_worst for r in all_rows):
        header, body = header[:-1], [b[:-1] for b in body]
    return [f"## Worst-task {unit} (paper Table 4)", "", *_table(header, body)]


def _sweep_lines(results: dict[str, Any], unit: str = "accuracy") -> list[str]:
    sweep_methods = [m for m in results["runs"][0]["methods"] if m["sweep"]]
    if not sweep_methods:
        return []
    scales = sorted({p["scale"] for run in results["runs"] for m in run["methods"] for p in m["sweep"]})
    body, partial = [], False
    for m in sweep_methods:
        runs = [mm for run in results["runs"] for mm in run["methods"] if mm["label"] == m["label"]]
        per_scale = [[p["val_avg"] for mm in runs for p in mm["sweep"] if p["scale"] == s] for s in scales]
        cells = []
        for v in per_scale:
            cells.append(fmt(v) + (" †" if 0 < len(v) < len(runs) else ""))
            partial |= 0 < len(v) < len(runs)
        body.append([display(m["label"]), *cells])
    note = (["†: tried on some seeds only: a sweep is extended to larger scales only while its best "
             "validation score is at the largest scale tried.", ""] if partial else [])
    return [f"## Scale sweep: average validation {unit} (paper Table 3)", "",
            *_table(["Method", *(f"{s:g}" for s in scales)], body), *note]


def paired_lines(results: dict[str, Any], reference: str = "tsv_m") -> list[str]:
    """Paired per-seed differences against ``reference`` (same fine-tuned models, Fishers and
    splits in each seed): each method's average and worst-task test score minus the
    reference's, in points, per seed and as mean ± sd over the seeds."""
    runs = [r for r in results["runs"] if r]
    if not runs or reference not in {m["label"] for m in runs[0]["methods"]}:
        return []
    lines = [f"## Paired differences against {display(reference)} (points, per seed: {[r['seed'] for r in runs]})", "",
             "| Method | Avg: per seed | Avg: mean ± sd | Worst task: per seed | Worst: mean ± sd |",
             "|---|---|---:|---|---:|"]

    def cells(xs: list[float]) -> tuple[str, str]:
        if not xs:
            return "–", "–"
        m, s = mean_std(xs)
        return ", ".join(f"{x:+.1f}" for x in xs), f"{m:+.1f}" + (f" ± {s:.1f}" if s is not None else "")

    for label in [m["label"] for m in runs[0]["methods"]]:
        if label == reference:
            continue
        d_avg, d_worst = [], []
        for r in runs:
            by = {m["label"]: m for m in r["methods"]}
            if label in by and reference in by:
                d_avg.append(100 * (by[label]["avg"] - by[reference]["avg"]))
                d_worst.append(100 * (by[label]["worst"] - by[reference]["worst"]))
        (ea, ma), (ew, mw) = cells(d_avg), cells(d_worst)
        lines.append(f"| {display(label)} | {ea} | {ma} | {ew} | {mw} |")
    return lines + [""]


def _study_runs(results: dict[str, Any]) -> list[dict[str, Any]]:
    return [run for run in results["runs"] if run.get("studies")]


def _by(runs: Sequence[dict[str, Any]], study: str, key: str) -> dict[float, list[dict[str, Any]]]:
    """Study entries grouped by their ``key`` value (rank or Fisher fraction) over seeds."""
    out: dict[float, list[dict[str, Any]]] = {}
    for run in runs:
        for entry in run["studies"][study]:
            out.setdefault(entry[key], []).append(entry)
    return dict(sorted(out.items()))


def _study_lines(results: dict[str, Any]) -> list[str]:
    runs = _study_runs(results)
    if not runs:
        return []
    seeds = ", ".join(str(run["seed"]) for run in runs)
    lines = [f"## Rank sweep: TSV-M and EpiMer at matched rank, with kappa (paper Sec. 4.4; seed {seeds})", ""]
    body = []
    for rf, entries in _by(runs, "rank", "rank_fraction").items():
        body.append([f"{rf:g}", fmt([e["tsv_m"]["avg"] for e in entries]), fmt([e["epimer"]["avg"] for e in entries]),
                     _signed([e["gain"] for e in entries]), fmt([e["tsv_m"]["worst"] for e in entries]),
                     fmt([e["epimer"]["worst"] for e in entries]), _signed([e["worst_gain"] for e in entries]),
                     _sci([e["diagnostics"]["kappa_rel"] for e in entries]),
                     _sci([e["diagnostics"]["kappa"] for e in entries])])
    lines += _table(["rank_fraction", "TSV-M avg", "EpiMer avg", "Gain", "TSV-M worst", "EpiMer worst", "Worst gain",
                     "kappa_rel", "kappa"], body)
    lines += ["Each merge's scale is chosen on validation. kappa = J(c̄) − J(c*) is EpiMer's predicted "
              "improvement over the flat mean in its own second-order surrogate (docs/method.md §5) and kappa_rel = "
              "kappa / J(c̄); Gain is EpiMer's average test accuracy minus TSV-M's.", "",
              "![rank sweep](rank_sweep.png)", "", "![kappa and gain](kappa_gain.png)", ""]
    lines += [f"## Fisher data fraction (paper Sec. 4.5; seed {seeds})", ""]
    body = []
    for f, entries in _by(runs, "fisher_fraction", "fraction").items():
        samples = sorted(n for e in entries for n in e["samples"].values())
        body.append([f"{f:g}", f"{samples[0]}–{samples[-1]}", fmt([e["epimer"]["avg"] for e in entries]),
                     fmt([e["epimer"]["worst"] for e in entries]), _scales([e["epimer"]["scale"] for e in entries])])
    lines += _table(["Fraction of training texts", "Texts per task", "EpiMer avg", "EpiMer worst", "Scale (val)"],
                    body)
    lines += ["![Fisher fraction](fisher_fraction.png)", ""]
    return lines


def _signed(xs: Sequence[float]) -> str:
    m, sd = mean_std(xs)
    return f"{m:+.3f}" + (f" ± {sd:.3f}" if sd is not None else "")


def _sci(xs: Sequence[float]) -> str:
    m, sd = mean_std(xs)
    return f"{m:.3g}" + (f" ± {sd:.2g}" if sd is not None else "")


# ------------------------------------------------------------------------------ plots


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")  # files only: no display on servers and in CI
    import matplotlib.pyplot as plt

    return plt


def _save(plt: Any, fig: Any, path: Path) -> None:
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_per_task(results: dict[str, Any], path: Path) -> None:
    """Grouped bars: test accuracy per task for the references and every method (seed mean)."""
    plt = _pyplot()
    tasks = results["config"]["tasks"]
    all_rows = rows(results)
    width = 0.8 / len(all_rows)
    fig, ax = plt.subplots(figsize=(max(9.0, 1.6 * len(tasks) + 0.25 * len(all_rows) + 2.5), 4.8))
    cmap = plt.get_cmap("tab20")
    for i, r in enumerate(all_rows):
        means = [mean_std(r.per_task[t])[0] for t in tasks]
        xs = [j + (i - (len(all_rows) - 1) / 2) * width for j in range(len(tasks))]
        ax.bar(xs, means, width, label=r.name, color=cmap(i % 20))
    lowest = min(mean_std(r.per_task[t])[0] for r in all_rows for t in tasks)
    floor = max(0.0, math.floor((lowest - 0.05) * 10) / 10)  # differences of a few points stay visible
    ax.set_xticks(range(len(tasks)))
    ax.set_xticklabels(tasks, rotation=20, ha="right")
    ax.set_ylabel("test accuracy" + (f" (axis from {floor:.1f})" if floor > 0 else ""))
    ax.set_ylim(floor, 1.0)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    ax.set_title("Test accuracy per task (mean over seeds)")
    _save(plt, fig, path)


def plot_scale_sweep(results: dict[str, Any], path: Path) -> None:
    """Average validation accuracy against the scale, one line per method with a scale."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(8.5, 4.5))
    labels = [m["label"] for m in results["runs"][0]["methods"] if m["sweep"]]
    for label in labels:
        points: dict[float, list[float]] = {}
        for run in results["runs"]:
            for m in run["methods"]:
                if m["label"] == label:
                    for p in m["sweep"]:
                        points.setdefault(p["scale"], []).append(p["val_avg"])
        xs = sorted(points)
        ax.plot(xs, [mean_std(points[x])[0] for x in xs], marker="o", label=display(label))
    ax.set_xlabel("scale")
    ax.set_ylabel("average validation accuracy")
    ax.set_title("Scale sweep (mean over seeds)")
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    _save(plt, fig, path)


def _study_figure(results: dict[str, Any], study: str, key: str
                  ) -> tuple[Any, dict[Any, list[Any]], list[Any], Any, Any]:
    """pyplot, a study's entries grouped by ``key``, the key's values, a figure and axes."""
    plt = _pyplot()
    groups = _by(_study_runs(results), study, key)
    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    return plt, groups, list(groups), fig, ax


def plot_rank_sweep(results: dict[str, Any], path: Path) -> None:
    """Average test accuracy of TSV-M and EpiMer against the matched rank_fraction."""
    plt, groups, xs, fig, ax = _study_figure(results, "rank", "rank_fraction")
    for method in ("tsv_m", "epimer"):
        for stat, style in (("avg", "-"), ("worst", ":")):
            ys = [mean_std([e[method][stat] for e in groups[x]])[0] for x in xs]
            ax.plot(xs, ys, style, marker="o", label=f"{display(method)} ({'average' if stat == 'avg' else 'worst task'})")
    ax.set_xscale("log")
    ax.set_xlabel("rank_fraction (matched)")
    ax.set_ylabel("test accuracy")
    ax.set_title("Rank sweep")
    ax.legend(fontsize=8)
    _save(plt, fig, path)


def plot_kappa_gain(results: dict[str, Any], path: Path) -> None:
    """kappa_rel (the surrogate's predicted gain) and the observed EpiMer − TSV-M gain, by rank."""
    plt, groups, xs, fig, ax = _study_figure(results, "rank", "rank_fraction")
    ax.plot(xs, [mean_std([e["diagnostics"]["kappa_rel"] for e in groups[x]])[0] for x in xs], "o-", color="C0")
    ax.set_xscale("log")
    ax.set_xlabel("rank_fraction")
    ax.set_ylabel("kappa_rel (predicted)", color="C0")
    right = ax.twinx()
    right.plot(xs, [mean_std([e["gain"] for e in groups[x]])[0] for x in xs], "s--", color="C3")
    right.axhline(0.0, color="C3", lw=0.5)
    right.set_ylabel("EpiMer − TSV-M avg test accuracy (observed)", color="C3")
    ax.set_title("Curvature heterogeneity vs gain over TSV-M")
    _save(plt, fig, path)


def plot_fisher_fraction(results: dict[str, Any], path: Path) -> None:
    """EpiMer's average and worst-task test accuracy against the Fisher's share of training texts."""
    plt, groups, xs, fig, ax = _study_figure(results, "fisher_fraction", "fraction")
    for stat, label in (("avg", "average"), ("worst", "worst task")):
        ax.plot(xs, [mean_std([e["epimer"][stat] for e in groups[x]])[0] for x in xs], "o-", label=f"EpiMer {label}")
    ax.set_xscale("log")
    ax.set_xlabel("fraction of each training split used for the Fisher")
    ax.set_ylabel("test accuracy")
    ax.set_title("Fisher data fraction")
    ax.legend(fontsize=8)
    _save(plt, fig, path)


def _write_text(path: Path, text: str) -> None:
    from epimer.io.outdir import write_text_atomic

    write_text_atomic(path, text, "benchmark report")  # the umask's mode, not a temp file's 0600


def write_report(results: dict[str, Any], out: Path, *, plots: bool = True) -> None:
    """Write ``results.json``, ``results.md`` and (with ``plots``) the PNG figures into ``out``
    (the causal-LM benchmark's own tables when ``results["benchmark"]`` is ``"llm"``)."""
    out.mkdir(parents=True, exist_ok=True)
    _write_text(out / "results.json", json.dumps(results, indent=2, default=str) + "\n")
    _write_text(out / "results.md", llm_markdown(results) if results.get("benchmark") == "llm" else markdown(results))
    if plots:
        plot_per_task(results, out / "per_task.png")
        plot_scale_sweep(results, out / "scale_sweep.png")
        if _study_runs(results):
            plot_rank_sweep(results, out / "rank_sweep.png")
            plot_kappa_gain(results, out / "kappa_gain.png")
            plot_fisher_fraction(results, out / "fisher_fraction.png")


# ------------------------------------------------------------------------------ the causal-LM benchmark


def _llm_config_lines(results: dict[str, Any]) -> list[str]:
    cfg = results["config"]
    ft, fs = cfg["finetune"], cfg["fisher"]
    trained = next((len(r.get("merged", [])) for r in results["runs"]), 0)
    return [
        f"- Model: {results['model']}; tasks ({len(cfg['tasks'])}): {', '.join(cfg['tasks'])}; seeds: "
        f"{', '.join(str(r['seed']) for r in results['runs'])} of {list(cfg['seeds'])}.",
        f"- Fine-tuning from the base: {ft['steps']} AdamW steps, batch {ft['batch_size']}, lr {ft['lr']:g}, "
        f"max length {ft['max_length']} tokens, training split capped at {ft['max_train'] or 'none'}; loss on the "
        f"answer tokens only; trained: parameters matching `{ft['trainable']}` ({trained} tensors), the rest "
        "frozen and left out of every merge.",
        f"- Curvature: {fs['estimator']} Fisher (diagonal, and projected on the merge's bases) on {fs['samples']} "
        f"training prompts per task (seed {fs['seed']}), causal-LM loss on the answer tokens. rank_fraction "
        f"{cfg['rank_fraction']:g} for TSV-M and EpiMer.",
        "- Scores: label-word log-likelihood (multiple choice) for the classification tasks; for the free-text "
        "task, exact match: the gold answer and the end of sequence are the greedy token at every step "
        "(lm-eval-harness's is_greedy). Scale chosen on validation "
        f"({cfg['max_val']} prompts per task) from {sorted(set(cfg['scale_grid']) | {1.0})}"
        + (f", extended in turn to {list(cfg['scale_extension'])} while the best is the largest scale tried"
           if cfg.get("scale_extension") else "")
        + f"; test at that scale ({cfg['max_test']} prompts per task).",
        _machine_line(results),
    ]


def llm_markdown(results: dict[str, Any]) -> str:
    """``results.md`` of ``epimer bench llm``."""
    tasks = results["config"]["tasks"]
    all_rows = rows(results)
    lines = ["# Causal-LM merging benchmark results", "", *_llm_config_lines(results), ""]
    lines += ["## Average test score", "", *_table(*comparison(results))]
    lines += ["Avg acc: mean over tasks of the test score (accuracy, or exact match for the free-text task). "
              "Normalized: mean over tasks of merged / fine-tuned score. Merge s: median wall time of one merge "
              "(scale 1) with `merge_updates`. The base row is the model before fine-tuning (zero-shot).", ""]
    lines += _per_task_lines(results, all_rows, "Test score per task")
    lines += _worst_lines(results, all_rows, "score")
    lines += paired_lines(results)
    lines += _sweep_lines(results, "score")
    lines += ["## Per-task models", ""]
    body = []
    for t in tasks:
        info = [run["tasks"][t] for run in results["runs"]]
        base = [run["references"]["pretrained"]["test"][t] for run in results["runs"]]
        tuned = [run["references"]["finetuned"]["test"][t] for run in results["runs"]]
        ft = [i["finetune"] for i in info]
        body.append([t, "free text" if not info[0]["choices"] else " / ".join(info[0]["choices"]),
                     str(info[0]["n_train"]), str(info[0]["n_val"]), str(info[0]["n_test"]), fmt(base), fmt(tuned),
                     f"{mean_std([f['loss_first'] for f in ft])[0]:.2f} → "
                     f"{mean_std([f['loss_last_10'] for f in ft])[0]:.2f}",
                     f"{mean_std([f['seconds'] for f in ft])[0]:.0f}"])
    lines += _table(["Task", "Answers", "Train", "Val", "Test", "Base test", "Fine-tuned test",
                     "Loss first → last 10", "Fine-tune s"], body)
    example = next((r["example"] for r in results["runs"] if r.get("example")), None)
    if example:
        lines += [f"## One merged model answering ({display(example['label'])}, scale {example['scale']:g})", "",
                  f"Written to `{example['folder']}`, reloaded with `AutoModelForCausalLM.from_pretrained`, greedy "
                  "decoding, the first test prompt of each task:", ""]
        body = [[a["task"], a["prompt"].replace("\n", " ⏎ ")[:90] + ("…" if len(a["prompt"]) > 90 else ""),
                 a["gold"], a["answer"]] for a in example["answers"]]
        lines += _table(["Task", "Prompt", "Gold", "Answer"], [[c.replace("|", "\\|") for c in b] for b in body])
    lines += ["![per-task test score](per_task.png)", "", "![scale sweep](scale_sweep.png)", ""]
    return "\n".join(lines)
