"""A short real run through the deepspeed launcher (2 CPU ranks, ZeRO-3) with wandb offline, then re-runs of it.

The run's offline wandb files are read back (tests/wandb_offline.py, no server): stage markers, the mixture
drawn per task and language, the skip counters, the per-language metric table and the hypotheses per language at
each evaluation, from rank 0 only. Then `--resume` on the finished run only reports it (no training, no
evaluation, nothing rewritten) and `--resume --reevaluate` evaluates the final model again.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest
import torch
from conftest import REPO, call_main, write_config
from wandb_offline import Table, offline_runs, read_offline_run

from part.train.launcher import deepspeed_command

pytestmark = pytest.mark.slow

STAGES = """\
  - {name: s1_adapter, steps: 3, tasks: {asr: 1.0}, trainable: [adapter], lr: 6.0e-3, warmup_steps: 1}
  - name: s2_lora
    steps: 2
    tasks: {asr: 0.5, s2tt: 0.5}
    translation_targets: [en]
    trainable: [adapter, llm.lora]
    lr: 1.0e-3
    group_lr: {adapter: 1.0e-12}  # held still while LoRA trains: per-group rates reach the ZeRO-3 optimizer
    warmup_steps: 0
"""


def env() -> dict:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("WANDB_")}  # the config alone decides
    return dict(clean, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", PYTHONPATH=str(REPO))


def run_ds(config: Path, *extra: str) -> subprocess.CompletedProcess:
    launcher = str(Path(sys.executable).parent / "deepspeed")
    # train.py under the collective guard: the counters gathered for wandb go through DistributedContext
    cmd = deepspeed_command("tests/integration/guarded_train.py", ["--config", str(config), *extra], 2,
                            launcher=launcher)
    return subprocess.run(cmd, cwd=REPO, env=env(), capture_output=True, text=True, timeout=900)


def durations(corpus: Path) -> list[float]:
    out = []
    for shard in sorted((corpus / "train").glob("*.tar")):
        with tarfile.open(shard) as tar:
            for member in tar:
                if member.name.endswith(".json"):
                    out.append(float(json.load(tar.extractfile(member))["duration"]))
    return sorted(out)


@pytest.fixture(scope="module")
def finished(corpus, tiny_models, tmp_path_factory):
    """A finished two-stage run: evaluation at step 3 and at the end (5), wandb offline; data.max_duration below
    the longest quarter of the clips, so the stream skips some (`too_long`)."""
    root = tmp_path_factory.mktemp("wandb_run")
    config = write_config(root / "c.yaml", corpus, tiny_models, STAGES)
    cut = durations(corpus)[len(durations(corpus)) * 3 // 4]
    overrides = [f"data.max_duration={cut:.2f}", "eval.every=3", "eval.per_language=2", "logging.every=1",
                 "logging.wandb_project=part-test", "logging.wandb_mode=offline", "logging.run_name=wandb_e2e",
                 "logging.wandb_samples=2"]
    proc = run_ds(config, *overrides)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    return {"config": config, "overrides": overrides, "out": root / "out", "stdout": proc.stdout}


def test_a_group_lr_holds_its_group_while_the_stage_lr_trains_the_rest(finished):
    from safetensors.torch import load_file

    checkpoints = finished["config"].parent / "ckpt"
    before, after = (load_file(str(checkpoints / f"step_{s:07d}" / "model.safetensors")) for s in (3, 5))
    adapter = [k for k in before if k.startswith("adapter.")]
    lora = [k for k in before if "lora_" in k]
    assert adapter and lora
    assert all(torch.allclose(before[k], after[k], rtol=0, atol=1e-9) for k in adapter)  # stage 2: lr 1e-12
    assert max((before[k] - after[k]).abs().max().item() for k in lora) > 1e-4  # stage 2: lr 1e-3


def test_check_prints_the_bytes_each_stage_s_checkpoint_holds(finished, capsys):
    """`train.py --check`'s bytes per checkpoint against the files this run wrote (ZeRO-3, 2 ranks): the weight file
    exactly, DeepSpeed's files within a few percent. Stage 1 writes the adapter and LoRA (the tiny encoder and LLM
    are referenced in their pretrained directories); stage 2 no more weights, LoRA's optimizer state besides."""
    from part.cli.train import main
    from part.config import load_config
    from part.train.checkpoint_contents import checkpoint_sizes
    from part.train.preflight import skeleton

    config, overrides = finished["config"], finished["overrides"]
    code, out, _ = call_main(main, ["--config", str(config), *overrides, "--check", "--world-size", "2"], capsys)
    assert code == 0
    printed = {m[1]: [float(x) for x in m.group(2, 3, 4)] for m in re.finditer(
        r"^\| (\w+) \| ([\d.]+) MiB \| ([\d.]+) MiB \| ([\d.]+) MiB \| \d+ \| [\d.]+ MiB \|$", out, re.M)}
    assert "bytes per checkpoint (2 ranks, ZeRO-3, fp32; lean" in out and set(printed) == {"s1_adapter", "s2_lora"}
    cfg = load_config(config, overrides)
    estimates = {s.stage: s for s in checkpoint_sizes(cfg, skeleton(cfg), world_size=2)}
    for stage, step in (("s1_adapter", 3), ("s2_lora", 5)):
        ckpt = config.parent / "ckpt" / f"step_{step:07d}"
        weights = (ckpt / "model.safetensors").stat().st_size
        deepspeed = sum(f.stat().st_size for f in [*(ckpt / "ds").iterdir(), *ckpt.glob("zero_to_*.py")])
        assert estimates[stage].weights == weights, stage
        assert abs(estimates[stage].optimizer - deepspeed) < 0.03 * deepspeed, (stage, estimates[stage], deepspeed)
        for shown, actual in zip(printed[stage], (weights, deepspeed, weights + deepspeed)):
            assert abs(shown * 2**20 - actual) < 0.03 * actual, (stage, printed[stage], weights, deepspeed)
        assert estimates[stage].every_weight > 3 * weights  # the frozen encoder and LLM are not written


def test_the_offline_wandb_run_holds_stages_mixture_skips_metrics_and_hypotheses(finished):
    out = finished["out"]
    runs = offline_runs(out)
    assert len(runs) == 1, runs  # rank 0 only
    assert finished["stdout"].count("wandb: offline run in") == 1
    run = read_offline_run(runs[0])
    assert run.config["logging"]["run_name"] == "wandb_e2e" and run.config["stages"][1]["name"] == "s2_lora"
    # stage boundaries: a marker at each stage's first step; every logged step carries its stage
    assert run.values("stage/started") == {0: 0, 3: 1}
    assert run.values("stage/name") == {0: "s1_adapter", 3: "s2_lora"}
    assert run.values("stage/index") == {1: 0, 2: 0, 3: 0, 4: 1, 5: 1}
    curriculum = run.values("curriculum")[0].rows()
    assert [r["stage"] for r in curriculum] == ["s1_adapter", "s2_lora"]
    assert json.loads(curriculum[1]["group_lr"]) == {"adapter": 1e-12}
    # the mixture drawn, summed over both ranks: ASR only in stage 1, ASR + S2TT into English in stage 2
    mixed = {k.removeprefix("data/mixed/") for k in run.keys() if k.startswith("data/mixed/")}
    assert {"asr/en", "asr/de", "asr/zh"} <= mixed and mixed <= {"asr/en", "asr/de", "asr/zh", "s2tt/de-en",
                                                                 "s2tt/zh-en"}
    assert mixed & {"s2tt/de-en", "s2tt/zh-en"}
    logged = [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]
    samples = {r["step"]: r["samples"] for r in logged}
    drawn_s1 = sum(run.values(f"data/mixed/asr/{lang}").get(3, 0) for lang in ("en", "de", "zh"))
    assert drawn_s1 >= samples[1] + samples[2] + samples[3]  # what both ranks trained on, and the clips skipped
    s1_mixture = run.values("data/mixture")[3].rows()
    assert {r["task"] for r in s1_mixture} == {"asr"} and sum(r["share"] for r in s1_mixture) == pytest.approx(1)
    assert {r["task"] for r in run.values("data/mixture")[5].rows()} == {"asr", "s2tt"}
    # the skip counters: the clips over data.max_duration, counted per reason
    too_long = run.values("data/skipped/too_long")
    assert too_long and max(too_long.values()) > 0, sorted(run.keys())
    assert run.values("data/skipped_total")[3] >= too_long[3] > 0
    assert run.values("train/skipped_samples") == {r["step"]: r["skipped_samples"] for r in logged}
    # each evaluation (step 3, and the end): the per-language table as final.md has it, and hypotheses per language
    for step in (3, 5):
        table = run.values("eval/metrics")[step]
        assert isinstance(table, Table) and table.columns == ["task", "metric", "lang", "value", "n"]
        keys = {(r["task"], r["lang"]) for r in table.rows()}
        assert {("asr", "en"), ("asr", "de"), ("asr", "zh"), ("s2tt", "de→en"), ("s2tt", "zh→en")} <= keys
        assert ("asr", "average") in keys
        for lang in ("en", "de", "zh"):
            rows = run.values(f"eval/hypotheses/{lang}")[step].rows()
            assert rows and all(r["reference"] and "hypothesis" in r for r in rows)
            assert {r["task"] for r in rows} == ({"asr"} if lang == "en" else {"asr", "s2tt"})
    final = json.loads((out / "final.json").read_text())
    de = next(r for r in final["rows"] if r["task"] == "asr" and r.get("language") == "de")
    assert run.values(f"eval/asr/{de['metric']}/de")[5] == pytest.approx(de["value"])
    hyps = [json.loads(line) for line in (out / "final_hypotheses.jsonl").read_text().splitlines()]
    wandb_de = run.values("eval/hypotheses/de")[5].rows()
    for r in wandb_de:  # the same utterances and texts as the saved hypotheses
        saved = next(h for h in hyps if h["key"] == r["key"] and h["task"] == r["task"])
        assert (saved["reference"], saved["hypothesis"]) == (r["reference"], r["hypothesis"])


def snapshot(out: Path) -> dict[str, tuple[int, bytes]]:
    names = ["final.md", "final.json", "final_hypotheses.jsonl", "train_log.jsonl", "final/README.md",
             "final/part_final.json", "final/model.safetensors"]
    return {n: ((out / n).stat().st_mtime_ns, (out / n).read_bytes()) for n in names}


@pytest.mark.extended  # a variant of the resume paths the default run covers (a finished run resumed)
def test_a_rerun_of_a_finished_run_reports_it_and_reevaluate_evaluates_again(finished):
    out, config, overrides = finished["out"], finished["config"], finished["overrides"]
    before = snapshot(out)
    proc = run_ds(config, "--resume", *overrides)
    text = proc.stdout + proc.stderr
    assert proc.returncode == 0, text[-4000:]
    assert proc.stdout.count("[part] run already complete: all 2 stages (5 steps) are trained") == 1, text[-4000:]
    assert "Pass --reevaluate to evaluate the final model again" in proc.stdout
    table = (out / "final.md").read_text().rstrip()
    assert f"saved results of step 5 ({out / 'final.md'}" in proc.stdout and table in proc.stdout
    assert "evaluation at step" not in proc.stdout and "[part] step " not in proc.stdout  # nothing ran
    assert "[part] stage " not in proc.stdout  # no stage (model, engine) was even built
    assert snapshot(out) == before  # nothing rewritten
    assert len(offline_runs(out)) == 1  # and no empty wandb run left behind

    # The first evaluation decoded with a replica of the weights on each rank (eval.replicate, the default);
    # this one with the ZeRO-3 engine itself, ranks in lockstep: the same hypotheses.
    proc = run_ds(config, "--resume", "--reevaluate", *overrides, "eval.replicate=false")
    text = proc.stdout + proc.stderr
    assert proc.returncode == 0, text[-4000:]
    assert "run already complete at step 5; --reevaluate: evaluating the final model again" in proc.stdout
    assert "evaluation at step 5" in proc.stdout and "[part] step " not in proc.stdout  # evaluated, not trained
    after = snapshot(out)
    assert after["train_log.jsonl"] == before["train_log.jsonl"]
    for name in ("final.md", "final.json", "final_hypotheses.jsonl", "final/README.md"):
        assert after[name][0] > before[name][0], name  # written again
    assert json.loads(after["final.json"][1])["step"] == 5
    assert after["final/model.safetensors"][1] == before["final/model.safetensors"][1]  # the same weights
    hypotheses = [sorted(snap["final_hypotheses.jsonl"][1].decode().splitlines()) for snap in (before, after)]
    assert len(hypotheses[0]) >= 8 and hypotheses[1] == hypotheses[0]
    runs = offline_runs(out)
    assert len(runs) == 2 and set(read_offline_run(runs[1]).values("eval/metrics")) == {5}
    # and --reevaluate alone is refused before anything starts
    proc = subprocess.run([sys.executable, "train.py", "--config", str(config), "--reevaluate"], cwd=REPO, env=env(),
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "--reevaluate evaluates a finished run again: use it with --resume" in proc.stderr
    assert re.search(r"usage: train.py", proc.stderr)
