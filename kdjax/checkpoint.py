"""Orbax checkpoints of one training stage: save, restore the latest, keep the last N and the selected one.

Each checkpoint holds two items: ``state`` (the whole `TrainState` pytree) and ``meta`` (JSON: the
epoch history, the selected (best) step and its score, ...). Orbax writes into a temporary
directory and renames it when complete, so an interrupted save is never listed as a checkpoint.

What is kept is decided from the stage's own ``meta``, not from metrics Orbax tracks: Orbax's
`BestN` knows only the metrics of checkpoints saved by the same process (it neither writes nor reads
them without a `best_fn`), so after a resume its first save deleted the best checkpoint. Here every
save keeps the latest ``keep`` checkpoints plus the one ``meta['best_step']`` names, which every
resumed process reads back from the latest checkpoint. The decision is taken when a save starts
and carried out (on the primary process only, by Orbax) after that save has committed, so an
earlier selected checkpoint is never deleted before the one replacing it exists. Every process
holds the same ``meta``, so all of them agree on the decision.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any, Sequence

import jax
import orbax.checkpoint as ocp
from orbax.checkpoint import checkpoint_managers as policies

from kdjax import paths


@dataclasses.dataclass
class _KeepSelected:
    """An Orbax preservation policy: keeps the checkpoint of `step` (the stage's selected one)."""

    step: int | None = None

    def should_preserve(self, checkpoints: Sequence[Any], *, context: Any) -> Sequence[bool]:
        del context
        return [info.step == self.step for info in checkpoints]


class StageCheckpoints:
    """A CheckpointManager for one stage's directory."""

    def __init__(self, directory: str, *, keep: int = 2, asynchronous: bool = True):
        self.directory = paths.absolute(directory)  # a gs:// URL as it is: Orbax writes it through TensorStore
        self._selected = _KeepSelected()
        preserve = policies.AnyPreservationPolicy([policies.LatestN(n=keep), self._selected])
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

    def save(self, step: int, state: Any, meta: dict) -> None:
        """Saves (asynchronously) unless a checkpoint for `step` already exists. Afterwards the
        folder holds the latest `keep` checkpoints and the one `meta['best_step']` names."""
        if step in self._mgr.all_steps():
            return
        self._selected.step = meta.get("best_step")
        self._mgr.save(
            step,
            args=ocp.args.Composite(state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)),
            force=True,
        )

    def check_selected(self, meta: dict, role: str) -> None:
        """One-line ValueError if the checkpoint `meta` selects is missing from the folder.

        kdjax before this module decided what to keep deleted it when a run with a validation split
        was resumed; such a run cannot report its selected model, and training on would only end
        in the same failure."""
        best = meta.get("best_step")
        steps = self.all_steps()
        if best is None or best in steps:
            return
        row = next((h for h in meta.get("history", []) if h.get("step") == best), {})
        stage_dir = os.path.dirname(self.directory)
        raise ValueError(
            f"the selected checkpoint of stage {role!r} (step {best}, epoch {row.get('epoch', '?')}, score "
            f"{meta.get('best_score')}) is missing from {self.directory} (kdjax before 2026-12-06 deleted it "
            f"when a run with a validation split was resumed), so this stage cannot report its selected model; "
            f"move {stage_dir} aside and rerun to train the stage again (checkpoints kept there: steps "
            f"{', '.join(map(str, steps))})"
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
