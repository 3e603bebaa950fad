"""Held-out evaluation: generate for ASR and S2TT prompts on every rank in lockstep, score on rank 0."""

from __future__ import annotations

import dataclasses
import json
import math
import time
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

import torch

from part.batch import Batch
from part.config import TrainConfig
from part.data.eval_sets import eval_batches
from part.evaluation.metrics import (
    DEFAULT_NORMALIZER,
    bleu,
    error_rate,
    evaluation_report,
    normalizers_from,
    results_table,
)

if TYPE_CHECKING:
    from part.model.speech_llm import SpeechLLM


class Ranks(Protocol):
    """What the evaluator asks of the run's processes (part.train.distributed.DistributedContext gives it)."""

    @property
    def rank(self) -> int: ...

    @property
    def world_size(self) -> int: ...

    @property
    def device(self) -> torch.device: ...

    @property
    def is_main(self) -> bool: ...

    def gather_objects(self, obj: object) -> list:
        """Every rank's `obj`, in rank order (collective: every rank calls it)."""


class EvaluationLog(Protocol):
    """Where the evaluator reports (part.train.logging.RunLogger on the main rank)."""

    def info(self, message: str) -> None: ...

    def evaluation(self, step: int, rows: list[dict], records: list[dict]) -> None: ...


def score(records: list[dict], normalizer: str = DEFAULT_NORMALIZER) -> list[dict]:
    """Rows per ASR language (WER/CER on text normalised by `normalizer`, which the row names) and per S2TT
    direction (BLEU, with its sacrebleu tokenizer and signature) from {task, language, target_language, reference,
    hypothesis}."""
    groups: dict[tuple, list[dict]] = defaultdict(list)
    for r in records:
        groups[(r["task"], r["language"], r.get("target_language"))].append(r)
    rows = []
    for (task, lang, target), items in sorted(groups.items(), key=lambda kv: tuple(str(x) for x in kv[0])):
        refs = [x["reference"] for x in items]
        hyps = [x["hypothesis"] for x in items]
        if task == "asr":
            m = error_rate(refs, hyps, lang, normalizer)
            rows.append({"task": "asr", "language": lang, "metric": m["metric"], "value": m["value"], "n": m["n"],
                         "normalizer": normalizer})
        else:
            b = bleu(refs, hyps, target)
            rows.append({"task": task, "source": lang, "target": target, "metric": "bleu", "value": b["value"],
                         "n": b["n"], "tokenizer": b["tokenizer"], "signature": b["signature"]})
    return rows


def score_each(records: list[dict], normalizers: list[str] | tuple[str, ...]) -> dict[str, list[dict]]:
    """{normaliser: `score(records, normaliser)`} in the order given (BLEU rows are the same under each)."""
    return {name: score(records, name) for name in normalizers}


def write_evaluation(out_dir: Path, name: str, step: int, records: list[dict], primary: str) -> tuple[list[dict], str]:
    """Scores `records` under every normaliser and writes `name`.json ({step, normalizer: `primary`, rows: the
    rows under it, table: their `results_table` dict, by_normalizer: {normaliser: rows}}), `name`.md
    (`evaluation_report`) and `name`_hypotheses.jsonl (the records, one a line) into `out_dir`. Returns (the
    rows under `primary`, the report)."""
    by_normalizer = score_each(records, normalizers_from(primary))
    rows = by_normalizer[primary]
    _, as_dict = results_table(rows)
    report = evaluation_report(by_normalizer, primary)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / f"{name}.json").write_text(json.dumps({"step": step, "normalizer": primary, "rows": rows,
                                                      "table": as_dict, "by_normalizer": by_normalizer},
                                                     indent=1, ensure_ascii=False))
    (out_dir / f"{name}.md").write_text(report + "\n")
    with open(out_dir / f"{name}_hypotheses.jsonl", "w", encoding="utf-8") as fh:
        for r in records:
            fh.write(json.dumps(r, ensure_ascii=False) + "\n")
    return rows, report


GENERATION_MARGIN = 8  # tokens a length-capped batch may generate beyond its estimate


def generation_budget(batch: Batch, max_new_tokens: int, per_second: float) -> int:
    """How many tokens `batch` may generate: `per_second` tokens per second of its longest clip, or twice its
    longest prompt for a text task, plus GENERATION_MARGIN, at most `max_new_tokens` (`per_second` 0: that)."""
    if per_second <= 0:
        return max_new_tokens
    need = max((math.ceil(meta.duration * per_second) if meta.duration > 0 else 2 * len(prompt)
                for meta, prompt in zip(batch.meta, batch.prompt_ids)), default=0)
    return max(1, min(max_new_tokens, need + GENERATION_MARGIN))


@torch.no_grad()
def generate_records(model: SpeechLLM, batches: list[Batch], tokenizer, device: torch.device, dtype: torch.dtype,
                     max_new_tokens: int, num_beams: int, synced: bool,
                     progress: Callable[[int, int], None] | None = None,
                     max_new_tokens_per_second: float = 0.0) -> list[dict]:
    """One record per real sample: its metadata and the decoded hypothesis. Padding batches yield nothing; they
    run only when `synced` (so every rank makes the same generate calls, with the same length: a synced batch is
    not length-capped). `progress(done, total)` after each batch."""
    records = []
    for done, batch in enumerate(batches, 1):
        if batch.is_padding and not synced:
            continue
        budget = max_new_tokens if synced else generation_budget(batch, max_new_tokens, max_new_tokens_per_second)
        outputs = model.generate(batch.to(device, dtype), max_new_tokens=budget, num_beams=num_beams,
                                 synced_gpus=synced)
        if progress is not None:
            progress(done, len(batches))
        if batch.is_padding:
            continue
        for meta, ids in zip(batch.meta, outputs):
            records.append(dict(dataclasses.asdict(meta),
                                hypothesis=tokenizer.decode(ids, skip_special_tokens=True).strip()))
    return records


class BatchProgress:
    """Progress lines for a long loop over batches (minutes on CPU): `label`, batches done (of those `scope` names),
    elapsed, ETA; at most one every `every_seconds`, and the last batch's."""

    def __init__(self, log: Callable[[str], None], label: str = "", scope: str = "", every_seconds: float = 60.0):
        self.log, self.label, self.scope, self.every = log, label, scope, every_seconds
        self.started = self.last = time.monotonic()

    def __call__(self, done: int, total: int) -> None:
        now = time.monotonic()
        if now - self.last < self.every and done < total:
            return
        self.last = now
        elapsed = now - self.started
        eta = elapsed / done * (total - done)
        self.log(f"{self.label}batch {done}/{total}{self.scope}, {elapsed / 60:.1f} min, eta {eta / 60:.1f} min")


class EvalProgress(BatchProgress):
    """The evaluation's progress, on each rank."""

    def __init__(self, logger: EvaluationLog, step: int, every_seconds: float = 60.0):
        super().__init__(logger.info, f"eval at step {step}: ", " on this rank", every_seconds)


class Evaluator:
    """Evaluates a model on `data.eval_shards` during a run; collective (every rank calls `run`)."""

    def __init__(self, cfg: TrainConfig, tokenizer, dist: Ranks, features_dtype: torch.dtype, logger: EvaluationLog):
        self.cfg, self.tokenizer, self.dist, self.dtype, self.logger = cfg, tokenizer, dist, features_dtype, logger

    def run(self, model: SpeechLLM, synced: bool, step: int, final: bool = False) -> list[dict]:
        """Writes eval_step_N.{json,md} (final.{json,md} with `final`) and the hypotheses under output_dir on
        rank 0, and returns the rows there (nothing elsewhere). `synced`: the ranks generate in lockstep (a
        ZeRO-3 partitioned model). Leaves the model in training mode."""
        cfg, dist = self.cfg, self.dist
        model.eval()
        batches = eval_batches(cfg.data, cfg.data.languages, cfg.eval.tasks, cfg.stages[-1].translation_targets,
                               cfg.eval.per_language, cfg.eval.batch_size, self.tokenizer,
                               model.audio_features, dist.rank, dist.world_size,
                               layout=model.layout_spec(cfg.data.packing, cfg.data.length_multiple,
                                                        cfg.data.row_tokens))
        records = generate_records(model, batches, self.tokenizer, dist.device, self.dtype, cfg.eval.max_new_tokens,
                                   cfg.eval.num_beams, synced=synced,
                                   progress=EvalProgress(self.logger, step),
                                   max_new_tokens_per_second=cfg.eval.max_new_tokens_per_second)
        gathered = dist.gather_objects(records)  # our own processes' hypotheses, not shard data
        rows: list[dict] = []
        if dist.is_main:
            everything = [r for part in gathered for r in part]
            rows, report = write_evaluation(Path(cfg.output_dir), "final" if final else f"eval_step_{step}", step,
                                            everything, cfg.eval.normalizer)
            self.logger.info(f"evaluation at step {step} ({len(everything)} utterances):\n{report}")
            self.logger.evaluation(step, rows, everything)
        model.train()
        return rows
