"""`final/README.md`: what the exported model is, how it was trained, how well it did, and how to reproduce it."""

from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path

from part.config import ModelConfig, TrainConfig
from part.data.shards import expand_shards


def training_data_summary(cfg: TrainConfig) -> dict[str, tuple[int, float]]:
    """(samples, hours) per language of the training shards, from their builders' index.json files."""
    totals: dict[str, list[float]] = defaultdict(lambda: [0, 0.0])
    for lang in cfg.data.languages:
        try:
            shards = expand_shards(cfg.data.train_shards, lang)
        except Exception:  # noqa: BLE001  remote or missing shards: the card says it does not know
            continue
        names = {Path(s).name for s in shards}
        seen: set[Path] = set()
        for index in {Path(s).parent / "index.json" for s in shards}:
            if index in seen or not index.exists():
                continue
            seen.add(index)
            for entry in json.loads(index.read_text()).get("shards", []):
                if entry["name"] in names:
                    totals[lang][0] += entry["samples"]
                    totals[lang][1] += sum(entry.get("hours_per_language", {}).values())
    return {lang: (int(n), hours) for lang, (n, hours) in totals.items()}


def model_card(cfg: TrainConfig, checkpoint: Path, metrics_markdown: str | None, command: str) -> str:
    """The card's markdown."""
    m = cfg.model
    lines = [
        f"# {cfg.logging.run_name or Path(cfg.output_dir).name}: a PART Speech LLM",
        "",
        f"Exported from checkpoint `{checkpoint.name}` (step {cfg.total_steps}). "
        "Load it with `SpeechLLM.from_pretrained` or `python -m part infer --model <this directory>`.",
        "",
        "## Model",
        "",
        f"- speech encoder: `{m.encoder.pretrained or 'a randomly initialised Whisper-style encoder'}`",
        f"- adapter: {m.adapter.kind}, {m.adapter.layers} layers, hidden {m.adapter.hidden}, "
        f"downsampling x{m.adapter.downsample} on top of the encoder's 50 frames per second",
        f"- LLM: `{m.llm.pretrained}`" + (f", LoRA rank {m.llm.lora.rank} on {', '.join(m.llm.lora.target_modules)}"
                                          if m.llm.lora else ""),
        *alignment_lines(m),
        "",
        "## Training",
        "",
        f"Precision {cfg.precision}, DeepSpeed ZeRO-{cfg.zero_stage}, seed {cfg.seed}.",
        "",
        "| stage | steps | tasks | trainable | lr | warm-up | loss |",
        "| --- | ---: | --- | --- | ---: | ---: | --- |",
    ]
    for s in cfg.stages:
        tasks = ", ".join(f"{k} {v:g}" for k, v in s.tasks.items())
        al = m.alignment
        losses = " + ".join(name for name, on in (
            ("LM", s.lm_loss), ("CTC", al is not None and al.ctc is not None and al.ctc.weight > 0),
            ("frame", al is not None and al.frame_targets is not None and al.frame_targets.weight > 0)) if on)
        lines.append(f"| {s.name} | {s.steps} | {tasks} | {', '.join(s.trainable)} | {s.lr:g} | {s.warmup_steps} "
                     f"| {losses} |")
    data = training_data_summary(cfg)
    lines += ["", "## Training data", ""]
    if data:
        lines += ["| language | samples | hours |", "| --- | ---: | ---: |"]
        lines += [f"| {lang} | {n} | {hours:.2f} |" for lang, (n, hours) in sorted(data.items())]
        lines.append(f"| total | {sum(n for n, _ in data.values())} | {sum(h for _, h in data.values()):.2f} |")
    else:
        lines.append(f"`{cfg.data.train_shards}` over {', '.join(cfg.data.languages)} (no index.json found).")
    lines += ["", "## Evaluation", ""]
    if metrics_markdown:
        e = cfg.eval
        decoding = "greedy" if e.num_beams == 1 else f"beam search ({e.num_beams} beams)"
        lines += [f"The run's final.md: the first {e.per_language} held-out utterances per language, {decoding}; "
                  f"WER/CER on text normalised by `{e.normalizer}` (`eval.normalizer`), BLEU with its sacrebleu "
                  "signature. `python -m part rescore <output_dir>` scores the saved hypotheses again under either "
                  "normaliser.", "", metrics_markdown.strip()]
    else:
        lines.append("Not evaluated at the end of training (`eval.per_language: 0`).")
    lines += ["", "## Reproduce", "", "```bash", command, "```", ""]
    return "\n".join(lines)


def alignment_lines(m: ModelConfig) -> list[str]:
    """The card's lines on the auxiliary objectives on the adapter's frames (`model.alignment`)."""
    al = m.alignment
    if al is None:
        return ["- no auxiliary objective on the adapter's frames; the LLM reads them as they are"]
    over = f"the tokens of `{al.vocabulary}`" if al.vocabulary else "the LLM's whole vocabulary"
    lines = [f"- the adapter's frames read through the LLM's final norm and head, over {over}"]
    if al.ctc is not None:
        lines.append(f"- CTC loss, weight {al.ctc.weight:g}")
    if (t := al.frame_targets) is not None:
        lines.append(f"- frame loss, weight {t.weight:g} ({t.targets} targets from word timings of "
                     f"`{t.teacher or m.encoder.pretrained}`'s Whisper alignment heads)")
    if al.readout is not None:
        lines.append("- the LLM reads each frame as its likely tokens' embeddings weighted by the posterior at "
                     f"temperature {al.readout.temperature:g}")
    return lines
