"""The adapter frames' own reading of a run's held-out clips beside its LLM's final hypotheses: how much of the
ASR error the speech side makes and how much the LLM adds (`python -m part frame_readout`)."""

from __future__ import annotations

from pathlib import Path

import torch

from part.config import load_config
from part.data.eval_sets import eval_batches
from part.evaluation.comparison import read_hypotheses
from part.evaluation.metrics import error_rate


def final_asr_hypotheses(run_dir: Path) -> dict[tuple[str, str], str]:
    """(language, utterance key) -> the final evaluation's ASR hypothesis; a malformed line is a ValueError."""
    records = read_hypotheses(run_dir / "final_hypotheses.jsonl", strict=True)
    return {(r["language"], r["key"]): r["hypothesis"] for r in records if r["task"] == "asr"}


@torch.no_grad()
def readout_rows(model, tokenizer, cfg, hypotheses: dict[tuple[str, str], str], batch_size: int = 8,
                 blank_penalty: float = 0.0) -> list[dict]:
    """Per language of `cfg.data.languages`: the error rate (under `cfg.eval.normalizer`) of the frames' reading
    (`FrameAlignment.greedy_reading` with `blank_penalty`) and of the hypotheses, on the held-out clips
    (`cfg.eval.per_language` of them, as the evaluation takes them) that have a hypothesis."""
    from part.objectives.frames import frame_alignment

    model.eval()
    reader = frame_alignment(model)
    rows = []
    for lang in cfg.data.languages:
        refs, frames, llm = [], [], []
        for batch in eval_batches(cfg.data, [lang], ["asr"], [], cfg.eval.per_language, batch_size, tokenizer,
                                  model.audio_features, 0, 1, layout=model.layout_spec()):
            for meta, ids in zip(batch.meta, reader.greedy_reading(model, batch, blank_penalty)):
                if (lang, meta.key) in hypotheses:
                    refs.append(meta.reference)
                    frames.append(tokenizer.decode(ids, skip_special_tokens=True).strip())
                    llm.append(hypotheses[(lang, meta.key)])
        if not refs:
            continue
        read, said = (error_rate(refs, texts, lang, cfg.eval.normalizer) for texts in (frames, llm))
        rows.append({"language": lang, "metric": read["metric"], "frames": read["value"], "llm": said["value"],
                     "n": len(refs)})
    return rows


def readout_table(rows: list[dict]) -> str:
    lines = ["| lang | metric | adapter frames alone (greedy CTC) | LLM hypotheses | n |",
             "|---|---|---:|---:|---:|"]
    lines += [f"| {r['language']} | {r['metric']} | {r['frames']:.2f} | {r['llm']:.2f} | {r['n']} |" for r in rows]
    return "\n".join(lines)


OUT_NAME = "frame_readout.md"


def write_frame_readout(run_dir: str | Path, batch_size: int = 8, blank_penalty: float = 0.0,
                        out: str | Path | None = None) -> tuple[str, Path]:
    """Reads a finished run (`<run>/final`, its `train_config.yaml` and `final_hypotheses.jsonl`), writes the
    readout table to `out` (default `<run>/frame_readout.md`) and returns (table, its path). A missing or
    unreadable file of the run is an OSError, ValueError or ConfigError naming it."""
    from part.model.speech_llm import SpeechLLM

    run = Path(run_dir)
    cfg = load_config(run / "final" / "train_config.yaml", [])
    hypotheses = final_asr_hypotheses(run)
    model, tokenizer = SpeechLLM.from_pretrained(run / "final")
    table = readout_table(readout_rows(model, tokenizer, cfg, hypotheses, batch_size, blank_penalty))
    path = Path(out) if out else run / OUT_NAME
    path.write_text(f"# {run}: the adapter frames' own reading vs the LLM's hypotheses\n\n{table}\n", encoding="utf-8")
    return table, path
