"""The training half of the PART vs baseline comparison: both recipes' configs with the comparison's overrides,
each checked, then trained in turn through the DeepSpeed launcher (`python -m part compare` reads the two runs
afterwards with part.evaluation.comparison)."""

from __future__ import annotations

import os
import sys
from pathlib import Path

from part.config import TrainConfig, load_config
from part.train.launcher import available_cores, deepspeed_command, run_prefixed

REPO = Path(__file__).resolve().parents[2]
TRAIN_SCRIPT = REPO / "train.py"


def run_overrides(name: str, cfg: TrainConfig, out: Path, use_config_dirs: bool, overrides: list[str],
                  eval_every: int | None) -> list[str]:
    """The overrides one run is trained with: the user's, then eval.every (unless the user set it), then the
    output and checkpoint directories (under `out` unless `use_config_dirs`)."""
    result = list(overrides)
    if not any(o.split("=", 1)[0].strip() == "eval.every" for o in overrides):
        every = eval_every if eval_every is not None else max(1, cfg.total_steps // 5)
        result.append(f"eval.every={every}")
    if not use_config_dirs:
        run_dir = out / name
        result += [f"output_dir={run_dir}", f"checkpoint.dir={run_dir / 'checkpoints'}"]
    return result


def recipe_runs(recipes: dict[str, str], out: Path, use_config_dirs: bool, overrides: list[str],
                eval_every: int | None) -> tuple[dict[str, TrainConfig], dict[str, list[str]]]:
    """Each recipe's config as its run trains it, and that run's overrides; a ConfigError names the file and field."""
    cfgs, run_args = {}, {}
    for name, path in recipes.items():
        cfg = load_config(path, overrides)
        run_args[name] = run_overrides(name, cfg, out, use_config_dirs, overrides, eval_every)
        cfgs[name] = load_config(path, run_args[name])
    return cfgs, run_args


def train_recipes(recipes: dict[str, str], run_args: dict[str, list[str]], cfgs: dict[str, TrainConfig],
                  nproc: int, launcher: str = "deepspeed") -> int:
    """Checks every recipe with its data (`train.py --check`), then trains each with `--resume` (a finished run
    only prints its results; an interrupted one goes on), its output prefixed with its name. Returns the first
    failing exit code, or 0."""
    train_py = "train.py" if Path.cwd().resolve() == REPO else str(TRAIN_SCRIPT)
    threads = os.environ.get("OMP_NUM_THREADS") or str(max(1, available_cores() // nproc))
    env = dict(os.environ, OMP_NUM_THREADS=threads, PYTHONUNBUFFERED="1")
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH")) if p)
    # Both configs and all their data first, so a broken baseline cannot fail after the PART run's minutes.
    for name, path in recipes.items():
        check = [sys.executable, train_py, "--config", path, "--check", "--world-size", str(nproc), *run_args[name]]
        if (code := run_prefixed(check, name, dict(env, WORLD_SIZE=str(nproc)))) != 0:
            print(f"error: {name}: the config check failed (exit {code})", file=sys.stderr)
            return code
    for name, path in recipes.items():
        cmd = deepspeed_command(train_py, ["--config", path, "--resume", *run_args[name]], nproc, launcher=launcher)
        print(f"[{name}] OMP_NUM_THREADS={threads}, output in {cfgs[name].output_dir}", flush=True)
        if (code := run_prefixed(cmd, name, env)) != 0:
            print(f"error: {name}: training failed (exit {code}); re-run the same command to resume", file=sys.stderr)
            return code
    return 0
