"""Joining JAX's multi-controller runtime: one process per host (or per GPU), one program.

Every process runs the same command; `initialize` connects it to the others through
jax.distributed, after which jax.devices() lists the devices of all processes, the "data" mesh
spans them (sharding.make_mesh), each process reads its own rows of every batch, and orbax
writes checkpoints collectively. On TPU pods, Slurm and Open MPI, JAX detects the coordinator,
the process count and the process id from the environment; elsewhere give them as flags or as
JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES and JAX_PROCESS_ID.
"""

import os

import jax

ENVIRONMENT = {
    "coordinator_address": "JAX_COORDINATOR_ADDRESS",
    "num_processes": "JAX_NUM_PROCESSES",
    "process_id": "JAX_PROCESS_ID",
}


def distributed_settings(
    coordinator_address: str | None = None, num_processes: int | None = None, process_id: int | None = None
) -> dict:
    """The settings given as arguments, else from the environment; None where neither gives one.

    Raises ValueError, before anything connects, for a process id outside [0, num_processes).
    """
    given = {"coordinator_address": coordinator_address, "num_processes": num_processes, "process_id": process_id}
    settings = {
        name: os.environ.get(variable) if given[name] is None else given[name] for name, variable in ENVIRONMENT.items()
    }
    for name in ("num_processes", "process_id"):
        if isinstance(settings[name], str):
            try:
                settings[name] = int(settings[name])
            except ValueError:
                raise ValueError(f"{ENVIRONMENT[name]}={settings[name]!r} must be an integer") from None
    if settings["num_processes"] is not None and settings["num_processes"] < 1:
        raise ValueError(f"--num_processes={settings['num_processes']} must be >= 1")
    for given_one, missing in (("process_id", "num_processes"), ("num_processes", "process_id")):
        if settings[given_one] is not None and settings[missing] is None:
            raise ValueError(
                f"--{given_one}={settings[given_one]} is given without --{missing} "
                f"(or {ENVIRONMENT[missing]}); give both, or neither on TPU, Slurm or Open MPI"
            )
    if None not in (settings["num_processes"], settings["process_id"]) and not (
        0 <= settings["process_id"] < settings["num_processes"]
    ):
        raise ValueError(
            f"--process_id={settings['process_id']} must be in [0, --num_processes={settings['num_processes']})"
        )
    return settings


def initialize(
    coordinator_address: str | None = None, num_processes: int | None = None, process_id: int | None = None
) -> None:
    """jax.distributed.initialize with these settings (None: from the environment or the cluster).

    CPU processes exchange their collectives through gloo.
    """
    settings = distributed_settings(coordinator_address, num_processes, process_id)
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(**settings)
