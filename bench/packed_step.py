"""The packed training step against the padded one: shapes, padding and speed, in one run on this machine.

a. Shapes and padding at the large recipe's data settings (configs/part_large.yaml: window, batch bounds, row
   length, 128 mel bins, the adapter's stride) over --batches batches of a corpus: distinct encoder input shapes
   and LLM input shapes, LLM padding and audio padding, for the layouts part can run: one packed row (varlen
   flash attention), packed rows of the recipe's data.row_tokens and rows as long as the longest sample (sdpa and
   eager), and the padded layout (one sample per row, padded to the longest, audio to the longest clip).
b. Step speed on a real-depth, narrow model built here (a 28-layer Qwen2-style LLM and a 32-layer Whisper-style
   encoder, width 128, LoRA on every projection): samples/s of the packed step (several samples per row: rows of
   --row-tokens positions, block-causal masks) against the padded step (one sample per row) over the same batches
   of configs/tiny_part.yaml's data settings, in one process on CPU (fp32), for an adapter-only stage and an
   adapter + LoRA stage. The two steps differ in the layout only (the same samples, model, weights and LoRA
   setting). And the largest difference between the packed and the padded step's loss and gradients, on a batch
   whose rows each hold several samples.

Every figure comes from this run; ratios only (absolute speed on a CPU says nothing of a GPU). The corpus is the
one configs/tiny_part.yaml names (cache/corpus, from `bash launch/demo.sh`), else --corpus, else a small one built
in a temporary directory.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from collections import Counter
from datetime import date
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

EXAMPLES = """\
examples:
  python bench/packed_step.py                                  # cache/corpus, 1000 batches, writes the report
  python bench/packed_step.py --corpus /data/corpus --batches 200 --steps 6 --out /tmp/packed.md
"""


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, epilog=EXAMPLES,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--corpus", default="cache/corpus", help="a corpus directory with train/ shards and "
                        "tokenizer_text.txt (default: %(default)s; built small when missing)")
    parser.add_argument("--languages", default="de,en,es,zh", help="the corpus languages to draw from")
    parser.add_argument("--batches", type=int, default=1000, help="batches for the shape and padding figures (a)")
    parser.add_argument("--steps", type=int, default=8, help="timed steps per mode and stage (b)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps per mode and stage first (b)")
    parser.add_argument("--row-tokens", type=int, default=512,
                        help="the packed step's rows hold at least this many positions (b; default %(default)s)")
    parser.add_argument("--out", default="docs/results/packed_step.md", help="the markdown report (%(default)s)")
    parser.add_argument("--shapes-only", action="store_true", help="only a (shapes and padding), no report file")
    return parser.parse_args(argv)


# ---------------------------------------------------------------- corpus and models


def corpus_dir(args, scratch: Path) -> Path:
    corpus = Path(args.corpus)
    if (corpus / "train").is_dir() and (corpus / "tokenizer_text.txt").is_file():
        return corpus
    if shutil.which("espeak-ng") is None:
        raise SystemExit(f"error: no corpus at {corpus}, and espeak-ng (launch/setup_env.sh) is needed to build one")
    from data_prep import synthetic

    built = scratch / "corpus"
    print(f"[bench] no corpus at {corpus}: building a small one in {built}", flush=True)
    code = synthetic.main(["--out", str(built), "--languages", args.languages, "--train-per-language", "64",
                           "--eval-per-language", "4", "--text-per-language", "20", "--shard-samples", "8",
                           "--max-duration", "15", "--workers", "2"])
    if code != 0:
        raise SystemExit("error: building the corpus failed")
    return built


def deep_narrow_models(corpus: Path, out: Path) -> tuple[Path, Path]:
    """A 32-layer Whisper-style encoder and a 28-layer Qwen2-style LLM, both 128 wide (random weights)."""
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM, WhisperConfig, WhisperModel

    from part.convert.tiny import train_tokenizer
    from part.model.tokenizer import load_tokenizer
    from part.prompts import TURN_END

    torch.manual_seed(0)
    whisper_dir, llm_dir = out / "whisper", out / "llm"
    train_tokenizer(corpus / "tokenizer_text.txt", llm_dir, 4000)
    tokenizer = load_tokenizer(str(llm_dir))
    WhisperModel(WhisperConfig(
        d_model=128, encoder_layers=32, encoder_attention_heads=4, encoder_ffn_dim=512, decoder_layers=1,
        decoder_attention_heads=4, decoder_ffn_dim=256, num_mel_bins=80, max_source_positions=1500,
        max_target_positions=64, vocab_size=64, pad_token_id=0, bos_token_id=1, eos_token_id=2,
        decoder_start_token_id=1, dropout=0.0)).save_pretrained(whisper_dir)
    Qwen2ForCausalLM(Qwen2Config(
        vocab_size=len(tokenizer), hidden_size=128, intermediate_size=352, num_hidden_layers=28,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096, tie_word_embeddings=True,
        pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.convert_tokens_to_ids(TURN_END),
        bos_token_id=tokenizer.bos_token_id)).save_pretrained(llm_dir)
    return whisper_dir, llm_dir


def data_config(corpus: Path, languages: list[str], **settings):
    from part.config import DataConfig

    return DataConfig(train_shards=f"{corpus}/train/{{lang}}-*.tar", languages=languages, num_workers=1,
                      **settings)


# ---------------------------------------------------------------- a. shapes and padding


BATCHING_KEYS = ("window", "max_batch_seconds", "max_batch_tokens", "max_batch_size", "max_duration", "row_tokens",
                 "length_multiple", "audio_multiple", "audio_row_seconds", "batching")


def large_recipe_settings() -> tuple[dict, int]:
    """configs/part_large.yaml's batching settings, and its adapter's stride."""
    import yaml

    raw = yaml.safe_load((REPO / "configs" / "part_large.yaml").read_text())
    return ({k: raw["data"][k] for k in BATCHING_KEYS if k in raw["data"]},
            int(raw["model"]["adapter"]["downsample"]))


# the batching before budget-filling batches and encoder rows, over the same data
SORTED = dict(batching="sorted", audio_row_seconds=0.0, max_batch_seconds=480, max_batch_size=32, length_multiple=16,
              row_tokens=2048)


def shapes_and_padding(corpus: Path, languages: list[str], tokenizer, n_batches: int) -> list[dict]:
    """Per batching and LLM layout: distinct shapes and padding over `n_batches` batches of the large recipe's
    settings (its own batching, and the sorted batching with a row per clip)."""
    from transformers import WhisperFeatureExtractor

    from part.config import StageConfig
    from part.data.stream import MixtureStream
    from part.features import LogMelFeatures
    from part.model.encoders import WHISPER_FRAME_CONVS
    from part.packing import ClipPositions, LayoutSpec, layout_batch
    from part.prompts import AUDIO_TOKEN

    settings, downsample = large_recipe_settings()
    positions = ClipPositions(tuple(WHISPER_FRAME_CONVS), downsample)
    audio_id, pad_id = tokenizer.convert_tokens_to_ids(AUDIO_TOKEN), tokenizer.pad_token_id
    stage = StageConfig(name="asr", steps=1, tasks={"asr": 1.0})
    features = LogMelFeatures(WhisperFeatureExtractor(feature_size=128))
    out = []
    for batching in ({**settings, **SORTED}, settings):
        data = data_config(corpus, languages, **batching)
        one_row = LayoutSpec(audio_id, pad_id, positions, True, data.length_multiple, 1 << 40)
        layouts = {
            "packed, one row (flash_attention_2)": one_row,
            f"packed rows of >= {data.row_tokens} (sdpa, eager)": LayoutSpec(audio_id, pad_id, positions, True,
                                                                            data.length_multiple, data.row_tokens),
        }
        if not data.audio_row_seconds:
            layouts["packed rows as long as the longest sample"] = LayoutSpec(audio_id, pad_id, positions, True,
                                                                              data.length_multiple)
            layouts["padded (one sample per row)"] = LayoutSpec(audio_id, pad_id, positions, False, 1)
        label = (f"{data.batching}, " + (f"clips in {data.audio_row_seconds:g}-s encoder rows" if
                                         data.audio_row_seconds else "a row per clip") +
                 f" ({data.max_batch_seconds:g} s, {data.max_batch_tokens} tokens, {data.max_batch_size} samples,"
                 f" LLM lengths /{data.length_multiple})")
        rows = {name: {"shapes": Counter(), "real": 0, "positions": 0, "audio_real": 0, "audio_padded": 0}
                for name in layouts}
        stream = iter(MixtureStream(data, stage, tokenizer, features, rank=0, world_size=1, layout=one_row))
        t0, samples = time.perf_counter(), 0
        for i in range(n_batches):
            batch = next(stream)  # audio as training lays it out: rounded, or packed into rows
            steps = batch.feature_frames.tolist()
            samples += len(batch)
            for name, spec in layouts.items():
                layout = layout_batch(batch.prompt_ids, batch.target_ids, batch.audio_index, batch.feature_frames,
                                      spec, clip_places=batch.clip_places)
                if batch.audio_segments is not None:  # rows of the encoder's window
                    encoder = tuple(batch.input_features.shape[::2])
                else:
                    encoder = (len(steps), batch.input_features.shape[-1] if spec.packed else max(steps))
                row = rows[name]
                row["shapes"][(*encoder, *layout.shape)] += 1
                row["real"] += layout.real_tokens
                row["positions"] += layout.shape[0] * layout.shape[1]
                row["audio_real"] += sum(steps)
                row["audio_padded"] += encoder[0] * encoder[1]
            if (i + 1) % 100 == 0:
                rate = (i + 1) / (time.perf_counter() - t0)
                print(f"[bench] a. {label}: {i + 1}/{n_batches} batches, eta {(n_batches - i - 1) / rate:.0f} s",
                      flush=True)
        for name, row in rows.items():
            shapes = row["shapes"]
            out.append({"batching": label, "layout": name, "shapes": len(shapes), "samples": samples / n_batches,
                        "encoder_shapes": len({s[:2] for s in shapes}), "llm_shapes": len({s[2:] for s in shapes}),
                        "llm_padding": 1 - row["real"] / row["positions"],
                        "audio_padding": 1 - row["audio_real"] / row["audio_padded"]})
    return out


# ---------------------------------------------------------------- b. step speed


def batches_for_steps(corpus: Path, languages: list[str], tokenizer, model, n: int, row_tokens: int):
    """`n` batches of the tiny recipe's settings, laid out in packed rows of at least `row_tokens` positions, or
    padded (one sample per row) with `row_tokens` 0; nothing else differs."""
    import yaml

    from part.config import StageConfig
    from part.data.stream import MixtureStream

    raw = yaml.safe_load((REPO / "configs" / "tiny_part.yaml").read_text())["data"]
    keys = ("window", "max_batch_seconds", "max_batch_tokens", "max_batch_size", "max_duration", "packing",
            "length_multiple", "row_tokens", "audio_multiple")
    data = data_config(corpus, languages, **{k: raw[k] for k in keys if k in raw})
    spec = model.layout_spec(packed=row_tokens > 0, length_multiple=data.length_multiple, row_tokens=row_tokens)
    stage = StageConfig(name="asr", steps=1, tasks={"asr": 1.0})
    stream = iter(MixtureStream(data, stage, tokenizer, model.audio_features, rank=0, world_size=1, layout=spec))
    return [next(stream) for _ in range(n)]


def trainer(model, groups: list[str], lora_runs: bool):
    """One training step (forward, backward, AdamW) of `model` training `groups`, as a function of the batch."""
    import torch

    from part.model.groups import set_trainable

    model.run_lora(lora_runs)
    set_trainable(model, groups)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)

    def step(batch) -> float:
        t0 = time.perf_counter()
        out = model(batch)
        out["loss"].backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return time.perf_counter() - t0

    return step


def gradient_difference(model, packed_batch, padded_batch) -> float:
    """The largest relative difference between the packed and the padded step's loss and gradients."""

    from part.model.groups import set_trainable

    set_trainable(model, ["adapter", "llm.lora"])
    results = []
    for batch in (packed_batch, padded_batch):
        model.zero_grad(set_to_none=True)
        out = model(batch)
        out["loss"].backward()
        results.append([out["loss"].detach()] + [p.grad.clone() for p in model.parameters() if p.grad is not None])
    return max(float((a - b).abs().max() / b.abs().max().clamp(min=1e-12)) for a, b in zip(*results))


def step_speed(corpus: Path, languages: list[str], scratch: Path, steps: int, warmup: int, row_tokens: int) -> dict:
    import torch

    from part.config import AdapterConfig, EncoderConfig, LLMConfig, LoraConfig, ModelConfig
    from part.model.speech_llm import SpeechLLM
    from part.model.tokenizer import load_tokenizer

    whisper_dir, llm_dir = deep_narrow_models(corpus, scratch / "deep_narrow")
    tokenizer = load_tokenizer(str(llm_dir))
    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    cfg = ModelConfig(encoder=EncoderConfig(pretrained=str(whisper_dir)),
                      adapter=AdapterConfig(downsample=4, kind="transformer", hidden=128, layers=2, heads=4),
                      llm=LLMConfig(pretrained=str(llm_dir), lora=LoraConfig(rank=8, alpha=16, target_modules=targets)))
    torch.manual_seed(0)
    model = SpeechLLM(cfg, tokenizer).train()
    twin = SpeechLLM(cfg, tokenizer).train()  # the padded step's model: the same weights, stepped alongside
    n = steps + warmup
    packed = batches_for_steps(corpus, languages, tokenizer, model, n, row_tokens)
    padded = batches_for_steps(corpus, languages, tokenizer, model, n, 0)
    assert [m.key for b in packed for m in b.meta] == [m.key for b in padded for m in b.meta]  # the same samples
    rows = {"packed": sum(b.layout.shape[0] for b in packed[warmup:]),
            "padded": sum(b.layout.shape[0] for b in padded[warmup:])}
    if rows["packed"] >= rows["padded"]:
        raise SystemExit(f"error: rows of {row_tokens} positions hold one sample each on these batches: the packed "
                         "and padded steps would not differ (raise --row-tokens)")
    state = {k: v.clone() for k, v in model.state_dict().items()}
    out = {"samples": sum(len(b) for b in packed[warmup:]), "stages": []}
    for stage, groups in (("adapter", ["adapter"]), ("adapter + LoRA", ["adapter", "llm.lora"])):
        model.load_state_dict(state)
        twin.load_state_dict(state)
        # the two steps alternate batch by batch, so that the machine's drift falls on both alike
        lora_runs = stage != "adapter"  # LoRA runs only where it trains (while zero it adds nothing)
        steps_of = {"padded": trainer(twin, groups, lora_runs), "packed": trainer(model, groups, lora_runs)}
        seconds = {"padded": 0.0, "packed": 0.0}
        for i in range(n):
            for mode, batches in (("padded", padded), ("packed", packed)):
                took = steps_of[mode](batches[i])
                seconds[mode] += took if i >= warmup else 0.0
        rates = {mode: out["samples"] / s for mode, s in seconds.items()}
        print(f"[bench] b. {stage}: padded {rates['padded']:.2f}, packed {rates['packed']:.2f} samples/s",
              flush=True)
        out["stages"].append({"stage": stage, **rates, "speedup": rates["packed"] / rates["padded"]})
    model.load_state_dict(state)
    model.run_lora(True)
    shared = next(i for i, b in enumerate(packed) if b.layout.shape[0] < len(b.prompt_ids))
    out["parity_batch"] = {"samples": len(packed[shared].prompt_ids), "rows": packed[shared].layout.shape[0]}
    out["max_relative_difference"] = gradient_difference(model, packed[shared], padded[shared])
    out["rows"], out["row_tokens"] = rows, row_tokens
    llm = [b.layout for b in packed[warmup:]], [b.layout for b in padded[warmup:]]
    out["llm_padding"] = [1 - sum(x.real_tokens for x in ls) / sum(x.shape[0] * x.shape[1] for x in ls) for ls in llm]
    return out


# ---------------------------------------------------------------- report


def report(args, corpus: Path, a: list[dict], b: dict, seconds: float) -> str:
    lines = ["# The packed training step", "",
             f"`python bench/packed_step.py --corpus {args.corpus} --batches {args.batches} --steps {args.steps} "
             f"--row-tokens {args.row_tokens}` ({date.today().isoformat()}, {seconds / 60:.1f} min on this machine).",
             "",
             f"## a. Shapes and padding over {args.batches} batches at the large recipe's data settings", "",
             "| batching | LLM layout | samples per batch | distinct shapes | encoder | LLM | LLM padding | "
             "audio padding |",
             "|---|---|---:|---:|---:|---:|---:|---:|"]
    for r in a:
        lines.append(f"| {r['batching']} | {r['layout']} | {r['samples']:.1f} | {r['shapes']} | "
                     f"{r['encoder_shapes']} | {r['llm_shapes']} | {100 * r['llm_padding']:.1f}% | "
                     f"{100 * r['audio_padding']:.1f}% |")
    lines += ["", "A shape is (encoder rows, audio steps, LLM rows, LLM length); the encoder and LLM columns count "
              "their own parts (the encoder's rows are its clips where each clip has a row). Audio padding counts "
              "the encoder's input steps that hold no audio. The last batching is configs/part_large.yaml's; the "
              "first is the same data cut from the sorted window with a row per clip "
              f"({', '.join(f'{k}: {v}' for k, v in SORTED.items())}).", "",
              "## b. Step speed, deep and narrow model (28-layer LLM, 32-layer encoder, width 128, LoRA on every "
              "projection), one process, fp32", "",
              f"Timed: {args.steps} steps per mode after {args.warmup} untimed ({b['samples']} samples), the same "
              "batches of configs/tiny_part.yaml's data settings for both modes, the two steps alternating batch by "
              f"batch. Packed: rows of at least {b['row_tokens']} positions ({b['samples']} samples in "
              f"{b['rows']['packed']} rows); padded: one sample per row ({b['rows']['padded']} rows). The model, "
              "weights and LoRA setting are the same; LoRA runs in the stage that trains it.", "",
              "| stage trains | padded step (samples/s) | packed step (samples/s) | speed-up |", "|---|---:|---:|---:|"]
    for r in b["stages"]:
        lines.append(f"| {r['stage']} | {r['padded']:.2f} | {r['packed']:.2f} | {r['speedup']:.2f}x |")
    lines += ["", f"LLM padding over the timed batches: packed {100 * b['llm_padding'][0]:.1f}%, padded "
              f"{100 * b['llm_padding'][1]:.1f}%. Packed vs padded loss and gradients (adapter + LoRA, a batch of "
              f"{b['parity_batch']['samples']} samples in {b['parity_batch']['rows']} packed rows): largest relative "
              f"difference {b['max_relative_difference']:.1e}.", ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    started = time.perf_counter()
    scratch = Path(tempfile.mkdtemp(prefix="part_packed_"))
    try:
        languages = args.languages.split(",")
        corpus = corpus_dir(args, scratch)
        from part.convert.tiny import train_tokenizer
        from part.model.tokenizer import load_tokenizer

        train_tokenizer(corpus / "tokenizer_text.txt", scratch / "tokenizer", 4000)
        tokenizer = load_tokenizer(str(scratch / "tokenizer"))
        a = shapes_and_padding(corpus, languages, tokenizer, args.batches)
        if args.shapes_only:
            for r in a:
                print(r, flush=True)
            return 0
        b = step_speed(corpus, languages, scratch, args.steps, args.warmup, args.row_tokens)
        text = report(args, corpus, a, b, time.perf_counter() - started)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    print(text)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(text)
    print(f"[bench] wrote {args.out}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
