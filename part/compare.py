r"""Train the PART recipe and its one-stage baseline, then compare them side by side.

    python -m part.compare --part configs/tiny_part.yaml --baseline configs/tiny_baseline.yaml --out runs/compare \
        [--nproc 2] [--eval-every N] [--skip-training] [--use-config-dirs] [--bootstrap 1000] [--seed 0] \
        [--normalizer part|whisper] [key.sub=value ...]

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
"""

from __future__ import annotations

import argparse
import datetime
import os
import shlex
import sys
from pathlib import Path

from part.config import NORMALIZERS
from part.evaluation.comparison import load_run, stages_from_config, write_comparison
from part.exit_codes import ExitCode
from part.train.launcher import available_cores, deepspeed_command, run_prefixed

REPO = Path(__file__).resolve().parents[1]


def run_overrides(name: str, cfg, out: Path, use_config_dirs: bool, overrides: list[str],
                  eval_every: int | None) -> list[str]:
    """The overrides one run is trained with: the user's, then eval.every (unless the user set it), then the
    output and checkpoint directories (under --out unless --use-config-dirs)."""
    result = list(overrides)
    if not any(o.split("=", 1)[0].strip() == "eval.every" for o in overrides):
        every = eval_every if eval_every is not None else max(1, cfg.total_steps // 5)
        result.append(f"eval.every={every}")
    if not use_config_dirs:
        run_dir = out / name
        result += [f"output_dir={run_dir}", f"checkpoint.dir={run_dir / 'checkpoints'}"]
    return result


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
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
    parser.add_argument("--deepspeed", default="deepspeed", help="the launcher (default: deepspeed from PATH)")
    parser.add_argument("overrides", nargs="*", help="key.sub=value overrides applied to both runs")
    args = parser.parse_intermixed_args(argv)
    if args.nproc < 1:
        parser.error("--nproc must be >= 1")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from part.config import ConfigError, load_config

    out = Path(args.out)
    configs = {"part": args.part, "baseline": args.baseline}
    run_args: dict[str, list[str]] = {}
    cfgs = {}
    for name, path in configs.items():
        try:
            cfg = load_config(path, args.overrides)
            run_args[name] = run_overrides(name, cfg, out, args.use_config_dirs, args.overrides, args.eval_every)
            cfgs[name] = load_config(path, run_args[name])
        except ConfigError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return ExitCode.BAD_INPUT
    if cfgs["part"].total_steps != cfgs["baseline"].total_steps:
        print(f"warning: the runs differ in length: part {cfgs['part'].total_steps} steps, baseline "
              f"{cfgs['baseline'].total_steps}", file=sys.stderr)
    if cfgs["part"].output_dir == cfgs["baseline"].output_dir:
        print(f"error: both runs would write to {cfgs['part'].output_dir}", file=sys.stderr)
        return ExitCode.BAD_INPUT

    if not args.skip_training:
        train_py = "train.py" if Path.cwd().resolve() == REPO else str(REPO / "train.py")
        threads = os.environ.get("OMP_NUM_THREADS") or str(max(1, available_cores() // args.nproc))
        env = dict(os.environ, OMP_NUM_THREADS=threads, PYTHONUNBUFFERED="1")
        env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH")) if p)
        # Both configs and all their data first, so a broken baseline cannot fail after the PART run's minutes.
        for name, path in configs.items():
            check = [sys.executable, train_py, "--config", path, "--check", "--world-size", str(args.nproc),
                     *run_args[name]]
            if (code := run_prefixed(check, name, dict(env, WORLD_SIZE=str(args.nproc)))) != 0:
                print(f"error: {name}: the config check failed (exit {code})", file=sys.stderr)
                return code
        for name, path in configs.items():
            cmd = deepspeed_command(train_py, ["--config", path, "--resume", *run_args[name]], args.nproc,
                                    launcher=args.deepspeed)
            print(f"[{name}] OMP_NUM_THREADS={threads}, output in {cfgs[name].output_dir}", flush=True)
            if (code := run_prefixed(cmd, name, env)) != 0:
                print(f"error: {name}: training failed (exit {code}); re-run the same command to resume",
                      file=sys.stderr)
                return code

    try:
        runs = {name: load_run(cfgs[name].output_dir) for name in configs}
    except FileNotFoundError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return ExitCode.FAILED
    # The curriculum's own boundaries (the log's can be off by a step when a stage's first step was skipped).
    stages = stages_from_config(cfgs["part"]) or runs["part"]["stages"]
    command = shlex.join([Path(sys.executable).name, "-m", "part.compare",
                          *(argv if argv is not None else sys.argv[1:])])
    header = "\n".join([
        "# PART vs one-stage baseline",
        "",
        f"- command: `{command}`",
        f"- date: {datetime.datetime.now().astimezone().isoformat(timespec='seconds')}",
        f"- part: `{args.part}`, {cfgs['part'].total_steps} steps in {len(cfgs['part'].stages)} stages",
        f"- baseline: `{args.baseline}`, {cfgs['baseline'].total_steps} steps in "
        f"{len(cfgs['baseline'].stages)} stage(s)",
        f"- ranks per run: {args.nproc}; overrides: {' '.join(args.overrides) or 'none'}",
    ])
    md_path = write_comparison(runs["part"], runs["baseline"], out, header, stages=stages, resamples=args.bootstrap,
                               seed=args.seed, normalizer=args.normalizer or cfgs["part"].eval.normalizer)
    print(md_path.read_text(encoding="utf-8"))
    print(f"wrote {md_path}, {out / 'compare.json'}, {out / 'curves.png'}")
    return ExitCode.OK


if __name__ == "__main__":
    sys.exit(main())
