"""End to end through the real `deepspeed` launcher: 2 ranks, ZeRO-3, gloo on CPU, the tiny models.

One reference run trains a four-stage curriculum; the other tests compare against it: exact parameter
changes per stage, optimizer state following the trainable set, kill -9 + resume, resume at a boundary,
non-finite losses, a two-node launch resumed on one node, resumes on another number of ranks, and a run
interrupted again and again that ends exactly as the uninterrupted one. Ranks follow their launcher, and one run
at a time owns a checkpoint directory.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import psutil
import pytest
import torch
from conftest import REPO, write_config
from safetensors.torch import load_file

from part.config import load_config
from part.exit_codes import ExitCode
from part.model.groups import group_parameters
from part.model.speech_llm import SpeechLLM
from part.model.tokenizer import load_tokenizer
from part.train.checkpoint import (
    read_data_state,
    read_trainer_state,
    step_dir_name,
    step_of,
    verify_sums,
    write_sums,
)
from part.train.launcher import deepspeed_command, free_port

pytestmark = pytest.mark.slow

STAGES = """\
  - {name: s1_adapter, steps: 5, tasks: {asr: 1.0}, trainable: [adapter], lr: 6.0e-3, warmup_steps: 1}
  - {name: s2_encoder_top, steps: 3, tasks: {asr: 1.0}, trainable: [adapter, encoder.top.1], lr: 1.0e-3,
     warmup_steps: 0}
  - name: s3_lora
    steps: 3
    tasks: {asr: 0.5, s2tt: 0.5}
    translation_targets: [en]
    trainable: [adapter, llm.lora]
    lr: 1.0e-3
    warmup_steps: 0
  - name: s4_text_joins
    steps: 2
    tasks: {asr: 0.4, s2tt: 0.3, mt: 0.2, text: 0.1}
    translation_targets: [en]
    trainable: [llm.lora]
    lr: 1.0e-3
    warmup_steps: 0
"""
BOUNDARIES = {"s1_adapter": (0, 5), "s2_encoder_top": (5, 8), "s3_lora": (8, 11), "s4_text_joins": (11, 13)}


def env() -> dict:
    return dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", PYTHONPATH=str(REPO))


# train.py under the collective guard: a collective given a tensor off the rank's device fails the run
GUARDED = "tests/integration/guarded_train.py"


def deepspeed_cmd(config: Path, *extra: str, nproc: int = 2, script: str = GUARDED) -> list[str]:
    launcher = str(Path(sys.executable).parent / "deepspeed")
    return deepspeed_command(script, ["--config", str(config), *extra], nproc, launcher=launcher)


def run_ds(config: Path, *extra: str, timeout: int = 600, script: str = GUARDED):
    proc = subprocess.run(deepspeed_cmd(config, *extra, script=script), cwd=REPO, env=env(), capture_output=True,
                          text=True, timeout=timeout)
    return proc


def losses(out_dir: Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in map(json.loads, (out_dir / "train_log.jsonl").read_text().splitlines())}


def processes_of_group(pgid: int) -> list[str]:
    """The live processes (not zombies) of process group `pgid`, described."""
    found = []
    for proc in psutil.process_iter(["pid", "status", "cmdline"]):
        try:
            if os.getpgid(proc.pid) == pgid and proc.info["status"] != psutil.STATUS_ZOMBIE:
                found.append(f"{proc.pid}: {' '.join(proc.info['cmdline'] or [])[:160]}")
        except (ProcessLookupError, psutil.Error):
            continue
    return found


def start_run(config: Path, *extra: str, script: str = GUARDED, nproc: int = 2) -> subprocess.Popen:
    """The launcher in a session of its own: its process group is the run's (launch.py, ranks, workers)."""
    return subprocess.Popen(deepspeed_cmd(config, *extra, script=script, nproc=nproc), cwd=REPO, env=env(),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)


def assert_nothing_left(run: subprocess.Popen, wait_s: float = 10) -> None:
    """No process of `run` (started by start_run) runs any more; the stragglers are killed if one does."""
    deadline = time.time() + wait_s
    while left := processes_of_group(run.pid):
        if time.time() > deadline:
            os.killpg(run.pid, signal.SIGKILL)
            pytest.fail(f"processes of the run left behind: {left}")
        time.sleep(0.5)


class RunOutput:
    """A run's output, read by a thread, so that every wait on it has a deadline (a silent, hung run fails the
    test instead of blocking it)."""

    def __init__(self, run: subprocess.Popen):
        self.run = run
        self.lines: list[str] = []
        self.times: list[float] = []  # when each line arrived
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()

    def _read(self) -> None:
        for line in self.run.stdout:
            self.times.append(time.time())
            self.lines.append(line)

    def seen_at(self, text: str) -> float | None:
        """When `text` first appeared in the output (None: not yet)."""
        return next((t for t, line in zip(list(self.times), list(self.lines)) if text in line), None)

    def until_exit(self, timeout: float) -> int:
        """The run's exit code; past `timeout` seconds the run's process group is killed and the test fails."""
        try:
            return self.run.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(self.run.pid, signal.SIGKILL)
            pytest.fail(f"the run did not end within {timeout:.0f} s:\n" + "".join(self.lines[-60:]))

    def wait_for(self, text: str, timeout: float = 400) -> None:
        deadline = time.time() + timeout
        while not any(text in line for line in list(self.lines)):
            if time.time() > deadline or not self._thread.is_alive() and not any(text in x for x in self.lines):
                pytest.fail(f"no {text!r} in the run's output:\n" + "".join(self.lines[-60:]))
            time.sleep(0.2)

    def text(self) -> str:
        self._thread.join(timeout=120)
        return "".join(self.lines)


@pytest.fixture(scope="module")
def reference(corpus, tiny_models, tmp_path_factory):
    """The uninterrupted run every other test compares with."""
    root = tmp_path_factory.mktemp("reference")
    config = write_config(root / "c.yaml", corpus, tiny_models, STAGES, "")
    # the profiler window (steps 4-7) is cut at stage 1's end (step 5)
    proc = run_ds(config, "checkpoint.keep=10", "eval.per_language=2", "logging.profile_start=3",
                  "logging.profile_steps=4")
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    assert "terminate called" not in proc.stdout + proc.stderr
    # both ranks ran under the collective guard and it checked the run's traffic (ours and DeepSpeed's)
    checked = [int(n) for n in re.findall(r"collective guard: (\d+) collectives checked", proc.stdout)]
    assert len(checked) == 2 and min(checked) > 100, checked
    port = proc.args[proc.args.index("--master_port") + 1]
    return {"root": root, "config": config, "stdout": proc.stdout, "ckpt": root / "ckpt", "out": root / "out",
            "port": port}


def test_every_step_of_every_stage_has_bounded_host_syncs(reference):
    """The sync guard's count of the reference run (ZeRO-3, batches of up to 4 clips; adapter, encoder, LoRA and
    text stages, the last of 2 steps): the bounds of tests/integration/test_sync_e2e.py, part's in every step."""
    from test_sync_e2e import assert_bounded, part_reads

    assert_bounded(reference["stdout"], [start for start, _ in BOUNDARIES.values()], 13, part_reads())


def test_cpu_allreduce_segments_do_not_outlive_the_run(reference):
    # DeepSpeed's CPU backend makes a 66 MB /dev/shm segment per rank and never unlinks it; the trainer
    # unlinks its own once every peer has mapped it, so runs (even killed ones) leave nothing behind
    if not Path("/dev/shm").is_dir():
        pytest.skip("no /dev/shm")
    left = [p.name for p in Path("/dev/shm").glob(f"deepspeed_allreduce_buffer_*_{reference['port']}_*")]
    assert left == []


def test_trains_all_stages_and_loss_falls(reference):
    lost = losses(reference["out"])
    assert sorted(lost) == list(range(1, 14))
    s1 = [lost[s] for s in range(1, 6)]
    assert s1[-1] < s1[0] - 0.05, s1  # adapter-only ASR learns within stage 1
    for name in BOUNDARIES:
        assert f"'{name}'" in reference["stdout"]
    final = json.loads((reference["out"] / "final.json").read_text())
    assert {r["task"] for r in final["rows"]} == {"asr", "s2tt"}
    # the model card: sources, stages, data, the final table, the command; the resolved config loads again
    card = (reference["out"] / "final" / "README.md").read_text()
    assert "whisper" in card and "| s3_lora | 3 | asr 0.5, s2tt 0.5 | adapter, llm.lora |" in card
    assert "| en |" in card and "| asr | wer | average |" in card and "train_config.yaml" in card
    assert load_config(reference["out"] / "final" / "train_config.yaml").stages[2].name == "s3_lora"
    final_md = (reference["out"] / "final.md").read_text()
    # wer, cer, bleu; then wer and cer again in the table of each normaliser side by side
    assert final_md.count("average") == 5 and "### WER/CER under each normaliser" in final_md
    assert "BLEU: sacrebleu corpus BLEU on the raw cased text, `nrefs:1|case:mixed|eff:no|tok:13a|" in final_md
    assert "WER/CER on text normalised by `part` (`eval.normalizer`)" in card


def test_profile_window_on_every_rank(reference):
    profile = reference["out"] / "profile"
    assert sorted(p.name for p in profile.iterdir()) == [
        f"rank{r}_steps4-5.{kind}" for r in (0, 1) for kind in ("top.txt", "trace.json")]
    for rank in (0, 1):
        table = (profile / f"rank{rank}_steps4-5.top.txt").read_text()
        assert table.startswith(f"steps 4-5, rank {rank}, sorted by self_cpu_time_total")
        events = json.loads((profile / f"rank{rank}_steps4-5.trace.json").read_text())["traceEvents"]
        assert any(e.get("name") in ("aten::addmm", "aten::mm") for e in events)


def weights(ckpt: Path, step: int) -> dict[str, torch.Tensor]:
    """What the checkpoint's weight file holds."""
    return load_file(str(ckpt / f"step_{step:07d}" / "model.safetensors"))


def every_weight(ckpt: Path, step: int) -> dict[str, torch.Tensor]:
    """The checkpoint's model, the weights it references read from their pretrained directories."""
    model, _ = SpeechLLM.from_pretrained(ckpt / f"step_{step:07d}")
    return {name: tensor.clone() for name, tensor in model.state_dict().items()}


def test_each_checkpoint_holds_what_its_stages_trained(reference, tiny_models):
    """The tiny encoder and LLM come from pretrained directories: a checkpoint holds the adapter and LoRA (no
    directory has them) and, from stage 2 on, the encoder's top layer; the rest is referenced by digest."""
    cfg = load_config(reference["config"])
    model = SpeechLLM(cfg.model, load_tokenizer(cfg.model.llm.pretrained))
    every = set(model.state_dict())
    own = {n for n in every if n.startswith("adapter.") or "lora_" in n}
    top = set(group_parameters(model, "encoder.top.1"))
    assert own and top
    for step in (3, 5, 6, 8, 9, 11, 12, 13):
        held = weights(reference["ckpt"], step)
        assert set(held) == (own if step <= 5 else own | top), step
        assert {t.dtype for t in held.values()} == {torch.float32}  # precision fp32: the training dtype
        sources = json.loads((reference["ckpt"] / step_dir_name(step) / "weight_sources.json").read_text())["sources"]
        assert {s["module"]: s["directory"] for s in sources} == {"encoder": str((tiny_models / "whisper").resolve()),
                                                                  "llm": str((tiny_models / "llm").resolve())}
        assert set().union(*(s["keys"] for s in sources)) == every - set(held)
        assert all("model.safetensors" in s["files"] and "config.json" in s["files"] for s in sources)
    # final/ holds every weight, the trained ones as the last checkpoint has them, and references nothing
    final = load_file(str(reference["out"] / "final" / "model.safetensors"))
    assert set(final) == every and not (reference["out"] / "final" / "weight_sources.json").exists()
    last = every_weight(reference["ckpt"], 13)
    assert all(torch.equal(final[n], last[n]) for n in every)


def test_each_stage_changes_exactly_its_groups(reference, tiny_models):
    cfg = load_config(reference["config"])
    model = SpeechLLM(cfg.model, load_tokenizer(cfg.model.llm.pretrained))
    ckpt = reference["ckpt"]
    pairs = {"s1_adapter": (3, 5), "s2_encoder_top": (5, 8), "s3_lora": (8, 11), "s4_text_joins": (11, 13)}
    for stage in cfg.stages:
        before, after = (every_weight(ckpt, s) for s in pairs[stage.name])
        trainable = {n for g in stage.trainable for n in group_parameters(model, g)}
        changed = {n for n in before if not torch.equal(before[n], after[n])}
        frozen_changed = changed - trainable
        assert not frozen_changed, f"{stage.name}: frozen parameters changed: {sorted(frozen_changed)[:5]}"
        unchanged = trainable - changed
        # LoRA's A gets no gradient while B is still zero, so allow that one exception in its first steps
        assert not {n for n in unchanged if "lora_A" not in n}, f"{stage.name}: not trained: {sorted(unchanged)[:5]}"
        assert changed, stage.name


def test_optimizer_state_follows_trainable_set(reference):
    """fp32 master weights + Adam moments: 12 bytes per trainable parameter, split over the ranks."""
    counts = {}
    for line in reference["stdout"].splitlines():
        if "[part] stage " in line and "trainable" in line:
            name = line.split("'")[1]
            counts[name] = int(line.split("trainable ")[1].split(" params")[0].replace(",", ""))
    assert len(counts) == 4
    for stage, step in (("s1_adapter", 5), ("s2_encoder_top", 8), ("s3_lora", 11), ("s4_text_joins", 13)):
        files = list((reference["ckpt"] / f"step_{step:07d}" / "ds").glob("*optim_states.pt"))
        assert len(files) == 2  # one partition per rank
        size = sum(f.stat().st_size for f in files)
        expected = 12 * counts[stage]
        assert abs(size - expected) < 0.1 * expected + 200_000, (stage, size, expected)


def rank_process(launcher: subprocess.Popen, local_rank: int) -> psutil.Process | None:
    for child in psutil.Process(launcher.pid).children(recursive=True):
        try:
            if f"--local_rank={local_rank}" in " ".join(child.cmdline()):
                return child
        except psutil.NoSuchProcess:
            continue
    return None


def test_kill_9_then_resume_matches_uninterrupted(reference, tmp_path):
    """kill -9 of rank 1 during step 7 (last checkpoint: step 6, inside stage 2); --resume redoes step 7 and
    continues across two stage boundaries with the losses of the uninterrupted run."""
    config = tmp_path / "c.yaml"
    config.write_text(reference["config"].read_text().replace(str(reference["root"]), str(tmp_path)))
    launcher = start_run(config, "eval.per_language=0")
    RunOutput(launcher).wait_for("[part] step 7/")
    victim = rank_process(launcher, 1)
    assert victim is not None
    os.kill(victim.pid, signal.SIGKILL)
    launcher.wait(timeout=120)
    assert launcher.returncode != 0
    assert (tmp_path / "ckpt" / "latest").read_text().strip() in ("step_0000006", "step_0000007")
    resumed_from = int((tmp_path / "ckpt" / "latest").read_text().strip().split("_")[1])
    logged_before = [json.loads(line)["step"] for line in (tmp_path / "out" / "train_log.jsonl").open()]
    assert max(logged_before) > resumed_from  # steps after the checkpoint were logged, then lost

    proc = run_ds(config, "--resume", "eval.per_language=0")
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    assert f"resuming from {tmp_path / 'ckpt' / f'step_{resumed_from:07d}'}" in proc.stdout
    assert f"[part] step {resumed_from + 1}/" in proc.stdout  # only the steps since the checkpoint are redone
    assert f"[part] step {resumed_from}/" not in proc.stdout
    # the log holds every step once: the resume dropped the lost steps' records before logging them again
    logged = [json.loads(line)["step"] for line in (tmp_path / "out" / "train_log.jsonl").open()]
    assert logged == list(range(1, 14))
    got, ref = losses(tmp_path / "out"), losses(reference["out"])
    for step in range(1, 14):
        assert got[step] == pytest.approx(ref[step], rel=1e-5, abs=1e-6), (step, got[step], ref[step])


def test_resume_exactly_at_a_stage_boundary(reference, tiny_models, tmp_path):
    """From the checkpoint written at the end of stage 1 (step 5): the stage-2 engine is built from it with a
    fresh optimizer, exactly as the uninterrupted run switched stages."""
    config = tmp_path / "c.yaml"
    config.write_text(reference["config"].read_text().replace(str(reference["root"]), str(tmp_path)))
    (tmp_path / "ckpt").mkdir()
    shutil.copytree(reference["ckpt"] / "step_0000005", tmp_path / "ckpt" / "step_0000005")
    # a fresh start over another run's checkpoints is refused (its pruning would mix the two runs)
    proc = run_ds(config, "eval.per_language=0", timeout=300)
    assert proc.returncode == 2 and "holds checkpoints of an earlier run" in proc.stderr, proc.stderr[-3000:]
    assert not (tmp_path / "out" / "train_log.jsonl").exists()
    # (a --resume whose config changed where a resume cannot follow is refused the same way, exit 2 with the
    # field named: tests/unit/test_resume_check.py holds those cases)
    # A pretrained directory the checkpoint reads its frozen weights from, changed since: every rank refuses
    # before any step, naming the file (here the LLM's directory is a copy, which the checkpoint names instead)
    llm = tmp_path / "llm"
    shutil.copytree(tiny_models / "llm", llm)
    ckpt = tmp_path / "ckpt" / "step_0000005"
    sources = (ckpt / "weight_sources.json").read_text()
    assert str((tiny_models / "llm").resolve()) in sources
    (ckpt / "weight_sources.json").write_text(sources.replace(str((tiny_models / "llm").resolve()),
                                                              str(llm.resolve())))
    write_sums(ckpt)
    changed = llm.resolve() / "model.safetensors"
    data = bytearray(changed.read_bytes())
    data[-1] ^= 0xFF
    changed.write_bytes(bytes(data))
    proc = run_ds(config, "--resume", "eval.per_language=0", timeout=300)
    assert proc.returncode == 2, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert f"{changed} in pretrained directory {llm.resolve()} has changed since the model was saved" in proc.stderr
    assert "[part] step " not in proc.stdout
    (ckpt / "weight_sources.json").write_text(sources)
    write_sums(ckpt)
    # no `latest` pointer (it was not copied): --resume takes the newest complete checkpoint, after its hashes
    proc = run_ds(config, "--resume", "eval.per_language=0")
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    assert "latest is missing; using the newest complete checkpoint, step_0000005" in proc.stdout
    got, ref = losses(tmp_path / "out"), losses(reference["out"])
    assert sorted(got) == list(range(6, 14))
    for step in got:
        assert got[step] == pytest.approx(ref[step], rel=1e-5, abs=1e-6), step
    end = load_file(str(tmp_path / "ckpt" / "step_0000013" / "model.safetensors"))
    ref_end = weights(reference["ckpt"], 13)
    assert all(torch.allclose(end[n], ref_end[n], atol=1e-6) for n in ref_end)

    # A crash after the last checkpoint but before the final evaluation/export: --resume does only those.
    shutil.rmtree(tmp_path / "out" / "final")
    proc = run_ds(config, "--resume", "eval.per_language=1")
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    assert (tmp_path / "out" / "final" / "model.safetensors").exists()
    assert json.loads((tmp_path / "out" / "final.json").read_text())["step"] == 13
    assert sorted(losses(tmp_path / "out")) == list(range(6, 14))  # no step trained again


def test_non_finite_loss_is_skipped_then_stops(corpus, tiny_models, tmp_path):
    stages = "  - {name: s1, steps: 6, tasks: {asr: 1.0}, trainable: [adapter], lr: 1.0e-3, warmup_steps: 1}"
    config = write_config(tmp_path / "c.yaml", corpus, tiny_models, stages)
    # The loss of steps 1, 3 and 4 (0-based) is made NaN by a callback the test entry point installs.
    proc = run_ds(config, "--nan-steps", "1,3,4", "optim.max_bad_steps=2", "eval.per_language=0",
                  "checkpoint.every=100", script="tests/integration/nan_loss_train.py")
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0
    assert "step 1: non-finite loss, step skipped (1 in a row)" in out
    assert "2 consecutive non-finite losses at step 4; stopping" in out
    logged = losses(tmp_path / "out")
    assert sorted(logged) == [1, 3] and all(v == v for v in logged.values())  # steps 0 and 2 trained, finite
    assert "terminate called" not in out


FAILED_SAVE_STAGE = "  - {name: s1, steps: 5, tasks: {asr: 1.0}, trainable: [adapter], lr: 1.0e-3, warmup_steps: 1}"


def test_a_failed_save_at_a_stage_boundary_stops_every_rank(corpus, tiny_models, tmp_path):
    """Rank 0 cannot write a checkpoint's weights (a full disk): both ranks drop that checkpoint together and keep
    the previous one as `latest`; at the stage boundary (the next stage is built from it) both stop with exit 4.
    No `.partial` directory is left."""
    config = write_config(tmp_path / "c.yaml", corpus, tiny_models, FAILED_SAVE_STAGE, "")
    proc = run_ds(config, "--fail-steps", "5", "checkpoint.every=2", "checkpoint.keep=5", "eval.per_language=0",
                  script="tests/integration/save_fault_train.py")
    out = proc.stdout + proc.stderr
    assert proc.returncode == 4, out[-4000:]
    assert "[rank 0] checkpoint at step 5 failed: RuntimeError: injected" in out
    assert "the stage-boundary checkpoint at step 5 could not be written" in out
    names = sorted(p.name for p in (tmp_path / "ckpt").iterdir())
    assert names == ["latest", "step_0000002", "step_0000004"], names
    assert (tmp_path / "ckpt" / "latest").read_text().strip() == "step_0000004"


@pytest.mark.extended  # the same agreement between ranks as the boundary case, which the default run keeps
def test_a_failed_save_inside_a_stage_keeps_the_previous_checkpoint_and_training_goes_on(corpus, tiny_models,
                                                                                          tmp_path):
    config = write_config(tmp_path / "c.yaml", corpus, tiny_models, FAILED_SAVE_STAGE, "")
    proc = run_ds(config, "--fail-steps", "4", "checkpoint.every=2", "checkpoint.keep=5", "eval.per_language=0",
                  script="tests/integration/save_fault_train.py")
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    assert "[rank 0] checkpoint at step 4 failed: RuntimeError: injected" in proc.stdout + proc.stderr
    names = sorted(p.name for p in (tmp_path / "ckpt").iterdir())
    assert names == ["latest", "step_0000002", "step_0000005"], names
    assert sorted(losses(tmp_path / "out")) == [1, 2, 3, 4, 5]


def test_non_finite_weights_stop_the_run_and_are_never_saved(corpus, tiny_models, tmp_path):
    """The weights gathered for the second checkpoint (step 4) hold a NaN: nothing of it is written, both ranks
    stop with exit 5, step 2's checkpoint stays `latest`, and no final/ is exported."""
    stages = "  - {name: s1, steps: 5, tasks: {asr: 1.0}, trainable: [adapter], lr: 1.0e-3, warmup_steps: 1}"
    config = write_config(tmp_path / "c.yaml", corpus, tiny_models, stages, "")
    proc = run_ds(config, "--nan-saves", "2", "checkpoint.every=2", "eval.per_language=0",
                  script="tests/integration/save_fault_train.py")
    out = proc.stdout + proc.stderr
    assert proc.returncode == 5, out[-4000:]
    assert "the weights at step 4 are not finite; nothing was saved" in out
    assert sorted(p.name for p in (tmp_path / "ckpt").iterdir()) == ["latest", "step_0000002"]
    assert not (tmp_path / "out" / "final").exists()


def test_two_nodes_then_single_node_resume(corpus, tiny_models, tmp_path):
    """Two launchers (--no_ssh, node ranks 0 and 1, hostfile 127.0.0.1 + localhost) train as 2 nodes x 1 rank
    with shards split by node; a single-node 2-rank run resumes the checkpoint."""
    stages = "  - {name: s1, steps: 5, tasks: {asr: 1.0}, trainable: [adapter], lr: 1.0e-3, warmup_steps: 1}"
    config = write_config(tmp_path / "c.yaml", corpus, tiny_models, stages)
    hostfile = tmp_path / "hostfile"
    hostfile.write_text("127.0.0.1 slots=1\nlocalhost slots=1\n")
    port = str(free_port())
    bin_dir = str(Path(sys.executable).parent)
    nodes = []
    for node_rank in (0, 1):
        node_env = {**env(), "NO_SSH": "1", "NODE_RANK": str(node_rank), "HOSTFILE": str(hostfile),
                    "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": port, "CONFIG": str(config),
                    "PATH": bin_dir + os.pathsep + os.environ["PATH"]}
        nodes.append(subprocess.Popen(["bash", "launch/multi_node.sh", "stages.0.steps=3", "eval.per_language=0"],
                                      cwd=REPO, env=node_env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                      text=True))
    outputs = [p.communicate(timeout=400)[0] for p in nodes]
    assert all(p.returncode == 0 for p in nodes), outputs[0][-3000:] + outputs[1][-3000:]
    ckpt = tmp_path / "ckpt" / "step_0000003"
    assert (ckpt / "data_rank0.json").exists() and (ckpt / "data_rank1.json").exists()
    # each node's rank read its own shards
    positions = [json.loads((ckpt / f"data_rank{r}.json").read_text()) for r in (0, 1)]
    workers = [set(p["workers"]) for p in positions]
    assert workers[0] and workers[1] and not workers[0] & workers[1]
    proc = run_ds(config, "--resume", "eval.per_language=0")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "resuming from" in proc.stdout and "step_0000003" in proc.stdout
    assert sorted(losses(tmp_path / "out")) == [1, 2, 3, 4, 5]  # 1-3 from the two nodes, 4-5 resumed


def sigterm_the_launch_script(reference, tmp_path) -> Path:
    """SIGTERM to launch/single_node.sh (what SLURM or Kubernetes send before preemption) inside stage 1: every rank
    writes a checkpoint at the next step boundary and stops, the script exits 6 (ExitCode.STOPPED, passed on by
    the launcher), and no process of the run is left. Returns the run's config."""
    config = tmp_path / "c.yaml"
    config.write_text(reference["config"].read_text().replace(str(reference["root"]), str(tmp_path)))
    launcher = Path(sys.executable).parent / "deepspeed"
    script_env = dict(env(), CONFIG=str(config), NPROC="2", PYTHON=sys.executable, DEEPSPEED=str(launcher))
    script = subprocess.Popen(["bash", "launch/single_node.sh", "eval.per_language=0"], cwd=REPO, env=script_env,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    output = RunOutput(script)
    output.wait_for("[part] step 4/")  # inside stage 1; its checkpoints are at steps 3 and 5
    script.send_signal(signal.SIGTERM)
    code = output.until_exit(120)
    out = output.text()
    assert code == ExitCode.STOPPED == 6, out[-4000:]
    assert out.count("SIGTERM: stopping after a checkpoint at the next step") == 2  # both ranks
    stopped = int(re.search(r"stopped by a signal at step (\d+)", out).group(1))
    assert stopped in (4, 5)
    assert (tmp_path / "ckpt" / "latest").read_text().strip() == f"step_{stopped:07d}"
    assert [json.loads(x)["step"] for x in (tmp_path / "out" / "train_log.jsonl").open()] == list(range(1, stopped + 1))
    time.sleep(1)
    orphans = [p.pid for p in psutil.process_iter(["cmdline"]) if str(config) in " ".join(p.info["cmdline"] or [])]
    assert not orphans, orphans
    return config


@pytest.mark.extended  # the raw launcher's SIGTERM test below is the default run's
def test_sigterm_to_the_launch_script_checkpoints_and_stops_every_rank(reference, tmp_path):
    sigterm_the_launch_script(reference, tmp_path)
    # the signal's checkpoint is one --resume takes: complete (its hashes), at the step it stopped, with both ranks'
    # data positions (resuming such a mid-stage checkpoint exactly: the kill -9 test)
    latest = tmp_path / "ckpt" / (tmp_path / "ckpt" / "latest").read_text().strip()
    assert verify_sums(latest) is None
    assert read_trainer_state(latest)["step"] == step_of(latest)
    assert read_data_state(latest, 0) and read_data_state(latest, 1)


@pytest.mark.extended  # resuming a mid-stage checkpoint is the kill -9 test's, in the default run
def test_sigterm_then_resume_matches_uninterrupted(reference, tmp_path):
    config = sigterm_the_launch_script(reference, tmp_path)
    proc = run_ds(config, "--resume", "eval.per_language=0")
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    got, ref = losses(tmp_path / "out"), losses(reference["out"])
    assert sorted(got) == list(range(1, 14))
    for step in range(1, 14):
        assert got[step] == pytest.approx(ref[step], rel=1e-5, abs=1e-6), (step, got[step], ref[step])


LONG_STAGE = "  - {name: s1, steps: 40, tasks: {asr: 1.0}, trainable: [adapter], lr: 1.0e-3, warmup_steps: 1}"


def test_sigterm_to_the_deepspeed_launcher_reaches_every_rank(corpus, tiny_gemma_models, tmp_path):
    """SIGTERM to the `deepspeed` process itself, which on one node forwards nothing to the ranks: every rank notices
    its launcher is gone, writes the checkpoint at the next step and exits 6 (launch.py reports it), the run's
    lock is released and no process of the run is left. With the demo's LLM family (Gemma 3)."""
    config = write_config(tmp_path / "c.yaml", corpus, tiny_gemma_models, LONG_STAGE)
    run = start_run(config, "eval.per_language=0")
    out = RunOutput(run)
    out.wait_for("[part] step 2/")
    os.kill(run.pid, signal.SIGTERM)  # the runner only
    signalled = time.time()
    assert run.wait(timeout=120) == -signal.SIGTERM
    text = out.text()
    assert time.time() - signalled < 60
    gone = f"the deepspeed launcher (pid {run.pid}) is gone: stopping after a checkpoint at the next step"
    # each rank watches on its own; one that reaches the agreed stop before its next poll does not print it
    assert text.count(gone) >= 1, text[-4000:]
    stopped = int(re.search(r"stopped by the launcher's end at step (\d+)", text).group(1))
    assert (tmp_path / "ckpt" / "latest").read_text().strip() == f"step_{stopped:07d}"
    assert verify_sums(tmp_path / "ckpt" / f"step_{stopped:07d}") is None
    assert "exits with return code = 6" in text  # launch.py saw the ranks stop with ExitCode.STOPPED
    assert_nothing_left(run)
    assert not (tmp_path / "ckpt" / "run.lock").exists()


@pytest.mark.extended  # the same watch as the runner's SIGTERM above, for the ranks' own parent; a second run
def test_a_second_run_is_refused_and_sigkill_of_launch_py_stops_every_rank(corpus, tiny_models, tmp_path):
    """While a run trains, a second run into its checkpoint.dir (--resume, one rank) is refused before any work,
    naming the first run's rank 0. Then DeepSpeed's launch.py (the ranks' parent) is killed and forwards nothing:
    every rank notices within a second, the ranks agree on a checkpoint at the next step and all of them are gone
    within 30 s."""
    config = write_config(tmp_path / "c.yaml", corpus, tiny_models, LONG_STAGE)
    run = start_run(config, "eval.per_language=0")
    out = RunOutput(run)
    out.wait_for("[part] step 2/")
    owner = rank_process(run, 0)
    second = subprocess.run(deepspeed_cmd(config, "--resume", "eval.per_language=0", nproc=1), cwd=REPO, env=env(),
                            capture_output=True, text=True, timeout=300)
    assert second.returncode == 2, second.stdout[-3000:] + second.stderr[-3000:]
    assert (f"{tmp_path / 'ckpt'} is in use by another run (host {socket.gethostname()}, pid {owner.pid}, "
            in second.stderr), second.stderr[-3000:]
    assert "resuming from" not in second.stdout and "[part] step" not in second.stdout
    steps = sum("[part] step " in line for line in out.lines)
    out.wait_for(f"[part] step {steps + 1}/")  # the first run goes on
    ranks = [rank_process(run, r) for r in (0, 1)]
    launch_py = ranks[0].parent()
    launch_py.kill()
    killed = time.time()
    psutil.wait_procs(ranks, timeout=60)
    assert time.time() - killed < 30
    text = out.text()
    assert text.count(f"DeepSpeed's launch.py (pid {launch_py.pid}) is gone: stopping after a checkpoint") == 2
    stopped = int(re.search(r"stopped by the launcher's end at step (\d+)", text).group(1))
    assert (tmp_path / "ckpt" / "latest").read_text().strip() == f"step_{stopped:07d}"
    assert_nothing_left(run)
    assert not (tmp_path / "ckpt" / "run.lock").exists()


def accumulate_two(tmp_path: Path) -> Path:
    """The CPU ZeRO-3 DeepSpeed config with 2 micro-batches per step (the YAML's optim.grad_accum_steps=2)."""
    ds = json.loads((REPO / "ds_configs" / "zero3_cpu.json").read_text())
    ds["gradient_accumulation_steps"] = 2
    path = tmp_path / "zero3_cpu_accum2.json"
    path.write_text(json.dumps(ds))
    return path


def worker_positions(ckpt: Path, ranks: int) -> dict[str, dict]:
    return {g: w for r in range(ranks) for g, w in read_data_state(ckpt, r)["workers"].items()}


@pytest.mark.extended  # three launcher runs (about 4 minutes)
def test_resume_on_another_number_of_ranks_continues_exactly(reference, tmp_path):
    """2 ranks -> 1 -> 2, inside stages. One rank with 2 loader workers and 2 micro-batches a step sees the same
    global batch as 2 ranks with 1 worker each (the same 2 data workers, regrouped), so with the optimizer state
    resharded the resumed runs continue the reference run exactly: the same losses, the same final weights and
    the same data positions, as the uninterrupted 2-rank run."""
    ref = losses(reference["out"])
    config = tmp_path / "c.yaml"
    config.write_text(reference["config"].read_text().replace(str(reference["root"]), str(tmp_path)))
    (tmp_path / "ckpt").mkdir()
    shutil.copytree(reference["ckpt"] / "step_0000003", tmp_path / "ckpt" / "step_0000003")  # inside stage 1
    one_rank = ["--resume", "eval.per_language=0", "data.num_workers=2", "optim.grad_accum_steps=2",
                f"ds_config={accumulate_two(tmp_path)}", "checkpoint.keep=10"]
    proc = subprocess.run(deepspeed_cmd(config, *one_rank, nproc=1), cwd=REPO, env=env(), capture_output=True,
                          text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    assert "the checkpoint was written by 2 rank(s), this run has 1" in proc.stdout
    assert "2 rank(s) x 1 loader worker(s) now run as 1 x 2: the same 2 data workers" in proc.stdout
    got = losses(tmp_path / "out")
    assert sorted(got) == list(range(4, 14))
    for step in got:
        assert got[step] == pytest.approx(ref[step], rel=1e-6, abs=1e-7), (step, got[step], ref[step])
    assert not list((tmp_path / "ckpt").glob("*universal*"))  # the conversion is removed once loaded
    single = tmp_path / "ckpt" / "step_0000006"  # inside stage 2, written by the one rank
    assert read_trainer_state(single)["world_size"] == 1
    assert worker_positions(single, 1) == worker_positions(reference["ckpt"] / "step_0000006", 2)

    # 1 -> 2: from the one rank's step 6, on 2 ranks with 1 worker each
    again = tmp_path / "again"
    again_config = again / "c.yaml"
    again.mkdir()
    again_config.write_text(reference["config"].read_text().replace(str(reference["root"]), str(again)))
    (again / "ckpt").mkdir()
    shutil.copytree(single, again / "ckpt" / "step_0000006")
    proc = run_ds(again_config, "--resume", "eval.per_language=0", "checkpoint.keep=10")
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    assert "the checkpoint was written by 1 rank(s), this run has 2" in proc.stdout
    got = losses(again / "out")
    assert sorted(got) == list(range(7, 14))
    for step in got:
        assert got[step] == pytest.approx(ref[step], rel=1e-6, abs=1e-7), (step, got[step], ref[step])
    for step in (8, 13):  # a boundary (the next stage's stream) and the end
        assert worker_positions(again / "ckpt" / step_dir_name(step), 2) == worker_positions(
            reference["ckpt"] / step_dir_name(step), 2)
    end, ref_end = weights(again / "ckpt", 13), weights(reference["ckpt"], 13)
    assert max(float((end[n] - ref_end[n]).abs().max()) for n in ref_end) < 1e-6


LOGGED_EXACTLY = ("step", "stage", "loss", "lr", "tokens", "samples", "audio_seconds", "flops", "skipped_samples")


@pytest.mark.extended  # four launcher runs (about 5 minutes)
def test_a_run_interrupted_again_and_again_ends_as_the_uninterrupted_one(reference, tmp_path):
    """Rank 0 dies inside the checkpoint write of step 6, rank 1 is killed -9 during a step, the `deepspeed`
    launcher gets SIGTERM: each time --resume goes on, and the run ends with the uninterrupted run's final weights
    and train_log, bit for bit (timings aside)."""
    config = tmp_path / "c.yaml"
    config.write_text(reference["config"].read_text().replace(str(reference["root"]), str(tmp_path)))
    ckpt = tmp_path / "ckpt"
    latest = lambda: (ckpt / "latest").read_text().strip()  # noqa: E731

    # 1. a crash while the step-6 checkpoint is being written: step 5's (the stage boundary) stays latest
    proc = run_ds(config, "--die-steps", "6", "eval.per_language=0", script="tests/integration/save_fault_train.py")
    assert proc.returncode != 0 and "[rank 0] dying while writing the checkpoint of step 6" in proc.stdout
    assert latest() == "step_0000005" and (ckpt / "step_0000006.partial").is_dir()

    # 2. kill -9 of rank 1 during a step
    run = start_run(config, "--resume", "eval.per_language=0")
    out = RunOutput(run)
    out.wait_for("[part] step 8/")
    os.kill(rank_process(run, 1).pid, signal.SIGKILL)
    run.wait(timeout=120)
    assert "resuming from " + str(ckpt / "step_0000005") in out.text()
    assert latest() in ("step_0000006", "step_0000007", "step_0000008")
    assert not (ckpt / "step_0000006.partial").exists()  # the dead save's leftovers are pruned
    assert_nothing_left(run)

    # 3. SIGTERM to the deepspeed launcher: the ranks stop at a step boundary with a checkpoint
    resumed = step_of(ckpt / latest())
    run = start_run(config, "--resume", "eval.per_language=0")
    out = RunOutput(run)
    out.wait_for(f"[part] step {resumed + 1}/")
    os.kill(run.pid, signal.SIGTERM)
    run.wait(timeout=120)
    stopped = int(re.search(r"stopped by the launcher's end at step (\d+)", out.text()).group(1))
    assert latest() == step_dir_name(stopped) and stopped < 13
    assert_nothing_left(run)

    # 4. to the end
    proc = run_ds(config, "--resume", "eval.per_language=0")
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    end, ref_end = weights(ckpt, 13), weights(reference["ckpt"], 13)
    assert sorted(end) == sorted(ref_end) and all(torch.equal(end[n], ref_end[n]) for n in ref_end)
    log = [json.loads(line) for line in (tmp_path / "out" / "train_log.jsonl").open()]
    ref_log = [json.loads(line) for line in (reference["out"] / "train_log.jsonl").open()]
    assert [{k: r.get(k) for k in LOGGED_EXACTLY} for r in log] == [
        {k: r.get(k) for k in LOGGED_EXACTLY} for r in ref_log]
