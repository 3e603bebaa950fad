"""The adapter frames' own reading of a run's held-out clips beside its LLM's final hypotheses: how much of the
ASR error the speech side makes and how much the LLM adds (`python -m part frame_readout`)."""

from __future__ import annotations

import dataclasses
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
def verified_readings(model, batch, readings: list[list[int]], margin: float, encoded=None) -> list[list[int]]:
    """The frames' readings (one per clip of `batch`) as drafts the LLM checks in one teacher-forced pass over
    `batch`'s prompts: a draft token stays where the LLM gives it a log-probability within `margin` of its likeliest
    token's, else the likeliest token takes its place; the reply ends where the end token stays or comes in. One
    list of ids per sample. `encoded`: the batch's clips through the encoder, when already at hand."""
    from part.packing import with_layouts

    end = model.end_token_id
    drafts = [readings[int(j)] for j in batch.audio_index.tolist()]
    drafted = with_layouts(dataclasses.replace(batch, target_ids=[torch.tensor(d + [end]) for d in drafts],
                                               layout=None, prompt_layout=None),
                           model.layout_spec(packed=False, length_multiple=1))
    layout = drafted.layout  # one sample per row, in order: the targets come sample by sample
    if encoded is None:
        encoded = model.encode(batch.input_features, batch.feature_frames)
    log_probs = model.target_logits(model.embed(layout, encoded), layout, model.attended(layout, encoded)) \
        .log_softmax(-1)
    best = log_probs.max(-1)
    kept = log_probs.gather(1, layout.targets[:, None])[:, 0] >= best.values - margin
    chosen = torch.where(kept, layout.targets, best.indices).tolist()
    out, at = [], 0
    for draft in drafts:
        ids = []
        for token in chosen[at:at + len(draft) + 1]:
            if token == end:
                break
            ids.append(token)
        out.append(ids)
        at += len(draft) + 1
    return out


@torch.no_grad()
def readout_rows(model, tokenizer, cfg, hypotheses: dict[tuple[str, str], str], batch_size: int = 8,
                 blank_penalty: float = 0.0, draft_margin: float | None = None) -> list[dict]:
    """Per language of `cfg.data.languages`: the error rate (under `cfg.eval.normalizer`) of the frames' reading
    (`FrameAlignment.greedy_reading` with `blank_penalty`) and of the hypotheses, on the held-out clips
    (`cfg.eval.per_language` of them, as the evaluation takes them) that have a hypothesis; with `draft_margin`,
    also of the frames' reading checked by the LLM (`verified_readings`); and the first EXAMPLES clips' texts."""
    from part.objectives.frames import frame_alignment

    model.eval()
    reader = frame_alignment(model)
    rows = []
    for lang in cfg.data.languages:
        refs, frames, llm, verified = [], [], [], []
        for batch in eval_batches(cfg.data, [lang], ["asr"], [], cfg.eval.per_language, batch_size, tokenizer,
                                  model.audio_features, 0, 1, layout=model.layout_spec()):
            encoded = model.encode(batch.input_features, batch.feature_frames)  # once for both readings
            readings = reader.greedy_reading(model, batch, blank_penalty, encoded)
            checked = verified_readings(model, batch, readings, draft_margin, encoded) if draft_margin is not None \
                else readings
            for meta, ids, checked_ids in zip(batch.meta, readings, checked):
                if (lang, meta.key) in hypotheses:
                    refs.append(meta.reference)
                    frames.append(tokenizer.decode(ids, skip_special_tokens=True).strip())
                    llm.append(hypotheses[(lang, meta.key)])
                    verified.append(tokenizer.decode(checked_ids, skip_special_tokens=True).strip())
        if not refs:
            continue
        read, said, checked = (error_rate(refs, texts, lang, cfg.eval.normalizer)
                               for texts in (frames, llm, verified))
        rows.append({"language": lang, "metric": read["metric"], "frames": read["value"], "llm": said["value"],
                     "n": len(refs), "examples": list(zip(refs, frames, llm))[:EXAMPLES]})
        if draft_margin is not None:
            rows[-1]["verified"] = checked["value"]
    return rows


def readout_examples(rows: list[dict]) -> str:
    """Each language's first clips: what was said, what the frames read, what the LLM wrote."""
    lines = []
    for r in rows:
        for reference, frames, llm in r["examples"]:
            lines += [f"- {r['language']} reference: `{reference}`", f"  - frames: `{frames}`", f"  - LLM: `{llm}`"]
    return "\n".join(lines)


def readout_table(rows: list[dict], draft_margin: float | None = None) -> str:
    verified = draft_margin is not None
    lines = ["| lang | metric | adapter frames alone (greedy CTC) | LLM hypotheses | "
             + (f"frames checked by the LLM (margin {draft_margin:g}) | " if verified else "") + "n |",
             "|---|---|---:|---:|" + ("---:|" if verified else "") + "---:|"]
    lines += [f"| {r['language']} | {r['metric']} | {r['frames']:.2f} | {r['llm']:.2f} | "
              + (f"{r['verified']:.2f} | " if verified else "") + f"{r['n']} |" for r in rows]
    return "\n".join(lines)


OUT_NAME = "frame_readout.md"
EXAMPLES = 3  # clips per language whose texts the report shows


def write_frame_readout(run_dir: str | Path, batch_size: int = 8, blank_penalty: float = 0.0,
                        out: str | Path | None = None, draft_margin: float | None = None) -> tuple[str, Path]:
    """Reads a finished run (`<run>/final`, its `train_config.yaml` and `final_hypotheses.jsonl`), writes the
    readout table to `out` (default `<run>/frame_readout.md`) and returns (table, its path). A missing or
    unreadable file of the run is an OSError, ValueError or ConfigError naming it."""
    from part.model.speech_llm import SpeechLLM

    run = Path(run_dir)
    cfg = load_config(run / "final" / "train_config.yaml", [])
    hypotheses = final_asr_hypotheses(run)
    model, tokenizer = SpeechLLM.from_pretrained(run / "final")
    rows = readout_rows(model, tokenizer, cfg, hypotheses, batch_size, blank_penalty, draft_margin)
    table = readout_table(rows, draft_margin)
    path = Path(out) if out else run / OUT_NAME
    path.write_text(f"# {run}: the adapter frames' own reading vs the LLM's hypotheses\n\n{table}\n\n"
                    f"## The first clips of each language\n\n{readout_examples(rows)}\n", encoding="utf-8")
    return table, path
