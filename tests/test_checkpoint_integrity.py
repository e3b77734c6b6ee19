"""Checkpoints that cannot lie: checksums verified on every restore, the fallback past a damaged
step (moved aside by training, left in place by eval and sample), and the last bad inputs: a NaN
before any checkpoint, an unusable --workdir, training.num_steps below the checkpoint."""

import functools
import hashlib
import logging
import os
import shutil
import subprocess
import sys
import zlib
from dataclasses import dataclass

import jax
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest
from tiny_runs import ROOT, tiny_config

from ddm_jax import main
from ddm_jax.checks import ArgumentError
from ddm_jax.training import trainer
from ddm_jax.training.checkpoints import (
    DAMAGED,
    CheckpointStore,
    DamagedCheckpointError,
    make_fingerprint,
    restore_latest,
)
from ddm_jax.training.experiment import Experiment
from ddm_jax.training.train_state import create_train_state

LATEST, PREVIOUS = 4, 2  # the steps the tiny run saves (training.num_steps=4, checkpoint_every=2)
SAMPLING = dict(sampler="ddim", steps=2, num_samples=4)
READ_ONLY = ocp.CheckpointManagerOptions(read_only=True, create=False, save_interval_steps=0, save_root_metadata=False)


@dataclass
class Run:
    data_dir: str
    workdir: str
    target: object  # the initial TrainState: the structure, dtypes and shardings restores take
    fingerprint: dict
    saved: dict  # {step: the TrainState saved at step, on the host}


@pytest.fixture(scope="module")
def run(digits_data_dir, tmp_path_factory) -> Run:
    workdir = str(tmp_path_factory.mktemp("integrity") / "run")
    trainer.train_and_evaluate(tiny_config(digits_data_dir), workdir)
    target = Experiment(tiny_config(digits_data_dir), workdir).initial_state()
    checkpoints = os.path.join(workdir, "checkpoints")
    saved = {step: jax.device_get(orbax_restore(checkpoints, step, target)) for step in (PREVIOUS, LATEST)}
    with ocp.CheckpointManager(checkpoints, options=READ_ONLY) as reader:
        args = ocp.args.Composite(fingerprint=ocp.args.JsonRestore())
        fingerprint = reader.restore(LATEST, args=args).fingerprint
    return Run(digits_data_dir, workdir, target, fingerprint, saved)


def orbax_restore(checkpoints: str, step: int, target):
    """The state of `step` as orbax alone reads it: no checksum, no fallback."""
    abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, target)
    with ocp.CheckpointManager(checkpoints, options=READ_ONLY) as reader:
        return reader.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract))).state


def leaves_by_path(tree) -> dict:
    return {
        jax.tree_util.keystr(path, simple=True, separator="/"): np.asarray(leaf)
        for path, leaf in jax.tree_util.tree_leaves_with_path(jax.device_get(tree))
    }


def changed_arrays(checkpoints: str, run: Run) -> list[str] | None:
    """The arrays of the latest step whose values orbax now reads differently from what was saved,
    or None when orbax cannot read them."""
    try:
        now = leaves_by_path(orbax_restore(checkpoints, LATEST, run.target))
    except Exception:  # a TensorStore error: a damage orbax notices itself
        return None
    before = leaves_by_path(run.saved[LATEST])
    return sorted(path for path in before if not np.array_equal(before[path], now[path], equal_nan=True))


def assert_trees_equal(a, b):
    assert jax.tree.structure(a) == jax.tree.structure(b)
    jax.tree.map(np.testing.assert_array_equal, jax.device_get(a), jax.device_get(b))


def snapshot(directory) -> dict:
    """{relative path: SHA-256 of the file} of every file below `directory`."""
    files = {}
    for folder, _, names in os.walk(directory):
        for name in names:
            with open(os.path.join(folder, name), "rb") as file:
                files[os.path.relpath(os.path.join(folder, name), directory)] = hashlib.sha256(file.read()).hexdigest()
    return files


def copy_checkpoints(run: Run, destination) -> str:
    return str(shutil.copytree(os.path.join(run.workdir, "checkpoints"), destination))


def data_files(step_directory: str, folders=("d", "ocdbt.process_0/d")) -> list[str]:
    """The data files of the state item of a step, largest first: OCDBT's tree nodes (in `d`) and the
    arrays that process 0 wrote (in `ocdbt.process_0/d`, each file ending with that process's own tree)."""
    folders = [os.path.join(step_directory, "state", folder) for folder in folders]
    paths = [os.path.join(folder, name) for folder in folders if os.path.isdir(folder) for name in os.listdir(folder)]
    return sorted(paths, key=os.path.getsize, reverse=True)


def flip_bytes(path: str, position: int, count: int = 8) -> None:
    with open(path, "r+b") as file:
        file.seek(position)
        original = file.read(count)
        file.seek(position)
        file.write(bytes(byte ^ 0xFF for byte in original))


def flip_optimizer_state(checkpoints: str, run: Run) -> list[str]:
    """Flips bytes of the latest step at the first place (data files largest first, at 10%, 30%,
    50%, 70% of each) where that silently changes an optimizer-state array (orbax reads it without
    error); returns the arrays changed. Where orbax puts the arrays varies between writes, so more
    than one place is tried."""
    for path in data_files(os.path.join(checkpoints, str(LATEST))):
        for tenths in (1, 3, 5, 7):
            position = os.path.getsize(path) * tenths // 10
            flip_bytes(path, position)
            changed = changed_arrays(checkpoints, run) or []
            if any(name.startswith("opt_state/") for name in changed):
                return changed
            flip_bytes(path, position)  # flipped back
    raise AssertionError("no data file holds optimizer state at 10-70% of its length")


def truncate_largest_data_file(checkpoints: str, run: Run) -> None:
    """Keeps the first tenth of the largest file of arrays."""
    path = data_files(os.path.join(checkpoints, str(LATEST)), folders=("ocdbt.process_0/d",))[0]
    os.truncate(path, os.path.getsize(path) // 10)


def delete_state_metadata(checkpoints: str, run: Run, step: int = LATEST) -> None:
    os.remove(os.path.join(checkpoints, str(step), "state", "_METADATA"))


def empty_manifest(checkpoints: str, run: Run) -> None:
    open(os.path.join(checkpoints, str(LATEST), "state", "manifest.ocdbt"), "w").close()


DAMAGES = {  # each damages the latest step of a copy of the run's checkpoints
    "truncated data file": truncate_largest_data_file,
    "deleted state/_METADATA": delete_state_metadata,
    "emptied manifest.ocdbt": empty_manifest,
    "flipped bytes": flip_optimizer_state,
}


# ----------------------------------------------------------------------------- checksums


def test_checksums_are_the_crc32_of_every_saved_array(run):
    """Against zlib over the bytes of the values orbax reads back, computed here independently."""
    with ocp.CheckpointManager(os.path.join(run.workdir, "checkpoints"), options=READ_ONLY) as reader:
        record = reader.restore(LATEST, args=ocp.args.Composite(checksums=ocp.args.JsonRestore())).checksums
    values = leaves_by_path(run.saved[LATEST])
    assert record["crc32"] == {
        path: zlib.crc32(value.astype(value.dtype.newbyteorder("<")).tobytes()) for path, value in values.items()
    }
    assert record["arrays"] == {path: f"{value.dtype.name}{list(value.shape)}" for path, value in values.items()}
    assert any(path.startswith("opt_state/") for path in record["crc32"])


def test_byte_flips_in_any_data_file_are_detected_naming_the_arrays(run, tmp_path):
    """Flips at several places of every data file of the latest step: whatever orbax reads differently
    from what was saved (found here by comparing with the saved values) is named, optimizer state included;
    a flip of bytes that no array reads changes nothing and passes."""
    named, original = set(), os.path.join(run.workdir, "checkpoints")
    for index, path in enumerate(data_files(os.path.join(original, str(LATEST)))):
        for fraction in (0.1, 0.3):
            checkpoints = copy_checkpoints(run, tmp_path / f"{index}_{fraction}")
            flip_bytes(
                os.path.join(checkpoints, os.path.relpath(path, original)), int(fraction * os.path.getsize(path))
            )
            changed = changed_arrays(checkpoints, run)
            with CheckpointStore(checkpoints, fingerprint=run.fingerprint, read_only=True) as store:
                if changed == []:
                    assert_trees_equal(store.restore(LATEST, run.target), run.saved[LATEST])
                    continue
                with pytest.raises(DamagedCheckpointError) as error:
                    store.restore(LATEST, run.target)
            message = str(error.value)
            assert message.startswith(f"checkpoint step {LATEST} in {checkpoints} is damaged: ")
            if changed is None:
                assert "orbax cannot read item 'state'" in message
            else:
                assert "item 'state': " in message and all(name in message for name in changed[:10]), (changed, message)
                named.update(changed)
    assert any(name.startswith("opt_state/") for name in named) and len(named) >= 3, named


# ----------------------------------------------------------------------------- fallback


@pytest.mark.parametrize("damage", DAMAGES)
def test_training_store_falls_back_and_moves_the_damaged_step_aside_out_of_retention(run, tmp_path, caplog, damage):
    checkpoints = copy_checkpoints(run, tmp_path / "checkpoints")
    DAMAGES[damage](checkpoints, run)
    damaged_files = snapshot(os.path.join(checkpoints, str(LATEST)))
    with (
        caplog.at_level(logging.WARNING),
        CheckpointStore(checkpoints, fingerprint=run.fingerprint, max_to_keep=2) as store,
    ):
        step, state = restore_latest(store, run.target)
        assert step == PREVIOUS
        assert_trees_equal(state, run.saved[PREVIOUS])
        aside = os.path.join(checkpoints, DAMAGED, str(LATEST))
        assert (
            f"Checkpoint step {LATEST} in {checkpoints} is damaged" in caplog.text
            and f"moved to {aside}" in caplog.text
        )
        assert snapshot(aside) == damaged_files  # moved whole, nothing deleted
        assert store.all_steps() == [PREVIOUS] and not os.path.exists(os.path.join(checkpoints, str(LATEST)))
        for new_step in (6, 8, 10):  # retention keeps 2 and never counts or deletes the damaged step
            assert store.save(new_step, state, force=True)
        store.wait_until_finished()
        assert store.all_steps() == [8, 10]
    assert snapshot(aside) == damaged_files
    with CheckpointStore(checkpoints, fingerprint=run.fingerprint) as reopened:  # damaged/ is no step to orbax
        assert reopened.all_steps() == [8, 10]


@pytest.mark.parametrize("damage", DAMAGES)
def test_read_only_store_takes_the_newest_intact_step_and_moves_nothing(run, tmp_path, caplog, damage):
    checkpoints = copy_checkpoints(run, tmp_path / "checkpoints")
    DAMAGES[damage](checkpoints, run)
    before = snapshot(checkpoints)
    with (
        caplog.at_level(logging.WARNING),
        CheckpointStore(checkpoints, fingerprint=run.fingerprint, read_only=True) as store,
    ):
        step, state = restore_latest(store, run.target)
        with pytest.raises(DamagedCheckpointError, match=f"checkpoint step {LATEST} in .* is damaged"):
            store.restore(LATEST, run.target)
    assert step == PREVIOUS
    assert_trees_equal(state, run.saved[PREVIOUS])
    assert (
        f"Checkpoint step {LATEST} in {checkpoints} is damaged" in caplog.text
        and "left in place (read-only)" in caplog.text
    )
    assert snapshot(checkpoints) == before


def test_every_step_damaged_leaves_none_and_keeps_them_all(run, tmp_path):
    checkpoints = copy_checkpoints(run, tmp_path / "checkpoints")
    for step in (PREVIOUS, LATEST):
        delete_state_metadata(checkpoints, run, step)
    with CheckpointStore(checkpoints, fingerprint=run.fingerprint) as store:
        assert restore_latest(store, run.target) is None
        assert store.all_steps() == []
    assert sorted(os.listdir(os.path.join(checkpoints, DAMAGED))) == [str(PREVIOUS), str(LATEST)]


def test_training_resumes_past_flipped_optimizer_state_bit_identical(run, tmp_path, caplog):
    """The flipped latest step is skipped; training redoes its steps from the previous one and saves
    exactly the state of the run that never had it damaged."""
    workdir = str(tmp_path / "run")
    shutil.copytree(run.workdir, workdir)
    checkpoints = os.path.join(workdir, "checkpoints")
    changed = flip_optimizer_state(checkpoints, run)
    damaged_files = snapshot(os.path.join(checkpoints, str(LATEST)))
    with caplog.at_level(logging.WARNING):
        result = trainer.train_and_evaluate(tiny_config(run.data_dir), workdir)
    assert result["resumed_from"] == PREVIOUS and result["step"] == LATEST
    assert f"Checkpoint step {LATEST} in {checkpoints} is damaged" in caplog.text
    assert [name for name in changed if name.startswith("opt_state/")][0] in caplog.text
    assert snapshot(os.path.join(checkpoints, DAMAGED, str(LATEST))) == damaged_files
    assert_trees_equal(orbax_restore(checkpoints, LATEST, run.target), run.saved[LATEST])


def test_eval_and_sample_take_the_newest_intact_step_and_refuse_a_damaged_step(run, tmp_path, caplog):
    workdir = str(tmp_path / "run")
    shutil.copytree(run.workdir, workdir)
    checkpoints = os.path.join(workdir, "checkpoints")
    truncate_largest_data_file(checkpoints, run)
    before = snapshot(checkpoints)
    for purpose, call in (("evaluate", trainer.evaluate), ("sample", functools.partial(trainer.sample, **SAMPLING))):
        refusal = rf"--step={LATEST}: expected an intact checkpoint to {purpose}; checkpoint step {LATEST} .* damaged"
        with pytest.raises(ArgumentError, match=refusal):
            call(None, workdir, step=LATEST)
    with pytest.raises(ArgumentError, match=rf"--step=3: expected one of the steps \[{PREVIOUS}, {LATEST}\]"):
        trainer.evaluate(None, workdir, step=3)
    with caplog.at_level(logging.WARNING):
        evaluation = trainer.evaluate(None, workdir)
    assert evaluation["step"] == PREVIOUS and np.isfinite(evaluation["bpd"])
    assert f"Checkpoint step {LATEST} in {checkpoints} is damaged" in caplog.text
    assert "left in place (read-only)" in caplog.text
    samples = trainer.sample(None, workdir, step=PREVIOUS, **SAMPLING)  # an intact step, named
    assert samples["step"] == PREVIOUS and f"checkpoint{PREVIOUS}" in samples["png"]
    assert snapshot(checkpoints) == before  # read-only: nothing moved


# ----------------------------------------------------------------------------- not damage


def small_state(optimizer):
    params = {"dense": {"kernel": np.arange(6, dtype=np.float32).reshape(3, 2), "bias": np.ones(2, np.float32)}}
    return create_train_state(jax.tree.map(jax.numpy.asarray, params), optimizer)


def small_fingerprint():
    return make_fingerprint({"layers": 1}, small_state(optax.adam(0.1)).params)


def test_a_state_of_another_structure_is_refused_not_moved(tmp_path):
    """Other optimizer settings change the state's structure: a user's mistake, not damage."""
    with CheckpointStore(tmp_path, fingerprint=small_fingerprint()) as store:
        store.save(1, small_state(optax.adam(0.1)))
    before = snapshot(tmp_path)
    clipped = small_state(optax.chain(optax.clip_by_global_norm(1.0), optax.adam(0.1)))
    refusal = r"^--config=.*its step 1 holds a training state of another structure .*opt_state/"
    with (
        CheckpointStore(tmp_path, fingerprint=small_fingerprint()) as store,
        pytest.raises(ArgumentError, match=refusal),
    ):
        restore_latest(store, clipped)
    assert snapshot(tmp_path) == before


def test_a_step_saved_without_checksums_restores_unverified_with_a_warning(tmp_path, caplog):
    """Checkpoints of a ddm_jax from before the checksums still resume."""
    state = small_state(optax.adam(0.1))
    with ocp.CheckpointManager(tmp_path) as older:
        older.save(
            3,
            args=ocp.args.Composite(
                state=ocp.args.StandardSave(state), fingerprint=ocp.args.JsonSave(small_fingerprint())
            ),
        )
    with caplog.at_level(logging.WARNING), CheckpointStore(tmp_path, fingerprint=small_fingerprint()) as store:
        step, restored = restore_latest(store, small_state(optax.adam(0.1)))
    assert step == 3 and "has no checksums" in caplog.text
    assert_trees_equal(restored, state)


# ----------------------------------------------------------------------------- bad inputs


def test_non_finite_loss_before_any_checkpoint_says_that_none_exists(run, tmp_path):
    config = tiny_config(run.data_dir, num_steps=4, checkpoint_every=4, log_every=2)
    config.optimizer.lr = 1e30
    with pytest.raises(FloatingPointError, match=r"stopped before step \d+ was saved, so no checkpoint exists in"):
        trainer.train_and_evaluate(config, str(tmp_path))
    assert [name for name in os.listdir(tmp_path / "checkpoints") if name.isdigit()] == []


def test_num_steps_below_the_checkpoint_warns_and_the_report_says_so(run, tmp_path, caplog, capsys):
    workdir = str(tmp_path / "run")
    shutil.copytree(run.workdir, workdir)
    before = snapshot(os.path.join(workdir, "checkpoints"))
    with caplog.at_level(logging.WARNING):
        result = trainer.train_and_evaluate(tiny_config(run.data_dir, num_steps=PREVIOUS), workdir)
    note = f"training.num_steps={PREVIOUS} is below the checkpoint's step {LATEST}; nothing was trained"
    assert result["step"] == LATEST and result["resumed_from"] == LATEST and result["note"] == note
    assert f"{note}; reporting step {LATEST}" in caplog.text
    main.report(result)
    assert f"at step {LATEST} ({note})" in capsys.readouterr().out
    assert snapshot(os.path.join(workdir, "checkpoints")) == before  # nothing saved


def refused_resume(run: Run, tmp_path, config) -> str:
    """The refusal of resuming a copy of the run with `config`; asserts that the copy's checkpoints
    and saved config were left as they were."""
    workdir = str(tmp_path / "run")
    shutil.copytree(run.workdir, workdir)
    before = snapshot(workdir)
    with pytest.raises(ArgumentError) as error:
        trainer.train_and_evaluate(config, workdir)
    assert snapshot(workdir) == before
    return str(error.value)


def test_a_resume_with_other_optimizer_settings_is_refused_and_the_saved_config_kept(run, tmp_path):
    """No clipping changes the optimizer state's structure: one clear error, and config.py is not
    replaced by the refused config (eval and sample read it)."""
    config = tiny_config(run.data_dir)
    config.optimizer.grad_clip_norm = 0.0
    refusal = refused_resume(run, tmp_path, config)
    assert refusal.startswith("--config='the given config': expected the optimizer settings of the run in ")
    assert f"its step {LATEST} holds a training state of another structure" in refusal


def test_a_resume_with_substeps_that_do_not_divide_the_step_is_refused(run, tmp_path):
    """Steps run in calls of `substeps`: from step 4 in calls of 3 no save boundary would be met."""
    config = tiny_config(run.data_dir, substeps=3, num_steps=6, log_every=3, eval_every=6, checkpoint_every=3)
    config.training.sample_every = 6
    refusal = refused_resume(run, tmp_path, config)
    assert (
        refusal
        == f"training.substeps=3: expected a divisor of the step {LATEST} the run resumes from (the steps of one call)"
    )


def workdir_refusal(workdir, writable: bool) -> str:
    with pytest.raises(ArgumentError) as error:
        main.check_workdir(str(workdir), writable=writable)
    return str(error.value)


def test_a_workdir_that_is_a_file_is_refused_naming_the_flag(tmp_path):
    path = tmp_path / "file"
    path.write_text("a user's file")
    for writable in (True, False):
        assert workdir_refusal(path, writable) == f"--workdir='{path}': expected a directory; {path} is a regular file"
        inside = path / "run"
        assert (
            workdir_refusal(inside, writable) == f"--workdir='{inside}': expected a directory; {path} is a regular file"
        )
    assert path.read_text() == "a user's file"


def test_a_workdir_on_a_read_only_filesystem_is_refused_for_training_only(tmp_path):
    mount_point = tmp_path / "read_only"
    mount_point.mkdir()
    mount = ["mount", "-t", "tmpfs", "-o", "ro,size=1m", "tmpfs", str(mount_point)]
    mounted = subprocess.run(mount, capture_output=True, text=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a read-only tmpfs here: {mounted.stderr.strip()}")
    try:
        workdir = mount_point / "run"
        assert workdir_refusal(workdir, writable=True) == (
            f"--workdir='{workdir}': expected a directory training can write to; "
            f"{mount_point} is on a read-only filesystem"
        )
        main.check_workdir(str(mount_point), writable=False)  # eval and sample only read
        assert os.listdir(mount_point) == []
    finally:
        subprocess.run(["umount", str(mount_point)], check=True)


def test_a_workdir_without_permission_is_refused_naming_the_flag(tmp_path, monkeypatch):
    """Root may write anywhere, so the permission is taken away from os.access here."""
    workdir = tmp_path / "run"
    workdir.mkdir()
    monkeypatch.setattr(os, "access", lambda path, mode: not mode & os.W_OK)
    assert workdir_refusal(workdir, writable=True) == (
        f"--workdir='{workdir}': expected a directory training can write to; {workdir} is not writable by this user"
    )
    main.check_workdir(str(workdir), writable=False)
    monkeypatch.setattr(os, "access", lambda path, mode: False)
    assert workdir_refusal(workdir, writable=False) == (
        f"--workdir='{workdir}': expected a readable directory; {workdir} is not readable by this user"
    )
    assert os.listdir(workdir) == []


@pytest.mark.parametrize(
    "flag, message",
    [
        ("--workdir={file}", "ddm_jax: --workdir='{file}': expected a directory; {file} is a regular file"),
        ("--config.model.foo=1", "ddm_jax: --config.model.foo: config.model has no field 'foo'"),
    ],
)
def test_the_entry_point_stops_at_once_naming_the_flag_and_creates_nothing(tmp_path, flag, message):
    file, workdir = tmp_path / "file", tmp_path / "run"
    file.write_text("a user's file")
    command = [
        sys.executable,
        "-m",
        "ddm_jax.main",
        "--config=configs/vdm_digits.py",
        f"--workdir={workdir}",
        flag.format(file=file),
    ]
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode != 0 and message.format(file=file) in result.stderr, result.stderr[-3000:]
    assert sorted(os.listdir(tmp_path)) == ["file"] and file.read_text() == "a user's file"


@pytest.mark.parametrize(
    "overrides, message",
    [
        (
            {"model": dict(schedule="learned_monotone", schedule_features=0)},
            "model.schedule_features=0: expected an integer >= 1",
        ),
        (
            {"model": dict(schedule="ddpm_linear", T=10, ddpm_betas=(0.5, 2.0))},
            "model.ddpm_betas=2.0: expected a number in (0.5, 1.0)",
        ),
        ({"data": dict(dataset="cifar10")}, "data.dataset='cifar10': expected a dataset prepared under"),
        ({"training": dict(batch_size=4096)}, "training.batch_size=4096: expected at most the 1437 training examples"),
        ({"training": dict(seed=-1)}, "training.seed=-1: expected an integer >= 0"),
    ],
)
def test_bad_config_stops_training_before_the_workdir_is_created(run, tmp_path, overrides, message):
    config = tiny_config(run.data_dir)
    if "data" in overrides:
        config.data.data_dir = str(tmp_path / "tfds")  # cifar10 is not prepared there
    for section, fields in overrides.items():
        config[section].update(fields)
    with pytest.raises(ArgumentError) as error:
        trainer.train_and_evaluate(config, str(tmp_path / "run"))
    assert str(error.value).startswith(message)
    assert os.listdir(tmp_path) == []
