"""PART benchmark: data loader, padding, ZeRO-3 training, stage switch and checkpoint figures, in one run.

Every figure, and every ratio, comes from numbers measured in this run. The data figures (a, b) run in this
process; the training figures (c-h) come from bench/train_bench_worker.py started through the real `deepspeed`
launcher on 1 and on 2 ranks (OMP_NUM_THREADS=1 per rank). See bench/README.md for what each figure means.
When the config's corpus or tiny models are missing (no cache/ from launch/demo.sh), a small corpus and tiny
models are built in a temporary directory, as tests/conftest.py does. The markdown report (the machine, the
versions, the load average, then figures a-h) is printed and written to --out (default bench/results.md).
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

PREFIX = "BENCH_JSON "
PAD_TARGET = 0.10
WAIT_TARGET = 0.05
# Dense bf16 tensor-core peak per GPU (FLOP/s), matched on the device name; the first matching key wins.

EXAMPLES = """\
examples:
  python bench/benchmark.py                                    # configs/tiny_part.yaml, writes bench/results.md
  python bench/benchmark.py --config configs/tiny_part.yaml --steps 30 --out /tmp/results.md data.window=128
  python bench/benchmark.py --parts data                       # the loader figures (a, b) alone
"""


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, epilog=EXAMPLES,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="configs/tiny_part.yaml", help="the training config (default: %(default)s)")
    parser.add_argument("overrides", nargs="*", help="key.sub=value config overrides, as train.py takes them")
    parser.add_argument("--steps", type=int, default=20, help="timed training steps per launcher run (c)")
    parser.add_argument("--warmup", type=int, default=3, help="untimed training steps first")
    parser.add_argument("--replay-steps", type=int, default=8, help="batches replayed for ZeRO-3 vs plain (d)")
    parser.add_argument("--switch-steps", type=int, default=3, help="steps timed after the stage switch (f)")
    parser.add_argument("--loader-batches", type=int, default=30, help="timed loader batches per setting (a)")
    parser.add_argument("--loader-warmup", type=int, default=4, help="untimed loader batches first (a)")
    parser.add_argument("--pad-windows", type=int, default=8, help="bucketing windows per stage (b)")
    parser.add_argument("--stage", type=int, default=0, help="stage index to train (c-g); the asr-only stage 1")
    parser.add_argument("--mixed-stage", type=int, default=-1,
                        help="stage index for the mixed-stage loader figures (default: the one with most tasks)")
    parser.add_argument("--ranks", default="1,2", help="rank counts for the launcher runs")
    parser.add_argument("--parts", default="data,train", help="data, train, or both (debugging)")
    parser.add_argument("--out", default="bench/results.md", help="the markdown report (default: %(default)s)")
    return parser.parse_intermixed_args(argv)


# ---------------------------------------------------------------- environment


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_info() -> dict[str, str]:
    import deepspeed
    import torch
    import transformers
    from deepspeed.accelerator import get_accelerator

    acc = get_accelerator()
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    gpu = "none"
    if torch.cuda.is_available():
        gpu = f"{torch.cuda.device_count()} x {torch.cuda.get_device_name(0)}"
    return {
        "host": platform.node(),
        "cpu": cpu_model(),
        "cores": f"{os.cpu_count()} logical, {usable} usable",
        "memory": mem_total(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "deepspeed": deepspeed.__version__,
        "transformers": transformers.__version__,
        "accelerator": f"{acc.device_name()} (deepspeed accelerator; backend {acc.communication_backend_name()})",
        "gpu": gpu,
    }


def mem_total() -> str:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal"):
                return f"{int(line.split()[1]) / 1024**2:.1f} GiB"
    except OSError:
        pass
    return "?"


def load_avg() -> str:
    try:
        return " / ".join(f"{x:.2f}" for x in os.getloadavg())
    except OSError:
        return "?"


# ---------------------------------------------------------------- config, corpus and models


def resolve_config(args: argparse.Namespace, scratch: Path) -> tuple[object, list[str], str]:
    """The config with the user's overrides; when its corpus or models are missing, a small corpus and tiny
    models are built under `scratch` (as tests/conftest.py does) and overrides point the config at them."""
    from part.config import ConfigError, load_config
    from part.data.shards import expand_shards

    overrides = list(args.overrides)
    try:
        cfg = load_config(args.config, overrides)
        if all(expand_shards(cfg.data.train_shards, lang) for lang in cfg.data.languages):
            return cfg, overrides, "the config's own corpus and models"
        reason = f"no shards match {cfg.data.train_shards}"
    except ConfigError as exc:
        reason = str(exc).splitlines()[-1].strip()
    print(f"[bench] config not usable as is ({reason}); building a small corpus and tiny models in {scratch}",
          flush=True)
    if shutil.which("espeak-ng") is None:
        raise SystemExit("error: espeak-ng is required to build the fallback corpus (launch/setup_env.sh installs it)")
    from data_prep import synthetic
    from part.convert.tiny import build_tiny

    corpus, tiny = scratch / "corpus", scratch / "tiny"
    langs = "en,de,zh"
    code = synthetic.main(["--out", str(corpus), "--languages", langs, "--train-per-language", "64",
                           "--eval-per-language", "6", "--text-per-language", "60", "--shard-samples", "8",
                           "--max-duration", "15", "--workers", "2"])
    if code != 0:
        raise SystemExit("error: building the fallback corpus failed")
    build_tiny(corpus / "tokenizer_text.txt", tiny, vocab_size=2000)
    import yaml

    raw = yaml.safe_load(Path(args.config).read_text()) or {}
    overrides = [
        f"model.encoder.pretrained={tiny}/whisper", f"model.llm.pretrained={tiny}/llm", "model.llm.tokenizer=null",
        f"data.train_shards={corpus}/train/{{lang}}-*.tar", f"data.text_shards={corpus}/text/{{lang}}-*.tar",
        f"data.eval_shards={corpus}/eval/{{lang}}-*.tar", f"data.languages=[{langs}]",
        f"ds_config={REPO}/ds_configs/zero3_cpu.json", "precision=fp32",
        # the tiny models have no Whisper decoder to give frame targets: every stage trains on the LM loss
        "model.alignment=null",
    ]
    for i, stage in enumerate(raw.get("stages") or []):
        overrides += [f"stages.{i}.languages=null", f"stages.{i}.lm_loss=true"]
        if stage.get("translation_targets"):
            overrides.append(f"stages.{i}.translation_targets=[en]")
    overrides += list(args.overrides)
    return load_config(args.config, overrides), overrides, f"a small corpus and tiny models built in {scratch}"


def mixed_stage_index(cfg, requested: int) -> int:
    if requested >= 0:
        return requested
    best, best_n = 0, -1
    for i, stage in enumerate(cfg.stages):
        n = sum(1 for w in stage.tasks.values() if w > 0)
        if n >= best_n:
            best, best_n = i, n
    return best


def num_mel_bins(cfg) -> int:
    if cfg.model.encoder.pretrained:
        from transformers import WhisperConfig

        return WhisperConfig.from_pretrained(cfg.model.encoder.pretrained).num_mel_bins
    return cfg.model.encoder.num_mel_bins


def tasks_text(stage) -> str:
    return " ".join(f"{k}:{v:g}" for k, v in stage.tasks.items() if v > 0)


# ---------------------------------------------------------------- a. loader throughput


def loader_throughput(cfg, stage, tokenizer, mels: int, workers: int, warmup: int, n: int) -> dict:
    """MixtureStream + make_loader (train.py's loader) with `workers` processes, drained by an idle consumer."""
    from part.config import SPEECH_TASKS
    from part.data.stream import MixtureStream, make_loader

    data = dataclasses.replace(cfg.data, num_workers=workers)
    t_start = time.perf_counter()
    stream = MixtureStream(data, stage, tokenizer, mels, rank=0, world_size=1)
    it = iter(make_loader(stream))
    next(it)
    first = time.perf_counter() - t_start
    for _ in range(max(0, warmup - 1)):
        next(it)
    samples = batches = 0
    audio = 0.0
    t0 = time.perf_counter()
    for _ in range(n):
        batch = next(it)
        batches += 1
        samples += len(batch)
        audio += sum(m.duration for m in batch.meta if m.task in SPEECH_TASKS)
    dt = time.perf_counter() - t0
    del it
    return {"workers": workers, "batches": batches, "samples": samples, "audio": audio, "seconds": dt,
            "first_batch": first, "samples_s": samples / dt, "audio_s": audio / dt, "batches_s": batches / dt}


# ---------------------------------------------------------------- b. padding


def padding(cfg, stage, tokenizer, mels: int, windows: int) -> dict:
    """Padded-frame fraction of the stream's bucketed batches vs the same samples in arrival order, cut into
    batches of the same sizes. Both go through part.data.batching.audio_stats (speech samples only)."""
    from part.data.batching import audio_stats, batch_audio_stats
    from part.data.stream import BucketedWindow, MixtureStream

    seen: list[BucketedWindow] = []  # every window the stream bucketed, as it bucketed it
    data = dataclasses.replace(cfg.data, num_workers=1)
    stream = MixtureStream(data, stage, tokenizer, mels, rank=0, world_size=1, on_window=seen.append)
    yielded: list[tuple[float, float]] = []  # batch_audio_stats of each batch the stream returned
    it = iter(stream)  # in this process (no loader workers), so on_window sees every window
    while len(seen) <= windows:  # window k+1 is bucketed only after every batch of window k was yielded
        yielded.append(batch_audio_stats(next(it)))
    it.close()
    seen = seen[:windows]

    real_b = pad_b = real_a = pad_a = 0.0
    n_samples = n_batches = 0
    for window in seen:
        arrival, batches = window.arrival, window.batches
        sizes = [len(b) for b in batches]
        assert sum(sizes) == len(arrival)
        start = 0
        for b, size in zip(batches, sizes):
            r, p = audio_stats(b)
            real_b, pad_b = real_b + r, pad_b + p
            r, p = audio_stats(arrival[start : start + size])
            real_a, pad_a = real_a + r, pad_a + p
            start += size
        n_samples += len(arrival)
        n_batches += len(batches)
    # cross-check: the batches the stream yielded for these windows carry the same audio
    real_y = pad_y = 0.0
    for r, p in yielded[:n_batches]:
        real_y, pad_y = real_y + r, pad_y + p
    return {
        "windows": len(seen), "samples": n_samples, "batches": n_batches,
        "mean_batch": n_samples / max(n_batches, 1), "speech_seconds": real_b,
        "bucketed": 1 - real_b / pad_b if pad_b else 0.0,
        "arrival": 1 - real_a / pad_a if pad_a else 0.0,
        "yielded": 1 - real_y / pad_y if pad_y else 0.0,
    }


# ---------------------------------------------------------------- c-h. launcher runs


def launch(ranks: int, args: argparse.Namespace, cfg_overrides: list[str], workdir: Path, phases: str,
           log_dir: Path) -> dict[str, dict]:
    from part.train.launcher import deepspeed_command, find_launcher

    deepspeed_bin = find_launcher() or "deepspeed"
    worker_args = ["--config", args.config, "--workdir", str(workdir), "--phases", phases, "--stage", str(args.stage),
                   "--warmup", str(args.warmup), "--steps", str(args.steps), "--replay-steps", str(args.replay_steps),
                   "--switch-steps", str(args.switch_steps), *cfg_overrides]
    cmd = deepspeed_command(REPO / "bench" / "train_bench_worker.py", worker_args, ranks, launcher=deepspeed_bin)
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", PYTHONUNBUFFERED="1",
               PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    log = log_dir / f"worker_{ranks}rank.log"
    t0 = time.perf_counter()
    print(f"[bench] launching {ranks} rank(s): {' '.join(cmd[1:])}", flush=True)
    with open(log, "w") as fh:
        proc = subprocess.run(cmd, cwd=REPO, env=env, stdout=fh, stderr=subprocess.STDOUT, timeout=1800)
    wall = time.perf_counter() - t0
    results: dict[str, dict] = {}
    for line in log.read_text(errors="replace").splitlines():
        if line.startswith(PREFIX):
            record = json.loads(line[len(PREFIX):])
            results[record["kind"]] = record
    if proc.returncode != 0 or "done" not in results:
        kept = REPO / "bench" / log.name
        shutil.copy(log, kept)
        tail = "\n".join(log.read_text(errors="replace").splitlines()[-40:])
        raise SystemExit(f"error: the {ranks}-rank launcher run failed (exit {proc.returncode}); log {kept}:\n{tail}")
    results["wall"] = {"seconds": wall}
    print(f"[bench] {ranks} rank(s) done in {wall:.0f} s", flush=True)
    return results


def train_summary(run: dict) -> dict:
    rows = run["train"]["per_rank"]
    span = max(r["time"] for r in rows)  # the ranks step together; the slowest clock is the wall time
    samples = sum(r["samples"] for r in rows)
    audio = sum(r["audio_seconds"] for r in rows)
    tokens = sum(r["tokens"] for r in rows)
    flops = sum(r.get("flops", 0.0) for r in rows)
    steps = rows[0]["steps"]
    waits = [r["wait"] / r["time"] for r in rows]
    return {"steps": steps, "step_time": span / steps, "samples_s": samples / span, "audio_s": audio / span,
            "tokens_s": tokens / span, "flops_s": flops / span, "per_rank_samples_s": samples / span / len(rows),
            "wait_mean": sum(waits) / len(waits), "wait_max": max(waits), "samples_per_step": samples / steps,
            "max_step": max(r["max_step"] for r in rows), "warmup": rows[0].get("warmup_times", [])}


# ---------------------------------------------------------------- report


def shown(path: str) -> str:
    p = Path(path)
    return str(p.relative_to(REPO)) if p.is_relative_to(REPO) else str(p)


def fmt_bytes(n: float) -> str:
    return f"{n / 2**20:.2f} MiB"


def table(header: list[str], rows: list[list[object]]) -> list[str]:
    out = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    out += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return out


def ok(flag: bool) -> str:
    return "OK" if flag else "**MISSED**"


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    args.config, args.out = str(Path(args.config).resolve()), str(Path(args.out).resolve())
    os.chdir(REPO)  # the configs' relative paths (cache/, ds_configs/) are relative to the repository, as for train.py
    started = time.perf_counter()
    date = datetime.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M:%S %Z")
    load_start = load_avg()
    parts = {p.strip() for p in args.parts.split(",") if p.strip()}
    scratch = Path(tempfile.mkdtemp(prefix="part_bench_"))
    try:
        return run(args, parts, scratch, started, date, load_start)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def run(args, parts, scratch: Path, started: float, date: str, load_start: str) -> int:
    import torch

    info = machine_info()
    t0 = time.perf_counter()
    cfg, overrides, source = resolve_config(args, scratch)
    from part.model.tokenizer import load_tokenizer

    tokenizer = load_tokenizer(cfg.model.llm.tokenizer or cfg.model.llm.pretrained)
    mels = num_mel_bins(cfg)
    s1 = cfg.stages[args.stage]
    mixed_i = mixed_stage_index(cfg, args.mixed_stage)
    mixed = cfg.stages[mixed_i]
    timings: dict[str, float] = {"setup": time.perf_counter() - t0}

    # ---- data (this process)
    loader_rows, pad_rows, window_rows = [], [], []
    if "data" in parts:
        t0 = time.perf_counter()
        for stage in (s1, mixed):
            for workers in (1, 2):
                print(f"[bench] a. loader: stage {stage.name}, {workers} worker(s)", flush=True)
                r = loader_throughput(cfg, stage, tokenizer, mels, workers, args.loader_warmup, args.loader_batches)
                loader_rows.append((stage, r))
        timings["a. loader"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        for stage in (s1, mixed):
            print(f"[bench] b. padding: stage {stage.name}", flush=True)
            pad_rows.append((stage, padding(cfg, stage, tokenizer, mels, args.pad_windows)))
        for factor in (2, 4):  # the bucketing window's effect, over about as many samples
            window = cfg.data.window * factor
            print(f"[bench] b. padding: stage {s1.name}, window {window}", flush=True)
            wide = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, window=window))
            r = padding(wide, s1, tokenizer, mels, max(1, round(args.pad_windows / factor)))
            window_rows.append((window, r))
        timings["b. padding"] = time.perf_counter() - t0

    # ---- training (launcher runs)
    runs: dict[int, dict] = {}
    if "train" in parts:
        log_dir = scratch / "logs"
        log_dir.mkdir()
        rank_counts = [int(r) for r in args.ranks.split(",") if r]
        if torch.cuda.is_available():  # one rank per GPU
            skipped = [r for r in rank_counts if r > torch.cuda.device_count()]
            rank_counts = [r for r in rank_counts if r <= torch.cuda.device_count()]
            if skipped:
                print(f"[bench] skipping {skipped} rank(s): {torch.cuda.device_count()} GPU(s)", flush=True)
        for ranks in rank_counts:
            phases = "train,replay,plain,ckpt,switch" if ranks == 1 else "train,ckpt,switch"
            workdir = scratch / f"work{ranks}"
            workdir.mkdir()
            try:
                runs[ranks] = launch(ranks, args, overrides, workdir, phases, log_dir)
            except subprocess.TimeoutExpired:
                raise SystemExit(f"error: the {ranks}-rank launcher run timed out") from None
            timings[f"launcher run, {ranks} rank(s)"] = runs[ranks]["wall"]["seconds"]

    total = time.perf_counter() - started
    lines = report(args, info, cfg, source, s1, mixed, loader_rows, pad_rows, window_rows, runs, timings, total,
                   date, load_start, torch.cuda.is_available())
    text = "\n".join(lines) + "\n"
    print("\n" + text, flush=True)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text)
    print(f"[bench] written to {shown(str(out))}", flush=True)
    return 0


def report(args, info, cfg, source, s1, mixed, loader_rows, pad_rows, window_rows, runs, timings, total, date,
           load_start, cuda: bool) -> list[str]:
    L: list[str] = ["# PART benchmark", ""]
    L += [f"- date: {date}", f"- host: {info['host']}",
          f"- CPU: {info['cpu']} ({info['cores']}), memory {info['memory']}",
          f"- python {info['python']}, torch {info['torch']}, deepspeed {info['deepspeed']}, "
          f"transformers {info['transformers']}",
          f"- accelerator: {info['accelerator']}; GPU: {info['gpu']}",
          f"- config: {shown(args.config)} ({source}); overrides: {' '.join(args.overrides) or 'none'}",
          f"- load average (1/5/15 min) at start: {load_start}; at end: {load_avg()}",
          f"- benchmark wall time: {total:.0f} s ("
          + ", ".join(f"{k} {v:.0f} s" for k, v in timings.items()) + ")", ""]

    if loader_rows or pad_rows:
        L += ["## Data: the loader never starves the trainer", ""]
    if loader_rows:
        L += [f"### a. Loader throughput (MixtureStream + make_loader, idle consumer; {args.loader_warmup} warmup "
              f"then {args.loader_batches} timed batches)", ""]
        rows = []
        for stage, r in loader_rows:
            rows.append([stage.name, tasks_text(stage), r["workers"], f"{r['samples_s']:.1f}", f"{r['audio_s']:.1f}",
                         f"{r['batches_s']:.2f}", f"{r['samples'] / r['batches']:.1f}", f"{r['first_batch']:.2f}"])
        L += table(["stage", "tasks", "workers", "samples/s", "audio-s/s", "batches/s", "samples/batch",
                    "first batch (s)"], rows)
        scale = []
        for stage in (s1, mixed):
            by = {r["workers"]: r for st, r in loader_rows if st is stage}
            if 1 in by and 2 in by:
                scale.append(f"{stage.name} {by[2]['samples_s'] / by[1]['samples_s']:.2f}x")
        L += ["", f"2 workers over 1 worker: {', '.join(scale)} (on {info['cores']})."]
        if 1 in runs:
            t1 = train_summary(runs[1])
            nw = max(1, cfg.data.num_workers)
            match = next((r for st, r in loader_rows if st is s1 and r["workers"] == nw), None)
            if match:
                L += [f"Headroom: the loader alone ({nw} worker, {s1.name}) makes {match['samples_s']:.1f} samples/s; "
                      f"one training rank consumes {t1['per_rank_samples_s']:.1f} samples/s "
                      f"(**{match['samples_s'] / t1['per_rank_samples_s']:.1f}x** headroom, before both share "
                      "the cores)."]
        L += [""]
    if pad_rows:
        L += [f"### b. Padded-frame fraction (target < {PAD_TARGET:.0%} with bucketing)", "",
              "1 - real audio seconds / sum(max duration x batch size), speech samples; the same samples in "
              "both columns: the stream's bucketed batches vs arrival order cut into batches of the same sizes.", ""]
        rows = []
        for stage, r in pad_rows:
            rows.append([stage.name, r["windows"], r["samples"], r["batches"], f"{r['mean_batch']:.1f}",
                         f"{r['speech_seconds']:.0f}", f"{r['bucketed']:.1%}", f"{r['arrival']:.1%}",
                         f"{r['yielded']:.1%}", ok(r["bucketed"] < PAD_TARGET)])
        L += table(["stage", "windows", "samples", "batches", "samples/batch", "speech s", "bucketed",
                    "arrival order", "as yielded", f"< {PAD_TARGET:.0%}"], rows)
        L += ["", "`as yielded`: the same fraction from the collated batches the stream returned (a cross-check)."]
        if window_rows:
            base = next(r for st, r in pad_rows if st is s1)
            cells = [f"{cfg.data.window} (config): {base['bucketed']:.1%}"]
            cells += [f"{w}: {r['bucketed']:.1%} ({r['samples']} samples)" for w, r in window_rows]
            L += ["", f"Bucketed padding of {s1.name} against `data.window` (samples sorted and cut together): "
                  + "; ".join(cells) + "."]
        L += [""]

    if not runs:
        return L
    L += ["## Training (deepspeed launcher, ZeRO-3)", ""]
    r0 = runs[min(runs)]["train"]
    L += [f"Stage `{r0['stage']}` (trainable {', '.join(r0['trainable'])}; tasks {r0['tasks']}), "
          f"{r0['ds_config']}, {r0['threads']} torch thread(s) per rank, {r0['num_workers']} loader worker(s) "
          f"per rank, {args.warmup} warmup + {args.steps} timed steps.", ""]
    L += [f"### c. Training throughput (data-wait target < {WAIT_TARGET:.0%})", ""]
    rows = []
    summaries = {n: train_summary(run) for n, run in sorted(runs.items())}
    for n, s in summaries.items():
        rows.append([n, s["steps"], f"{s['step_time']:.3f}", f"{s['samples_per_step']:.1f}", f"{s['samples_s']:.1f}",
                     f"{s['audio_s']:.1f}", f"{s['per_rank_samples_s']:.1f}", f"{s['wait_mean']:.1%}",
                     f"{s['wait_max']:.1%}", ok(s["wait_max"] < WAIT_TARGET)])
    L += table(["ranks", "steps", "step time (s)", "samples/step", "samples/s", "audio-s/s", "samples/s per rank",
                "data wait (mean)", "data wait (max rank)", f"< {WAIT_TARGET:.0%}"], rows)
    if 1 in summaries and 2 in summaries:
        sp = summaries[2]["samples_s"] / summaries[1]["samples_s"]
        L += ["", f"2 ranks over 1 rank: {sp:.2f}x samples/s (scaling efficiency {sp / 2:.0%}); "
              f"step time {summaries[2]['step_time'] / summaries[1]['step_time']:.2f}x."]
    warm = {n: s["warmup"] for n, s in summaries.items() if s["warmup"]}
    if warm:
        L += ["Warmup step times (s, excluded): " + "; ".join(
            f"{n} rank(s) " + ", ".join(f"{t:.2f}" for t in w) for n, w in warm.items()) + "."]
    L += [""]

    if 1 in runs and "replay" in runs[1] and "plain" in runs[1]["replay"]["per_rank"][0]:
        rp = runs[1]["replay"]["per_rank"][0]
        z, p = rp["zero3"], rp["plain"]
        L += ["### d. ZeRO-3 over plain PyTorch (1 rank, same model, same batches, compute only)", "",
              f"{len(z)} ZeRO-3 and {len(p)} plain steps over {len(z) // 2} batches kept from c, in A-B-B-A order; "
              "plain = the same SpeechLLM, trainable groups, torch AdamW and gradient clipping, no engine.", ""]
        L += table(["loop", "mean step (s)", "median step (s)"],
                   [["ZeRO-3 engine", f"{statistics.mean(z):.3f}", f"{statistics.median(z):.3f}"],
                    ["plain PyTorch", f"{statistics.mean(p):.3f}", f"{statistics.median(p):.3f}"]])
        L += ["", f"ZeRO-3 / plain step time: **{statistics.mean(z) / statistics.mean(p):.2f}x** (mean), "
              f"{statistics.median(z) / statistics.median(p):.2f}x (median).", ""]

    L += ["### e. Parameter memory per rank (ZeRO-3 partitions: sum of `ds_tensor.ds_numel` x element size)", ""]
    rows = []
    base = None
    for n, run in sorted(runs.items()):
        pr = run["params"]["per_rank"]
        local = [x["local_bytes"] for x in pr]
        base = base or (max(local) * n if n == 1 else None)
        ratio = f"{max(local) / base:.3f}" if base else "n/a"
        rows.append([n, f"{pr[0]['params']:,}", fmt_bytes(pr[0]["full_bytes"]), ", ".join(fmt_bytes(x) for x in local),
                     ratio, f"{1 / n:.3f}", sum(x["unpartitioned"] for x in pr)])
    L += table(["ranks", "parameters", "full model", "local partition per rank", "vs 1 rank", "ideal 1/N",
                "params not partitioned"], rows)
    L += [""]

    if any("switch" in run and "total" in run["switch"] for run in runs.values()):
        L += ["### f. Stage switch (train.py's path: destroy engine, next stage's model from the checkpoint weights "
              "with its trainable groups, new engine, new stream)", ""]
        rows = []
        for n, run in sorted(runs.items()):
            sw = run.get("switch")
            if not sw or "total" not in sw:
                continue
            st = sw["step_time"]
            new = sw["new_stage_steps"]
            rest = f"{statistics.mean(new[1:]):.2f}" if len(new) > 1 else "n/a"
            rows.append([n, f"{sw['from_stage']} -> {sw['to_stage']}", f"{sw['destroy']:.2f}",
                         f"{sw['build_model'] + sw['load_weights']:.2f}", f"{sw['init_engine']:.2f}",
                         f"{sw['first_batch']:.2f}", f"**{sw['total']:.2f}**", f"{st:.3f}",
                         f"**{sw['total'] / st:.1f}x**", f"{new[0]:.2f} ({new[0] / st:.1f}x)", rest])
        L += table(["ranks", "switch", "destroy (s)", "model + weights (s)", "new engine (s)", "first batch (s)",
                    "total (s)", "step time (s)", "total / step", "first new-stage step (s)",
                    "later new-stage steps (s)"], rows)
        L += ["", "`total` ends when the new stage's first batch is in hand; the first new-stage step also builds "
              "the optimizer state of the newly trainable parameters.", ""]

    if any("ckpt" in run for run in runs.values()):
        L += ["### g. Checkpoint save and load", "",
              "save = Checkpointer.save (gathered safetensors + DeepSpeed optimizer partitions, atomic publish); "
              "load = train.py's resume path: SpeechLLM(...).load_weights + engine.load_checkpoint "
              "(full resume adds building the model and the engine).", ""]
        rows = []
        for n, run in sorted(runs.items()):
            ck = run.get("ckpt")
            if not ck:
                continue
            load = ck["load_weights"] + ck["load_checkpoint"]
            rows.append([n, f"{ck['bytes'] / 2**20:.1f} MiB", f"{ck['save']:.2f}", f"{ck['load_weights']:.2f}",
                         f"{ck['load_checkpoint']:.2f}", f"{load:.2f}", f"{ck['resume_total']:.2f}",
                         f"{ck['save'] / ck['step_time']:.1f}x", f"{ck['first_step']:.2f}"])
        L += table(["ranks", "size", "save (s)", "load_weights (s)", "load_checkpoint (s)", "load (s)",
                    "full resume (s)", "save / step", "first step after resume (s)"], rows)
        L += [""]

    from part.model.flops import peak_bf16_flops

    L += ["### h. GPU tokens/s and MFU", ""]
    if not cuda:
        L += ["Skipped: no CUDA device on this machine (torch.cuda.is_available() is False).", ""]
    else:
        rows = []
        for n, run in sorted(runs.items()):
            s = summaries[n]
            name = run["train"].get("device_name")
            params = run["params"]["per_rank"][0]["params"]
            peak = peak_bf16_flops(name)
            mfu = f"{s['flops_s'] / (peak * n):.2%}" if peak else "n/a"
            peak_text = f"{peak / 1e12:.0f} TFLOP/s" if peak else "n/a"
            rows.append([n, name, f"{params:,}", f"{s['tokens_s']:.0f}", peak_text, mfu])
        L += table(["ranks", "device", "parameters", "tokens/s", "peak bf16 per GPU", "MFU"], rows)
        L += ["", "tokens: LLM positions (prompt + target + adapter audio frames); MFU = the steps' model "
              "operations (part/model/flops.py: forward, and the backward products the stage's trainable set needs) "
              f"/ time / (peak x GPUs). ds_config {r0['ds_config']}.", ""]
    return L


if __name__ == "__main__":
    sys.exit(main())
