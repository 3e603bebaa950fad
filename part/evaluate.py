"""Held-out evaluation: generate for ASR and S2TT prompts on every rank in lockstep, score on rank 0."""

from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path

import torch
import torch.distributed as dist

from part.data import eval_batches, to_device
from part.metrics import bleu, error_rate, results_table


def score(records: list[dict]) -> list[dict]:
    """Rows per ASR language (WER/CER) and per S2TT direction (BLEU) from {task, language, target, ref, hyp}."""
    groups: dict[tuple, list[dict]] = defaultdict(list)
    for r in records:
        groups[(r["task"], r["language"], r.get("target_language"))].append(r)
    rows = []
    for (task, lang, target), items in sorted(groups.items(), key=lambda kv: tuple(str(x) for x in kv[0])):
        refs = [x["reference"] for x in items]
        hyps = [x["hypothesis"] for x in items]
        if task == "asr":
            m = error_rate(refs, hyps, lang)
            rows.append({"task": "asr", "language": lang, "metric": m["metric"], "value": m["value"], "n": m["n"]})
        else:
            b = bleu(refs, hyps, target)
            rows.append({"task": task, "source": lang, "target": target, "metric": "bleu", "value": b["value"],
                         "n": b["n"]})
    return rows


@torch.no_grad()
def generate_records(model, batches: list[dict], tokenizer, device, dtype, max_new_tokens: int, num_beams: int,
                     synced: bool) -> list[dict]:
    records = []
    for batch in batches:
        moved = to_device(batch, device, dtype)
        outputs = model.generate(moved, max_new_tokens=max_new_tokens, num_beams=num_beams, synced_gpus=synced)
        if batch.get("pad"):
            continue
        for meta, ids in zip(batch["meta"], outputs):
            records.append(dict(meta, hypothesis=tokenizer.decode(ids, skip_special_tokens=True).strip()))
    return records


def evaluate(engine, cfg, tokenizer, rank: int, world: int, device, dtype, step: int, logger,
             final: bool = False) -> list[dict]:
    """Collective. Writes eval_step_N.{json,md} (and final.{json,md}) under output_dir; returns the rows."""
    model = engine.module
    model.eval()
    languages = cfg.data.languages
    batches = eval_batches(cfg.data, languages, cfg.eval.tasks, cfg.stages[-1].translation_targets,
                           cfg.eval.per_language, cfg.eval.batch_size, tokenizer, model.encoder.config.num_mel_bins,
                           rank, world)
    records = generate_records(model, batches, tokenizer, device, dtype, cfg.eval.max_new_tokens, cfg.eval.num_beams,
                               synced=world > 1)
    gathered = [None] * world
    if dist.is_initialized():
        dist.all_gather_object(gathered, records)  # our own processes' hypotheses, not shard data
    else:
        gathered = [records]
    rows: list[dict] = []
    if rank == 0:
        everything = [r for part in gathered for r in part]
        rows = score(everything)
        table, as_dict = results_table(rows)
        out = Path(cfg.output_dir)
        out.mkdir(parents=True, exist_ok=True)
        name = "final" if final else f"eval_step_{step}"
        (out / f"{name}.json").write_text(json.dumps({"step": step, "rows": rows, "table": as_dict}, indent=1,
                                                      ensure_ascii=False))
        (out / f"{name}.md").write_text(table + "\n")
        with open(out / f"{name}_hypotheses.jsonl", "w", encoding="utf-8") as fh:
            for r in everything:
                fh.write(json.dumps(r, ensure_ascii=False) + "\n")
        logger.info(f"evaluation at step {step} ({len(everything)} utterances):\n{table}")
        logger.metrics(step, rows)
    model.train()
    return rows
