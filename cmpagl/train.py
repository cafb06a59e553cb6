"""The training engine: ``train(cfg)`` runs CMPAGL pre-training on the train split, validates
ITC retrieval (mR) on the val split and keeps the best checkpoint (METHOD.md §2, §4).

What it does, in order of a step:

1. a batch of (image, one of its captions, image id) in a per-epoch order that is a pure function
   of ``(seed, epoch)``; each sample's own randomness (caption choice, augmentation) is seeded by
   ``(seed, epoch, image index)``, so neither workers nor resuming change what a step sees;
2. :func:`cmpagl.objective.compute_losses` under autocast (CUDA only), backward, gradients
   averaged over processes (``torchrun``), clipped, AdamW with two learning rates
   (pretrained / new parameters, :mod:`cmpagl.optim`) and a warm-up + cosine schedule;
3. every ``log_every`` steps a JSONL line, every ``checkpoint_every`` steps a resumable ``last/``
   checkpoint; at the end of every ``eval_every``-th epoch ITC mR on the val split and, if it
   improved, ``best/``. The test split is never evaluated here.

``train(cfg, resume=run_dir)`` continues from ``run_dir/last`` exactly where it stopped: the
weights, momentum encoders and queue, optimizer, schedule, RNG streams and the rest of the
epoch's data order all come from the checkpoint, so the resumed run matches an uninterrupted
one (bit for bit on the CPU).

Shared machines: SIGINT (Ctrl-C) or SIGTERM stops a run after the step in progress, with a
``last/`` checkpoint at that step (:mod:`cmpagl.interrupt`); a second process training into the
same folder is refused (:mod:`cmpagl.lock`).
"""

from __future__ import annotations

import contextlib
import math
import os
import sys
import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset, DistributedSampler
from tqdm.auto import tqdm

from cmpagl.checkpoint import (
    copy_checkpoint,
    find_checkpoint,
    load_checkpoint,
    portable_config,
    save_checkpoint,
    saved_checkpoints,
)
from cmpagl.config import (
    ConfigError,
    ExperimentConfig,
    TrainConfig,
    check_experiment,
    save_config,
    to_dict,
)
from cmpagl.data.dataset import CaptionDataset, DataError
from cmpagl.data.torch_data import TrainPairs, make_loader
from cmpagl.distributed import (
    Dist,
    all_reduce_gradients,
    broadcast_model,
    gather_objects,
    setup_processes,
)
from cmpagl.interrupt import StopSignals, TrainingInterrupted
from cmpagl.lock import run_lock
from cmpagl.objective import compute_losses
from cmpagl.optim import build_optimizer, build_scheduler, total_steps
from cmpagl.runlog import LOG_FILE, JsonLog, Meter, rng_state, seed_everything, set_rng_state

__all__ = [
    "StepInfo",
    "TrainResult",
    "TrainingInterrupted",
    "epoch_order",
    "train",
]


# ----------------------------------------------------------------------------------------------
# Results and hooks
# ----------------------------------------------------------------------------------------------


@dataclass
class TrainResult:
    """What :func:`train` returns (on every process).

    Epochs are 0-based indices: ``best_epoch = 1`` is the second epoch.
    ``samples_per_s`` counts the samples of all processes over the time spent in training steps
    of this call (validation and checkpoint writing excluded); ``wall_time_s`` is this call's.
    """

    best_r_mean: float | None
    best_epoch: int | None
    best_step: int | None
    best_metrics: dict[str, float] | None
    last_metrics: dict[str, float] | None
    steps: int
    output_dir: Path
    last_checkpoint: Path
    best_checkpoint: Path
    log_path: Path
    wall_time_s: float
    samples_per_s: float


@dataclass
class StepInfo:
    """Passed to ``train(..., on_step=...)`` after every optimizer step, on every process.

    ``step`` counts optimizer steps from 1; ``epoch`` is the 0-based epoch the step belonged
    to and ``position`` the batches of that epoch consumed so far (this one included).
    Checkpoints due at this step are already written when the hook runs.
    """

    step: int
    epoch: int
    position: int
    image_ids: Tensor
    logs: dict[str, float]
    model: nn.Module
    rank: int
    world_size: int


StepHook = Callable[[StepInfo], None]
# ----------------------------------------------------------------------------------------------
# Data order and per-sample randomness
# ----------------------------------------------------------------------------------------------


def epoch_order(n: int, epoch: int, seed: int, rank: int = 0, world: int = 1) -> list[int]:
    """Image indices process ``rank`` trains on in ``epoch``: a ``DistributedSampler`` shard
    (shuffled by ``seed + epoch``, tail dropped so shards are disjoint and equal in size).

    With ``world == 1`` it is a plain seeded permutation; torch.distributed is not touched.
    """
    sampler = DistributedSampler(
        range(n), num_replicas=world, rank=rank, shuffle=True, seed=seed, drop_last=True
    )
    sampler.set_epoch(epoch)
    return list(sampler)


def _sample_seed(seed: int, epoch: int, index: int) -> int:
    return int(np.random.SeedSequence((seed, epoch, index)).generate_state(1)[0])


class _EpochPairs(Dataset):
    """Item ``k``: :class:`TrainPairs` item ``order[k]``, with the caption choice and the
    augmentation drawn from a torch RNG seeded by ``(seed, epoch, image index)``.

    The global RNG is forked around each item, so the training process's own RNG stream (used
    by dropout) does not depend on how many samples were loaded, nor on which worker loaded them.
    """

    def __init__(self, pairs: TrainPairs, order: list[int], seed: int, epoch: int) -> None:
        self.pairs, self.order, self.seed, self.epoch = pairs, order, seed, epoch

    def __len__(self) -> int:
        return len(self.order)

    def __getitem__(self, k: int) -> tuple[Tensor, str, int]:
        index = self.order[k]
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(_sample_seed(self.seed, self.epoch, index))
            return self.pairs[index]


# ----------------------------------------------------------------------------------------------
# The training run
# ----------------------------------------------------------------------------------------------


def _amp_dtype(cfg: TrainConfig, device: torch.device) -> torch.dtype | None:
    """bf16 where the GPU has it, else fp16 (with a GradScaler); None (fp32) on the CPU."""
    if not cfg.amp or device.type != "cuda":
        return None
    return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16


def _val_split(ds: CaptionDataset) -> CaptionDataset:
    try:
        return ds.split("val")
    except DataError as err:
        raise DataError(
            f"{err}; model selection needs a val split: set data.val_from_train "
            "to move that many train images into one"
        ) from err


@dataclass
class _Data:
    train: CaptionDataset
    val: CaptionDataset
    pairs: TrainPairs
    eval_transform: Any


def _load_data(cfg: ExperimentConfig, ctx: Dist) -> _Data:
    """Train and val splits; the test split is dropped here and never looked at in training."""
    from cmpagl.data.build import dataset_from_config, transforms_from_config

    if not ctx.main:  # rank 0 generates the synthetic dataset first; the others then read it
        ctx.barrier()
    ds = dataset_from_config(cfg.data)
    if ctx.main:
        ctx.barrier()
    train_tf, eval_tf = transforms_from_config(cfg.data)
    train_ds = ds.split("train")
    return _Data(train_ds, _val_split(ds), TrainPairs(train_ds, train_tf), eval_tf)


class _Run:
    """One training run: model, optimizer, schedule, counters; methods fit on a screen each."""

    def __init__(
        self,
        cfg: ExperimentConfig,
        ctx: Dist,
        model: nn.Module,
        data: _Data,
        on_step: StepHook | None,
        config_path: str | None,
    ) -> None:
        self.cfg, self.ctx, self.model, self.data = cfg, ctx, model, data
        self.on_step, self.config_path = on_step, config_path
        self.out = Path(cfg.output_dir)
        self.log = JsonLog(self.out / LOG_FILE, ctx.main)
        self._build_optimization()
        # ITM negatives and MLM masks; its own stream, saved and restored with the others
        self.generator = torch.Generator(device=ctx.device)
        self.generator.manual_seed(cfg.seed + ctx.rank)
        self.step = self.epoch = self.position = 0
        self.step_epoch = 0  # the epoch the latest step belonged to
        self.saved_step = -1  # the step ``last/`` holds, written by this call
        self.signals: StopSignals | None = None  # set while the loop runs
        self.stop_signal: int | None = None  # the signal that stopped the loop
        self.order: list[list[int]] | None = None  # every rank's order of the current epoch
        self.best: dict[str, Any] | None = None  # r_mean, epoch, step, metrics
        self.last_val: dict[str, float] | None = None
        self.meter = Meter()
        self.prior_wall = 0.0  # wall time of earlier (interrupted) calls
        self.t0 = time.perf_counter()
        self.step_time = 0.0
        self.samples = 0

    def _build_optimization(self) -> None:
        """Optimizer, schedule over the run's total steps, AMP dtype and gradient scaler."""
        tc, ctx = self.cfg.train, self.ctx
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        self.optimizer = build_optimizer(self.model, self.cfg)
        n_per_rank = len(epoch_order(self.data.train.num_images, 0, self.cfg.seed, 0, ctx.world))
        self.steps_per_epoch = n_per_rank // tc.batch_size
        if self.steps_per_epoch == 0:
            raise ValueError(
                f"train.batch_size {tc.batch_size} is larger than the "
                f"{n_per_rank} train images per process: no full batch"
            )
        self.total_steps = total_steps(tc, self.steps_per_epoch)
        self.scheduler = build_scheduler(self.optimizer, tc, self.total_steps)
        self.amp_dtype = _amp_dtype(tc, ctx.device)
        # a scaler only for fp16: bf16 has fp32's range, so its gradients do not underflow
        self.scaler = torch.amp.GradScaler(ctx.device.type, enabled=self.amp_dtype == torch.float16)

    # -- state ----------------------------------------------------------------------------
    def _orders(self, epoch: int) -> list[list[int]]:
        n = self.data.train.num_images
        return [
            epoch_order(n, epoch, self.cfg.seed, r, self.ctx.world) for r in range(self.ctx.world)
        ]

    def state_dict(self) -> dict[str, Any]:
        """``state.pt`` content; call on every process (per-process RNG states are gathered)."""
        local = {"rng": rng_state(self.generator), "meter": self.meter.state_dict()}
        return {
            "step": self.step,
            "epoch": self.epoch,
            "position": self.position,
            "epoch_order": torch.tensor(self.order, dtype=torch.int64),
            "steps_per_epoch": self.steps_per_epoch,
            "world_size": self.ctx.world,
            "best": self.best,
            "last_val": self.last_val,
            "wall_time": self._wall(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict(),
            "per_rank": gather_objects(local, self.ctx),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state["world_size"] != self.ctx.world:
            raise ValueError(
                f"the checkpoint was written by {state['world_size']} processes, "
                f"this run has {self.ctx.world}: resume with the same number"
            )
        self.step, self.epoch = int(state["step"]), int(state["epoch"])
        self.position = int(state["position"])
        self.order = state["epoch_order"].tolist()
        if max(max(o) for o in self.order) >= self.data.train.num_images:
            raise ValueError("the train split is smaller than when the checkpoint was written")
        self.best, self.last_val = state["best"], state["last_val"]
        self.prior_wall = float(state["wall_time"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.scaler.load_state_dict(state["scaler"])
        local = state["per_rank"][self.ctx.rank]
        self.meter.load_state_dict(local["meter"])
        set_rng_state(local["rng"], self.generator)  # last: nothing may draw after it

    def _wall(self) -> float:
        return self.prior_wall + time.perf_counter() - self.t0

    def _done(self) -> bool:
        return self.step >= self.total_steps

    # -- loop -----------------------------------------------------------------------------
    def run(self) -> None:
        """Train until ``epochs`` or ``max_steps``, or until a signal asks to stop (then after
        the step in progress, see :meth:`_stop_asked`); resumes from the current counters."""
        while self.epoch < self.cfg.train.epochs and not self._done() and not self.stop_signal:
            if self.order is None:
                self.order = self._orders(self.epoch)
            self._run_epoch()

    def _stop_asked(self) -> bool:
        """Whether SIGINT/SIGTERM arrived. Under torchrun every process learns here, after the
        same step, of a signal any one of them got: the checkpoint that follows is collective."""
        signum = (self.signals.signum if self.signals is not None else None) or 0
        if self.ctx.world > 1:
            flag = torch.tensor([signum], dtype=torch.int64, device=self.ctx.device)
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
            signum = int(flag.item())
        self.stop_signal = signum or None
        return self.stop_signal is not None

    def stop(self) -> TrainingInterrupted:
        """After a signal stopped the loop: ``last/`` at the current step (unless this step's
        periodic checkpoint wrote it already), and the exception to raise."""
        if self.saved_step != self.step:
            self._save(improved=False)
        return TrainingInterrupted(
            self.stop_signal, self.step, self.step_epoch, self.out / "last", self.ctx.rank
        )

    def _loader(self) -> DataLoader:
        """The rest of the current epoch: this process's order from ``position`` on."""
        bs = self.cfg.train.batch_size
        mine = self.order[self.ctx.rank][self.position * bs : self.steps_per_epoch * bs]
        ds = _EpochPairs(self.data.pairs, mine, self.cfg.seed, self.epoch)
        return make_loader(
            ds,
            bs,
            shuffle=False,
            num_workers=self.cfg.data.num_workers,
            seed=self.cfg.seed + self.epoch,
            drop_last=True,
        )

    def _run_epoch(self) -> None:
        epoch = self.epoch
        bar = tqdm(
            total=self.steps_per_epoch,
            initial=self.position,
            desc=f"epoch {epoch}",
            leave=False,
            dynamic_ncols=True,
            disable=not (self.ctx.main and sys.stderr.isatty()),
        )
        try:
            for images, captions, ids in self._loader():
                logs = self._train_step(images, list(captions), ids)
                bar.update(1)
                bar.set_postfix(loss=f"{logs['total']:.3f}")
                self._after_step(epoch, ids, logs)
                if self._stop_asked() or self.epoch != epoch or self._done():
                    break
        finally:
            bar.close()

    def _autocast(self) -> contextlib.AbstractContextManager:
        if self.amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.ctx.device.type, dtype=self.amp_dtype)

    def _train_step(self, images: Tensor, captions: list[str], ids: Tensor) -> dict[str, float]:
        """One optimizer step on a batch ``images [B, 3, H, W]``, B captions, ids ``[B]``."""
        t = time.perf_counter()
        images = images.to(self.ctx.device, non_blocking=True)
        with self._autocast():
            loss, logs = compute_losses(
                self.model,
                images,
                captions,
                ids,
                self.cfg.loss,
                self.generator,
                step=self.step,  # steps done so far (restored on resume): α's ramp position
                steps_per_epoch=self.steps_per_epoch,
            )
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        all_reduce_gradients(self.params, self.ctx.world)  # before unscale: same on all ranks
        self.scaler.unscale_(self.optimizer)
        clip = self.cfg.train.grad_clip if self.cfg.train.grad_clip > 0 else math.inf
        grad_norm = float(torch.nn.utils.clip_grad_norm_(self.params, clip))
        if not self.scaler.is_enabled() and not math.isfinite(grad_norm):
            # the norm is computed from averaged gradients, so every process stops here
            raise FloatingPointError(
                f"non-finite gradient norm at step {self.step + 1}: losses {logs}"
            )
        lrs = {f"lr_{g['name']}": g["lr"] for g in self.optimizer.param_groups}
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.scheduler.step()
        self.step += 1
        self.position += 1
        self.step_time += time.perf_counter() - t
        self.samples += images.shape[0] * self.ctx.world
        logs = {**logs, "grad_norm": grad_norm}
        self.meter.add(logs)
        if self.step % max(self.cfg.train.log_every, 1) == 0:
            self._log_train(lrs)
        return logs

    def _log_train(self, lrs: dict[str, float]) -> None:
        means = self.meter.means(self.ctx)  # collective: every process calls it
        wall = self._wall()
        rate = self.samples / self.step_time if self.step_time > 0 else 0.0
        self.log.write(
            {
                "kind": "train",
                "step": self.step,
                "epoch": self.epoch,
                "position": self.position,
                **means,
                **lrs,
                "samples_per_s": rate,
                "wall_time": wall,
            }
        )

    def _after_step(self, epoch: int, ids: Tensor, logs: dict[str, float]) -> None:
        """Epoch end, validation and checkpoints due after this step; then the hook."""
        position = self.position
        self.step_epoch = epoch
        end_of_epoch = position == self.steps_per_epoch
        if end_of_epoch:  # the counters move on first, so the checkpoint resumes the next epoch
            self.epoch, self.position = self.epoch + 1, 0
            self.order = self._orders(self.epoch)
        every = max(self.cfg.train.eval_every, 1)
        last_epoch = self.epoch == self.cfg.train.epochs
        validate = (end_of_epoch and (self.epoch % every == 0 or last_epoch)) or self._done()
        improved = self._validate(epoch, end_of_epoch) if validate else False
        ckpt = self.cfg.train.checkpoint_every
        if end_of_epoch or self._done() or (ckpt > 0 and self.step % ckpt == 0):
            self._save(improved)
        if self.on_step is not None:
            self.on_step(
                StepInfo(
                    step=self.step,
                    epoch=epoch,
                    position=position,
                    image_ids=ids,
                    logs=logs,
                    model=self.model,
                    rank=self.ctx.rank,
                    world_size=self.ctx.world,
                )
            )

    # -- validation and checkpoints -------------------------------------------------------
    def _validate(self, epoch: int, end_of_epoch: bool) -> bool:
        """ITC mR on the val split (main process; shared with all); True if a new best."""
        from cmpagl.retrieval import evaluate_itc

        metrics = None
        if self.ctx.main:
            with self._autocast():
                metrics = evaluate_itc(
                    self.model,
                    self.data.val,
                    self.data.eval_transform,
                    batch_size=self.cfg.retrieval.batch_size,
                    num_workers=self.cfg.data.num_workers,
                    device=self.ctx.device,
                )
            metrics = {k: float(v) for k, v in metrics.items()}
        if self.ctx.world > 1:
            box = [metrics]
            dist.broadcast_object_list(box, src=0)
            metrics = box[0]
        self.last_val = metrics
        improved = self.best is None or metrics["r_mean"] > self.best["r_mean"]
        if improved:
            self.best = {
                "r_mean": metrics["r_mean"],
                "epoch": epoch,
                "step": self.step,
                "metrics": metrics,
            }
        self.log.write(
            {
                "kind": "val",
                "step": self.step,
                "epoch": epoch,
                "end_of_epoch": end_of_epoch,
                **metrics,
                "best": improved,
                "wall_time": self._wall(),
            }
        )
        return improved

    def _meta(self, kind: str) -> dict[str, Any]:
        return {
            "kind": kind,
            "step": self.step,
            "epoch": self.epoch,
            "position": self.position,
            "world_size": self.ctx.world,
            "config_path": self.config_path,
            "best": self.best,
        }

    def _save(self, improved: bool) -> None:
        """``last/`` (and ``best/`` if ``improved``); all processes call it, rank 0 writes.

        A new best is written first and ``last/`` linked to it: a crash in between resumes
        from the older ``last/``, which repeats the validation and so rewrites ``best/``.
        """
        state = self.state_dict()  # collective: gathers every process's RNG state
        self.saved_step = self.step
        if self.ctx.main:
            if improved:
                save_checkpoint(
                    self.out / "best",
                    self.model,
                    self.cfg,
                    state,
                    metrics=self.last_val,
                    meta=self._meta("best"),
                )
                copy_checkpoint(self.out / "best", self.out / "last", meta={"kind": "last"})
            else:
                save_checkpoint(
                    self.out / "last",
                    self.model,
                    self.cfg,
                    state,
                    metrics=self.last_val,
                    meta=self._meta("last"),
                )
        self.ctx.barrier()

    def result(self, wall: float) -> TrainResult:
        best = self.best or {}
        return TrainResult(
            best_r_mean=best.get("r_mean"),
            best_epoch=best.get("epoch"),
            best_step=best.get("step"),
            best_metrics=best.get("metrics"),
            last_metrics=self.last_val,
            steps=self.step,
            output_dir=self.out,
            last_checkpoint=self.out / "last",
            best_checkpoint=self.out / "best",
            log_path=self.out / LOG_FILE,
            wall_time_s=wall,
            samples_per_s=self.samples / self.step_time if self.step_time > 0 else 0.0,
        )


# ----------------------------------------------------------------------------------------------
# Entry point
# ----------------------------------------------------------------------------------------------


def _warn_config_changes(saved: ExperimentConfig, cfg: ExperimentConfig) -> None:
    """Resuming with a different config is allowed (e.g. more epochs) but said out loud."""

    def flat(d: Any, prefix: str = "") -> dict[str, Any]:
        if not isinstance(d, dict):
            return {prefix: d}
        return {k: v for key, sub in d.items() for k, v in flat(sub, f"{prefix}{key}.").items()}

    # paths compared as saved: "data/x" from the repository root and its absolute form agree
    old, new = flat(to_dict(portable_config(saved))), flat(to_dict(portable_config(cfg)))
    changed = [
        k.rstrip(".")
        for k in sorted(set(old) | set(new))
        if old.get(k) != new.get(k) and k != "output_dir."
    ]
    if changed:
        warnings.warn(
            f"resuming with a config that differs from the checkpoint's in: {', '.join(changed)}",
            stacklevel=3,
        )


@contextlib.contextmanager
def _deterministic(mode: str, device: torch.device) -> Iterator[None]:
    """Deterministic kernels while training (``train.deterministic``), restored after.

    With more than one thread some CPU kernels accumulate in a varying order, so two runs (or a
    run and its resumption) drift apart by ~1e-7 from the second step on; their deterministic
    versions cost nothing measurable here (with the NaN fill of new tensors switched off, see
    below), hence the default ``"cpu"``. On CUDA (``"always"``)
    cuBLAS also needs ``CUBLAS_WORKSPACE_CONFIG`` (set to ``:4096:8`` if unset, before the first
    cuBLAS call of the process) and cuDNN's autotuner is turned off; some kernels get slower.
    Operations without a deterministic version warn instead of failing.
    """
    if mode == "off" or (mode == "cpu" and device.type != "cpu"):
        yield
        return
    prev = torch.are_deterministic_algorithms_enabled()
    prev_warn = torch.is_deterministic_algorithms_warn_only_enabled()
    prev_bench = torch.backends.cudnn.benchmark
    prev_fill = torch.utils.deterministic.fill_uninitialized_memory
    if device.type == "cuda":
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.backends.cudnn.benchmark = False
    torch.use_deterministic_algorithms(True, warn_only=True)
    # Deterministic mode also fills every new tensor with NaN (a debugging aid that catches reads
    # of uninitialised memory); no correct kernel reads it, so results do not change, and the fill
    # took ~4 % of a CPU training step (12,000 fills per 3 steps, benchmarks/train_step.py).
    torch.utils.deterministic.fill_uninitialized_memory = False
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(prev, warn_only=prev_warn)
        torch.backends.cudnn.benchmark = prev_bench
        torch.utils.deterministic.fill_uninitialized_memory = prev_fill


def check_fresh_output(output_dir: str | os.PathLike[str]) -> None:
    """A fresh run (no ``resume``) must not replace a trained one.

    Raises:
        ConfigError: ``output_dir`` holds a checkpoint (``last/``, ``best/``, or one renamed
            aside by an interrupted write), with how to resume it or train elsewhere.
    """
    out = Path(output_dir)
    found = saved_checkpoints(out)
    if found:
        raise ConfigError(
            f"output_dir {out} already holds a trained run ({', '.join(found)}): continue it "
            f"with --resume {out}, train elsewhere with --set output_dir=..., or delete it",
            key="output_dir",
        )


def _prepare(
    cfg: ExperimentConfig,
    ctx: Dist,
    resume: str | os.PathLike[str] | None,
    on_step: StepHook | None,
    config_path: str | None,
) -> _Run:
    """Data, model, optimizer; the checkpoint's state when resuming."""
    from cmpagl.models.cmpagl import build_model
    from cmpagl.models.pretrained import load_pretrained

    resume_dir = find_checkpoint(resume, prefer="last") if resume is not None else None
    data = _load_data(cfg, ctx)
    torch.manual_seed(cfg.seed)  # the same initial weights on every process
    model = build_model(cfg.model)
    if resume_dir is None:  # a fresh run starts from pretrained weights, a resumed one from its
        load_pretrained(model)  # checkpoint; raises PretrainedUnavailable rather than go on
    model = model.to(ctx.device)
    broadcast_model(model, ctx)
    run = _Run(cfg, ctx, model, data, on_step, config_path)
    seed_everything(cfg.seed + ctx.rank)  # dropout differs between processes
    if resume_dir is None:
        run.log.reset()
        return run
    _, saved_cfg, state = load_checkpoint(resume_dir, model=model)
    _warn_config_changes(saved_cfg, cfg)
    run.load_state_dict(state)
    run.log.truncate_after(run.step)
    return run


def train(
    cfg: ExperimentConfig,
    resume: str | os.PathLike[str] | None = None,
    config_path: str | None = None,
    *,
    on_step: StepHook | None = None,
) -> TrainResult:
    """Train CMPAGL as ``cfg`` says; files go to ``cfg.output_dir`` (METHOD.md §2, §4).

    Writes ``config.yaml``, ``train_log.jsonl`` (``"kind": "train"`` lines every
    ``train.log_every`` steps, ``"kind": "val"`` lines after each validation), ``last/`` (every
    ``train.checkpoint_every`` steps and at each epoch end) and ``best/`` (highest val
    ``r_mean``; the test split is never evaluated). Under ``torchrun`` (WORLD_SIZE > 1) each
    process trains on its shard with averaged gradients and only rank 0 writes files;
    ``train.batch_size`` is per process.

    Args:
        cfg: the resolved experiment config.
        resume: a run folder (its ``last/``) or checkpoint folder to continue from exactly;
            ``cfg.output_dir`` still names where files go (normally the same run folder).
        config_path: the YAML file ``cfg`` came from, recorded in ``meta.json``.
        on_step: called with a :class:`StepInfo` after every optimizer step (live plots,
            tests); it runs on every process.

    SIGINT (Ctrl-C) or SIGTERM stops the run after the optimizer step in progress: ``last/`` is
    written at that step, exactly as a periodic checkpoint (a repeated signal cannot interrupt
    the write), and :class:`TrainingInterrupted` is raised; ``train(cfg, resume=output_dir)``
    then continues as if nothing had happened. ``cfg.output_dir`` is locked while training
    (:func:`cmpagl.lock.run_lock`).

    Raises:
        CheckpointError: ``resume`` holds no complete checkpoint.
        ConfigError: without ``resume``, ``cfg.output_dir`` already holds a trained run
            (:func:`check_fresh_output`); nothing there is touched.
        RunFolderInUse: another process trains in ``cfg.output_dir`` (a
            :class:`~cmpagl.config.ConfigError`; the message names it).
        TrainingInterrupted: a signal stopped the run; ``last/`` holds its latest step.
    """
    check_experiment(cfg)
    t0 = time.perf_counter()
    if cfg.train.num_threads > 0:
        torch.set_num_threads(cfg.train.num_threads)
    ctx = setup_processes(cfg.train)
    try:
        # rank 0 writes every file, so rank 0 alone locks (the others may be on other hosts)
        lock = run_lock(cfg.output_dir) if ctx.main else contextlib.nullcontext()
        with lock, _deterministic(cfg.train.deterministic, ctx.device):
            if resume is None:  # under the lock: a run in progress is named as such
                check_fresh_output(cfg.output_dir)
            run = _prepare(cfg, ctx, resume, on_step, config_path)
            if ctx.main:
                run.out.mkdir(parents=True, exist_ok=True)
                save_config(portable_config(cfg), run.out / "config.yaml")
            stopped = None
            with StopSignals(announce=ctx.main) as run.signals:
                run.run()
                if run.stop_signal is not None and not run._done():
                    stopped = run.stop()  # writes last/ with the signals still held off
            run.signals = None
            ctx.barrier()
            if stopped is not None:
                raise stopped
            return run.result(time.perf_counter() - t0)
    finally:
        if ctx.owns_group:
            dist.destroy_process_group()
