"""Checkpoints over orbax's CheckpointManager: atomic, keep-N, every N steps, resumable, verified.

Each step directory `<directory>/<step>/` holds three items, committed together by orbax's
atomic rename of the step's temporary directory:
  state        the TrainState (any pytree of arrays), sharded arrays included;
  fingerprint  JSON describing the architecture (model config and parameter shapes);
  checksums    JSON: the dtype and shape of every array of `state` ("arrays") and the CRC-32
               of its bytes ("crc32"), keyed by the array's path, e.g. "opt_state/0/mu/dense/kernel".
A crash mid-save leaves only an uncommitted temporary directory that orbax ignores. Opening a
directory whose checkpoints carry another fingerprint is refused before anything in it is touched.

Checksums. CRC-32 (zlib) of each array's global value as little-endian bytes in C order,
computed on the host before orbax's asynchronous save starts, from the same immutable arrays
orbax copies, so they describe exactly the values saved. An array sharded over several
processes is gathered first (every process computes every checksum); a fully replicated one,
as this project's TrainState is, needs no gather. Every restore recomputes them.

Damaged steps. A step that orbax cannot read, or whose arrays differ from their checksums, is
damaged (`DamagedCheckpointError`). `restore_latest` skips it for the newest intact step; a
writable store moves it to `<directory>/damaged/<step>/`, out of orbax's view, so that neither
its step list nor retention (`max_to_keep`) ever sees it, and nothing is deleted.
"""

import os
import sys
import zlib
from collections.abc import Mapping
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from absl import logging
from jax.experimental import multihost_utils

from ddm_jax.checks import PyTree, as_json, check

DAMAGED = "damaged"  # the folder, inside the checkpoint directory, damaged steps are moved to
_ABSENT = "<absent>"
_MAX_REPORTED_DIFFERENCES = 10
_MAX_REASON_CHARACTERS = 300


class DamagedCheckpointError(ValueError):
    """A committed step that cannot be read back as it was saved."""

    def __init__(self, directory: str, step: int, reason: str):
        self.directory, self.step, self.reason = directory, step, reason
        super().__init__(f"checkpoint step {step} in {directory} is damaged: {reason}")


def _path_name(path) -> str:
    return jax.tree_util.keystr(path, simple=True, separator="/")


def param_shapes(params: PyTree) -> dict[str, str]:
    """{"path/to/leaf": "float32[3, 4]"} for every leaf (arrays or jax.ShapeDtypeStruct)."""
    return {
        _path_name(path): f"{np.dtype(leaf.dtype).name}{list(np.shape(leaf))}"
        for path, leaf in jax.tree_util.tree_leaves_with_path(params)
    }


def _host_value(leaf) -> jax.Array | np.ndarray:
    """`leaf` as this process can read it whole: an array sharded over processes is gathered."""
    if isinstance(leaf, jax.Array) and not (leaf.is_fully_addressable or leaf.is_fully_replicated):
        return multihost_utils.process_allgather(leaf, tiled=True)
    return leaf


def _little_endian_bytes(value: np.ndarray) -> np.ndarray:
    """The array's bytes in C order, each element little-endian, as a flat uint8 array."""
    value = np.ascontiguousarray(value)
    big_endian = value.dtype.byteorder == ">" or (value.dtype.byteorder == "=" and sys.byteorder == "big")
    return (value.byteswap() if big_endian else value).reshape(-1).view(np.uint8)


def array_checksums(tree: PyTree) -> dict[str, int]:
    """{"path/to/leaf": CRC-32 of the leaf's global value as little-endian bytes} for every leaf."""
    values = jax.device_get(jax.tree.map(_host_value, tree))
    return {
        _path_name(path): zlib.crc32(_little_endian_bytes(np.asarray(value)))
        for path, value in jax.tree_util.tree_leaves_with_path(values)
    }


def checksum_record(tree: PyTree) -> dict:
    """The `checksums` item saved with `tree`: its arrays' dtypes and shapes, and their CRC-32s."""
    return {"arrays": param_shapes(tree), "crc32": array_checksums(tree)}


def mismatched_arrays(record: Mapping, tree: PyTree) -> list[str]:
    """Paths of the leaves of `tree` whose CRC-32 differs from `record` (a `checksum_record`), sorted."""
    stored = record["crc32"]
    return sorted(path for path, crc in array_checksums(tree).items() if stored.get(path) != crc)


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


def _short(error: Exception) -> str:
    """'Type: first line of the message', cut short (TensorStore messages carry whole specs)."""
    lines = str(error).strip().splitlines() or [""]
    text = f"{type(error).__name__}: {lines[0]}"
    return text if len(text) <= _MAX_REASON_CHARACTERS else text[:_MAX_REASON_CHARACTERS] + " ..."


def _read_json_items(manager: ocp.CheckpointManager, step: int, names: tuple[str, ...]) -> dict:
    """{name: JSON item} of `step`; DamagedCheckpointError when orbax cannot read them."""
    try:
        items = manager.restore(step, args=ocp.args.Composite(**{name: ocp.args.JsonRestore() for name in names}))
    except Exception as error:  # any failure to read a committed step is damage
        raise DamagedCheckpointError(
            os.fspath(manager.directory), step, f"cannot read item(s) {', '.join(names)}: {_short(error)}"
        ) from error
    return {name: items[name] for name in names}


def _has_item(directory: str, step: int, name: str) -> bool:
    return os.path.isdir(os.path.join(directory, str(step), name))


def _check_same_architecture(directory: str, step: int, stored: Mapping, current: Mapping) -> None:
    differences = fingerprint_differences(stored, current)
    if differences:
        raise ValueError(
            f"checkpoint directory {directory} holds checkpoints of another architecture "
            f"(step {step}, checkpoint != now: {_describe(differences)}); "
            "use a new --workdir, or delete that directory yourself"
        )


def _check_written_by_ddm_jax(directory: str, step: int) -> None:
    if not _has_item(directory, step, "fingerprint"):
        raise ValueError(
            f"checkpoint directory {directory} holds step {step} without an architecture "
            "fingerprint (not written by ddm_jax); use a new --workdir, or move that directory away yourself"
        )


def check_fingerprint(directory: str | os.PathLike, fingerprint: Mapping) -> None:
    """Raises ValueError if any checkpoint in `directory` lacks or differs from `fingerprint`.

    A step whose fingerprint cannot be read is left to `CheckpointStore.restore`, which reports it
    as damaged. Reads only: nothing in `directory` is created, changed or removed.
    """
    directory = os.fspath(directory)
    if not os.path.isdir(directory):
        return
    current = as_json(fingerprint, "fingerprint")
    read_only = ocp.CheckpointManagerOptions(
        read_only=True, create=False, save_interval_steps=0, save_root_metadata=False
    )
    with ocp.CheckpointManager(directory, options=read_only) as reader:
        for step in sorted(reader.all_steps(), reverse=True):
            _check_written_by_ddm_jax(directory, step)
            try:
                stored = _read_json_items(reader, step, ("fingerprint",))["fingerprint"]
            except DamagedCheckpointError:
                continue
            _check_same_architecture(directory, step, stored, current)


def _abstract(target: PyTree) -> PyTree:
    """Shapes, dtypes and shardings of `target` (arrays or jax.ShapeDtypeStruct leaves)."""
    return jax.tree.map(ocp.utils.to_shape_dtype_struct, target)


class CheckpointStore:
    """Saves and restores TrainStates of one architecture in one directory, with checksums.

    Usage: `with CheckpointStore(workdir / "checkpoints", fingerprint=fp) as store: ...`
    All processes of a multi-host job open, save and restore together. A `read_only` store
    (evaluation, sampling) creates, saves, moves and deletes nothing, so it can read the
    checkpoints of a run that is still training. Every restore checks the step's fingerprint and
    the checksums of every array it reads.
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

        The checksums are computed before this returns, from the arrays orbax saves. A step that
        is already saved is never overwritten.
        """
        if self.read_only:
            raise ValueError(f"checkpoint directory {self.directory} was opened read-only; nothing was saved")
        if step in self._manager.all_steps() or not (force or self._manager.should_save(step)):
            return False
        return self._manager.save(
            step,
            args=ocp.args.Composite(
                state=ocp.args.StandardSave(state),
                fingerprint=ocp.args.JsonSave(self._fingerprint),
                checksums=ocp.args.JsonSave(checksum_record(state)),
            ),
            force=force,
        )

    def _check_step(self, step: int) -> None:
        if step not in self._manager.all_steps():
            raise ValueError(
                f"checkpoint directory {self.directory} has no step {step}; expected one of {self.all_steps()}"
            )

    def restore(self, step: int, target_state: PyTree) -> PyTree:
        """The state saved at `step`, with the structure, dtypes and shardings of `target_state`.

        Raises:
          ValueError: no such step; or it holds another architecture, or a state of another
            structure (e.g. other optimizer settings) than `target_state`.
          DamagedCheckpointError: orbax cannot read the step, or an array differs from its checksum.
        """
        self._check_step(step)
        if os.path.isdir(os.path.join(self.directory, str(step))):  # else deleted meanwhile: damaged below
            _check_written_by_ddm_jax(self.directory, step)
        verified = _has_item(self.directory, step, "checksums")
        items = _read_json_items(self._manager, step, ("fingerprint", "checksums") if verified else ("fingerprint",))
        _check_same_architecture(self.directory, step, items["fingerprint"], self._fingerprint)
        if verified:
            self._check_same_structure(step, items["checksums"], target_state)
        else:
            logging.warning(
                "Checkpoint step %d in %s has no checksums (an older ddm_jax): unverified", step, self.directory
            )
        try:
            state = self._manager.restore(
                step, args=ocp.args.Composite(state=ocp.args.StandardRestore(_abstract(target_state)))
            ).state
        except Exception as error:  # any failure to read a committed step is damage
            raise DamagedCheckpointError(
                self.directory, step, f"orbax cannot read item 'state': {_short(error)}"
            ) from error
        mismatched = mismatched_arrays(items["checksums"], state) if verified else []
        if mismatched:
            raise DamagedCheckpointError(
                self.directory,
                step,
                f"item 'state': {len(mismatched)} array(s) differ from their CRC-32 checksums: "
                + _describe(mismatched),
            )
        return state

    def _check_same_structure(self, step: int, record: Mapping, target_state: PyTree) -> None:
        """A state of another structure is a mismatch of settings, not damage: refused (the user's
        mistake, ArgumentError), left in place."""
        differences = fingerprint_differences(record["arrays"], param_shapes(target_state))
        check(
            not differences,
            "--config",
            "the given config",
            f"the optimizer settings of the run in {self.directory}: its step {step} holds a training state of "
            f"another structure than this config's (checkpoint != now: {_describe(differences)}). Use a new "
            "--workdir, or the settings the run was saved with",
        )

    def move_aside(self, step: int) -> str:
        """Moves the directory of `step` to `damaged/<step>` (out of orbax's view); returns its new path.

        Process 0 moves it; all processes then see the step gone. Nothing is deleted: a name
        already taken in `damaged/` gets a suffix (`damaged/<step>.2`, ...).
        """
        if self.read_only:
            raise ValueError(f"checkpoint directory {self.directory} was opened read-only; nothing was moved")
        destination, copies = os.path.join(self.directory, DAMAGED, str(step)), 1
        while os.path.exists(destination):
            copies += 1
            destination = os.path.join(self.directory, DAMAGED, f"{step}.{copies}")
        _sync_processes(f"ddm_jax: checkpoint step {step} about to be moved aside")  # all named it first
        if jax.process_index() == 0:
            os.makedirs(os.path.dirname(destination), exist_ok=True)
            os.rename(os.path.join(self.directory, str(step)), destination)
        _sync_processes(f"ddm_jax: checkpoint step {step} moved aside")
        self.reload()
        return destination

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


def _sync_processes(name: str) -> None:
    if jax.process_count() > 1:
        multihost_utils.sync_global_devices(name)


def true_on_any_process(flag: bool) -> bool:
    """Whether `flag` holds on at least one process."""
    if jax.process_count() == 1:
        return flag
    return bool(np.any(multihost_utils.process_allgather(np.int32(flag))))


def _newest_below(steps: list[int], below: int | None) -> int | None:
    candidates = [step for step in steps if below is None or step < below]
    return max(candidates, default=None)


def restore_latest(store: CheckpointStore, target_state: PyTree, *, attempts: int = 3) -> tuple[int, PyTree] | None:
    """(step, state) of the store's newest intact step, or None when it holds none.

    A damaged step (`DamagedCheckpointError`) is skipped with a warning naming it and why; a
    writable store moves it to `damaged/` (`CheckpointStore.move_aside`), a read-only one leaves
    it in place. The store may belong to a run that is training: a step its retention deletes
    while it is read is not damaged, and the newest step is taken again, up to `attempts` times.
    With several processes, process 0 chooses each step, and a step is intact only if every
    process read it intact.
    """
    store.reload()
    damaged, deletions, below = [], 0, None
    while (step := same_on_all_processes(_newest_below(store.all_steps(), below))) is not None:
        try:
            state, failure = store.restore(step, target_state), None
        except DamagedCheckpointError as error:
            failure = error
        if not true_on_any_process(failure is not None):
            if damaged:
                logging.warning("Checkpoint directory %s: took step %d, the newest intact one", store.directory, step)
            return step, state
        store.reload()
        if not same_on_all_processes(int(step in store.all_steps())):  # deleted by a training run's retention
            deletions += 1
            if deletions == attempts:
                raise RuntimeError(
                    f"checkpoint directory {store.directory}: the latest checkpoint was deleted while being read, "
                    f"{attempts} times; the run training there deletes faster than this reads (raise its "
                    "training.keep_checkpoints), then try again"
                )
            logging.warning("Checkpoint %d was deleted while being read; taking the latest again", step)
            continue
        reason = failure.reason if failure is not None else "unreadable on another process"
        where = "left in place (read-only)" if store.read_only else f"moved to {store.move_aside(step)}"
        logging.warning("Checkpoint step %d in %s is damaged (%s); %s", step, store.directory, reason, where)
        damaged.append(step)
        below = step
    if damaged:
        logging.warning("Checkpoint directory %s: no intact step left (damaged: %s)", store.directory, damaged)
    return None
