"""DeepSpeed engine smoke test, run under the real launcher by tests/integration/test_ds_launcher.py.

    deepspeed --num_gpus 2 tests/integration/ds_smoke.py ds_configs/zero3_cpu.json [more.json ...] [--steps 2]

For each DeepSpeed JSON given, in the same process: build a tiny two-Linear model and a torch.optim.AdamW
client optimizer (as the trainer does), hand both to deepspeed.initialize, run --steps forward/backward/step
iterations and print, on rank 0, one line per step:

    DS_SMOKE config=<path> step=<i> loss=<float>

then `DS_SMOKE config=<path> done`. Any failure raises, so the launcher exits non-zero.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

import torch


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("configs", nargs="+", help="DeepSpeed JSON files")
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--local_rank", type=int, default=-1, help=argparse.SUPPRESS)  # set by the launcher
    return parser.parse_args(argv)


def smoke(config_path: str, steps: int, rank: int, device: torch.device) -> None:
    import deepspeed

    config = json.loads(Path(config_path).read_text())
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.GELU(), torch.nn.Linear(32, 4))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.0)
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, config=config)
    dtype = torch.bfloat16 if engine.bfloat16_enabled() else torch.float32
    micro = engine.train_micro_batch_size_per_gpu()
    generator = torch.Generator().manual_seed(1234 + rank)  # different data on each rank
    for step in range(steps):
        x = torch.randn(micro, 16, generator=generator).to(device=device, dtype=dtype)
        y = torch.randn(micro, 4, generator=generator).to(device=device, dtype=dtype)
        loss = torch.nn.functional.mse_loss(engine(x).float(), y.float())
        engine.backward(loss)
        engine.step()
        value = loss.detach().float().item()
        if not math.isfinite(value):
            raise RuntimeError(f"{config_path}: non-finite loss {value} at step {step}")
        if rank == 0:
            print(f"DS_SMOKE config={config_path} step={step} loss={value:.6f}", flush=True)
    engine.destroy()
    if rank == 0:
        print(f"DS_SMOKE config={config_path} done", flush=True)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    import torch.distributed as dist
    from deepspeed.accelerator import get_accelerator

    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repository's part/
    from part.train.distributed import DistributedContext

    accelerator = get_accelerator()
    context = DistributedContext.init()  # the trainer's own setup (device choice, CPU shm segment cleanup)
    rank, device = context.rank, context.device
    if rank == 0:
        print(f"DS_SMOKE world={dist.get_world_size()} accelerator={accelerator.device_name()} "
              f"backend={accelerator.communication_backend_name()}", flush=True)
    for config_path in args.configs:
        smoke(config_path, args.steps, rank, device)
    context.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
