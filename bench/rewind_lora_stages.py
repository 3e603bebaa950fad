"""A checkpoint at the start of a LoRA stage, made from a later checkpoint of the same run.

When every stage from STAGE up to the checkpoint's own trained only `llm.lora`, the encoder and adapter weights
at the start of STAGE are the checkpoint's, and LoRA at its start is what the stage began from: its B matrices zero
(PEFT's initialisation; A keeps the checkpoint's values, which with B = 0 change nothing the model computes). This
writes that boundary checkpoint (weights, trainer state, data positions, SHA256SUMS; no optimizer state: a stage
starts with a fresh one) into OUT/step_NNNNNNN, so the LoRA stages can be trained again with other settings by
`train.py --resume checkpoint.dir=OUT` without training the earlier stages again. A run with
`checkpoint.keep_stage_ends: true` keeps the boundary checkpoints themselves; this is for runs that did not.

examples:
    python bench/rewind_lora_stages.py runs/tiny_part/checkpoints/step_0000290 --config configs/tiny_part.yaml \\
        --stage s3a_llm_lora_s2tt --out runs/s3_try/checkpoints
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

COPIED = ("encoder_config", "llm_config", "objectives", "tokenizer", "part_model.json", "weight_sources.json")


def rewind(checkpoint: Path, cfg, stage: str, out: Path) -> Path:
    import torch
    from safetensors.torch import load_file, save_file

    from part.curriculum import Curriculum
    from part.train.checkpoint import LATEST, read_trainer_state, step_dir_name, write_sums

    state = read_trainer_state(checkpoint)
    spans = Curriculum(cfg.stages).spans
    names = [span.name for span in spans]
    if stage not in names:
        raise SystemExit(f"error: --stage {stage!r} is not a stage of the config ({', '.join(names)})")
    start = spans[names.index(stage)]
    since = [span for span in spans if start.start <= span.start < state["step"]]
    if state["step"] <= start.start:
        raise SystemExit(f"error: {checkpoint} is at step {state['step']}, not after the start of {stage} "
                         f"(step {start.start})")
    if any(span.stage.trainable != ["llm.lora"] for span in since):
        raise SystemExit("error: a stage since " + stage + " trained more than llm.lora ("
                         + ", ".join(f"{span.name}: {span.stage.trainable}" for span in since) + "): its other "
                         "weights at the stage's start are not in the checkpoint")
    target = out / step_dir_name(start.start)
    if target.exists():
        raise SystemExit(f"error: {target} exists")
    target.mkdir(parents=True)
    for name in COPIED:
        source = checkpoint / name
        if source.is_dir():
            shutil.copytree(source, target / name)
        elif source.exists():
            shutil.copy2(source, target / name)
    weights = load_file(checkpoint / "model.safetensors")
    reset = [key for key in weights if ".lora_B." in key]
    for key in reset:
        weights[key] = torch.zeros_like(weights[key])
    save_file(weights, target / "model.safetensors", metadata={"format": "pt"})
    before = spans[names.index(stage) - 1] if names.index(stage) > 0 else None
    state.update(step=start.start, engine_stage=before.index if before else 0,
                 stage=before.name if before else stage)
    (target / "trainer_state.json").write_text(json.dumps(state, indent=1))
    for rank_file in checkpoint.glob("data_rank*.json"):  # another stage's positions: the stage's stream restarts
        shutil.copy2(rank_file, target / rank_file.name)
    write_sums(target)
    (out / LATEST).write_text(target.name)
    print(f"{target}: the start of {stage} (step {start.start}), {len(reset)} LoRA B matrices reset")
    return target


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoint", type=Path, help="a checkpoint directory (step_NNNNNNN) of the run")
    parser.add_argument("--config", required=True, help="the run's config (its stages)")
    parser.add_argument("--stage", required=True, help="the LoRA stage whose start to write")
    parser.add_argument("--out", type=Path, required=True, help="the new checkpoint.dir")
    parser.add_argument("overrides", nargs="*", help="config overrides, as train.py takes them")
    args = parser.parse_args(argv)
    from part.config import load_config

    rewind(args.checkpoint, load_config(args.config, args.overrides), args.stage, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
