"""Per-stage memory of the large recipes, from `train.py --check`'s estimate, without downloading anything.

The recipes point at local copies of openai/whisper-large-v3 and Qwen/Qwen2.5-7B-Instruct. The estimate needs only
their architectures, so this writes config-only directories of those published shapes (and a small tokenizer:
the vocabulary size the estimate uses is the LLM config's), points the recipes at them and prints the table
`train.py --check` prints (the same code: part.train.memory.memory_report, then the bytes per checkpoint of
part.train.checkpoint_contents; the data check is left out, so no corpus is needed). The recipes' comments quote
its memory table; tests/unit/test_memory.py checks that they still do.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

WHISPER_LARGE_V3 = dict(d_model=1280, encoder_layers=32, encoder_attention_heads=20, encoder_ffn_dim=5120,
                        decoder_layers=32, decoder_attention_heads=20, decoder_ffn_dim=5120, num_mel_bins=128,
                        vocab_size=51866, max_source_positions=1500, max_target_positions=448)
QWEN25_7B = dict(hidden_size=3584, intermediate_size=18944, num_hidden_layers=28, num_attention_heads=28,
                 num_key_value_heads=4, vocab_size=152064, max_position_embeddings=32768, tie_word_embeddings=False)

EXAMPLES = """\
examples:
  python bench/large_recipe_memory.py                       # configs/part_large.yaml and baseline_large.yaml, 8 x 80 GB
  python bench/large_recipe_memory.py --world-size 16 --device-memory-gb 141 configs/part_large.yaml
"""


def write_shapes(root: Path) -> tuple[Path, Path]:
    from transformers import Qwen2Config, WhisperConfig

    from part.convert.tiny import train_tokenizer

    whisper, llm = root / "whisper-large-v3", root / "Qwen2.5-7B-Instruct"
    WhisperConfig(**WHISPER_LARGE_V3).save_pretrained(whisper)
    Qwen2Config(**QWEN25_7B).save_pretrained(llm)
    text = root / "text.txt"
    text.write_text("\n".join(f"sentence number {i} of a small tokenizer corpus" for i in range(2000)))
    train_tokenizer(text, llm, vocab_size=300)
    return whisper, llm


def recipe_report(config: str | Path, shapes: tuple[Path, Path], world_size: int, device_memory_gb: float):
    """(the table as `train.py --check` prints it, its rows) for one recipe over the config-only model directories
    `shapes` (write_shapes)."""
    from part.config import load_config
    from part.train.checkpoint_contents import checkpoint_sizes, checkpoint_table
    from part.train.memory import GIB, memory_report
    from part.train.preflight import skeleton

    whisper, llm = shapes
    cfg = load_config(config, [f"model.encoder.pretrained={whisper}", f"model.llm.pretrained={llm}"])
    model = skeleton(cfg)
    report, rows, warnings = memory_report(cfg, model, world_size, device_memory_gb * GIB)
    sizes = checkpoint_table(checkpoint_sizes(cfg, model, world_size), cfg, world_size)
    return "\n".join([report, *warnings, sizes]), rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, epilog=EXAMPLES,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("configs", nargs="*", default=["configs/part_large.yaml", "configs/baseline_large.yaml"],
                        help="the recipes (default: configs/part_large.yaml configs/baseline_large.yaml)")
    parser.add_argument("--world-size", type=int, default=8, help="ranks (default 8)")
    parser.add_argument("--device-memory-gb", type=float, default=80, help="one GPU's memory (default 80)")
    args = parser.parse_args(argv)
    from part.config import ConfigError

    with tempfile.TemporaryDirectory() as tmp:
        shapes = write_shapes(Path(tmp))
        for config in args.configs:
            try:
                report, _ = recipe_report(config, shapes, args.world_size, args.device_memory_gb)
            except ConfigError as exc:  # as train.py --check reports it: the file and the field, exit 2
                print(f"error: {exc}", file=sys.stderr)
                return 2
            print(f"## {config}\n{report}\n", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
