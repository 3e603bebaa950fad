"""part.convert.whisper_ct2 and the `python -m part convert` command: CTranslate2 Whisper -> transformers, on the
Whisper-base wheels pinned in requirements.txt.

The wheels are a hard requirement (no skip): without them every test here fails with a pointer to
`bash launch/setup_env.sh`. The conversion runs once per session, through the command line (the `ct2_files` and
`converted` fixtures are in tests/conftest.py: the alignment tests use the converted model too).
"""

from __future__ import annotations

import contextlib
import csv
import dataclasses
import shutil
import struct
import time
from pathlib import Path

import pytest
import torch

from data_prep.text_sources import default_shared_dir
from part.cli import convert
from part.convert import whisper_ct2
from part.convert.whisper_ct2 import CT2FormatError, CT2SourceError, read_ct2_model, whisper_parts

SPEECH = default_shared_dir() / "speech"
MAX_CLIP_S = 30.0  # Whisper's window; longer clips would need long-form decoding
# Whisper-base on these FLEURS clips measured 10.4 (en), 17.9 (de), 33.9 (fr) % WER; the bounds leave headroom.
MAX_WER = {"en": 25.0, "de": 35.0, "fr": 50.0}


@pytest.fixture(scope="session")
def ct2_model(ct2_files) -> whisper_ct2.CT2Model:
    return read_ct2_model(ct2_files.model)


@pytest.fixture(scope="session")
def whisper(converted):
    from transformers import WhisperForConditionalGeneration, WhisperProcessor

    out, _ = converted
    return WhisperForConditionalGeneration.from_pretrained(out).eval(), WhisperProcessor.from_pretrained(out)


def test_conversion_is_quick_and_loads_as_the_project_encoder(converted):
    from part.config import EncoderConfig
    from part.model.speech_llm import build_encoder

    out, seconds = converted
    print(f"conversion took {seconds:.1f} s")
    assert seconds < 120, f"conversion took {seconds:.0f} s"
    assert {"model.safetensors", "config.json", "generation_config.json", "tokenizer.json"} <= {
        p.name for p in out.iterdir()
    }
    encoder = build_encoder(EncoderConfig(pretrained=str(out)))
    assert encoder.config.d_model == 512 and len(encoder.layers) == 6 and encoder.config.num_mel_bins == 80
    assert encoder.conv1.weight.dtype == torch.float32


def test_every_encoder_tensor_comes_from_the_file(converted, ct2_model):
    from transformers import WhisperConfig, WhisperModel
    from transformers.models.whisper.modeling_whisper import WhisperEncoder

    out, _ = converted
    parts = whisper_parts(ct2_model)
    loaded = WhisperModel.from_pretrained(out, dtype=torch.float32).get_encoder().state_dict()
    torch.manual_seed(0)
    fresh = WhisperEncoder(WhisperConfig.from_pretrained(out)).state_dict()
    prefix = "model.encoder."
    mapped = {n.removeprefix(prefix): src for n, src in parts.sources.items() if n.startswith(prefix)}
    # Every parameter of the encoder was assigned from a variable, and none is left over.
    assert set(mapped) == set(loaded) == set(fresh)
    for name, value in loaded.items():
        assert torch.equal(value, parts.params[f"model.encoder.{name}"].float()), name
        assert not torch.equal(value, fresh[name]), f"{name} equals a fresh random init"
    # Spot checks against the raw file, independent of the mapping code: the fused q;k;v rows and the plain ones.
    qkv_w = ct2_model.get("encoder/layer_3/self_attention/linear_0/weight").float()
    qkv_b = ct2_model.get("encoder/layer_3/self_attention/linear_0/bias").float()
    assert torch.equal(loaded["layers.3.self_attn.q_proj.weight"], qkv_w[:512])
    assert torch.equal(loaded["layers.3.self_attn.k_proj.weight"], qkv_w[512:1024])
    assert torch.equal(loaded["layers.3.self_attn.v_proj.weight"], qkv_w[1024:])
    assert torch.equal(loaded["layers.3.self_attn.v_proj.bias"], qkv_b[1024:])
    for param, variable in [
        ("conv2.weight", "encoder/conv2/weight"),
        ("embed_positions.weight", "encoder/position_encodings/encodings"),
        ("layers.5.final_layer_norm.weight", "encoder/layer_5/ffn/layer_norm/gamma"),
    ]:
        assert torch.equal(loaded[param], ct2_model.get(variable).float()), param
    # The whole model, decoder included, is filled from the file; the output projection is the tied embedding.
    weights = [n for n, value in ct2_model.variables.items() if value.dim()]  # the rest are scalar settings
    assert set(parts.sources.values()) == set(weights)
    assert parts.tied and parts.sources["proj_out.weight"] == "decoder/embeddings/weight"


def _fleurs(language: str) -> list[dict]:
    with open(SPEECH / "transcripts.tsv", encoding="utf-8") as handle:
        rows = list(csv.DictReader(handle, delimiter="\t"))
    return [
        r
        for r in rows
        if r["provenance"] == "documented-public-dataset"
        and r["lang"] == language
        and r["id"].startswith("fleurs_")
        and float(r["duration_s"]) <= MAX_CLIP_S
    ]


@contextlib.contextmanager
def _threads(n: int):
    # Token-by-token decoding is many tiny matmuls: extra threads only add synchronisation (on a busy 2-core
    # machine they made each step about 10x slower), so decoding runs on one thread.
    before = torch.get_num_threads()
    torch.set_num_threads(min(n, before))
    try:
        yield
    finally:
        torch.set_num_threads(before)


def transcribe(whisper, clips: list[Path], language: str) -> list[str]:
    from part.data.audio import load_audio

    model, processor = whisper
    audio = [load_audio(path) for path in clips]
    features = processor.feature_extractor(audio, sampling_rate=16000, return_tensors="pt").input_features
    with torch.inference_mode():
        encoded = model.get_encoder()(features)
        with _threads(1):
            ids = model.generate(
                encoder_outputs=encoded, language=language, task="transcribe", num_beams=1, do_sample=False
            )
    return [text.strip() for text in processor.batch_decode(ids, skip_special_tokens=True)]


@pytest.mark.parametrize(
    "language", ["en", pytest.param("de", marks=pytest.mark.extended), pytest.param("fr", marks=pytest.mark.extended)]
)
def test_converted_model_transcribes_fleurs(whisper, language):
    from part.evaluation.metrics import error_rate

    rows = _fleurs(language)
    assert len(rows) >= 8, f"expected the FLEURS {language} clips in {SPEECH}"
    start = time.perf_counter()
    hyps = transcribe(whisper, [SPEECH / r["path"] for r in rows], language)
    result = error_rate([r["transcript"] for r in rows], hyps, language)
    print(f"{language}: WER {result['value']:.1f}% on {result['n']} FLEURS clips ({time.perf_counter() - start:.0f} s)")
    for row, hyp in zip(rows, hyps):
        print(f"  {row['id']}: {hyp}")
    assert result["value"] <= MAX_WER[language], (language, result, hyps)


# ------------------------------------------------------------------------------------------------ corrupt files


def _variable_at(model: whisper_ct2.CT2Model, offset: int) -> tuple[str, int]:
    """The variable whose data covers byte `offset` of the stream, and where its data starts."""
    for name, start in model.offsets.items():
        if start <= offset < start + model.variables[name].numel() * model.variables[name].element_size():
            return name, start
    raise AssertionError(f"no variable data at byte {offset}")


def test_truncated_model_bin_names_the_file_and_variable(ct2_files, ct2_model, tmp_path):
    cut = 3_000_000  # inside the token embedding
    src = tmp_path / "ct2"
    src.mkdir()
    with open(ct2_files.model[0], "rb") as handle:
        (src / "model.bin").write_bytes(handle.read(cut))
    for side in (ct2_files.config, ct2_files.vocabulary):
        shutil.copy(side, src / side.name)
    name, start = _variable_at(ct2_model, cut)
    needed = ct2_model.variables[name].numel() * ct2_model.variables[name].element_size()
    expected = (
        f"{src / 'model.bin'}: truncated while reading variable {name!r} (needs {needed} bytes, {cut - start} left)"
    )
    with pytest.raises(CT2FormatError) as err:
        read_ct2_model(src / "model.bin")
    assert str(err.value) == expected
    # The command line reports the same, without a traceback.
    assert convert.main(["whisper-ct2", str(src), str(tmp_path / "out")]) == 2


def test_truncated_second_part_names_both_files_and_the_variable(ct2_files, ct2_model, tmp_path, capsys):
    part1, part2 = ct2_files.model
    src = tmp_path / "ct2"
    src.mkdir()
    (src / "model.bin.part1").symlink_to(part1)  # the big part is read in place, not copied
    keep = 20_000_000
    with open(part2, "rb") as handle:
        (src / "model.bin.part2").write_bytes(handle.read(keep))
    for side in (ct2_files.config, ct2_files.vocabulary):
        shutil.copy(side, src / side.name)
    name, _ = _variable_at(ct2_model, part1.stat().st_size + keep)
    assert convert.main(["whisper-ct2", str(src), str(tmp_path / "out")]) == 2
    message = capsys.readouterr().err
    files = f"{src / 'model.bin.part1'} + {src / 'model.bin.part2'}"
    assert f"{files}: truncated while reading variable {name!r}" in message


def _header_prefix(ct2_files, size: int = 1 << 16) -> bytearray:
    with open(ct2_files.model[0], "rb") as handle:
        return bytearray(handle.read(size))


def _corrupt_dims(data: bytearray) -> None:
    at = data.index(b"decoder/embeddings/weight\x00") + len(b"decoder/embeddings/weight\x00")
    assert data[at] == 2  # rank, then the dims
    struct.pack_into("<I", data, at + 1, 51866)


def _corrupt_dtype(data: bytearray) -> None:
    at = data.index(b"decoder/embeddings/weight\x00") + len(b"decoder/embeddings/weight\x00")
    data[at + 1 + 2 * 4] = 9


def _corrupt_version(data: bytearray) -> None:
    struct.pack_into("<I", data, 0, 99)


def _corrupt_name_length(data: bytearray) -> None:
    at = data.index(b"decoder/alibi\x00") - 2  # the uint16 length before the second variable's name
    struct.pack_into("<H", data, at, 0)


@pytest.mark.parametrize(
    "corrupt, message",
    [
        (
            _corrupt_dims,
            "corrupt header of variable 'decoder/embeddings/weight': shape [51866, 512] of float16 needs 53110784 "
            "bytes but the file declares 53109760",
        ),
        (_corrupt_dtype, "variable 'decoder/embeddings/weight' has unknown dtype id 9"),
        (_corrupt_version, "unsupported binary version 99"),
        (_corrupt_name_length, "corrupt the name of variable #2 of 214 (after 'decoder/activation')"),
    ],
    ids=["dims", "dtype", "version", "name"],
)
def test_corrupt_header_names_the_file_and_variable(ct2_files, tmp_path, corrupt, message):
    data = _header_prefix(ct2_files)
    corrupt(data)
    path = tmp_path / "model.bin"
    path.write_bytes(bytes(data))
    with pytest.raises(CT2FormatError) as err:
        read_ct2_model(path)
    assert str(err.value).startswith(f"{path}: ")
    assert message in str(err.value)


# ------------------------------------------------------------------------------------------------ mapping errors


def test_unknown_variable_is_an_error_naming_it(ct2_model):
    # an unknown layer part, a cross-attention in an encoder layer, an unknown top-level name
    for extra in ("encoder/layer_0/self_attention/rotary", "encoder/layer_2/attention/linear_0/weight", "decoder/foo"):
        model = dataclasses.replace(ct2_model, variables={**ct2_model.variables, extra: torch.zeros(4)})
        with pytest.raises(CT2FormatError, match=f"variable '{extra}' has no counterpart"):
            whisper_parts(model)


def test_missing_encoder_variable_is_an_error_naming_the_parameter(ct2_model):
    variables = dict(ct2_model.variables)
    del variables["encoder/layer_2/ffn/linear_1/bias"]
    parts = whisper_parts(dataclasses.replace(ct2_model, variables=variables))
    with pytest.raises(CT2FormatError, match=r"1 of them in the encoder: model\.encoder\.layers\.2\.fc2\.bias"):
        whisper_ct2.build_whisper(parts)


def test_int8_weights_are_dequantized(ct2_model):
    # CTranslate2's int8 scheme: one scale per output row, q = round(w * 127 / max|w|).
    name = "encoder/layer_1/ffn/linear_0/weight"
    weight = ct2_model.get(name).float()
    scale = 127.0 / weight.abs().amax(dim=1)
    quantized = torch.round(weight * scale[:, None]).to(torch.int8)
    variables = {**ct2_model.variables, name: quantized, f"{name}_scale": scale}
    parts = whisper_parts(dataclasses.replace(ct2_model, variables=variables))
    restored = parts.params["model.encoder.layers.1.fc1.weight"]
    assert torch.all((restored - weight).abs() <= 0.5 / scale[:, None] + 1e-6)


def test_missing_packages_fail_with_the_setup_hint():
    with pytest.raises(CT2SourceError, match="launch/setup_env.sh"):
        whisper_ct2.ct2_files_in_packages(["part_no_such_model_package"])


def test_cli_help_and_argument_errors(capsys):
    with pytest.raises(SystemExit) as exit_help:
        convert.main(["whisper-ct2", "--help"])
    assert exit_help.value.code == 0
    assert "--from-packages" in capsys.readouterr().out
    with pytest.raises(SystemExit) as exit_usage:
        convert.main(["whisper-ct2", "out"])  # neither SRC_DIR nor --from-packages
    assert exit_usage.value.code == 2
