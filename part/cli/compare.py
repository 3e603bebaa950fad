r"""Train the PART recipe and its one-stage baseline, then compare them side by side.

Each recipe is trained in turn through the DeepSpeed launcher (`deepspeed --num_gpus NPROC --master_port <free>
train.py --config X --resume <overrides> eval.every=N output_dir=... checkpoint.dir=...`), its output streamed with
a `[part]` / `[baseline]` prefix. Overrides apply to both runs. By default each run writes under `--out`
(`<out>/part`, `<out>/baseline`), so an older run in a config's own output_dir (other eval points, an appended
train_log) cannot leak in; `--use-config-dirs` keeps the configs' output_dir / checkpoint.dir instead. Because of
`--resume`, re-running the command continues interrupted runs and skips finished ones.

Run it from the repository root, like train.py: the configs' relative paths (cache/..., ds_configs/...) are
relative to the working directory. Each run gets OMP_NUM_THREADS = cores // NPROC (at least
1) unless OMP_NUM_THREADS is already set.

Then (or only, with `--skip-training`) it reads both output dirs and writes into `--out`:
  compare.md    header (command, date, steps), the WER/CER normaliser and the BLEU signatures, final results side
                by side (ASR per language, S2TT per direction, averages), paired bootstrap 95% confidence
                intervals of each final metric and of the difference PART - baseline (from the runs'
                per-utterance hypotheses files), with the significant differences stated in words, the
                evaluations during training, and the curves
  compare.json  the same numbers, machine-readable
  curves.png    (a) smoothed training loss vs step, (b) average ASR error rate and average S2TT BLEU vs step,
                with the PART stage boundaries drawn and labelled

examples:
    # train both tiny recipes on 2 ranks each, evaluate, write runs/compare/compare.md
    python -m part compare --part configs/tiny_part.yaml --baseline configs/tiny_baseline.yaml --out runs/compare \
        --nproc 2
    # only read two finished runs in the configs' own output_dir and compare them under Whisper's normalisers
    python -m part compare --part configs/tiny_part.yaml --baseline configs/tiny_baseline.yaml --out runs/compare \
        --use-config-dirs --skip-training --normalizer whisper
"""

from __future__ import annotations

import argparse
import shlex
import sys
from pathlib import Path

from part.cli import command_prog, help_text
from part.config import NORMALIZERS
from part.exit_codes import ExitCode


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog=command_prog(__file__), **help_text(__doc__))
    parser.add_argument("--part", required=True, help="the PART recipe (e.g. configs/tiny_part.yaml)")
    parser.add_argument("--baseline", required=True, help="the baseline recipe (e.g. configs/tiny_baseline.yaml)")
    parser.add_argument("--out", required=True, help="directory for compare.md / compare.json / curves.png")
    parser.add_argument("--nproc", type=int, default=2, help="ranks per run (deepspeed --num_gpus; default 2)")
    parser.add_argument("--eval-every", type=int, default=None,
                        help="eval.every for both runs (default: total steps // 5; 0: final evaluation only)")
    parser.add_argument("--skip-training", action="store_true", help="only read the existing run directories")
    parser.add_argument("--use-config-dirs", action="store_true",
                        help="train into / read from the configs' output_dir and checkpoint.dir instead of "
                             "<out>/part and <out>/baseline")
    parser.add_argument("--bootstrap", type=int, default=1000, metavar="N",
                        help="bootstrap resamples for the confidence intervals (default 1000; 0: none)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the bootstrap resampling (default 0)")
    parser.add_argument("--normalizer", choices=NORMALIZERS, default=None,
                        help="the WER/CER text normaliser of the comparison, for both runs (default: the PART "
                             "config's eval.normalizer; the runs' results files hold their rows under each)")
    parser.add_argument("--deepspeed", default="deepspeed",
                        help="the launcher (default: deepspeed from PATH, else the one beside this Python)")
    parser.add_argument("overrides", nargs="*", help="key.sub=value overrides applied to both runs")
    args = parser.parse_intermixed_args(argv)
    if args.nproc < 1:
        parser.error("--nproc must be >= 1")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from part.config import ConfigError
    from part.evaluation.comparison import comparison_header, load_run, stages_from_config, write_comparison
    from part.train.launcher import find_launcher
    from part.train.recipe_pair import recipe_runs, train_recipes

    out = Path(args.out)
    recipes = {"part": args.part, "baseline": args.baseline}
    try:
        cfgs, run_args = recipe_runs(recipes, out, args.use_config_dirs, args.overrides, args.eval_every)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return ExitCode.BAD_INPUT
    if cfgs["part"].total_steps != cfgs["baseline"].total_steps:
        print(f"warning: the runs differ in length: part {cfgs['part'].total_steps} steps, baseline "
              f"{cfgs['baseline'].total_steps}", file=sys.stderr)
    if cfgs["part"].output_dir == cfgs["baseline"].output_dir:
        print(f"error: both runs would write to {cfgs['part'].output_dir}", file=sys.stderr)
        return ExitCode.BAD_INPUT
    launcher = args.deepspeed if args.skip_training else find_launcher(args.deepspeed)
    if launcher is None:
        print(f"error: --deepspeed: the launcher {args.deepspeed!r} is neither on PATH nor beside {sys.executable} "
              "(install deepspeed, activate its environment or pass its path)", file=sys.stderr)
        return ExitCode.BAD_INPUT
    if not args.skip_training and (code := train_recipes(recipes, run_args, cfgs, args.nproc, launcher)):
        return code

    try:
        runs = {name: load_run(cfgs[name].output_dir) for name in recipes}
    except FileNotFoundError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return ExitCode.FAILED
    # The curriculum's own boundaries (the log's can be off by a step when a stage's first step was skipped).
    stages = stages_from_config(cfgs["part"]) or runs["part"]["stages"]
    command = f"{command_prog(__file__)} {shlex.join(argv if argv is not None else sys.argv[1:])}"
    header = comparison_header(command, recipes, cfgs, args.nproc, args.overrides)
    md_path = write_comparison(runs["part"], runs["baseline"], out, header, stages=stages, resamples=args.bootstrap,
                               seed=args.seed, normalizer=args.normalizer or cfgs["part"].eval.normalizer)
    print(md_path.read_text(encoding="utf-8"))
    print(f"wrote {md_path}, {out / 'compare.json'}, {out / 'curves.png'}")
    return ExitCode.OK


if __name__ == "__main__":
    sys.exit(main())
