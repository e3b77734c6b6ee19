"""Checkpoints over orbax's CheckpointManager: atomic, keep-N, every N steps, resumable.

Each step directory holds two items, committed together by orbax's atomic rename:
  state        the TrainState (any pytree of arrays), sharded arrays included;
  fingerprint  JSON describing the architecture (model config and parameter shapes).
Because the fingerprint is part of every committed step, a finished checkpoint always
carries it; a crash mid-save leaves only an uncommitted temporary directory that orbax
ignores. Opening a directory whose checkpoints carry another fingerprint is refused
before anything in it is touched.
"""

import os
from collections.abc import Mapping
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from absl import logging
from jax.experimental import multihost_utils

from ddm_jax.checks import PyTree, as_json

_ABSENT = "<absent>"
_MAX_REPORTED_DIFFERENCES = 10


def param_shapes(params: PyTree) -> dict[str, str]:
    """{"path/to/leaf": "float32[3, 4]"} for every leaf (arrays or jax.ShapeDtypeStruct)."""
    return {
        jax.tree_util.keystr(path, simple=True, separator="/"): f"{np.dtype(leaf.dtype).name}{list(np.shape(leaf))}"
        for path, leaf in jax.tree_util.tree_leaves_with_path(params)
    }


def make_fingerprint(model_config: Mapping, params: PyTree) -> dict:
    """The architecture description stored with each checkpoint: model config and param shapes."""
    config = model_config.to_dict() if hasattr(model_config, "to_dict") else dict(model_config)
    return {"model": config, "params": param_shapes(params)}


def _flatten(tree: Mapping, prefix: str = "") -> dict[str, Any]:
    """Nested mappings to {"a.b.c": leaf}."""
    flat = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping) and value:
            flat.update(_flatten(value, f"{name}."))
        else:
            flat[name] = value
    return flat


def fingerprint_differences(stored: Mapping, current: Mapping) -> list[str]:
    """'key: stored != current' for every dotted key whose value differs, sorted by key."""
    stored, current = _flatten(stored), _flatten(current)
    return [
        f"{key}: {stored.get(key, _ABSENT)!r} != {current.get(key, _ABSENT)!r}"
        for key in sorted(stored.keys() | current.keys())
        if stored.get(key, _ABSENT) != current.get(key, _ABSENT)
    ]


def _describe(differences: list[str]) -> str:
    shown = "; ".join(differences[:_MAX_REPORTED_DIFFERENCES])
    hidden = len(differences) - _MAX_REPORTED_DIFFERENCES
    return shown + (f"; and {hidden} more" if hidden > 0 else "")


def check_fingerprint(directory: str | os.PathLike, fingerprint: Mapping, steps=None) -> None:
    """Raises ValueError if any checkpoint in `directory` (or of `steps`) lacks or differs from `fingerprint`.

    Reads only: nothing in `directory` is created, changed or removed.
    """
    directory = os.fspath(directory)
    if not os.path.isdir(directory):
        return
    current = as_json(fingerprint, "fingerprint")
    read_only = ocp.CheckpointManagerOptions(
        read_only=True, create=False, save_interval_steps=0, save_root_metadata=False
    )
    with ocp.CheckpointManager(directory, options=read_only) as reader:
        for step in sorted(reader.all_steps() if steps is None else steps, reverse=True):
            if "fingerprint" not in (reader.metadata(step).item_metadata or {}):
                raise ValueError(
                    f"checkpoint directory {directory} holds step {step} without an architecture "
                    "fingerprint (not written by ddm_jax); use a new --workdir, or move that directory away yourself"
                )
            stored = reader.restore(step, args=ocp.args.Composite(fingerprint=ocp.args.JsonRestore())).fingerprint
            differences = fingerprint_differences(stored, current)
            if differences:
                raise ValueError(
                    f"checkpoint directory {directory} holds checkpoints of another architecture "
                    f"(step {step}, checkpoint != now: {_describe(differences)}); "
                    "use a new --workdir, or delete that directory yourself"
                )


def _abstract(target: PyTree) -> PyTree:
    """Shapes, dtypes and shardings of `target` (arrays or jax.ShapeDtypeStruct leaves)."""
    return jax.tree.map(ocp.utils.to_shape_dtype_struct, target)


class CheckpointStore:
    """Saves and restores TrainStates of one architecture in one directory.

    Usage: `with CheckpointStore(workdir / "checkpoints", fingerprint=fp) as store: ...`
    All processes of a multi-host job open, save and restore together. A `read_only` store
    (evaluation, sampling) creates, saves and deletes nothing, so it can read the checkpoints of
    a run that is still training; it checks the fingerprint of each step it restores, not of
    every step when it opens (the run's retention may delete old steps meanwhile).
    """

    def __init__(
        self,
        directory: str | os.PathLike,
        *,
        fingerprint: Mapping,
        max_to_keep: int | None = 3,
        save_interval_steps: int = 1,
        read_only: bool = False,
    ):
        if max_to_keep is not None and max_to_keep < 1:
            raise ValueError(f"max_to_keep = {max_to_keep}: expected >= 1, or None to keep all")
        if save_interval_steps < 1:
            raise ValueError(f"save_interval_steps = {save_interval_steps}: expected >= 1")
        if not read_only:
            check_fingerprint(directory, fingerprint)
        self._fingerprint = as_json(fingerprint, "fingerprint")
        self._manager = ocp.CheckpointManager(
            os.fspath(directory),
            options=ocp.CheckpointManagerOptions(
                max_to_keep=max_to_keep,
                save_interval_steps=save_interval_steps,
                read_only=read_only,
                create=not read_only,
            ),
        )
        self.read_only = read_only

    @property
    def directory(self) -> str:
        return os.fspath(self._manager.directory)

    def all_steps(self) -> list[int]:
        return sorted(self._manager.all_steps())

    def latest_step(self) -> int | None:
        return self._manager.latest_step()

    def reload(self) -> None:
        """Re-reads the directory's steps (another process, e.g. a training run, may have changed them)."""
        self._manager.reload()

    def save(self, step: int, state: PyTree, *, force: bool = False) -> bool:
        """Saves (asynchronously) when `step` is due or `force`; True if a save started.

        A step that is already saved is never overwritten.
        """
        if self.read_only:
            raise ValueError(f"checkpoint directory {self.directory} was opened read-only; nothing was saved")
        if step in self._manager.all_steps():
            return False
        return self._manager.save(
            step,
            args=ocp.args.Composite(
                state=ocp.args.StandardSave(state),
                fingerprint=ocp.args.JsonSave(self._fingerprint),
            ),
            force=force,
        )

    def _check_step(self, step: int) -> None:
        if step not in self._manager.all_steps():
            raise ValueError(
                f"checkpoint directory {self.directory} has no step {step}; expected one of {self.all_steps()}"
            )

    def restore(self, step: int, target_state: PyTree) -> PyTree:
        """The state saved at `step`, with the structure, dtypes and shardings of `target_state`."""
        self._check_step(step)
        if self.read_only:
            check_fingerprint(self.directory, self._fingerprint, steps=[step])
        return self._manager.restore(
            step, args=ocp.args.Composite(state=ocp.args.StandardRestore(_abstract(target_state)))
        ).state

    def wait_until_finished(self) -> None:
        self._manager.wait_until_finished()

    def close(self) -> None:
        """Waits for pending saves and deletions, then releases the manager."""
        self._manager.close()

    def __enter__(self) -> "CheckpointStore":
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()


def same_on_all_processes(step: int | None) -> int | None:
    """Process 0's value of `step` on every process (-1 stands for None in the broadcast)."""
    if jax.process_count() == 1:
        return step
    value = int(multihost_utils.broadcast_one_to_all(np.int64(-1 if step is None else step)))
    return None if value < 0 else value


def restore_latest(store: CheckpointStore, target_state: PyTree, *, attempts: int = 3) -> tuple[int, PyTree] | None:
    """(step, state) of the store's latest step, or None when it holds none.

    The store may belong to a run that is training: a step listed here can be deleted by its
    retention while it is read; then the new latest is taken, up to `attempts` times. With
    several processes, process 0 chooses the step for all.
    """
    for _ in range(attempts):
        store.reload()
        step = same_on_all_processes(store.latest_step())
        if step is None:
            return None
        try:
            return step, store.restore(step, target_state)
        except Exception:
            store.reload()
            if step in store.all_steps() or jax.process_count() > 1:
                raise
            logging.warning("Checkpoint %d was deleted while being read; taking the latest again", step)
    raise RuntimeError(
        f"checkpoint directory {store.directory}: the latest checkpoint was deleted while being read, "
        f"{attempts} times; the run training there deletes faster than this reads (raise its "
        "training.keep_checkpoints), then try again"
    )
