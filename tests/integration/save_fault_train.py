"""Test-only entry point: train.py (under the collective guard) where rank 0's weight file cannot be written at
chosen steps, as on a full disk (the exception is not an OSError, as safetensors' is not), where rank 0 dies in
the middle of writing a checkpoint, or where the weights gathered for a checkpoint hold a NaN.

    deepspeed --num_gpus 2 tests/integration/save_fault_train.py [--fail-steps 3] [--die-steps 6] [--nan-saves 2] \\
        --config c.yaml ...
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repository: train.py and part/
sys.path.insert(0, str(Path(__file__).resolve().parent))  # guarded_train

from guarded_train import guarded_main  # noqa: E402  (after the path set-up above)

from part.exit_codes import exit_process  # noqa: E402
from part.model import speech_llm  # noqa: E402
from part.train import checkpoint  # noqa: E402


def failing_at(steps: set[int], dying: set[int]):
    original = speech_llm.SpeechLLM.save_pretrained

    def save_pretrained(self, out_dir, tokenizer, state=None, **kwargs):
        step = int(Path(out_dir).name.split("_")[1].split(".")[0])
        if step in steps:
            raise RuntimeError(f"injected: no space left writing the weights of step {step}")
        if step in dying:  # the weights half written, then the process is gone (power loss, OOM killer)
            (Path(out_dir) / speech_llm.WEIGHTS_NAME).write_bytes(b"\0" * 1000)
            print(f"[rank 0] dying while writing the checkpoint of step {step}", flush=True)
            os.kill(os.getpid(), signal.SIGKILL)
        return original(self, out_dir, tokenizer, state, **kwargs)

    return save_pretrained


class NanAt:
    """gather_state_dict, with a NaN in the first floating-point weight on rank 0 at the chosen saves."""

    def __init__(self, saves: set[int]):
        self.saves, self.calls, self.original = saves, 0, checkpoint.gather_state_dict

    def __call__(self, model, rank, **kwargs):
        state = self.original(model, rank, **kwargs)
        self.calls += 1
        if self.calls in self.saves and state:
            name = next(k for k, v in state.items() if v.is_floating_point())
            state[name].view(-1)[0] = float("nan")
        return state


if __name__ == "__main__":
    parser = argparse.ArgumentParser(add_help=False)
    parser.add_argument("--fail-steps", default="", help="steps whose checkpoint cannot be written, e.g. 3,5")
    parser.add_argument("--nan-saves", default="", help="1-based saves of this run whose weights get a NaN, e.g. 2")
    parser.add_argument("--die-steps", default="", help="steps whose checkpoint write rank 0 dies in (SIGKILL)")
    ours, rest = parser.parse_known_args()
    speech_llm.SpeechLLM.save_pretrained = failing_at({int(s) for s in ours.fail_steps.split(",") if s},
                                                      {int(s) for s in ours.die_steps.split(",") if s})
    checkpoint.gather_state_dict = NanAt({int(s) for s in ours.nan_saves.split(",") if s})
    exit_process(guarded_main(rest))
