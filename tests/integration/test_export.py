"""`python -m part export`: a trained model directory as a self-contained Hugging Face directory.

Models saved from the tiny models with non-zero LoRA weights (so that merging them changes the LLM): the default
readout, the vocabulary readout over a frame vocabulary (as the demo's model), and the other encoder families.
They are exported through the command's `main`, then loaded in a fresh interpreter whose sys.path holds no
repository directory (tests/integration/hf_generate.py, one run for all of them), where AutoModel and
AutoProcessor with trust_remote_code must load them without importing `part`, and greedy `generate` must give
the token ids `python -m part infer`'s `transcribe` gives on the same real clips.
"""

from __future__ import annotations

import ast
import contextlib
import io
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch
from conftest import AIFF, FLAC, IGNORE_INPUTS_EMBEDS_WARNING, OGG, REPO, WAV, call_main
from safetensors.torch import load_file

from part.cli.export import main
from part.hf_export.exporter import TEMPLATE, TEMPLATE_FILES, ExportError, resolve_source

pytestmark = IGNORE_INPUTS_EMBEDS_WARNING

TOKENS = 16  # greedy steps compared: enough for the penalties and the suppressed tokens to act
FAMILIES = ("wav2vec2", "hubert", "wavlm", "wav2vec2-bert")
EXTENDED_FAMILIES = ("hubert", "wavlm", "wav2vec2-bert")  # wav2vec2's code path covers most of theirs
# name -> (clips, task, language, target); OGG (17.9 s) is batched with WAV (2.7 s), as transcribe batches them
JOBS = {"embeddings": ([OGG, FLAC, WAV], "asr", "de", None),
        "vocabulary": ([FLAC, WAV, AIFF], "s2tt", "de", "en"),
        # the demo's LLM family (Gemma 3: scaled embeddings, tied head, sliding-window layers), vocabulary readout
        "gemma": ([OGG, WAV], "s2tt", "es", "en")}
JOBS.update({family: ([WAV, FLAC], "asr", "en", None) for family in FAMILIES})


def jobs_run(config: pytest.Config) -> list[str]:
    """The jobs this run covers: the extended families only with --extended."""
    extended = config.getoption("--extended")
    return [name for name in JOBS if extended or name not in EXTENDED_FAMILIES]


def waves() -> dict[str, np.ndarray]:
    from part.data.audio import load_audio

    return {path: load_audio(path) for path in (OGG, FLAC, WAV, AIFF)}


def save_trained(tiny_models: Path, out: Path, encoder: Path, **model_fields) -> Path:
    """A model directory as training writes it, with every LoRA B matrix random (zero would merge to nothing); the
    LLM is `tiny_models`' (its llm/ directory)."""
    from part.config import AdapterConfig, EncoderConfig, LLMConfig, LoraConfig, ModelConfig
    from part.model.speech_llm import SpeechLLM
    from part.model.tokenizer import load_tokenizer

    adapter = model_fields.pop("adapter", {})
    cfg = ModelConfig(encoder=EncoderConfig(pretrained=str(encoder)),
                      adapter=AdapterConfig(hidden=64, layers=1, heads=4, **adapter),
                      llm=LLMConfig(pretrained=str(tiny_models / "llm"), lora=LoraConfig(rank=4, alpha=8)),
                      **model_fields)
    tok = load_tokenizer(str(tiny_models / "llm"))
    torch.manual_seed(0)
    model = SpeechLLM(cfg, tok)
    with torch.no_grad():
        for name, param in model.llm.named_parameters():
            if "lora_B" in name:
                param.normal_(0.0, 0.05)
    model.save_pretrained(out, tok)
    return out


@pytest.fixture(scope="module")
def trained(tiny_models, tiny_gemma_models, corpus, tmp_path_factory, request) -> dict[str, Path]:
    from tiny_encoders import build_tiny_encoder

    from part.config import AlignmentConfig, ReadoutConfig
    from part.model.tokenizer import load_tokenizer
    from part.objectives.frame_vocabulary import write_frame_vocabulary

    root = tmp_path_factory.mktemp("trained")
    lines = (corpus / "tokenizer_text.txt").read_text(encoding="utf-8").splitlines()[:200]

    def readout(models: Path, name: str) -> AlignmentConfig:  # over the tokens of the corpus' first lines
        tok = load_tokenizer(str(models / "llm"))
        vocabulary = root / f"frame_vocabulary_{name}.json"
        write_frame_vocabulary(vocabulary, [i for line in lines for i in tok(line, add_special_tokens=False)
                                            ["input_ids"]])
        return AlignmentConfig(vocabulary=str(vocabulary), readout=ReadoutConfig(temperature=0.2))

    dirs = {"embeddings": save_trained(tiny_models, root / "embeddings", tiny_models / "whisper"),
            "vocabulary": save_trained(tiny_models, root / "vocabulary", tiny_models / "whisper",
                                       alignment=readout(tiny_models, "vocabulary")),
            "gemma": save_trained(tiny_gemma_models, root / "gemma", tiny_gemma_models / "whisper",
                                  alignment=readout(tiny_gemma_models, "gemma"))}
    for family in (name for name in jobs_run(request.config) if name in FAMILIES):
        encoder = build_tiny_encoder(family, root / f"encoder_{family}")
        dirs[family] = save_trained(tiny_models, root / family, encoder)
    return dirs


@pytest.fixture(scope="module")
def exported(trained, tmp_path_factory) -> dict[str, tuple[Path, str]]:
    """name -> (exported directory, the command's stderr)."""
    root = tmp_path_factory.mktemp("exported")
    out = {}
    for name, src in trained.items():
        err = io.StringIO()
        with contextlib.redirect_stderr(err):
            code = main([str(src), str(root / name)])
        assert code == 0, err.getvalue()
        out[name] = (root / name, err.getvalue())
    return out


def batches_of(paths: list[str], clips: dict[str, np.ndarray]) -> list[list[str]]:
    """`transcribe`'s batches of `paths` at batch size 2: longest clips first."""
    order = sorted(paths, key=lambda p: -len(clips[p]))
    return [order[k : k + 2] for k in range(0, len(order), 2)]


def start_hf_generate(exported: dict, clips: dict[str, np.ndarray], root: Path) -> subprocess.Popen:
    """hf_generate.py on every exported directory, in a fresh interpreter (`-I`: no PYTHONPATH, no script
    directory on sys.path), writing its arrays to `root`."""
    for path, wave in clips.items():
        np.save(root / f"{Path(path).stem}.npy", wave)
    native, rate = sf.read(FLAC, dtype="float32", always_2d=True)
    np.save(root / "native.npy", native.mean(axis=1))
    jobs = [{"name": name, "dir": str(exported[name][0]), "task": task, "language": language, "target": target,
             "max_new_tokens": TOKENS,
             "batches": [[str(root / f"{Path(p).stem}.npy") for p in batch] for batch in batches_of(paths, clips)]}
            for name, (paths, task, language, target) in JOBS.items() if name in exported]
    spec = {"repository": str(REPO), "jobs": jobs,
            "resample": {"dir": str(exported["embeddings"][0]), "native": str(root / "native.npy"), "rate": rate,
                         "resampled": str(root / f"{Path(FLAC).stem}.npy")}}
    (root / "jobs.json").write_text(json.dumps(spec))
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(HF_MODULES_CACHE=str(root / "modules"), HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    return subprocess.Popen([sys.executable, "-I", str(REPO / "tests/integration/hf_generate.py"),
                             str(root / "jobs.json"), str(root)], cwd=root, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


@pytest.fixture(scope="module")
def compared(trained, exported, tmp_path_factory) -> dict:
    """hf_generate.py's report and the folder of its arrays (`report`, `arrays`), and, per job, what
    `python -m part infer` computes (`reference`): each clip's token ids and text, the batches with their features
    and audio frames, the prompt's ids. The fresh process runs while this one computes the reference."""
    from part.inference import transcribe
    from part.model.speech_llm import SpeechLLM

    clips = waves()
    arrays = tmp_path_factory.mktemp("hf_generate")
    proc = start_hf_generate(exported, clips, arrays)
    try:
        reference = {}
        for name in trained:
            paths, task, language, target = JOBS[name]
            model, tok = SpeechLLM.from_pretrained(trained[name])
            model.eval()
            records = transcribe(model, tok, paths, task, language, target, batch_size=2, max_new_tokens=TOKENS)
            batches, encoded = batches_of(paths, clips), []
            with torch.no_grad():
                for batch in batches:
                    features, frames = model.audio_features([clips[p] for p in batch])
                    audio, lengths = model.encode_audio(features, frames)
                    encoded.append((features, audio, lengths))
            prompt = tok(model.prompt_format.prompt(task, language, target), add_special_tokens=False)["input_ids"]
            reference[name] = {"ids": {r["audio"]: r["token_ids"] for r in records},
                               "texts": {r["audio"]: r["text"] for r in records}, "batches": batches,
                               "encoded": encoded, "prompt_ids": prompt}
        out, err = proc.communicate(timeout=600)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0, err[-4000:]
    return {"report": json.loads(out.splitlines()[-1]), "arrays": arrays, "reference": reference}


# ---------------------------------------------------------------- the directory


def test_export_writes_a_self_contained_directory(trained, exported):
    out, err = exported["vocabulary"]
    for name in ("config.json", "generation_config.json", "model.safetensors", "processor_config.json",
                 "tokenizer.json", "tokenizer_config.json", *TEMPLATE_FILES):
        assert (out / name).is_file(), name
    assert not (out.parent / "vocabulary.partial").exists()
    for line in ("[export] loading", "[export] merged LoRA (rank 4, alpha 8) into 16 LLM weight matrices",
                 "[export] writing weights:", "[export] done in"):
        assert line in err, err

    from part.model.speech_llm import SpeechLLM

    model, tok = SpeechLLM.from_pretrained(trained["vocabulary"])
    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == "part_speech_llm"
    assert config["auto_map"]["AutoModel"] == config["auto_map"]["AutoModelForCausalLM"] \
        == "modeling_part.PartSpeechLLMForConditionalGeneration"
    assert config["encoder_config"]["model_type"] == "whisper" and config["llm_config"]["model_type"] == "qwen2"
    assert config["llm_config"]["vocab_size"] == len(tok)
    assert config["adapter"] == {"downsample": 4, "kind": "transformer", "hidden": 64, "layers": 1, "heads": 4,
                                 "readout": "vocabulary", "readout_temperature": 0.2, "readout_top_k": 16}
    assert config["audio_token_id"] == model.audio_token_id
    assert config["frame_vocabulary_size"] == len(model.objectives[0].token_ids) > 100
    generation = json.loads((out / "generation_config.json").read_text())
    assert generation["eos_token_id"] == [tok.convert_tokens_to_ids("<|im_end|>")]
    assert (generation["no_repeat_ngram_size"], generation["repetition_penalty"]) == (4, 1.1)
    assert generation["suppress_tokens"] == model.suppressed_token_ids and generation["max_new_tokens"] == 128
    processor = json.loads((out / "processor_config.json").read_text())
    assert processor["prompt_before"] + processor["task_messages"]["asr"].replace("{source}", "German") \
        + processor["prompt_after"] == model.prompt_format.prompt("asr", "de")

    # LoRA merged by hand from the source's weights: W + B A alpha / r
    source = load_file(str(trained["vocabulary"] / "model.safetensors"))
    weights = load_file(str(out / "model.safetensors"))
    base = "llm.base_model.model.model.layers.1.self_attn.q_proj"
    merged = source[f"{base}.base_layer.weight"] + source[f"{base}.lora_B.default.weight"] \
        @ source[f"{base}.lora_A.default.weight"] * (8 / 4)
    assert torch.allclose(weights["llm.model.layers.1.self_attn.q_proj.weight"], merged, atol=1e-6)
    assert not torch.allclose(merged, source[f"{base}.base_layer.weight"], atol=1e-3)
    assert not any("lora" in k or "base_layer" in k for k in weights)
    assert "llm.lm_head.weight" not in weights  # the tiny LLM's head is tied: transformers ties it on loading
    assert torch.equal(weights["frame_token_ids"], model.objectives[0].token_ids)
    assert torch.equal(weights["encoder.layers.0.fc1.weight"], source["encoder.layers.0.fc1.weight"])


def test_the_demos_llm_family_exports_with_its_own_config_and_one_copy_of_its_tied_head(exported):
    out, _ = exported["gemma"]
    config = json.loads((out / "config.json").read_text())
    assert config["llm_config"]["model_type"] == "gemma3_text"
    assert "sliding_attention" in config["llm_config"]["layer_types"]
    weights = load_file(str(out / "model.safetensors"))
    assert "llm.lm_head.weight" not in weights and "llm.model.embed_tokens.weight" in weights


def test_the_modelling_code_imports_only_torch_and_transformers(exported):
    out, _ = exported["embeddings"]
    allowed = {"__future__", "copy", "types", "warnings", "math", "numpy", "torch", "transformers"}
    for name in TEMPLATE_FILES:
        text = (out / name).read_text()
        assert text == (TEMPLATE / name).read_text()
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, ast.Import):
                roots = {alias.name.split(".")[0] for alias in node.names}
            elif isinstance(node, ast.ImportFrom):
                roots = {"." if node.level else node.module.split(".")[0]}
            else:
                continue
            assert roots <= allowed | {".", "scipy"}, (name, roots)


# ---------------------------------------------------------------- loaded without part


def test_loads_in_a_fresh_process_without_part(compared, pytestconfig):
    report = compared["report"]
    assert report["part_imported"] == []
    assert set(report["jobs"]) == set(jobs_run(pytestconfig))
    job = report["jobs"]["embeddings"]
    assert (job["model_class"], job["processor_class"]) == ("PartSpeechLLMForConditionalGeneration",
                                                            "PartSpeechProcessor")
    assert report["resampled_features_equal"]  # 22.05 kHz in, resampled as part.data.audio does


@pytest.mark.parametrize("name", [pytest.param(name, marks=[pytest.mark.extended] if name in EXTENDED_FAMILIES else [])
                                  for name in JOBS])
def test_greedy_generate_gives_part_infer_token_ids(name, compared):
    """The same features, the same audio frames, the same prompt ids and the same generated ids (and text)."""
    arrays = compared["arrays"]
    job, expected = compared["report"]["jobs"][name], compared["reference"][name]
    assert job["prompt_ids"] == expected["prompt_ids"]
    for b, (batch, (features, audio, lengths)) in enumerate(zip(expected["batches"], expected["encoded"])):
        assert np.array_equal(np.load(arrays / f"{name}_{b}_features.npy"), features.numpy())
        assert job["audio_lengths"][b] == lengths.tolist()
        frames = np.load(arrays / f"{name}_{b}_frames.npy")
        assert np.allclose(frames, audio.numpy(), atol=1e-5), np.abs(frames - audio.numpy()).max()
        assert job["ids"][b] == [expected["ids"][p] for p in batch]
    assert any(len(set(ids)) > 2 for ids in expected["ids"].values())  # not a constant, empty or one-token output
    order = [p for batch in expected["batches"] for p in batch]
    assert job["texts"] == [expected["texts"][p] for p in order]


# ---------------------------------------------------------------- the command


def test_help_and_bad_inputs_exit_2(trained, exported, tmp_path, capsys):
    code, out, _ = call_main(main, ["--help"], capsys)
    assert code == 0 and "python -m part export" in out and "AutoModel.from_pretrained" in out
    cases = [
        ([str(tmp_path / "nowhere"), str(tmp_path / "a")], "nowhere: no such directory"),
        ([str(tmp_path), str(tmp_path / "b")], "missing part_model.json"),
        ([str(trained["embeddings"]), str(exported["embeddings"][0])], "exists and is not empty"),
        ([str(trained["embeddings"]), str(tmp_path / "c"), "--dtype", "int8"], "invalid choice"),
    ]
    # a model whose slot the modelling code cannot read as training did (a compressed readout): refused by name
    compressed = tmp_path / "compressed"
    compressed.mkdir()
    for item in trained["vocabulary"].iterdir():
        (compressed / item.name).symlink_to(item)
    settings = json.loads((trained["vocabulary"] / "part_model.json").read_text())
    settings["alignment"]["readout"]["compress"] = True
    (compressed / "part_model.json").unlink()
    (compressed / "part_model.json").write_text(json.dumps(settings))
    cases.append(([str(compressed), str(tmp_path / "d")], "model.alignment.readout.compress=true"))
    for argv, message in cases:
        code, out, err = call_main(main, argv, capsys)
        assert code == 2 and message in err and "Traceback" not in err, (argv, err)
        assert out == ""
    assert not any((tmp_path / name).exists() for name in "abd")


def test_sources_and_dtype(trained, tmp_path, capsys):
    """A run's output directory exports its final/, a checkpoint directory the step `latest` names."""
    run = tmp_path / "run"
    run.mkdir()
    (run / "final").symlink_to(trained["embeddings"])
    assert resolve_source(run) == run / "final"
    checkpoints = tmp_path / "ckpt"
    checkpoints.mkdir()
    (checkpoints / "step_0000007").symlink_to(trained["embeddings"])
    (checkpoints / "latest").write_text("step_0000007")
    assert resolve_source(checkpoints) == checkpoints / "step_0000007"
    with pytest.raises(ExportError, match="missing"):
        resolve_source(run / "final" / "tokenizer")
    code, _, err = call_main(main, [str(checkpoints), str(tmp_path / "bf16"), "--dtype", "bfloat16"], capsys)
    assert code == 0, err
    weights = load_file(str(tmp_path / "bf16" / "model.safetensors"))
    assert {t.dtype for t in weights.values()} == {torch.bfloat16}
    assert json.loads((tmp_path / "bf16" / "config.json").read_text())["dtype"] == "bfloat16"
