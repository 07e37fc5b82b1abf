"""Orbax checkpoints of one training stage: save, restore the latest, keep the last N and the best.

Each checkpoint holds two items: ``state`` (the whole `TrainState` pytree) and ``meta`` (JSON: the
epoch history, best score so far, ...). Orbax writes into a temporary directory and renames it when
complete, so an interrupted save is never listed as a checkpoint.
"""

from __future__ import annotations

import os
from typing import Any

import jax
import orbax.checkpoint as ocp
from orbax.checkpoint import checkpoint_managers as policies


class StageCheckpoints:
    """A CheckpointManager for one stage's directory."""

    def __init__(self, directory: str, *, keep: int = 2, asynchronous: bool = True):
        self.directory = os.path.abspath(directory)
        preserve = policies.AnyPreservationPolicy([
            policies.LatestN(n=keep),
            policies.BestN(get_metric_fn=lambda m: m["score"], n=1, keep_checkpoints_without_metrics=False),
        ])
        self._mgr = ocp.CheckpointManager(
            self.directory,
            options=ocp.CheckpointManagerOptions(
                preservation_policy=preserve,
                enable_async_checkpointing=asynchronous,
                cleanup_tmp_directories=True,
            ),
            item_names=("state", "meta"),
        )

    def latest_step(self) -> int | None:
        return self._mgr.latest_step()

    def all_steps(self) -> list[int]:
        return list(self._mgr.all_steps())

    def save(self, step: int, state: Any, meta: dict, score: float | None = None) -> None:
        """Saves (asynchronously) unless a checkpoint for `step` already exists."""
        if step in self._mgr.all_steps():
            return
        metrics = None if score is None else {"score": float(score)}
        self._mgr.save(
            step,
            args=ocp.args.Composite(state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)),
            metrics=metrics,
            force=True,
        )

    def restore(self, step: int, target: Any = None) -> tuple[Any, dict]:
        """Restores `step` into the structure (and dtypes) of `target` (None: as saved, as host
        arrays in nested dicts); returns (state, meta)."""
        abstract = None if target is None else jax.tree.map(ocp.utils.to_shape_dtype_struct, target)
        out = self._mgr.restore(
            step,
            args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract), meta=ocp.args.JsonRestore()),
        )
        return out.state, dict(out.meta)

    def restore_meta(self, step: int) -> dict:
        out = self._mgr.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))
        return dict(out.meta)

    def wait(self) -> None:
        self._mgr.wait_until_finished()

    def close(self) -> None:
        self._mgr.wait_until_finished()
        self._mgr.close()
