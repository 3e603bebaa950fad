"""Loads exported directories the way a user of transformers does, and decodes clips with them: run by
tests/integration/test_export.py in a fresh interpreter whose sys.path holds no repository directory.

    python -I tests/integration/hf_generate.py JOBS.json OUT_DIR

JOBS.json: {"repository": path, "jobs": [{"name", "dir", "task", "language", "target", "max_new_tokens",
"batches": [[clip.npy, ...], ...]}], "resample": {"dir", "native": clip.npy, "rate": Hz, "resampled": clip.npy}}.
The clips are 16 kHz float32 waveforms (`native`: the same clip at its own rate). Writes to OUT_DIR, per job and
batch, the processor's features and the model's audio frames (.npy), and prints one JSON line: per job the
generated ids of each batch, the prompt's ids and the frame counts; whether the native-rate clip's features equal
the 16 kHz clip's; and whether the training package was imported.
"""

import json
import sys
from pathlib import Path

import numpy as np
import torch
from transformers import AutoModel, AutoProcessor


def main(jobs_file: str, out_dir: str) -> None:
    spec = json.loads(Path(jobs_file).read_text())
    repository = str(Path(spec["repository"]).resolve())
    if any(Path(p or ".").resolve() == Path(repository) for p in sys.path):
        raise SystemExit(f"the repository {repository} is on sys.path: {sys.path}")
    out = Path(out_dir)
    report = {"jobs": {}}
    for job in spec["jobs"]:
        model = AutoModel.from_pretrained(job["dir"], trust_remote_code=True).eval()
        processor = AutoProcessor.from_pretrained(job["dir"], trust_remote_code=True)
        result = report["jobs"][job["name"]] = {"ids": [], "audio_lengths": [], "model_class": type(model).__name__,
                                                "processor_class": type(processor).__name__}
        for b, paths in enumerate(job["batches"]):
            inputs = processor([np.load(p) for p in paths], sampling_rate=16000, task=job["task"],
                               language=job["language"], target=job["target"])
            with torch.no_grad():
                frames, lengths = model.encode_audio(inputs["input_features"], inputs["feature_lengths"])
                ids = model.generate(**inputs, max_new_tokens=job["max_new_tokens"])
            np.save(out / f"{job['name']}_{b}_features.npy", inputs["input_features"].numpy())
            np.save(out / f"{job['name']}_{b}_frames.npy", frames.numpy())
            result["ids"].append(processor.cut_at_end(ids))
            result["texts"] = result.get("texts", []) + processor.batch_decode(ids)
            result["audio_lengths"].append(lengths.tolist())
            assert lengths.tolist() == model.audio_lengths(inputs["feature_lengths"]).tolist()
            result["prompt_ids"] = inputs["input_ids"][0].tolist()
    resample = spec["resample"]
    processor = AutoProcessor.from_pretrained(resample["dir"], trust_remote_code=True)
    native = processor(np.load(resample["native"]), sampling_rate=resample["rate"])["input_features"]
    resampled = processor(np.load(resample["resampled"]), sampling_rate=16000)["input_features"]
    report["resampled_features_equal"] = bool(torch.equal(native, resampled))
    report["part_imported"] = sorted(name for name in sys.modules if name == "part" or name.startswith("part."))
    print(json.dumps(report))


if __name__ == "__main__":
    main(*sys.argv[1:])
