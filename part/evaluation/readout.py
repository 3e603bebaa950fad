"""The adapter frames' own reading of a run's held-out clips beside its LLM's final hypotheses: how much of the
ASR error the speech side makes and how much the LLM adds (`python -m part.frame_readout`)."""

from __future__ import annotations

from pathlib import Path

import torch

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
    (`SpeechLLM.frame_readout` with `blank_penalty`) and of the hypotheses, on the held-out clips
    (`cfg.eval.per_language` of them, as the evaluation takes them) that have a hypothesis."""
    model.eval()
    rows = []
    for lang in cfg.data.languages:
        refs, frames, llm = [], [], []
        for batch in eval_batches(cfg.data, [lang], ["asr"], [], cfg.eval.per_language, batch_size, tokenizer,
                                  model.audio_features, 0, 1):
            for meta, ids in zip(batch.meta, model.frame_readout(batch, blank_penalty)):
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
