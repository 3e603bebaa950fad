"""The GPU check: real model shapes, random weights, noise audio; the whole training path on one GPU.

Builds a Whisper-large-v3-shaped encoder (32 layers, d 1280, 128 mel bins) and a Qwen2.5-1.5B-shaped LLM
(28 layers, d 1536, its 151,936-token vocabulary) with random weights, and noise-audio shards through
`data_prep.manifest`; prints `train.py --check`'s per-stage memory estimate; trains three PART stages (adapter;
adapter + whole encoder; adapter + LoRA on ASR + S2TT) through the `deepspeed` launcher with a checkpoint inside
each stage, kills the run (SIGKILL) after the first checkpoint of stage 2 and resumes it, evaluates; then reports
per stage: tokens/s, audio-seconds/s, step time (median, p90, max after warm-up), MFU and peak memory. Then the
step's anatomy per stage (bench/train_bench_worker.py's `anatomy` phase, one launcher run per stage): batches
never trained on, each stepped twice in a row (a new shape's first step vs the same batch replayed), with cuDNN
attention on and off, and the share of the replayed step spent in device kernels (torch.profiler). The report
(markdown) and the logs go to `--out`.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

LANGUAGES = ("en", "de")
SAMPLE_RATE = 16000
WARMUP_STEPS = 2  # per stage (and after the resume): allocator growth, first-call compilation

EXAMPLES = """\
examples:
  bash bench/gpu_check.sh                              # on a GPU machine: sets up, then runs this script
  python bench/gpu_check.py --out docs/gpu_check       # the same, the environment already set up
  python bench/gpu_check.py --zero 2 --no-kill --eval-per-language 0 --steps 5 --out /tmp/gc   # throughput only
  python bench/gpu_check.py --small --out /tmp/gc      # the same path at toy shapes on CPU: the script's own test
"""


def log(message: str) -> None:
    print(f"[gpu-check {time.strftime('%H:%M:%S')}] {message}", flush=True)


# ---------------------------------------------------------------- assets

def pseudo_sentences(n: int, rng: random.Random) -> list[str]:
    """Word-like text (no corpus travels to the GPU machine): syllables drawn from a fixed inventory."""
    syllables = [c + v for c in "bdfgklmnprstvz" for v in "aeiou"]
    return [" ".join("".join(rng.choice(syllables) for _ in range(rng.randint(1, 3)))
                     for _ in range(rng.randint(4, 18))).capitalize() + "." for _ in range(n)]


def build_shards(work: Path, clips: int, eval_clips: int, seed: int = 0) -> Path:
    """Noise clips of 2-28 s with pseudo-text transcripts and English 'translations', as webdataset shards."""
    import numpy as np
    import soundfile as sf

    from data_prep import manifest

    rng = random.Random(seed)
    audio_dir = work / "audio"
    audio_dir.mkdir(parents=True, exist_ok=True)
    shards = work / "shards"
    for split, n in (("train", clips), ("eval", eval_clips)):
        rows = []
        for lang in LANGUAGES:
            texts, translations = pseudo_sentences(n, rng), pseudo_sentences(n, rng)
            for i, (text, translation) in enumerate(zip(texts, translations)):
                path = audio_dir / f"{split}-{lang}-{i:05d}.flac"
                seconds = rng.uniform(2, 28)
                noise = np.random.default_rng(rng.randrange(1 << 30)).normal(0, 0.1, int(seconds * SAMPLE_RATE))
                sf.write(path, noise.astype("float32"), SAMPLE_RATE)
                rows.append({"audio": str(path), "text": text, "language": lang, "translation_en": translation})
        listing = work / f"{split}.jsonl"
        listing.write_text("".join(json.dumps(r) + "\n" for r in rows))
        code = manifest.main(["--manifest", str(listing), "--out", str(shards / split), "--shard-samples",
                              str(max(4, n // 4)), "--workers", "4"])
        if code != 0:
            raise SystemExit(f"building the {split} shards failed ({code})")
    return shards


def build_models(work: Path, small: bool, device: str) -> tuple[Path, Path]:
    """Random-weight encoder and LLM directories of the real shapes (`small`: toy shapes), 16-bit on disk."""
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM, WhisperConfig, WhisperModel

    from part.convert.tiny import train_tokenizer
    from part.prompts import PromptFormat

    whisper_dir, llm_dir = work / "whisper", work / "llm"
    text = work / "tokenizer_text.txt"
    text.write_text("\n".join(pseudo_sentences(4000, random.Random(1))))
    tokenizer = train_tokenizer(text, llm_dir, vocab_size=1000)
    end = PromptFormat.from_tokenizer(tokenizer).end_token
    dtype = torch.float32 if small else torch.bfloat16
    torch.manual_seed(0)
    enc = dict(d_model=1280, encoder_layers=32, encoder_attention_heads=20, encoder_ffn_dim=5120, num_mel_bins=128)
    if small:
        enc = dict(d_model=128, encoder_layers=4, encoder_attention_heads=4, encoder_ffn_dim=512, num_mel_bins=80)
    with torch.device(device):
        whisper = WhisperModel(WhisperConfig(**enc, decoder_layers=1,
                                             decoder_attention_heads=enc["encoder_attention_heads"],
                                             decoder_ffn_dim=512, max_source_positions=1500, max_target_positions=64,
                                             vocab_size=51866, dropout=0.0)).to(dtype)
    whisper.save_pretrained(whisper_dir)
    del whisper
    llm_shape = dict(hidden_size=192, intermediate_size=512, num_hidden_layers=4, num_attention_heads=6,
                     num_key_value_heads=2) if small else \
        dict(hidden_size=1536, intermediate_size=8960, num_hidden_layers=28, num_attention_heads=12,
             num_key_value_heads=2)
    with torch.device(device):
        llm = Qwen2ForCausalLM(Qwen2Config(**llm_shape, vocab_size=151936, max_position_embeddings=32768,
                                           tie_word_embeddings=True, rope_theta=1e6,
                                           pad_token_id=tokenizer.pad_token_id,
                                           eos_token_id=tokenizer.convert_tokens_to_ids(end))).to(dtype)
    llm.save_pretrained(llm_dir)
    return whisper_dir, llm_dir


STAGES = """\
  - {{name: s1_adapter_asr, steps: {n}, tasks: {{asr: 1.0}}, trainable: [adapter], lr: 1.0e-4, warmup_steps: 1}}
  - {{name: s2_adapter_encoder, steps: {n}, tasks: {{asr: 1.0}}, trainable: [adapter, encoder], lr: 2.0e-5,
     warmup_steps: 1}}
  - {{name: s3_adapter_lora_s2tt, steps: {n}, tasks: {{asr: 0.5, s2tt: 0.5}}, translation_targets: [en],
     trainable: [adapter, llm.lora], lr: 1.0e-4, warmup_steps: 1}}
"""


def write_config(work: Path, shards: Path, whisper: Path, llm: Path, small: bool, steps: int, every: int,
                 batch_seconds: float, zero: int, eval_per_language: int, profile_start: int,
                 profile_steps: int) -> Path:
    ds = f"zero{zero}_cpu.json" if small else f"zero{zero}.json"
    path = work / f"gpu_check_zero{zero}.yaml"
    path.write_text(f"""# written by bench/gpu_check.py
model:
  encoder: {{pretrained: {whisper}}}
  adapter: {{downsample: 4, kind: transformer, hidden: {64 if small else 2048}, layers: 2, heads: {4 if small else 16}}}
  llm:
    pretrained: {llm}
    lora: {{rank: 16, alpha: 32, target_modules: [q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj, down_proj]}}
  attn_implementation: sdpa
  activation_checkpointing: {{encoder: true, llm: true}}
data:
  train_shards: {shards}/train/{{lang}}-*.tar
  eval_shards: {shards}/eval/{{lang}}-*.tar
  languages: [{", ".join(LANGUAGES)}]
  num_workers: {1 if small else 4}
  window: 256
  batching: fill
  audio_row_seconds: 30
  max_batch_seconds: {batch_seconds}
  max_batch_tokens: 8192
  max_batch_size: 256
  length_multiple: 256
  row_tokens: 4096
  max_duration: 30
stages:
{STAGES.format(n=steps)}
checkpoint: {{dir: {work}/run/checkpoints, every: {every}, keep: 2}}
logging: {{every: 1, profile_start: {profile_start}, profile_steps: {profile_steps}}}
eval: {{per_language: {eval_per_language}, tasks: [asr, s2tt], max_new_tokens: 16, batch_size: 8}}
ds_config: {REPO}/ds_configs/{ds}
precision: {"fp32" if small else "bf16"}
zero_stage: {zero}
output_dir: {work}/run
""")
    return path


# ---------------------------------------------------------------- the run

def one_rank(script: str, args: list[str]) -> tuple[list[str], dict[str, str]]:
    """The command that runs `script` on one rank through the launcher, and its environment. The launcher runs
    through this interpreter: on a machine where the packages were installed with --target, no `deepspeed` script
    is on the PATH."""
    from part.train.launcher import deepspeed_command

    cmd = deepspeed_command(script, args, 1)
    path = os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH", "")) if p)
    env = dict(os.environ, PYTHONUNBUFFERED="1", PYTHONPATH=path,
               PYTORCH_CUDA_ALLOC_CONF=os.environ.get("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True"))
    return [sys.executable, "-m", "deepspeed.launcher.runner", *cmd[1:]], env


def launch(config: Path, log_file: Path, *extra: str) -> subprocess.Popen:
    cmd, env = one_rank("train.py", ["--config", str(config), *extra])
    return subprocess.Popen(cmd, cwd=REPO, env=env, stdout=open(log_file, "a"), stderr=subprocess.STDOUT,
                            start_new_session=True)


def last_step(train_log: Path) -> int:
    if not train_log.exists():
        return 0
    lines = train_log.read_text().splitlines()
    return json.loads(lines[-1])["step"] if lines else 0


def run_with_kill(config: Path, work: Path, out: Path, kill_after: int, timeout: float) -> tuple[int, float]:
    """Trains; SIGKILLs the whole launcher group once step `kill_after` is logged; resumes. Returns (code, s)."""
    train_log = work / "run" / "train_log.jsonl"
    log_file = out / f"train_{config.stem}.log"
    t0 = time.time()
    proc = launch(config, log_file)
    while proc.poll() is None and last_step(train_log) < kill_after and time.time() - t0 < timeout:
        time.sleep(0.5)
    if proc.poll() is None:
        log(f"step {last_step(train_log)} logged: SIGKILL to the launcher and its ranks")
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        log("resuming")
        proc = launch(config, log_file, "--resume")
    else:
        log(f"the run ended (code {proc.returncode}) before the kill point")
    try:
        code = proc.wait(timeout=max(1.0, timeout - (time.time() - t0)))
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        code = -9
    return code, time.time() - t0


# ---------------------------------------------------------------- the report

def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q * (len(ordered) - 1))))]


def stage_report(train_log: Path, warmup: int = WARMUP_STEPS) -> list[dict]:
    """Per stage, from train_log.jsonl (one record per step, as `load_run` reads it), after the first `warmup`
    steps of each stage and of each process (a resumed run's first steps: `process_steps` counts them)."""
    from part.evaluation.comparison import load_run

    by_stage: dict[str, list[dict]] = {}
    for record in load_run(train_log.parent)["train"]:
        by_stage.setdefault(record["stage"], []).append(record)
    skip = {r["step"] for recs in by_stage.values() for r in recs if r.get("process_steps", warmup + 1) <= warmup}
    rows = []
    for stage, recs in by_stage.items():
        steady = [r for r in recs[warmup:] if r["step"] not in skip] or recs[-1:]
        times = [r["step_time"] for r in steady]
        total = sum(times)
        median = statistics.median(times)
        # the device's peak, as the trainer used it for each record's MFU
        peak = next((r["flops"] / r["step_time"] / r["mfu"] for r in steady if r.get("mfu")), None)
        rows.append({
            "stage": stage, "steps": len(recs), "timed": len(steady),
            "median_s": median, "p90_s": percentile(times, 0.9), "max_s": max(times),
            "max_over_median": max(times) / median,
            "tokens_per_s": sum(r.get("tokens", 0) for r in steady) / total,
            "audio_s_per_s": sum(r["audio_seconds"] for r in steady) / total,
            "tflops_per_s": sum(r.get("flops", 0.0) for r in steady) / total / 1e12,
            "mfu": sum(r.get("flops", 0.0) for r in steady) / total / peak if peak else None,
            # everything that ran, padding included, and the padding's shares
            "mfu_padded": sum(r.get("padded_flops", r.get("flops", 0.0)) for r in steady) / total / peak
            if peak else None,
            "llm_padding": statistics.mean(r.get("llm_padding", 0.0) for r in steady),
            "audio_padding": statistics.mean(r.get("audio_padding", 0.0) for r in steady),
            "peak_memory_gib": max((r.get("peak_memory_gib", 0.0) for r in recs), default=0.0),
            "first_steps_s": [round(r["step_time"], 2) for r in recs[:warmup]],
        })
    return rows


def report_markdown(rows: list[dict]) -> str:
    lines = ["| stage | steps (timed) | tokens/s | audio-s/s | step s median | p90 | max | max/median | TFLOP/s | MFU "
             "| MFU with padding | LLM padding | audio padding | peak GiB | warm-up steps s |",
             "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- |"]
    for r in rows:
        mfu = "n/a" if r["mfu"] is None else f"{100 * r['mfu']:.1f}%"
        padded = "n/a" if r["mfu_padded"] is None else f"{100 * r['mfu_padded']:.1f}%"
        lines.append(f"| {r['stage']} | {r['steps']} ({r['timed']}) | {r['tokens_per_s']:.0f} | "
                     f"{r['audio_s_per_s']:.0f} | {r['median_s']:.2f} | {r['p90_s']:.2f} | {r['max_s']:.2f} | "
                     f"{r['max_over_median']:.2f} | {r['tflops_per_s']:.1f} | {mfu} | {padded} | "
                     f"{100 * r['llm_padding']:.1f}% | {100 * r['audio_padding']:.1f}% | {r['peak_memory_gib']:.1f} | "
                     f"{r['first_steps_s']} |")
    return "\n".join(lines)


def step_anatomy(config: Path, work: Path, out: Path, stages: list[int], batches: int, timeout: float,
                 deadline: float = float("inf")) -> tuple[list[dict], list[int]]:
    """The worker's `anatomy` phase, one launcher run per stage (a few live steps first: the shapes they meet
    count as seen): its records in stage order, and the stages that failed. No stage starts within a minute of
    `deadline` (time.time())."""
    records, failed = [], []
    for index in stages:
        if time.time() > deadline - 60:
            log(f"step anatomy of stage {index}: skipped (the check's time budget is spent)")
            continue
        timeout = min(timeout, deadline - time.time())
        worker_args = ["--config", str(config), "--workdir", str(work / "anatomy"), "--phases", "train,anatomy",
                       "--stage", str(index), "--warmup", "1", "--steps", "1", "--replay-steps", "1",
                       "--anatomy-batches", str(batches)]
        cmd, env = one_rank("bench/train_bench_worker.py", worker_args)
        log_file = out / "anatomy.log"
        with open(log_file, "a") as sink:  # the ranks in a session of their own: a timeout stops all of them
            proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=sink, text=True,
                                    start_new_session=True)
            try:
                stdout, _ = proc.communicate(timeout=timeout)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                stdout, _ = proc.communicate()
                log(f"step anatomy of stage {index}: stopped after {timeout:.0f} s")
            sink.write(stdout)
        found = [json.loads(line.split("BENCH_JSON ", 1)[1]) for line in stdout.splitlines()
                 if "BENCH_JSON " in line]
        anatomy = [r for r in found if r.get("kind") == "anatomy"]
        if proc.returncode != 0 or not anatomy:  # the worker's own traceback is in the log
            log(f"step anatomy of stage {index}: exit {proc.returncode}, no result (see {log_file})")
            failed.append(index)
            continue
        records.append(anatomy[0])
        log(f"step anatomy of stage {index} ({anatomy[0]['stage']}) done")
    return records, failed


def anatomy_markdown(records: list[dict]) -> str:
    """Per stage and attention setting: medians of the first step on a new batch and of its replay, the per-shape
    cost (first minus replay, over the batches whose shape was new), and the share of the profiled (replayed)
    steps' wall time in kernels."""
    lines = ["| stage | attention | batches (new shapes) | first step s | replayed s | first / replayed | "
             "per new shape s | kernels s per step | in kernels |",
             "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for r in records:
        for k, m in enumerate(r["modes"]):
            first, replay = statistics.median(m["first"]), statistics.median(m["replay"])
            extra = [f - p for f, p, new in zip(m["first"], m["replay"], m["new_shape"]) if new]
            per_shape = f"{statistics.median(extra):.3f}" if extra else "n/a"
            # the profiled steps ran under the first setting (the default)
            share = r["kernel_seconds"] / r["profiled_seconds"]
            kernels = f"{r['kernel_seconds']:.3f} | {100 * share:.0f}%" if k == 0 else " |"
            lines.append(f"| {r['stage']} | {m['mode']} | {len(m['first'])} ({sum(m['new_shape'])}) | {first:.3f} | "
                         f"{replay:.3f} | {first / replay:.2f} | {per_shape} | {kernels} |")
    kinds = sorted({r["kernel_kind"] for r in records})
    return "\n".join(lines) + (f"\n\nKernels: the own time of the {', '.join(kinds)} per replayed step under "
                               "torch.profiler, and its share of those steps' wall time; the rest of the step is the "
                               "host: Python, launches, waits." if records else "")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, epilog=EXAMPLES,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", type=Path, default=Path("/tmp/part_gpu_check"), help="scratch directory")
    parser.add_argument("--out", type=Path, default=REPO / "docs" / "gpu_check", help="report and logs")
    parser.add_argument("--small", action="store_true", help="toy shapes, fp32, CPU: the script's own test")
    parser.add_argument("--steps", type=int, default=8, help="steps per stage")
    parser.add_argument("--every", type=int, default=6, help="checkpoint every this many steps")
    parser.add_argument("--batch-seconds", type=float, default=480, help="data.max_batch_seconds")
    parser.add_argument("--clips", type=int, default=160, help="training clips per language")
    parser.add_argument("--timeout", type=float, default=420, help="seconds for the training run, resume included")
    parser.add_argument("--zero", type=int, choices=(2, 3), default=2,
                        help="ZeRO stage (ds_configs/zeroN.json); 2 by default: on one GPU ZeRO-3 only costs")
    parser.add_argument("--no-kill", action="store_true", help="no kill -9 and resume (throughput only)")
    parser.add_argument("--eval-per-language", type=int, default=8, help="held-out clips per language (0: none)")
    parser.add_argument("--profile-start", type=int, default=None,
                        help="torch.profiler from the step after this one (default: stage 3's 4th step, or its last "
                             "when it has fewer; -1: none)")
    parser.add_argument("--profile-steps", type=int, default=2, help="steps in the profiler window")
    parser.add_argument("--anatomy-stages", default="0,1,2",
                        help="stages (indices) whose step anatomy is measured after the run ('': none)")
    parser.add_argument("--anatomy-batches", type=int, default=2,
                        help="new batches per stage and attention setting, each stepped twice")
    parser.add_argument("--anatomy-timeout", type=float, default=180, help="seconds per stage for the anatomy")
    parser.add_argument("--budget", type=float, default=450,
                        help="seconds for the whole check: no anatomy stage starts in its last minute")
    args = parser.parse_args(argv)
    if args.profile_start is None:
        args.profile_start = 2 * args.steps + min(3, args.steps - 1)
    import torch

    args.out.mkdir(parents=True, exist_ok=True)
    device = "cpu" if args.small or not torch.cuda.is_available() else "cuda"
    log(f"torch {torch.__version__}, device {torch.cuda.get_device_name(0) if device == 'cuda' else 'cpu'}")
    t0 = time.time()
    shards, whisper, llm = args.work / "shards", args.work / "whisper", args.work / "llm"
    if (llm / "model.safetensors").exists():
        log(f"reusing the shards and models in {args.work}")
    else:
        build_shards(args.work, args.clips, 8)
        log(f"noise shards built ({time.time() - t0:.0f} s)")
        build_models(args.work, args.small, device)
        log(f"models written ({time.time() - t0:.0f} s)")
    config = write_config(args.work, shards, whisper, llm, args.small, args.steps, args.every, args.batch_seconds,
                          args.zero, args.eval_per_language, args.profile_start, args.profile_steps)
    import shutil

    shutil.rmtree(args.work / "run", ignore_errors=True)
    check = subprocess.run([sys.executable, "train.py", "--config", str(config), "--check"], cwd=REPO,
                           capture_output=True, text=True)
    (args.out / f"check_zero{args.zero}.txt").write_text(check.stdout + check.stderr)
    print(check.stdout, flush=True)
    if check.returncode != 0:
        print(check.stderr[-3000:])
        return check.returncode
    # inside stage 2, after its first checkpoint (never, with --no-kill)
    kill_after = 10**9 if args.no_kill else args.steps + args.every + 1
    code, seconds = run_with_kill(config, args.work, args.out, kill_after, args.timeout)
    log(f"training (kill and resume included) ended with code {code} in {seconds:.0f} s")
    if code != 0:
        print("".join((args.out / f"train_{config.stem}.log").read_text().splitlines(keepends=True)[-80:]), flush=True)
    train_log = args.work / "run" / "train_log.jsonl"
    name = torch.cuda.get_device_name(0) if device == "cuda" else "cpu"
    killed = "no kill" if args.no_kill else f"kill -9 at step {kill_after}, resume included"
    results = [f"# GPU check ({time.strftime('%Y-%m-%d')}, {name}, ZeRO-{args.zero})",
               "", f"training exit code {code}; wall {seconds:.0f} s ({killed})",
               "", "## train.py --check", "", "```", check.stdout.strip(), "```", ""]
    if train_log.exists():
        shutil.copy(train_log, args.out / f"train_log_zero{args.zero}.jsonl")
        results += ["## Throughput per stage", "", report_markdown(stage_report(train_log)), ""]
    for table in sorted((args.work / "run" / "profile").glob("rank0_*.top.txt")):
        # the traces (Chrome / Perfetto JSON, one per rank) stay in the work directory: they can be large
        shutil.copy(table, args.out / f"profile_zero{args.zero}_{table.name}")
        results += ["## Profile (torch.profiler, rank 0; top operators by their own time)", "",
                    f"traces: `{table.parent}/*.trace.json`", "", "```", table.read_text().strip(), "```", ""]
    stages = [int(i) for i in args.anatomy_stages.split(",") if i.strip()]
    anatomy, anatomy_failed = step_anatomy(config, args.work, args.out, stages, args.anatomy_batches,
                                           args.anatomy_timeout, deadline=t0 + args.budget)
    if anatomy:
        (args.out / f"anatomy_zero{args.zero}.json").write_text(json.dumps(anatomy, indent=1))
        results += ["## Step anatomy (new shapes vs replayed batches, cuDNN attention, share in kernels)", "",
                    anatomy_markdown(anatomy), ""]
    final = args.work / "run" / "final.md"
    if final.exists():
        results += ["## Evaluation (random weights: the numbers only show it ran)", "", final.read_text(), ""]
    text = "\n".join(results)
    (args.out / f"gpu_check_zero{args.zero}.md").write_text(text)
    print(text, flush=True)
    log(f"done in {time.time() - t0:.0f} s")
    return 0 if code == 0 and (final.exists() or not args.eval_per_language) and not anatomy_failed else 1


if __name__ == "__main__":
    sys.exit(main())
