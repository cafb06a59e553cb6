"""Run :func:`cmpagl.train.train` in its own process, for tests that kill it or run torchrun.

    python tests/train_helper.py CONFIG.yaml [--resume DIR] [--kill-after-step K]
                                 [--debug-dir DIR]

``--kill-after-step K`` SIGKILLs the process right after optimizer step K (a real, unclean
death: no finally blocks, no flushing). ``--debug-dir`` makes every process write
``rank<r>.json``: the image ids of each step, the queue's ids and a checksum of the weights after
step 1, and a checksum of the final weights.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import signal
from pathlib import Path

import torch

from cmpagl.config import load_config
from cmpagl.train import StepInfo, train


def weights_checksum(model: torch.nn.Module) -> str:
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("config")
    ap.add_argument("--resume")
    ap.add_argument("--kill-after-step", type=int, default=0)
    ap.add_argument("--debug-dir")
    args = ap.parse_args()
    cfg = load_config(args.config)
    record: dict = {"ids": [], "queue_ids_after_step1": None}
    last_model: list[torch.nn.Module] = []

    def on_step(info: StepInfo) -> None:
        record["ids"].append(info.image_ids.tolist())
        if info.step == 1 and args.debug_dir:
            ids = info.model.queue.ids
            record["queue_ids_after_step1"] = ids[ids >= 0].tolist()
            record["checksum_after_step1"] = weights_checksum(info.model)
        last_model[:] = [info.model]
        if info.step == args.kill_after_step:
            os.kill(os.getpid(), signal.SIGKILL)

    result = train(cfg, resume=args.resume, config_path=args.config, on_step=on_step)
    if args.debug_dir:
        rank = int(os.environ.get("RANK", "0"))
        record.update(
            rank=rank,
            checksum=weights_checksum(last_model[0]),
            best_r_mean=result.best_r_mean,
            steps=result.steps,
        )
        out = Path(args.debug_dir)
        out.mkdir(parents=True, exist_ok=True)
        (out / f"rank{rank}.json").write_text(json.dumps(record))


if __name__ == "__main__":
    main()
