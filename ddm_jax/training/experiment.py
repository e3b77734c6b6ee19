"""One config on one device mesh: the model, optimizer, compiled functions, checkpoints and evaluators.

`Experiment(config, workdir)` checks the whole config first (`builders.check_config`, no
compilation), then builds what training, `--mode=eval` and `--mode=sample` share. The config a
training run used is saved in its workdir (`config.py`, itself a valid --config file), so eval
and sample need no --config; `resolve_config` decides which config applies and refuses one that
disagrees with the saved run on the architecture.
"""

import functools
import math
import os
import pprint

import jax
import ml_collections

from ddm_jax.checks import ArgumentError, as_json, check
from ddm_jax.data import eval_batches, identity_cond
from ddm_jax.evaluation.evaluators import BitsPerDim, Samples
from ddm_jax.training.builders import architecture, check_config
from ddm_jax.training.checkpoints import (
    CheckpointStore,
    DamagedCheckpointError,
    fingerprint_differences,
    make_fingerprint,
    restore_latest,
)
from ddm_jax.training.optimizer import make_optimizer
from ddm_jax.training.sharding import make_mesh, replicate, replicated, shard_batch
from ddm_jax.training.steps import train_steps, vdm_loss_fn
from ddm_jax.training.train_state import TrainState, create_train_state

SAVED_CONFIG = "config.py"


class Experiment:
    """The pieces of one config on one mesh: model, optimizer, compiled steps, data, evaluators."""

    def __init__(self, config: ml_collections.ConfigDict, workdir: str):
        self.config, self.workdir = config, os.path.abspath(workdir)  # orbax needs absolute paths
        self.spec, self.model = check_config(config)
        self.mesh = make_mesh()
        self.optimizer = make_optimizer(config.optimizer)
        self.rng = jax.random.PRNGKey(config.training.seed)
        state_sharding = replicated(self.mesh)
        self.train_steps = jax.jit(
            functools.partial(train_steps, vdm_loss_fn(self.model), self.optimizer, config.training.ema_decay),
            out_shardings=(state_sharding, state_sharding),
            donate_argnums=(0,),
        )
        self.elbo_terms = jax.jit(self.model.elbo_terms)
        self.sample = jax.jit(
            self.model.sample,
            static_argnums=(2, 3),
            static_argnames=("steps", "sampler", "eta", "grid"),
            out_shardings=state_sharding,
        )
        self.bits_per_dim = BitsPerDim(
            lambda params, rng, batch: self.elbo_terms(params, rng, batch["image"], cond=batch["cond"]),
            self.eval_batches,
            jax.random.fold_in(self.rng, 1),
            num_dims=math.prod(self.spec.image_shape),
            num_time_samples=config.eval.num_time_samples,
        )
        self.training_samples = self.samples(
            jax.random.fold_in(self.rng, 2), config.training.num_samples, steps=config.training.sample_steps
        )

    def samples(self, rng, num_samples: int, **sampler_settings) -> Samples:
        """An evaluator drawing `num_samples` with the sampler settings (sampler, steps, eta, grid)."""
        sample_fn = lambda params, rng: self.sample(
            params, rng, num_samples, self.spec.image_shape, cond=self.cond(num_samples), **sampler_settings
        )
        directory = os.path.join(self.workdir, "samples")
        return Samples(
            sample_fn, rng, vocab_size=self.spec.vocab_size, directory=directory, write_files=jax.process_index() == 0
        )

    def initial_state(self) -> TrainState:
        """Step 0, compiled once (run op by op, the score network's init took 7 s of a 2-core CPU)."""
        init = jax.jit(lambda rng: create_train_state(self.model.init(rng, self.spec.image_shape), self.optimizer))
        return replicate(init(jax.random.fold_in(self.rng, 0)), self.mesh)

    def checkpoints(self, read_only: bool = False) -> CheckpointStore:
        """The workdir's checkpoint store; refuses one holding another architecture (before any write).
        read_only: for evaluation and sampling, also of a run that is training."""
        params = jax.eval_shape(lambda rng: self.model.init(rng, self.spec.image_shape), jax.random.PRNGKey(0))
        fingerprint = make_fingerprint(architecture(self.config.model), params)
        fingerprint["data"] = {
            "dataset": self.spec.name,
            "image_shape": list(self.spec.image_shape),
            "vocab_size": self.spec.vocab_size,
        }
        return CheckpointStore(
            os.path.join(self.workdir, "checkpoints"),
            fingerprint=fingerprint,
            max_to_keep=self.config.training.keep_checkpoints,
            save_interval_steps=self.config.training.checkpoint_every,
            read_only=read_only,
        )

    def restore_latest(self, purpose: str, step: int | None = None) -> tuple[int, TrainState]:
        """(step, state) of the workdir's newest intact checkpoint, or of `step` when given. Read-only:
        a damaged step is skipped with a warning and left in place; a given `step` that is missing or
        damaged is refused, as is a workdir without a checkpoint."""
        if os.path.isdir(os.path.join(self.workdir, "checkpoints")):
            with self.checkpoints(read_only=True) as store:
                if step is None:
                    restored = restore_latest(store, self.initial_state())
                else:
                    steps = store.all_steps()
                    check(step in steps, "--step", step, f"one of the steps {steps} saved in {store.directory}")
                    try:
                        return step, store.restore(step, self.initial_state())
                    except DamagedCheckpointError as error:
                        raise ArgumentError("--step", step, f"an intact checkpoint to {purpose}; {error}") from None
            if restored is not None:
                return restored
        raise ArgumentError("--workdir", self.workdir, f"a workdir holding a checkpoint to {purpose}; train first")

    def cond(self, batch_size: int):
        """The conditioning of un-augmented data: the identity's one-hot, or None without augmentation."""
        return identity_cond(batch_size, self.config.data.augment)

    def eval_batches(self):
        """The eval split's batches, sharded over the mesh, with their padding masks."""
        data = self.config.data
        batches = eval_batches(
            self.spec,
            split=data.eval_split,
            batch_size=self.config.eval.batch_size,
            data_dir=data.data_dir,
            download=data.download,
            process_index=jax.process_index(),
            process_count=jax.process_count(),
        )
        for batch in batches:
            sharded = shard_batch({"image": batch["image"], "cond": self.cond(len(batch["image"]))}, self.mesh)
            yield {**sharded, "mask": batch["mask"]}


# The run's config, saved in its workdir ------------------------------------------------------------


def save_config(workdir: str, config: ml_collections.ConfigDict) -> None:
    """Writes the config as workdir/config.py, a file --config accepts (process 0, atomically).

    A workdir that already has one keeps it when this config has the same architecture; a
    different architecture was refused before (`resolve_config`)."""
    if jax.process_index() > 0:
        return
    path = os.path.join(workdir, SAVED_CONFIG)
    os.makedirs(workdir, exist_ok=True)
    source = (
        '"""The config this run trained with, as saved by ddm_jax; a valid --config file."""\n'
        "import ml_collections\n\n\n"
        f"def get_config():\n    return ml_collections.ConfigDict({pprint.pformat(config.to_dict(), indent=4)})\n"
    )
    temporary = f"{path}.tmp"
    with open(temporary, "w") as file:
        file.write(source)
    os.replace(temporary, path)


def load_saved_config(workdir: str) -> ml_collections.ConfigDict | None:
    """The config saved in workdir by training, or None."""
    path = os.path.join(workdir, SAVED_CONFIG)
    if not os.path.isfile(path):
        return None
    namespace: dict = {}
    with open(path) as file:
        exec(compile(file.read(), path, "exec"), namespace)  # noqa: S102 - a file this package wrote
    return namespace["get_config"]()


def architecture_differences(saved: ml_collections.ConfigDict, given: ml_collections.ConfigDict) -> list[str]:
    """'field: saved != given' for each config field of the architecture (model and dataset) that differs."""
    fields = lambda config: as_json({"model": architecture(config.model), "data": {"dataset": config.data.dataset}})
    return fingerprint_differences(fields(saved), fields(given))


def resolve_config(config: ml_collections.ConfigDict | None, workdir: str) -> ml_collections.ConfigDict:
    """The config that applies to `workdir`: the given one, else the one its training saved.

    A given config whose architecture differs from the saved one is refused, naming the fields,
    before anything is built; the settings that leave the parameters' meaning alone (eval
    settings, T, the loss, the compute dtype, data_dir, ...) may differ.
    """
    saved = load_saved_config(workdir)
    if config is None:
        if saved is None:
            raise ArgumentError("--config", None, f"a config file: --workdir={workdir} holds no saved {SAVED_CONFIG}")
        return saved
    if saved is not None:
        differences = architecture_differences(saved, config)
        if differences:
            raise ArgumentError(
                "--config",
                "the given config",
                f"the architecture of the run in --workdir={workdir} ({os.path.join(workdir, SAVED_CONFIG)}); "
                f"these fields differ: {'; '.join(differences)}. Use a new --workdir, or omit --config",
            )
    return config
