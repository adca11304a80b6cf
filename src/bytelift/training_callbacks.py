"""What a training run does around the `transformers.Trainer` loop: its files on disk (completed checkpoints,
the JSONL log, learning-curve snapshots, atomic JSON writes) and its callbacks (the log, the wall-clock
budget and the learning-rate schedule that follows it, snapshots, throughput on the progress bar).
`bytelift.training` assembles them into a run."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import torch
from transformers import Trainer, TrainerCallback

COMPLETE_MARKER = "checkpoint_complete.json"  # written last into a checkpoint folder: the folder is whole
LOG_NAME = "log.jsonl"
CHECKPOINT_PREFIX = "checkpoint-"
SNAPSHOT_DIR = "snapshots"  # <output>/snapshots/minute-<m>: the model after m training minutes (learning curves)


def latest_complete_checkpoint(output: str | os.PathLike) -> str | None:
    """The newest checkpoint folder that finished writing (has the completion marker)."""
    root = Path(output)
    if not root.is_dir():
        return None
    done = [
        d for d in root.iterdir()
        if d.name.startswith(CHECKPOINT_PREFIX) and (d / COMPLETE_MARKER).is_file()
    ]
    if not done:
        return None
    return str(max(done, key=lambda d: int(d.name[len(CHECKPOINT_PREFIX):])))


def write_json_atomically(path: Path, payload: dict, indent: int = 2, default=None) -> None:
    """Write `payload` as JSON to `path` through a temporary file: a crash leaves the old file or the new one,
    never half of one. `default` as in `json.dumps` (e.g. `str` for paths)."""
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(payload, indent=indent, default=default))
    os.replace(tmp, path)


class JsonlLogger(TrainerCallback):
    """Appends every log entry (with step and time) to <output>/log.jsonl on the main process."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)

    def on_log(self, args, state, control, logs=None, **kwargs):
        if state.is_world_process_zero and logs:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with self.path.open("a") as f:
                f.write(json.dumps({"step": state.global_step, "time": time.time(), **logs}) + "\n")


class TimeBudget(TrainerCallback):
    """Stops training (with a final save) once `minutes` of wall-clock time have passed.

    The elapsed time is agreed between processes at every step (the largest of the ranks' clocks), so that
    under torchrun every rank stops at the same step and a time-following LR schedule gives every rank the
    same learning rate. With `progress`, it also draws the run's progress bar in minutes (for runs sized by
    time, whose step count is not known in advance), with the latest loss and bytes/s."""

    def __init__(self, minutes: float, progress: bool = False):
        self.seconds = 60.0 * minutes
        self.start = time.time()
        self.elapsed = 0.0  # seconds, synchronised across ranks at each step end
        self.progress = progress
        self._bar = None

    def fraction(self) -> float:
        """Share of the budget spent, in [0, 1] (as of the last step end)."""
        return min(1.0, self.elapsed / max(self.seconds, 1e-9))

    def _synced_elapsed(self) -> float:
        import torch.distributed as dist

        elapsed = time.time() - self.start
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            device = "cuda" if dist.get_backend() == "nccl" else "cpu"
            t = torch.tensor([elapsed], dtype=torch.float64, device=device)
            dist.all_reduce(t, op=dist.ReduceOp.MAX)
            elapsed = float(t.item())
        return elapsed

    def on_train_begin(self, args, state, control, **kwargs):
        self.start = time.time()  # model loading and data set-up do not count against the budget
        self.elapsed = 0.0
        if self.progress and state.is_world_process_zero:
            from tqdm.auto import tqdm

            self._bar = tqdm(total=self.seconds / 60, unit="min", desc="training", bar_format=(
                "{desc}: {percentage:3.0f}%|{bar}| {n:.1f}/{total:.1f} min {postfix}"))

    def on_step_end(self, args, state, control, **kwargs):
        self.elapsed = self._synced_elapsed()
        if self._bar is not None:
            self._bar.n = min(self.elapsed, self.seconds) / 60
            self._bar.refresh()
        if self.elapsed >= self.seconds:
            control.should_training_stop = True
            control.should_save = True
        return control

    def on_log(self, args, state, control, logs=None, **kwargs):
        if self._bar is not None and logs:
            shown = {k: logs[k] for k in ("loss", "bytes_per_s", "boundary_f1", "eval_bits_per_byte") if k in logs}
            if shown:
                self._bar.set_postfix(step=state.global_step, **{k: round(v, 3) for k, v in shown.items()})

    def on_train_end(self, args, state, control, **kwargs):
        if self._bar is not None:
            self._bar.close()
            self._bar = None


class Snapshots(TrainerCallback):
    """Saves the byte model into <output>/snapshots/minute-<m> at the first step end after m training minutes
    (clock started at train begin, plus `offset` minutes of earlier stages); marks passed before this run began
    are skipped. Each snapshot is written to a temporary folder and renamed, so none is ever half-written."""

    def __init__(self, trainer: Trainer, minutes: list[float], offset: float = 0.0):  # a ByteliftTrainer
        self.trainer = trainer
        self.offset = float(offset)
        self.pending = sorted(float(m) for m in minutes if m > offset)
        self.start = time.time()

    @staticmethod
    def folder(output: str | os.PathLike, minute: float) -> Path:
        return Path(output) / SNAPSHOT_DIR / f"minute-{minute:g}"

    def on_train_begin(self, args, state, control, **kwargs):
        self.start = time.time()

    def on_step_end(self, args, state, control, **kwargs):
        now = self.offset + (time.time() - self.start) / 60
        while self.pending and now >= self.pending[0]:
            minute = self.pending.pop(0)
            target = self.folder(args.output_dir, minute)
            if state.is_world_process_zero and not target.exists():  # a resumed run keeps its earlier ones
                tmp = target.with_name(target.name + ".tmp")
                self.trainer._byte_model().save_pretrained(tmp)
                write_json_atomically(tmp / "snapshot.json", {"minute": round(now, 3), "step": state.global_step})
                os.replace(tmp, target)
        return control


class ThroughputOnBar(TrainerCallback):
    """Shows the latest bytes/s and loss on the Trainer's own progress bar (runs sized by steps)."""

    def __init__(self, trainer: Trainer):
        from transformers.trainer_callback import ProgressCallback

        self.bars = [c for c in trainer.callback_handler.callbacks if isinstance(c, ProgressCallback)]

    def on_log(self, args, state, control, logs=None, **kwargs):
        for cb in self.bars:
            if cb.training_bar is not None and logs and "bytes_per_s" in logs:
                cb.training_bar.set_postfix(bytes_per_s=logs["bytes_per_s"], loss=round(logs.get("loss", 0.0), 3))


def wall_clock_schedule(budget: TimeBudget, warmup_ratio: float):
    """LR multiplier from the share of the time budget spent: linear warmup over `warmup_ratio` of it, then
    linear decay to 0 at its end. A plain closure on purpose: LambdaLR checkpoints skip functions, so no
    clock state is pickled into a checkpoint."""

    def factor(step: int) -> float:
        f = budget.fraction()
        if warmup_ratio > 0 and f < warmup_ratio:
            return max(f / warmup_ratio, 1e-3)
        return max(0.0, (1.0 - f) / max(1.0 - warmup_ratio, 1e-9))

    return factor
