"""Transcription (asr) and translation (s2tt) of audio files with a trained Speech LLM directory.

`--model` directories are what training writes (`<output_dir>/final` or `<checkpoint dir>/step_N`):
model.safetensors, part_model.json and tokenizer/. Files are sorted by length and batched so padding stays small;
results come back in input order. The command line is `python -m part infer` (part/cli/infer.py).
"""

from __future__ import annotations

import contextlib
import json
import sys
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import soundfile as sf
import torch

from part.data.audio import AudioDecodeError, load_audio
from part.features import SAMPLE_RATE

MODEL_FILES = ("part_model.json", "model.safetensors", "tokenizer")


class InferError(RuntimeError):
    """A problem with an input file, a list file or the model directory; the message names it."""


# ---------------------------------------------------------------- inputs


def read_inputs(items: list[str]) -> list[str]:
    """Audio paths from the command line: `@file` items are expanded to the paths listed in that file."""
    paths: list[str] = []
    for item in items:
        if not item.startswith("@"):
            paths.append(item)
            continue
        list_file = Path(item[1:])
        try:
            lines = list_file.read_text(encoding="utf-8").splitlines()
        except (OSError, UnicodeDecodeError) as exc:
            raise InferError(f"cannot read list file {list_file}: {exc}") from None
        paths.extend(s for s in (line.strip() for line in lines) if s and not s.startswith("#"))
    return paths


def check_task(task: str, language: str, target: str | None) -> None:
    if task not in ("asr", "s2tt"):
        raise ValueError(f"task must be asr or s2tt, not '{task}'")
    if task == "s2tt" and not target:
        raise ValueError("s2tt needs a target language (--target), e.g. --target en")
    if task == "s2tt" and target == language:
        raise ValueError(f"the target language must differ from the spoken language ({language}); use --task asr")
    if task == "asr" and target:
        raise ValueError("a target language (--target) is only for --task s2tt")


def max_audio_seconds(model) -> float:
    """The longest clip the model's encoder takes: Whisper's window (30 s), the same 30 s for the other families."""
    return model.encoder_family.max_seconds


def probe(path: str, max_seconds: float | None) -> float:
    """Duration from the file's header (cheap: nothing is decoded); raises InferError naming the file."""
    p = Path(path)
    if not p.exists():
        raise InferError(f"{path}: no such file")
    if not p.is_file():
        raise InferError(f"{path}: not a file")
    try:
        info = sf.info(str(p))
    except Exception as exc:  # soundfile raises several types; all mean "unreadable"
        raise InferError(f"{path}: cannot decode audio ({exc})") from None
    seconds = info.frames / info.samplerate if info.samplerate > 0 and 0 < info.frames < 2**62 else 0.0
    if max_seconds is not None and seconds > max_seconds:
        raise InferError(too_long(path, seconds, max_seconds))
    return seconds


def too_long(path: str, seconds: float, max_seconds: float) -> str:
    return (f"{path}: {seconds:.2f} s of audio is longer than the encoder's {max_seconds:g} s window "
            "(cut it into shorter clips)")


# ---------------------------------------------------------------- model


def check_model_dir(model_dir: str | Path) -> Path:
    """Fails with a message saying what a model directory must contain (and where one might be) when it does not."""
    path = Path(model_dir)
    if not path.is_dir():
        raise InferError(f"--model {path}: no such directory")
    missing = [name for name in MODEL_FILES if not (path / name).exists()]
    if missing:
        hint = ""
        if (path / "latest").is_file():
            hint = f"; this looks like a checkpoint directory: use {path / (path / 'latest').read_text().strip()}"
        elif (path / "final" / "part_model.json").is_file():
            hint = f"; did you mean {path / 'final'}?"
        raise InferError(
            f"--model {path} is not a trained model directory (missing {', '.join(missing)}): expected "
            f"{', '.join(MODEL_FILES)}/, as training writes to <output_dir>/final and <checkpoint dir>/step_N{hint}"
        )
    try:
        cfg = json.loads((path / "part_model.json").read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise InferError(f"{path / 'part_model.json'}: unreadable ({exc})") from None
    # The architecture is rebuilt from the pretrained directories named there before model.safetensors is loaded.
    for key in ("encoder", "llm"):
        base = (cfg.get(key) or {}).get("pretrained")
        if base and not Path(base).exists() and (Path(base).is_absolute() or base.startswith(".")
                                                 or base.count("/") != 1):  # "org/name" may be a hub id
            raise InferError(
                f"{path / 'part_model.json'}: {key}.pretrained '{base}' does not exist (relative paths resolve "
                f"against the current directory, {Path.cwd()}). The model is rebuilt from it before "
                "model.safetensors is loaded: run from the directory training ran in, or correct the path"
            )
    return path


def load_model(model_dir: str | Path, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32):
    """(model, tokenizer) from a trained model directory, in eval mode on `device` in `dtype`."""
    from part.model.speech_llm import SpeechLLM

    path = check_model_dir(model_dir)
    try:
        model, tokenizer = SpeechLLM.from_pretrained(path)
    except (OSError, ValueError) as exc:
        raise InferError(f"cannot load the model in {path}: {exc}") from exc
    return model.to(device=device, dtype=dtype).eval(), tokenizer


# ---------------------------------------------------------------- inference


def transcribe(model, tokenizer, paths: list[str], task: str, language: str, target: str | None = None,
               beams: int = 1, max_new_tokens: int = 128, batch_size: int = 8, device: str | torch.device = "cpu",
               dtype: torch.dtype = torch.float32, skip_bad: bool = False, progress: bool = False,
               frames: bool = False, on_result: Callable[[int, dict], None] | None = None) -> list[dict]:
    """Transcribes (asr) or translates (s2tt, into `target`) the audio files `paths`, spoken in `language`.

    Returns one dict per path, in input order: audio (the path as given), task, language, target, text,
    duration (seconds of decoded audio) and token_ids (the generated ids, end token excluded). A missing,
    undecodable or too long (> 30 s) file raises InferError naming it; with `skip_bad` it is reported on stderr
    and its dict has `error` (the reason) and text None. The model is moved to `device`/`dtype` and put in eval
    mode. `on_result(i, record)` is called as each file's result is ready (batches run longest first). With
    `frames`, each dict also has `frames`: the adapter frames' own reading (`FrameAlignment.greedy_reading`) as text.
    """
    from part.data.batching import collate
    from part.data.samples import Sample, encode_text

    check_task(task, language, target)
    if beams < 1 or max_new_tokens < 1 or batch_size < 1:
        raise ValueError("beams, max_new_tokens and batch_size must be at least 1")
    device = torch.device(device)
    was_training = model.training
    model.to(device=device, dtype=dtype).eval()
    max_seconds = max_audio_seconds(model)
    feature_extractor = model.audio_features  # the encoder family's
    prompt = model.prompt_format.prompt(task, language, target)  # the model's own chat template
    results: list[dict | None] = [None] * len(paths)

    def finish(i: int, record: dict) -> None:
        results[i] = record
        if on_result is not None:
            on_result(i, record)

    def bad(i: int, message: str) -> None:
        if not skip_bad:
            raise InferError(message)
        print(f"warning: skipping {message}", file=sys.stderr, flush=True)
        finish(i, {"audio": paths[i], "task": task, "language": language, "target": target, "text": None,
                   "duration": None, "token_ids": None, "error": message})

    lengths = []
    for i, path in enumerate(paths):  # header checks first: a bad file fails before any decoding
        try:
            lengths.append((probe(path, max_seconds), i))
        except InferError as exc:
            bad(i, str(exc))
    # Longest first: a batch that does not fit in memory shows up at once, not at the end of a long list.
    order = [i for _, i in sorted(lengths, key=lambda x: (-x[0], x[1]))]
    batches = [order[k : k + batch_size] for k in range(0, len(order), batch_size)]
    start, done_files, done_seconds = time.time(), 0, 0.0
    last_report = start
    if frames:
        from part.objectives.frames import frame_alignment

        reader = frame_alignment(model)
    try:
        with torch.inference_mode():
            for b, members in enumerate(batches):
                samples = []
                for i in members:
                    try:
                        data = Path(paths[i]).read_bytes()
                        wave = load_audio(data, name=paths[i])  # decoded here to check it; collate decodes again
                    except AudioDecodeError as exc:  # its message names the file
                        bad(i, str(exc))
                        continue
                    except OSError as exc:
                        bad(i, f"{paths[i]}: cannot read ({exc})")
                        continue
                    seconds = len(wave) / SAMPLE_RATE
                    if seconds > max_seconds:
                        bad(i, too_long(paths[i], seconds, max_seconds))
                        continue
                    sample = Sample(task, language, target, key=str(i), shard=paths[i], prompt=prompt, target="",
                                    duration=seconds, audio=data)
                    encode_text(tokenizer, sample, model.end_token_id)
                    samples.append(sample)
                if not samples:
                    continue
                counters: Counter = Counter()
                with contextlib.redirect_stdout(sys.stderr):  # collate's warnings must not mix with the results
                    batch = collate(samples, feature_extractor, counters, layout=model.layout_spec())
                if batch is None or len(batch.meta) != len(samples):  # cannot happen: every clip decoded above
                    raise RuntimeError(f"collate dropped clips of a batch ({dict(counters)})")
                batch = batch.to(device, dtype)
                outputs = model.generate(batch, max_new_tokens=max_new_tokens, num_beams=beams)
                readouts = reader.greedy_reading(model, batch) if frames else [None] * len(samples)
                for sample, ids, readout in zip(samples, outputs, readouts):
                    record = {
                        "audio": sample.shard, "task": task, "language": language, "target": target,
                        "text": tokenizer.decode(ids, skip_special_tokens=True).strip(),
                        "duration": round(sample.duration, 3), "token_ids": ids,
                    }
                    if frames:
                        record["frames"] = tokenizer.decode(readout, skip_special_tokens=True).strip()
                    finish(int(sample.key), record)
                done_files += len(samples)
                done_seconds += sum(s.duration for s in samples)
                now = time.time()
                if progress and (now - last_report >= 2.0 or b + 1 == len(batches)):
                    last_report = now
                    print(f"[infer] {done_files}/{len(order)} files, {done_seconds:.0f} s of audio in "
                          f"{now - start:.0f} s ({done_seconds / max(now - start, 1e-9):.1f}x real time)",
                          file=sys.stderr, flush=True)
    finally:
        model.train(was_training)
    return results  # type: ignore[return-value]
