"""Train a Speech LLM with the PART curriculum: the script the DeepSpeed launcher starts on every rank.

    deepspeed --num_gpus 8 train.py --config configs/part_large.yaml [--resume [--reevaluate]] [key.sub=value ...]
    python train.py --config configs/part_large.yaml --check --world-size 8   # validate; start nothing

The command is part/cli/train.py (also `python -m part train`); `python train.py --help` lists its options.
"""

from __future__ import annotations

from part.cli.train import main
from part.exit_codes import exit_process

__all__ = ["main"]

if __name__ == "__main__":
    exit_process(main())
