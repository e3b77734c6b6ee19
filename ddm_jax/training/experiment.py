"""One config on one device mesh: the model, optimizer, compiled functions, checkpoints and evaluators.

`Experiment(config, workdir)` checks the whole config first and builds its task
(`builders.build_task`: a VDM, an autoencoder or a text-to-image model; no compilation), then
what training, `--mode=eval` and `--mode=sample` share. The config a
training run used is saved in its workdir (`config.py`, itself a valid --config file), so eval
and sample need no --config; `resolve_config` decides which config applies and refuses one that
disagrees with the saved run on the architecture.
"""

import functools
import os
import pprint

import jax
import ml_collections

from ddm_jax.checks import ArgumentError, as_json, check
from ddm_jax.training.builders import build_task, config_architecture
from ddm_jax.training.checkpoints import (
    CheckpointStore,
    DamagedCheckpointError,
    fingerprint_differences,
    make_fingerprint,
    restore_latest,
)
from ddm_jax.training.optimizer import make_optimizer
from ddm_jax.training.sharding import make_mesh, replicate, replicated
from ddm_jax.training.steps import train_steps
from ddm_jax.training.train_state import TrainState, create_train_state, stream_key

SAVED_CONFIG = "config.py"


class Experiment:
    """The pieces of one config on one mesh: the task (its model, data, loss, evaluation and export),
    the optimizer, the compiled train step and the checkpoints."""

    def __init__(self, config: ml_collections.ConfigDict, workdir: str):
        self.config, self.workdir = config, os.path.abspath(workdir)  # orbax needs absolute paths
        self.mesh = make_mesh()
        self.rng = jax.random.PRNGKey(config.training.seed)
        self.task = build_task(config, self.mesh, self.rng, self.workdir)
        self.optimizer = make_optimizer(config.optimizer, getattr(self.task, "learning_rate_scales", None))
        state_sharding = replicated(self.mesh)
        self.train_steps = jax.jit(
            functools.partial(train_steps, self.task.loss_fn, self.optimizer, config.training.ema_decay),
            out_shardings=(state_sharding, state_sharding),
            donate_argnums=(0,),
        )

    @functools.cached_property
    def _init(self):
        """The initial state's function of the rng and the task's `init_arguments` (e.g. pretrained
        parameters), compiled once (run op by op, the score network's init took 7 s of a 2-core CPU)."""
        return jax.jit(lambda rng, *arguments: create_train_state(self.task.init(rng, *arguments), self.optimizer))

    @property
    def init_arguments(self) -> tuple:
        """The arrays the task's init takes after the rng (training/vdm_task.py; most tasks take none)."""
        return getattr(self.task, "init_arguments", ())

    def initial_state(self) -> TrainState:
        """Step 0 (also the target structure of every restore)."""
        return replicate(self._init(stream_key(self.rng, "params"), *self.init_arguments), self.mesh)

    def checkpoints(self, read_only: bool = False) -> CheckpointStore:
        """The workdir's checkpoint store; refuses one holding another architecture (before any write).
        read_only: for evaluation and sampling, also of a run that is training."""
        params = jax.eval_shape(self.task.init, jax.random.PRNGKey(0), *self.init_arguments)
        spec = self.task.spec
        fingerprint = make_fingerprint(config_architecture(self.config)["model"], params)
        fingerprint["data"] = {
            "dataset": spec.name,
            "image_shape": list(spec.image_shape),
            "vocab_size": spec.vocab_size,
        }
        fingerprint["data"].update(getattr(self.task, "fingerprint_data", {}))
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

    def export(self, state: TrainState, step: int) -> dict:
        """The task's export of the EMA parameters at `step` (e.g. a diffusers folder), written once to
        workdir/export/step_<step>; {} when it exists already or the task exports nothing."""
        directory = os.path.join(self.workdir, "export", f"step_{step}")
        return {} if os.path.exists(directory) else self.task.export(state.ema_params, directory)


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
    return fingerprint_differences(as_json(config_architecture(saved)), as_json(config_architecture(given)))


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
