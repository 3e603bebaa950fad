"""What a resume may change. A checkpoint stores the resolved config it was written under; `--resume` compares it
with the config it is given and refuses, listing the fields, any change that would put weights, optimizer state or
the data position in the wrong place:

- the model (`model.*` but `attn_implementation` and `activation_checkpointing`, which change no number): the
  weights would not fit, or mean something else;
- the stages already begun: names, order, the steps of finished stages (they place every later boundary), and
  for the stage being resumed its trainable groups and `group_lr` (its optimizer state is per parameter, in the
  param groups these make), tasks, languages and translation targets (its data position);
- what the data stream's position means (`data.*` but `num_workers`, which is checked with the stream layout
  and only restarts the stage's stream, how batches are laid out: `packing`, `length_multiple`,
  `row_tokens`, `audio_multiple`, `audio_row_seconds`, and how network shards are retried: `shard_retries`,
  `shard_retry_wait`, `shard_timeout`), `seed`, `precision` and `zero_stage` (the optimizer partitions).

Allowed, and tested: everything of later stages, the length of the stage the checkpoint belongs to (also when it
was the run's last: more steps continue it with its optimizer state), learning rates and warm-up (the schedule
follows the new values from the resumed step on), evaluation, logging, checkpoint cadence, `checkpoint.lean` (each
checkpoint says what it holds), `distributed.*` (timeouts) and `output_dir`. A field the checkpoint's config lacks
(added to the config after the checkpoint was written) is not compared.
"""

from __future__ import annotations

from part.config import TrainConfig, to_dict

MODEL_FIELDS_FREE = ("attn_implementation", "activation_checkpointing")
# the loader's processes, how batches are laid out (not which samples they hold), how network reads are retried
DATA_FIELDS_FREE = ("num_workers", "packing", "length_multiple", "row_tokens", "audio_multiple", "audio_row_seconds",
                    "shard_retries", "shard_retry_wait", "shard_timeout")
STAGE_FIELDS_FIXED = ("name", "trainable", "tasks", "languages", "translation_targets")


def _differences(saved: object, current: object, path: str, fields: bool = False) -> list[str]:
    """The differences, by dotted path. `fields`: the dicts are config sections, and a field the checkpoint's
    lacks came after it was written (that run had none): not compared."""
    if isinstance(saved, dict) and isinstance(current, dict):
        out = []
        for key in sorted(set(saved) | (set() if fields else set(current))):
            out += _differences(saved.get(key), current.get(key), f"{path}.{key}" if path else key, fields)
        return out
    return [] if saved == current else [f"{path}: {saved!r} in the checkpoint, {current!r} now"]


def resume_conflicts(saved: dict, cfg: TrainConfig, step: int) -> list[str]:
    """The changes from `saved` (the checkpoint's config) to `cfg` that a resume at `step` cannot take."""
    now = to_dict(cfg)
    problems = []
    model_saved = {k: v for k, v in saved.get("model", {}).items() if k not in MODEL_FIELDS_FREE}
    model_now = {k: v for k, v in now["model"].items() if k not in MODEL_FIELDS_FREE}
    problems += _differences(model_saved, model_now, "model", fields=True)
    data_saved = {k: v for k, v in saved.get("data", {}).items() if k not in DATA_FIELDS_FREE}
    data_now = {k: v for k, v in now["data"].items() if k not in DATA_FIELDS_FREE}
    problems += _differences(data_saved, data_now, "data", fields=True)
    for key in ("seed", "precision", "zero_stage"):
        problems += _differences(saved.get(key), now[key], key)
    start = 0
    for i, (old, new) in enumerate(zip(saved.get("stages", []), now["stages"])):
        if start >= step:  # a stage not begun yet (a boundary checkpoint belongs to the stage before): free
            break
        end = start + old["steps"]
        for key in STAGE_FIELDS_FIXED:
            problems += _differences(old.get(key), new.get(key), f"stages[{i}].{key}")
        if end < step and old["steps"] != new["steps"]:  # finished: its length places every later boundary
            problems.append(f"stages[{i}].steps: {old['steps']} in the checkpoint, {new['steps']} now (the stage "
                            f"finished at step {end}, before the resumed step {step})")
        elif end >= step and new["steps"] < step - start:  # the checkpoint's own stage: longer is fine
            problems.append(f"stages[{i}].steps: {new['steps']} now ends the stage before the resumed step {step}")
        if end >= step:  # the checkpoint's own stage: its optimizer state is laid out by these param groups
            problems += _differences(old.get("group_lr") or {}, new.get("group_lr") or {}, f"stages[{i}].group_lr")
        start = end
    if cfg.total_steps < step:
        problems.append(f"stages: the run now ends at step {cfg.total_steps}, before the resumed step {step}")
    return problems
