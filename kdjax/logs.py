"""Where a stage's numbers go: metrics.jsonl, TensorBoard, an optional Weights & Biases run, and
the progress display. The trainer calls `StageLog`; nothing here reads the config object.

- ``<workdir>/metrics.jsonl``: one JSON line per logged train step and per evaluation (always).
- ``<workdir>/tensorboard/<stage>/``: tensorboardX event files (no TensorFlow needed) with every
  scalar of metrics.jsonl under ``<kind>/<name>`` (``train/loss``, ``eval/test_accuracy``), plus
  ``train/steps_per_sec`` and ``train/images_per_sec``, and the run's config as text and as
  hyper-parameters. ``tensorboard --logdir runs`` shows every run and stage side by side.
- Weights & Biases (``wandb``, only if installed): the same scalars, prefixed by the stage.
- Progress: on a terminal a tqdm bar per stage (epoch, step, loss, images/s, ETA); without one
  (Colab cells, CI, redirected output) a plain line every `progress_seconds` seconds. The
  per-step and per-evaluation lines themselves are absl DEBUG lines (``--verbosity=1``).

Only process 0 writes.

On a ``gs://`` workdir an append would overwrite the object (GCS objects are immutable), so
metrics.jsonl is kept whole in memory (the object's earlier lines read back when a stage starts,
e.g. on resume) and the whole object is rewritten (one atomic object write) after every
evaluation, at most every `GCS_FLUSH_SECONDS` between them, and when the stage ends. A process
killed without warning loses at most the train lines since the last write; those steps come after
the latest checkpoint and are logged again by the resumed run.
"""

from __future__ import annotations

import json
import os
import sys
import time

import jax
from absl import logging

from kdjax import paths


def check_wandb(enabled: bool) -> None:
    """One-line ValueError when W&B logging is asked for but `wandb` is not installed."""
    if not enabled:
        return
    try:
        import wandb  # noqa: F401
    except ImportError:
        raise ValueError("config.log.wandb=True needs the wandb package: pip install wandb "
                         "(or set config.log.wandb=False)") from None


GCS_FLUSH_SECONDS = 60.0


def _scalars(values: dict) -> dict[str, float]:
    return {k: float(v) for k, v in values.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}


class StageLog:
    """The logging sinks of one stage (see the module docstring)."""

    def __init__(self, workdir: str, role: str, *, total_steps: int, steps_per_epoch: int, batch_size: int,
                 start_step: int = 0, progress: bool = True, progress_seconds: float = 30.0,
                 tensorboard: bool = True, wandb: bool = False, config: dict | None = None):
        self.role, self.total, self.spe, self.batch = role, total_steps, steps_per_epoch, batch_size
        self.main = jax.process_index() == 0
        self.metrics_path = os.path.join(workdir, "metrics.jsonl")
        self.progress_seconds = progress_seconds
        self.last_line = self.rate_time = time.time()
        self.rate_step = start_step
        self.writer = self.bar = self.wandb = None
        self.remote = paths.is_remote(workdir)
        self.lines: list[str] = []  # a gs:// metrics.jsonl, whole (see the module docstring)
        self.flushed = time.time()
        if not self.main:
            return
        if self.remote:
            if paths.exists(self.metrics_path):
                with paths.open_file(self.metrics_path) as f:
                    self.lines = [line if line.endswith("\n") else line + "\n" for line in f.read().splitlines()]
        if tensorboard:
            from tensorboardX import SummaryWriter

            self.writer = SummaryWriter(os.path.join(workdir, "tensorboard", role))
            if config is not None:
                self.writer.add_text("config", "```\n" + json.dumps(config, indent=1, sort_keys=True, default=str)
                                     + "\n```", start_step)
        if wandb:
            import wandb as wandb_module

            self.wandb = wandb_module.run or wandb_module.init(
                project="kdjax", name=os.path.basename(os.path.abspath(workdir) if not self.remote else workdir.rstrip("/")),
                dir=None if self.remote else workdir, config=config,
                resume="allow")
        self.config = config
        if progress and sys.stderr.isatty():
            from tqdm import tqdm

            self.bar = tqdm(total=total_steps, initial=start_step, desc=f"[{role}]", unit="step", dynamic_ncols=True,
                            leave=True)
        self.progress = progress

    def log(self, step: int, values: dict, kind: str = "train") -> None:
        """One train-step or evaluation record (every sink)."""
        epoch = step / self.spe
        text = " ".join(f"{k}={v:.4g}" for k, v in sorted(values.items()))
        logging.debug("[%s] %s step %d epoch %.2f: %s", self.role, kind, step, epoch, text)
        if not self.main:
            return
        line = json.dumps({"role": self.role, "kind": kind, "step": step, "epoch": epoch, **values}) + "\n"
        if self.remote:
            self.lines.append(line)
            if kind != "train" or time.time() - self.flushed >= GCS_FLUSH_SECONDS:
                self.flush()
        else:
            with open(self.metrics_path, "a") as f:
                f.write(line)
        scalars = _scalars(values)
        if kind == "train":
            now = time.time()
            if step > self.rate_step and now > self.rate_time:
                scalars["steps_per_sec"] = (step - self.rate_step) / (now - self.rate_time)
                scalars["images_per_sec"] = scalars["steps_per_sec"] * self.batch
            self.rate_step, self.rate_time = step, now
            self._progress(step, scalars)
        if self.writer is not None:
            for name, value in scalars.items():
                self.writer.add_scalar(f"{kind}/{name}", value, step)
        if self.wandb is not None:
            self.wandb.log({f"{self.role}/{kind}/{k}": v for k, v in scalars.items()})

    def _progress(self, step: int, scalars: dict) -> None:
        epoch = max(1, -(-step // self.spe))  # the epoch this step belongs to, 1-based
        if self.bar is not None:
            self.bar.n = step
            post = {"epoch": f"{epoch}/{self.total // self.spe}", "loss": f"{scalars.get('loss', float('nan')):.4g}"}
            if "images_per_sec" in scalars:
                post["img/s"] = f"{scalars['images_per_sec']:.0f}"
            self.bar.set_postfix(post, refresh=True)
        elif self.progress and (time.time() - self.last_line >= self.progress_seconds or step == self.total):
            self.last_line = time.time()
            rate = scalars.get("images_per_sec")
            logging.info("[%s] epoch %d/%d, step %d/%d, loss %.4g%s", self.role, epoch, self.total // self.spe, step,
                         self.total, scalars.get("loss", float("nan")), f", {rate:.0f} img/s" if rate else "")

    def flush(self) -> None:
        """gs:// only: rewrites the whole metrics.jsonl object (nothing to do locally)."""
        if not (self.remote and self.main):
            return
        with paths.open_file(self.metrics_path, "w") as f:
            f.write("".join(self.lines))
        self.flushed = time.time()

    def close(self, result: dict | None = None) -> None:
        """Ends the bar; with the stage's `result`, records the final figures as TensorBoard
        hyper-parameter metrics."""
        self.flush()
        if self.bar is not None:
            self.bar.close()
        if self.writer is not None:
            if result is not None and self.config is not None:
                hparams = {k: v if isinstance(v, (int, float, str, bool)) else str(v)
                           for k, v in self.config.items()}
                metrics = {f"final/{k}": v for k, v in _scalars(result).items()
                           if k.endswith("accuracy") or k == "num_params"}
                self.writer.add_hparams(hparams, metrics, name="hparams")
            self.writer.close()

