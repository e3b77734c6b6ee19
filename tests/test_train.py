"""End to end on the offline digits builder: train, checkpoint, resume, evaluate, refuse."""

import os
import re
import shutil

import numpy as np
import pytest
from tiny_runs import tiny_config

from ddm_jax.training import trainer
from ddm_jax.training.checkpoints import CheckpointStore
from ddm_jax.training.experiment import Experiment, load_saved_config


def listing(directory):
    return sorted(
        (
            os.path.relpath(os.path.join(root, f), directory),
            os.path.getsize(os.path.join(root, f)),
            os.path.getmtime(os.path.join(root, f)),
        )
        for root, _, files in os.walk(directory)
        for f in files
    )


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    data_dir = tmp_path_factory.mktemp("tfds")
    workdir = os.path.relpath(tmp_path_factory.mktemp("workdir"))  # relative, as make run passes it
    first = trainer.train_and_evaluate(tiny_config(data_dir), workdir)
    return data_dir, workdir, first


def test_training_writes_checkpoints_samples_and_events(trained):
    _, workdir, first = trained
    assert first["step"] == 4 and first["resumed_from"] == 0
    assert sorted(os.listdir(os.path.join(workdir, "checkpoints"))) == ["2", "4"]
    assert os.path.isfile(first["samples"])
    assert any(f.startswith("events.out.tfevents") for f in os.listdir(workdir))
    assert np.isfinite(first["bpd"]) and first["num_examples"] == 360


def test_restart_resumes_from_latest_checkpoint_and_eval_reports_bpd(trained):
    data_dir, workdir, _ = trained
    resumed = trainer.train_and_evaluate(tiny_config(data_dir, num_steps=6), workdir)
    assert resumed["resumed_from"] == 4 and resumed["step"] == 6
    evaluation = trainer.evaluate(tiny_config(data_dir, num_steps=6), workdir)
    assert evaluation["step"] == 6 and evaluation["num_examples"] == 360
    parts = evaluation["reconstruction_bpd"] + evaluation["prior_bpd"] + evaluation["diffusion_bpd"]
    assert evaluation["bpd"] == pytest.approx(parts, rel=1e-5)


def test_workdir_of_another_architecture_is_refused_untouched(trained):
    data_dir, workdir, _ = trained
    before = listing(workdir)
    config = tiny_config(data_dir, num_steps=8)
    config.model.score_net.n_layers = 2
    with pytest.raises(ValueError, match=r"these fields differ: model.score_net.n_layers: 1 != 2"):
        trainer.train_and_evaluate(config, workdir)
    assert listing(workdir) == before


def test_eval_of_an_empty_workdir_is_refused(trained, tmp_path):
    data_dir, _, _ = trained
    with pytest.raises(ValueError, match="expected a workdir holding a checkpoint to evaluate"):
        trainer.evaluate(tiny_config(data_dir), str(tmp_path))


@pytest.mark.parametrize(
    "field, value, message",
    [
        ("data.dataset", "imagenet9", "data.dataset='imagenet9': expected"),
        ("data.vocab_size", 256, "data.vocab_size=256: expected 17, the vocabulary of dataset 'digits'"),
        ("model.schedule", "sqrt", "model.schedule='sqrt': expected one of"),
        ("model.gamma_min", 6.0, "model.gamma_max=5.0: expected a value above gamma_min=6.0"),
        ("training.batch_size", 0, "training.batch_size=0: expected an integer >= 1"),
        ("training.batch_size", 4096, "training.batch_size=4096: expected at most the 1437 training examples"),
        ("optimizer.lr", -1.0, "optimizer.lr=-1.0: expected a learning rate > 0"),
    ],
)
def test_bad_config_is_refused_before_compilation(trained, field, value, message, tmp_path):
    data_dir, _, _ = trained
    config = tiny_config(data_dir)
    section, name = field.split(".")
    config[section][name] = value
    with pytest.raises(ValueError, match=re.escape(message)):
        Experiment(config, str(tmp_path / "workdir"))
    assert not os.path.exists(tmp_path / "workdir")


def test_cifar10_with_dihedral_augmentation_steps_and_evaluates_on_mock_data(tmp_path):
    """The augmentation reaches the network as an 8-way one-hot cond; eval conditions on the identity.
    (Only the data is mocked: mock_data also redirects file writes, so no checkpoint is written.)"""
    import tensorflow_datasets as tfds

    from ddm_jax.data import train_batches
    from ddm_jax.training.sharding import shard_batch

    config = tiny_config(tmp_path / "tfds")
    config.data.dataset, config.data.augment, config.data.download = "cifar10", "dihedral", True
    config.eval.batch_size = 32
    with tfds.testing.mock_data(num_examples=48):
        experiment = Experiment(config, str(tmp_path / "workdir"))
        assert experiment.task.model.network.cond_dim == 8
        batch = next(train_batches(experiment.task.spec, batch_size=16, seed=0, augment="dihedral", download=True))
        assert batch["cond"].shape == (16, 8)
        batches = shard_batch({k: batch[k][None] for k in ("image", "cond")}, experiment.mesh, leading_axes=1)
        state, metrics = experiment.train_steps(experiment.initial_state(), batches, experiment.rng)
        evaluation = experiment.task.bits_per_dim.run(state.ema_params)
    assert np.isfinite(float(metrics["loss"][0])) and int(state.step) == 1
    assert evaluation["num_examples"] == 48 and np.isfinite(evaluation["bpd"])


@pytest.mark.parametrize("sampler, steps, eta", [("ddim", 3, 0.5), ("ode", 2, None)])
def test_sample_mode_writes_a_grid_and_integers(trained, sampler, steps, eta):
    data_dir, workdir, _ = trained
    result = trainer.sample(None, workdir, sampler=sampler, steps=steps, num_samples=5, eta=eta)  # saved config
    samples = np.load(result["npz"])["samples"]
    assert os.path.isfile(result["png"]) and samples.shape == (5, 8, 8, 1)
    assert samples.min() >= 0 and samples.max() < 17
    assert result["nfe"] == steps if sampler == "ddim" else result["nfe"] > steps


@pytest.mark.parametrize(
    "settings, message",
    [
        (dict(sampler="heun", steps=3, eta=None), "--sampler='heun': expected one of"),
        (dict(sampler="ddim", steps=0, eta=None), "--steps=0: expected an integer >= 1"),
        (dict(sampler="ddim", steps=3, eta=1.5), "--eta=1.5: expected a number in [0.0, 1.0]"),
        (dict(sampler="ancestral", steps=3, eta=0.5), "--eta=0.5: expected a setting of sampler 'ancestral'"),
    ],
)
def test_bad_sampling_flags_are_refused_before_anything_is_read(settings, message, tmp_path):
    with pytest.raises(ValueError, match=re.escape(message)):
        trainer.sample(None, str(tmp_path / "none"), num_samples=4, **settings)
    assert not os.path.exists(tmp_path / "none")


def test_the_run_config_is_saved_and_used_when_none_is_given(trained):
    data_dir, workdir, _ = trained
    saved = load_saved_config(workdir)
    assert saved.to_dict() == tiny_config(data_dir, num_steps=saved.training.num_steps).to_dict()
    evaluation = trainer.evaluate(None, workdir)
    assert evaluation["num_examples"] == 360 and np.isfinite(evaluation["bpd"])


def test_a_config_of_another_architecture_is_refused_naming_the_fields_and_t_may_change(trained):
    data_dir, workdir, _ = trained
    config = load_saved_config(workdir)
    config.model.score_net.embedding_dim = 16
    config.model.schedule_features = 32
    with pytest.raises(ValueError) as error:
        trainer.evaluate(config, workdir)
    assert "model.schedule_features: 16 != 32" in str(error.value)
    assert "model.score_net.embedding_dim: 8 != 16" in str(error.value)
    # A continuous-time checkpoint evaluated in discrete time: not an architecture change.
    config = load_saved_config(workdir)
    config.model.T = 100
    assert np.isfinite(trainer.evaluate(config, workdir)["bpd"])


def test_eval_with_bfloat16_compute_restores_a_float32_checkpoint(trained):
    """The compute dtype is not part of the architecture: a float32 run evaluates in bfloat16,
    with bits/dim within bfloat16's precision of the float32 evaluation."""
    data_dir, workdir, _ = trained
    config = tiny_config(data_dir, num_steps=6)
    float32 = trainer.evaluate(config, workdir)
    config.model.score_net.dtype = "bfloat16"
    bfloat16 = trainer.evaluate(config, workdir)
    assert bfloat16["step"] == float32["step"]
    assert bfloat16["bpd"] == pytest.approx(float32["bpd"], rel=2e-2)
    assert bfloat16["bpd"] != float32["bpd"]  # it did compute in bfloat16


def test_eval_takes_the_new_latest_when_its_checkpoint_is_deleted_while_read(trained, tmp_path, monkeypatch):
    """As a training run's retention can do: the latest step vanishes between listing and reading."""
    data_dir, workdir, _ = trained
    copy = str(tmp_path / "copy")
    shutil.copytree(workdir, copy)
    steps = sorted(int(s) for s in os.listdir(os.path.join(copy, "checkpoints")) if s.isdigit())
    restore, deleted = CheckpointStore.restore, []

    def restore_after_deleting_the_first(store, step, target):
        if not deleted:
            shutil.rmtree(os.path.join(store.directory, str(step)))
            deleted.append(step)
        return restore(store, step, target)

    monkeypatch.setattr(CheckpointStore, "restore", restore_after_deleting_the_first)
    evaluation = trainer.evaluate(tiny_config(data_dir, num_steps=steps[-1]), copy)
    assert deleted == [steps[-1]] and evaluation["step"] == steps[-2]
