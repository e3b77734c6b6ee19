"""Multi-host training through jax.distributed: two real processes (gloo CPU collectives, 2 devices
each) train and evaluate as one process with 4 devices does."""

import os
import re
import socket

import jax
import numpy as np
import pytest
from tiny_runs import final_params, output_of, start_training

from ddm_jax.training import distributed

STEPS = 6


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def cpu_env(num_devices: int) -> dict:
    return {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": f"--xla_force_host_platform_device_count={num_devices}"}


def reported_bpd(output: str) -> float:
    match = re.search(r"test bits/dim: ([0-9.]+)", output)
    assert match, output[-3000:]
    return float(match.group(1))


def test_two_processes_train_as_one_process_with_four_devices(digits_data_dir, tmp_path):
    # Eval batches of 256 over the 360 test examples: the second is padded, so each process's
    # mask must be gathered in process order for the bits/dim to agree.
    padded_eval = ["--config.eval.batch_size=256"]
    single = start_training(digits_data_dir, tmp_path / "single", STEPS, STEPS, env=cpu_env(4), flags=padded_eval)
    single_output = output_of(single)
    assert single.returncode == 0, single_output[-3000:]

    port = free_port()
    processes = [
        start_training(
            digits_data_dir,
            tmp_path / "multi",
            STEPS,
            STEPS,
            env=cpu_env(2),
            log_suffix=f".{index}",
            flags=[
                *padded_eval,
                "--multihost",
                f"--coordinator_address=localhost:{port}",
                "--num_processes=2",
                f"--process_id={index}",
            ],
        )
        for index in range(2)
    ]
    outputs = [output_of(process) for process in processes]
    for process, output in zip(processes, outputs, strict=True):
        assert process.returncode == 0, output[-3000:]

    for index, output in enumerate(outputs):
        assert f"Process {index} of 2; mesh of 4 devices, 2 of them local" in output, output[-3000:]
    assert "Process 0 of 1; mesh of 4 devices, 4 of them local" in single_output
    assert "test bits/dim" not in outputs[1]  # only process 0 reports
    np.testing.assert_allclose(reported_bpd(outputs[0]), reported_bpd(single_output), rtol=1e-4)
    jax.tree.map(
        lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6),
        final_params(digits_data_dir, str(tmp_path / "single"), STEPS, STEPS),
        final_params(digits_data_dir, str(tmp_path / "multi"), STEPS, STEPS),
    )


@pytest.mark.parametrize(
    "settings, message",
    [
        (dict(num_processes=2, process_id=2), r"--process_id=2 must be in \[0, --num_processes=2\)"),
        (dict(num_processes=0), "--num_processes=0 must be >= 1"),
        (dict(coordinator_address="host:1", process_id=1), "--process_id=1 is given without --num_processes"),
    ],
)
def test_bad_distributed_settings_are_refused_before_connecting(settings, message, monkeypatch):
    for variable in distributed.ENVIRONMENT.values():
        monkeypatch.delenv(variable, raising=False)
    with pytest.raises(ValueError, match=message):
        distributed.distributed_settings(**settings)


def test_distributed_settings_come_from_the_environment(monkeypatch):
    monkeypatch.setenv("JAX_COORDINATOR_ADDRESS", "host:1234")
    monkeypatch.setenv("JAX_NUM_PROCESSES", "4")
    monkeypatch.setenv("JAX_PROCESS_ID", "3")
    assert distributed.distributed_settings(process_id=1) == {
        "coordinator_address": "host:1234",
        "num_processes": 4,
        "process_id": 1,
    }
