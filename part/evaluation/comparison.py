"""PART vs baseline: read two finished runs (train_log.jsonl, eval_step_N.json, final.json, the hypotheses files)
and write them side by side: compare.md (final results per language and direction, averages over the rows both
runs have, paired bootstrap confidence intervals and significance, the evaluations during training, the
stages), compare.json (the same numbers) and curves.png (loss and held-out metrics against steps, stage
boundaries drawn). The command that trains both runs first is
`python -m part compare` (part/cli/compare.py).
"""

from __future__ import annotations

import datetime
import json
import re
from collections.abc import Mapping, Sequence
from pathlib import Path

from part.config import TrainConfig
from part.curriculum import Curriculum
from part.evaluation.bootstrap import Interval, Paired, error_rate_score, paired_bootstrap
from part.evaluation.metrics import (
    CER_LANGUAGES,
    DEFAULT_NORMALIZER,
    NORMALIZER_DESCRIPTIONS,
    base_language,
    bleu_from_statistics,
    bleu_signature_line,
    bleu_statistics,
    compare_table,
    error_counts,
)

SYSTEMS = ("part", "baseline")
FIG_SIZE = (12.0, 4.5)  # inches; at FIG_DPI the PNG is 1200 x 450 pixels
FIG_DPI = 100
_EVAL_FILE = re.compile(r"^eval_step_(\d+)\.json$")
# The normaliser of a results file that does not name one: the project's own, the only one such files were scored with
UNNAMED_NORMALIZER = "part"


# ---------------------------------------------------------------- reading a run


def _read_jsonl(path: Path) -> list[dict]:
    """Records of a JSONL file; a malformed line (e.g. the half-written last line of a live run) is skipped."""
    records = []
    with open(path, encoding="utf-8") as fh:
        for line in fh:
            line = line.strip()
            if not line:
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(record, dict) and "step" in record:
                records.append(record)
    return records


def _stages_from_log(train: list[dict]) -> list[dict]:
    """Stage spans from the per-step log: [{index, name, start, end}], steps start..end (end inclusive, 1-based).

    A logged step is the count of steps done, so a stage whose first logged step is s starts at s - 1 (the
    boundary drawn on the plots), as in the config's cumulative step counts.
    """
    stages: list[dict] = []
    for record in train:
        index = record.get("stage_index")
        if index is None:
            continue
        if stages and stages[-1]["index"] == index:
            stages[-1]["end"] = record["step"]
        else:
            stages.append({"index": index, "name": record.get("stage", f"stage{index}"),
                           "start": record["step"] - 1, "end": record["step"]})
    return stages


def _existing(path: Path) -> str | None:
    return str(path) if path.is_file() else None


_HYPOTHESIS_FIELDS = ("key", "task", "language", "reference")


def read_hypotheses(path: str | Path, strict: bool = False) -> list[dict]:
    """Per-utterance records of a *_hypotheses.jsonl (the evaluator's: key, task, language, target_language,
    reference, hypothesis, ...); malformed lines and records without key, task, language and reference are
    skipped, or with `strict` (a finished run's file) a ValueError naming the file and the line, as is a record
    there without its hypothesis. Blank lines are skipped."""
    records = []
    with open(path, encoding="utf-8") as fh:
        for number, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as exc:
                if strict:
                    raise ValueError(f"{path}, line {number}: not JSON ({exc})") from None
                continue
            if isinstance(record, dict) and all(k in record for k in _HYPOTHESIS_FIELDS):
                if strict and not isinstance(record.get("hypothesis"), str):
                    raise ValueError(f"{path}, line {number}: no hypothesis")
                records.append(record)
            elif strict:
                fields = ", ".join(_HYPOTHESIS_FIELDS + ("hypothesis",))
                raise ValueError(f"{path}, line {number}: not a hypothesis record (a JSON object with {fields})")
    return records


def stages_from_config(cfg: TrainConfig) -> list[dict]:
    """Stage spans from a TrainConfig's curriculum (for a run whose train_log is missing)."""
    return [{"index": s.index, "name": s.name, "start": s.start, "end": s.end} for s in Curriculum(cfg.stages).spans]


def _scored(data: dict) -> dict:
    """rows, normalizer and by_normalizer ({normaliser: rows} or None) of an eval_step_N.json / final.json."""
    by_normalizer = data.get("by_normalizer")
    return {"rows": list(data.get("rows", [])), "normalizer": data.get("normalizer") or UNNAMED_NORMALIZER,
            "by_normalizer": by_normalizer if isinstance(by_normalizer, dict) else None}


def load_run(output_dir: str | Path) -> dict:
    """Reads a train.py output_dir.

    Returns {"output_dir", "train": [{step, stage, stage_index, loss, ...}] (one per step, sorted; a step logged
    twice, as after a resume, keeps its last record), "stages": [{index, name, start, end}], "evals": [{step,
    rows, normalizer, by_normalizer, final, hypotheses}] (every eval_step_N.json, plus final.json when its step
    has no intermediate file; rows: scored with its normalizer, by_normalizer: {normaliser: rows} or None;
    hypotheses: the path of its per-utterance *_hypotheses.jsonl or None), "final": rows of final.json or None,
    "final_step": its step or None, "normalizer" and "final_by_normalizer": final.json's (or None),
    "final_hypotheses": the path of final_hypotheses.jsonl or None, "last_step": the last logged training step
    or None}.
    """
    out = Path(output_dir)
    if not out.is_dir():
        raise FileNotFoundError(f"run directory {out} does not exist (train it first, or drop --skip-training)")
    train: list[dict] = []
    log = out / "train_log.jsonl"
    if log.is_file():
        by_step = {int(r["step"]): r for r in _read_jsonl(log)}
        train = [by_step[s] for s in sorted(by_step)]
    evals: dict[int, dict] = {}
    for path in out.glob("eval_step_*.json"):
        match = _EVAL_FILE.match(path.name)
        if not match:
            continue
        data = json.loads(path.read_text(encoding="utf-8"))
        step = int(data.get("step", match.group(1)))
        evals[step] = {"step": step, **_scored(data), "final": False,
                       "hypotheses": _existing(out / f"eval_step_{step}_hypotheses.jsonl")}
    final_rows, final_step, final = None, None, {"normalizer": None, "by_normalizer": None}
    final_path = out / "final.json"
    if final_path.is_file():
        data = json.loads(final_path.read_text(encoding="utf-8"))
        final = _scored(data)
        final_rows = final["rows"]
        final_step = data.get("step")
        if final_step is not None and int(final_step) not in evals:
            evals[int(final_step)] = {"step": int(final_step), **final, "final": True,
                                      "hypotheses": _existing(out / "final_hypotheses.jsonl")}
    return {
        "output_dir": str(out),
        "train": train,
        "stages": _stages_from_log(train),
        "evals": [evals[s] for s in sorted(evals)],
        "final": final_rows,
        "final_step": final_step,
        "normalizer": final["normalizer"],
        "final_by_normalizer": final["by_normalizer"],
        "final_hypotheses": _existing(out / "final_hypotheses.jsonl") if final_rows is not None else None,
        "last_step": train[-1]["step"] if train else None,
    }


# ---------------------------------------------------------------- summaries


def _mean(values: Sequence[float]) -> float | None:
    return sum(values) / len(values) if values else None


def _row_key(row: Mapping) -> str:
    return row["language"] if row.get("language") is not None else f"{row.get('source')}→{row.get('target')}"


def summarize(rows: Sequence[Mapping], keys: set[tuple[str, str, str]] | None = None) -> dict:
    """Macro averages of one set of rows: asr_error (all ASR languages, WER or CER each: the 'average error
    rate'), asr_wer, asr_cer, s2tt_bleu. Rows without a value are left out; with `keys`, only rows whose
    (task, metric, key) is in it. A missing average is None."""
    def values(task: str, metric: str | None = None) -> list[float]:
        return [float(r["value"]) for r in rows
                if r.get("task") == task and (metric is None or r.get("metric") == metric)
                and r.get("value") is not None and (keys is None or (r["task"], r["metric"], _row_key(r)) in keys)]

    return {"asr_error": _mean(values("asr")), "asr_wer": _mean(values("asr", "wer")),
            "asr_cer": _mean(values("asr", "cer")), "s2tt_bleu": _mean(values("s2tt", "bleu"))}


def _shared_keys(*row_sets: Sequence[Mapping]) -> set[tuple[str, str, str]]:
    """(task, metric, key) that every row set has a value for."""
    sets = [{(r["task"], r["metric"], _row_key(r)) for r in rows if r.get("value") is not None} for rows in row_sets]
    return set.intersection(*sets) if sets else set()


def _fmt(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.2f}"


SUMMARY_LABELS = {
    "asr_error": "ASR average error rate (WER, CER for zh/ja/ko/yue/th), all languages",
    "asr_wer": "ASR average WER (space-delimited languages)",
    "asr_cer": "ASR average CER (CJK / Thai)",
    "s2tt_bleu": "S2TT average BLEU",
}


# ---------------------------------------------------------------- plotting


def draw_stage_boundaries(axes, stages: Sequence[Mapping]) -> None:
    """A dotted vertical line at each stage's start (but the first) and the stage's name along it."""
    for ax in axes:
        transform = ax.get_xaxis_transform()  # x in data, y in axes fraction
        for stage in stages:
            if stage["start"] > 0:
                ax.axvline(stage["start"], color="0.5", linestyle=":", linewidth=1)
            ax.text(stage["start"], 0.02, f" {stage['name']}", transform=transform, rotation=90,
                    fontsize=7, color="0.35", ha="left", va="bottom", clip_on=True)


def save_figure(fig, path: Path) -> None:
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=FIG_DPI)


def smooth(values: list[float], window: int) -> list[float]:
    """Trailing moving average (the first points average what there is)."""
    out, total = [], 0.0
    for i, v in enumerate(values):
        total += v
        if i >= window:
            total -= values[i - window]
        out.append(total / min(i + 1, window))
    return out


def _label_last_point(ax, point: tuple[float, float], text: str, color: str, above: bool) -> None:
    """Writes a series' last value beside its point (a run that evaluates once has nothing else to read); error
    rates above their point and BLEU below, since the two axes can put both on the same spot."""
    ax.annotate(text, point, textcoords="offset points", xytext=(-8, 6 if above else -6), ha="right",
                va="bottom" if above else "top", fontsize=7, color=color)


def plot_curves(runs: Mapping[str, dict], stages: list[dict], path: Path) -> Path:
    """curves.png: (a) training loss (raw faint, smoothed solid) and (b) average ASR error rate (left axis) and
    average S2TT BLEU (right axis) at each evaluation; stage boundaries as labelled vertical lines."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.lines import Line2D

    colors = {name: f"C{i}" for i, name in enumerate(runs)}
    fig, (ax_loss, ax_err) = plt.subplots(1, 2, figsize=FIG_SIZE, dpi=FIG_DPI)
    try:
        # The LM loss, and the frame loss where a run logs one (the PART default's stages 1-2 train on it alone,
        # so the LM loss says nothing of them).
        for name, run in runs.items():
            for key, label, style in (("loss", "LM loss", "-"), ("frame_loss", "frame loss", "--")):
                points = [(r["step"], r[key]) for r in run["train"] if isinstance(r.get(key), int | float)]
                if not points:
                    continue
                steps, losses = zip(*points)
                window = max(1, min(50, len(losses) // 20))
                ax_loss.plot(steps, losses, color=colors[name], alpha=0.15, linewidth=0.8, linestyle=style)
                ax_loss.plot(steps, smooth(list(losses), window), color=colors[name], linewidth=1.8, linestyle=style,
                             label=f"{name}: {label} (moving avg {window})")
        ax_loss.set_title("(a) training loss")
        ax_loss.set_xlabel("step")
        ax_loss.set_ylabel("loss (per target token; per frame), log scale")
        ax_loss.set_yscale("log")  # the frame loss starts near 50; the differences that matter are at 4-10
        if ax_loss.get_legend_handles_labels()[0]:
            ax_loss.legend(loc="upper right", fontsize=8)

        ax_bleu = ax_err.twinx()
        handles = []
        for name, run in runs.items():
            summaries = [(e["step"], summarize(e["rows"])) for e in run["evals"]]
            err = [(s, m["asr_error"]) for s, m in summaries if m["asr_error"] is not None]
            blu = [(s, m["s2tt_bleu"]) for s, m in summaries if m["s2tt_bleu"] is not None]
            if err:
                ax_err.plot(*zip(*err), color=colors[name], marker="o", linewidth=1.8)
                _label_last_point(ax_err, err[-1], f"{err[-1][1]:.1f}", colors[name], above=True)
                handles.append(Line2D([], [], color=colors[name], marker="o", label=f"{name}: ASR error rate"))
            if blu:
                # hollow and larger: a BLEU point that lands on an error-rate point leaves it visible
                ax_bleu.plot(*zip(*blu), color=colors[name], marker="s", markersize=10, markerfacecolor="none",
                             linestyle="--", linewidth=1.5)
                _label_last_point(ax_bleu, blu[-1], f"BLEU {blu[-1][1]:.2f}", colors[name], above=False)
                handles.append(Line2D([], [], color=colors[name], marker="s", markerfacecolor="none", linestyle="--",
                                      label=f"{name}: S2TT BLEU"))
        for ax in (ax_err, ax_bleu):
            ax.margins(y=0.15)  # room for the value labels at the top and bottom points
        ax_err.set_title("(b) held-out evaluation")
        ax_err.set_xlabel("step")
        ax_err.set_ylabel("average ASR error rate, % (WER; CER for CJK)")
        ax_bleu.set_ylabel("average S2TT BLEU")
        if handles:
            # Below the panel: runs that evaluate only at their end put every point at the right edge, where a
            # legend inside the axes would hide them.
            ax_err.legend(handles=handles, loc="upper center", bbox_to_anchor=(0.5, -0.13), ncol=2, fontsize=7)

        # The same step range on both panels (the evaluations start later than the loss curve).
        ends = [s["end"] for s in stages] + [r["step"] for run in runs.values() for r in run["train"]]
        ends += [e["step"] for run in runs.values() for e in run["evals"]]
        if ends:
            for ax in (ax_loss, ax_err):
                ax.set_xlim(0, max(ends) * 1.02)
        draw_stage_boundaries((ax_loss, ax_err), stages)
        if stages:
            fig.suptitle("stage boundaries (dotted): PART's curriculum; the baseline is one stage", fontsize=9)
        save_figure(fig, path)
    finally:
        plt.close(fig)
    return path


# ---------------------------------------------------------------- writing the comparison


def run_under(run: dict, normalizer: str) -> tuple[dict, list[str]]:
    """A copy of a `load_run` result whose final and evaluation rows are those scored with `normalizer` (each
    file's by_normalizer), and the names of the files that hold none under it (their own rows are kept)."""
    view = dict(run)
    unscored: list[str] = []

    def under(rows: list[dict] | None, recorded: str | None, by_normalizer: dict | None, name: str) -> list | None:
        if by_normalizer and normalizer in by_normalizer:
            return list(by_normalizer[normalizer])
        if rows is not None and recorded != normalizer and any(r.get("task") == "asr" for r in rows):
            unscored.append(f"{name} (`{recorded}`)")
        return rows

    view["evals"] = [dict(e, rows=under(e["rows"], e.get("normalizer"), e.get("by_normalizer"),
                                         "final.json" if e["final"] else f"eval_step_{e['step']}.json"))
                     for e in run.get("evals", [])]
    if run.get("final") is not None:
        view["final"] = under(run["final"], run.get("normalizer"), run.get("final_by_normalizer"), "final.json")
    return view, list(dict.fromkeys(unscored))


def _final_rows(run: dict) -> tuple[list[dict], str]:
    """The run's final rows, or its last intermediate evaluation (with a note) when final.json is missing."""
    if run.get("final") is not None:
        return run["final"], f"final.json, step {run['final_step']}"
    if run.get("evals"):
        last = run["evals"][-1]
        return last["rows"], f"no final.json: last evaluation, step {last['step']}"
    return [], "no evaluation found"


def _final_hypotheses(run: dict) -> str | None:
    """The hypotheses file of the evaluation `_final_rows` reads, or None."""
    if run.get("final") is not None:
        return run.get("final_hypotheses")
    if run.get("evals"):
        return run["evals"][-1].get("hypotheses")
    return None


def _group_name(record: Mapping) -> tuple[str, str, str]:
    """(task, metric, row key) of a hypothesis record, as in the result rows: ASR per language (CER for the
    languages without word spacing), translation per source→target direction."""
    if record["task"] == "asr":
        lang = record["language"]
        return "asr", "cer" if base_language(lang) in CER_LANGUAGES else "wer", lang
    return record["task"], "bleu", f"{record['language']}→{record.get('target_language')}"


Intervals = dict[tuple[str, str], dict[str, Paired]]  # (task, metric) -> {row key or "average": Paired}


def paired_intervals(part_records: Sequence[Mapping], baseline_records: Sequence[Mapping], resamples: int = 1000,
                     seed: int = 0, confidence: float = 0.95,
                     normalizer: str = DEFAULT_NORMALIZER) -> tuple[Intervals, list[str]]:
    """Paired bootstrap of every final metric from the two runs' per-utterance hypotheses (A = part), WER/CER on
    text normalised by `normalizer`.

    Utterances are paired by (task, language, target, key); those only one run has are left out (with a note).
    Returns ({(task, metric): {row key: Paired, ..., "average": Paired}}, notes). WER/CER statistics are
    per-utterance (errors, reference units), BLEU's sacrebleu's sentence statistics; utterances whose normalised
    reference is empty are left out, as error_rate does.
    """
    by_group: dict[tuple[str, str, str], list[dict[tuple, Mapping]]] = {}
    for i, records in enumerate((part_records, baseline_records)):
        for r in records:
            sides = by_group.setdefault(_group_name(r), [{}, {}])
            sides[i][(r["task"], r["language"], r.get("target_language"), r["key"])] = r
    families: dict[tuple[str, str], dict[str, tuple]] = {}
    notes = []
    # ASR first, WER before CER, as in the tables; then the translation directions.
    for (task, metric, name), (mine, theirs) in sorted(by_group.items(),
                                                       key=lambda kv: (kv[0][0] != "asr", kv[0][1] == "cer", kv[0])):
        keys = sorted(set(mine) & set(theirs), key=str)
        if len(keys) < max(len(mine), len(theirs)):
            notes.append(f"{task}/{metric} {name}: {len(keys)} utterances in both runs "
                         f"(part {len(mine)}, baseline {len(theirs)}); the others are left out.")
        if not keys:
            continue
        stats = []
        for side in (mine, theirs):
            refs = [side[k]["reference"] for k in keys]
            hyps = [side[k].get("hypothesis") or "" for k in keys]
            if metric == "bleu":
                stats.append(bleu_statistics(refs, hyps, keys[0][2]))
            else:
                stats.append(error_counts(refs, hyps, keys[0][1], normalizer))
        if metric != "bleu":  # error_rate skips empty references: so do the resamples
            kept = [i for i, (a, b) in enumerate(zip(*stats)) if a[1] > 0 and b[1] > 0]
            if not kept:
                continue
            stats = [[side[i] for i in kept] for side in stats]
        families.setdefault((task, metric), {})[name] = tuple(stats)
    results = {}
    for (task, metric), groups in families.items():
        score = bleu_from_statistics if metric == "bleu" else error_rate_score
        results[(task, metric)] = paired_bootstrap(dict(sorted(groups.items())), score, resamples=resamples,
                                                   seed=seed, confidence=confidence)
    return results, notes


def _verdict(metric: str, diff: Interval) -> tuple[bool, str | None]:
    """(significant, the better system or None): lower WER/CER is better, higher BLEU is better."""
    if not diff.excludes_zero():
        return False, None
    part_lower = diff.high < 0
    return True, "part" if part_lower == (metric in ("wer", "cer")) else "baseline"


def _ci(interval: Interval) -> str:
    return f"[{interval.low:.2f}, {interval.high:.2f}]"


def bootstrap_section(results: Intervals, notes: list[str], resamples: int,
                      seed: int, confidence: float = 0.95) -> tuple[list[str], list[dict]]:
    """Markdown lines (table of values, intervals and paired differences, then the significant differences in
    words) and the same as JSON rows."""
    pct = f"{100 * confidence:g}%"
    lines = [f"### Paired bootstrap: {pct} confidence intervals", "",
             f"{resamples} resamples of the utterances (seed {seed}), the same resampled utterances for both runs "
             "(paired by utterance id). Per language / direction the corpus metric is recomputed on each resample "
             "(WER/CER: total errors / total reference units; BLEU: sacrebleu corpus BLEU from the summed sentence "
             "statistics); an average is the mean over its rows, per resample. Δ = part − baseline: lower WER/CER "
             "is better, higher BLEU is better. Values are over the utterances both runs have.", "",
             f"| task | metric | lang | n | part | part {pct} CI | baseline | baseline {pct} CI | Δ part − baseline "
             f"| Δ {pct} CI | significant |",
             "|---|---|---|---:|---:|---|---:|---|---:|---|---|"]
    rows, significant, not_significant = [], [], []
    for (task, metric), per_key in results.items():
        for key, r in per_key.items():
            sig, better = _verdict(metric, r.diff)
            label = f"{task} {metric} {key}"
            lines.append(f"| {task} | {metric} | {key} | {r.n} | {r.a.value:.2f} | {_ci(r.a)} | {r.b.value:.2f} | "
                         f"{_ci(r.b)} | {r.diff.value:+.2f} | {_ci(r.diff)} | "
                         f"{f'yes, {better} better' if sig else 'no'} |")
            rows.append({"task": task, "metric": metric, "key": key, "n": r.n, "part": r.a.to_dict(),
                         "baseline": r.b.to_dict(), "diff": r.diff.to_dict(), "significant": sig, "better": better})
            if sig:
                what = "lower" if (r.diff.value < 0) else "higher"
                significant.append(f"- {label}: **{better}** is better — part's {metric.upper()} is "
                                   f"{abs(r.diff.value):.2f} points {what} than the baseline's "
                                   f"(Δ {pct} CI {_ci(r.diff)})")
            else:
                not_significant.append(label)
    lines += [""] + [f"_{n}_" for n in notes] + ([""] if notes else [])
    if significant:
        lines += [f"Significant differences (the {pct} interval of part − baseline excludes 0):", "", *significant]
    else:
        lines.append(f"No difference is significant at {pct} (every interval of part − baseline contains 0).")
    if not_significant and significant:
        lines += ["", "Not significant (the interval contains 0): " + ", ".join(not_significant) + "."]
    return lines, rows


def comparison_header(command: str, recipes: Mapping[str, str], cfgs: Mapping[str, TrainConfig], nproc: int,
                      overrides: Sequence[str]) -> str:
    """compare.md's header: the command, the date, each recipe's file, steps and stages, the ranks per run."""
    lines = ["# PART vs one-stage baseline", "", f"- command: `{command}`",
             f"- date: {datetime.datetime.now().astimezone().isoformat(timespec='seconds')}"]
    for name in SYSTEMS:
        cfg = cfgs[name]
        stages = f"{len(cfg.stages)} stages" if name == "part" else f"{len(cfg.stages)} stage(s)"
        lines.append(f"- {name}: `{recipes[name]}`, {cfg.total_steps} steps in {stages}")
    lines.append(f"- ranks per run: {nproc}; overrides: {' '.join(overrides) or 'none'}")
    return "\n".join(lines)


def write_comparison(part_run: dict, baseline_run: dict, out_dir: str | Path, header: str = "",
                     stages: list[dict] | None = None, resamples: int = 1000, seed: int = 0,
                     normalizer: str | None = None) -> Path:
    """Writes compare.md, compare.json and curves.png into `out_dir`; returns the path of compare.md.

    `header` is markdown put at the top (command, date, ...). The vertical lines of the plot are `stages`, by
    default the PART run's stages as read from its train_log. With both runs' hypotheses files and `resamples`
    > 0, a paired bootstrap (`resamples`, `seed`) adds confidence intervals and significance. WER/CER are those
    under `normalizer` (by default the one the PART run's final.json was scored with) for both runs, as their
    results files hold them; a file holding none under it keeps its own, and compare.md says so.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    normalizer = normalizer or part_run.get("normalizer") or DEFAULT_NORMALIZER
    views = {name: run_under(run, normalizer) for name, run in (("part", part_run), ("baseline", baseline_run))}
    runs = {name: view for name, (view, _) in views.items()}
    if stages is None:
        stages = part_run.get("stages") or []
    finals = {name: _final_rows(run) for name, run in runs.items()}
    final_rows = {name: rows for name, (rows, _) in finals.items()}
    table = compare_table(final_rows)
    shared = _shared_keys(*final_rows.values())
    summaries = {name: summarize(rows, shared) for name, rows in final_rows.items()}

    lines = [header.rstrip(), ""] if header.strip() else []
    lines += ["## Final evaluation", ""]
    for name, run in runs.items():
        steps = run.get("last_step")
        lines.append(f"- {name}: `{run['output_dir']}` ({finals[name][1]}; last training step "
                     f"{steps if steps is not None else 'n/a'}, {len(run.get('stages') or [])} stage(s))")
    lines.append(f"- normaliser of WER/CER: `{normalizer}`, {NORMALIZER_DESCRIPTIONS[normalizer]} "
                 "(`python -m part rescore RUN_DIR` shows a run's under each)")
    for name, (_, unscored) in views.items():
        if unscored:
            lines.append(f"- **{name}: no WER/CER under `{normalizer}` in {', '.join(unscored)}: the rows from "
                         "there are under the normaliser named, not comparable**")
    signatures = {name: bleu_signature_line(rows) for name, rows in final_rows.items()}
    if len(set(signatures.values()) - {None}) == 1:
        lines.append(f"- {next(s for s in signatures.values() if s)}")
    else:
        lines += [f"- {name}: {line}" for name, line in signatures.items() if line]
    lines += ["", table, "", "### Averages over the rows both runs have", "",
              "| summary | part | baseline |", "|---|---:|---:|"]
    for key, label in SUMMARY_LABELS.items():
        lines.append(f"| {label} | {_fmt(summaries['part'][key])} | {_fmt(summaries['baseline'][key])} |")

    hypotheses = {name: _final_hypotheses(run) for name, run in runs.items()}
    bootstrap: dict | None = None
    lines.append("")
    if resamples <= 0:
        lines.append("_Bootstrap confidence intervals disabled (--bootstrap 0)._")
    elif missing := [name for name, path in hypotheses.items() if path is None]:
        lines.append(f"_No per-utterance hypotheses file for {' and '.join(missing)} (final_hypotheses.jsonl): "
                     "no confidence intervals._")
    else:
        results, notes = paired_intervals(read_hypotheses(hypotheses["part"]), read_hypotheses(hypotheses["baseline"]),
                                          resamples=resamples, seed=seed, normalizer=normalizer)
        section, boot_rows = bootstrap_section(results, notes, resamples, seed)
        lines += section
        bootstrap = {"resamples": resamples, "seed": seed, "confidence": 0.95, "hypotheses": hypotheses,
                     "rows": boot_rows, "notes": notes}

    eval_summaries = {name: {e["step"]: summarize(e["rows"]) for e in run["evals"]} for name, run in runs.items()}
    eval_steps = sorted(set().union(*eval_summaries.values()))
    lines += ["", "## Evaluation during training", ""]
    if eval_steps:
        lines += ["| step | part ASR error rate | baseline ASR error rate | part S2TT BLEU | baseline S2TT BLEU |",
                  "|---:|---:|---:|---:|---:|"]
        for step in eval_steps:
            cells = [_fmt(eval_summaries[n].get(step, {}).get("asr_error")) for n in runs]
            cells += [_fmt(eval_summaries[n].get(step, {}).get("s2tt_bleu")) for n in runs]
            lines.append(f"| {step} | " + " | ".join(cells) + " |")
    else:
        lines.append("_No evaluation files found._")
    if stages:
        lines += ["", "PART stages: " + ", ".join(f"{s['name']} (steps {s['start']}-{s['end']})" for s in stages)]
    lines += ["", "![training curves](curves.png)", ""]
    md_path = out / "compare.md"
    md_path.write_text("\n".join(lines), encoding="utf-8")

    plot_curves(runs, stages, out / "curves.png")

    payload = {
        "header": header,
        "normalizer": normalizer,
        "not_under_normalizer": {name: unscored for name, (_, unscored) in views.items()},
        "bleu_signatures": signatures,
        "final": {name: {"rows": rows, "source": finals[name][1], "output_dir": runs[name]["output_dir"],
                         "last_step": runs[name].get("last_step")} for name, rows in final_rows.items()},
        "averages": summaries,
        "averaged_over": sorted("/".join(k) for k in shared),
        "bootstrap": bootstrap,
        "evals": {name: [dict(step=s, **eval_summaries[name][s]) for s in sorted(eval_summaries[name])]
                  for name in runs},
        "stages": stages,
        "table": table,
    }
    (out / "compare.json").write_text(json.dumps(payload, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
    return md_path
