"""One run's figure: the training loss with its stage boundaries, and the held-out metrics per language at each
evaluation (`python -m part plot RUN_DIR`)."""

from __future__ import annotations

from pathlib import Path

from part.evaluation.comparison import FIG_DPI, draw_stage_boundaries, load_run, save_figure, smooth


def plot_run(output_dir: str | Path, path: str | Path | None = None) -> Path:
    """Writes `<output_dir>/run.png` (or `path`): (a) training loss (and the CTC and frame terms when logged)
    against step, stage boundaries labelled; (b) ASR error rate per language; (c) S2TT BLEU per direction.
    Returns the path."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    run = load_run(output_dir)
    path = Path(path) if path else Path(output_dir) / "run.png"
    fig, (ax_loss, ax_asr, ax_st) = plt.subplots(1, 3, figsize=(15.0, 4.5), dpi=FIG_DPI)
    try:
        steps = [r["step"] for r in run["train"]]
        for key, label, color in (("loss", "LLM loss per target token", "C0"), ("ctc_loss", "CTC term", "C1"),
                                  ("frame_loss", "frame loss", "C2")):
            values = [(r["step"], r[key]) for r in run["train"] if isinstance(r.get(key), int | float)]
            if values:
                xs, ys = zip(*values)
                window = max(1, min(50, len(ys) // 20))
                ax_loss.plot(xs, ys, color=color, alpha=0.2, linewidth=0.8)
                ax_loss.plot(xs, smooth(list(ys), window), color=color, linewidth=1.8, label=f"{label} (avg {window})")
        ax_loss.set_title("(a) training loss")
        ax_loss.set_xlabel("step")
        if ax_loss.get_legend_handles_labels()[0]:
            ax_loss.legend(fontsize=8)
        for task, ax, title in (("asr", ax_asr, "(b) ASR error rate, % (WER; CER for CJK)"),
                                ("s2tt", ax_st, "(c) S2TT BLEU")):
            series: dict[str, list[tuple[int, float]]] = {}
            for evaluation in run["evals"]:
                for row in evaluation["rows"]:
                    if row.get("task") != task or row.get("value") is None:
                        continue
                    key = row.get("language") or f"{row.get('source')}→{row.get('target')}"
                    series.setdefault(key, []).append((evaluation["step"], row["value"]))
            for i, (key, points) in enumerate(sorted(series.items())):
                ax.plot(*zip(*sorted(points)), marker="o", linewidth=1.5, color=f"C{i % 10}", label=key)
            ax.set_title(title)
            ax.set_xlabel("step")
            if series:
                ax.legend(fontsize=7, ncol=2)
        end = max(steps + [e["step"] for e in run["evals"]] + [0])
        for ax in (ax_loss, ax_asr, ax_st):
            ax.set_xlim(0, max(end, 1) * 1.02)
        draw_stage_boundaries((ax_loss, ax_asr, ax_st), run["stages"])
        fig.suptitle(f"{Path(output_dir).name}: stage boundaries dotted", fontsize=9)
        save_figure(fig, path)
    finally:
        plt.close(fig)
    return path
