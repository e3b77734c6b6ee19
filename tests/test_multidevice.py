"""Data parallelism: on 8 fake CPU devices, jit over a mesh and jax.pmap give the step of 1 device."""

import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = r"""
import functools, jax, numpy as np
from tiny_runs import tiny_model_config
from ddm_jax.training.builders import build_vdm
from ddm_jax.training.optimizer import make_optimizer
from ddm_jax.training.sharding import (make_mesh, replicate, replicated, shard_batch, split_for_pmap,
                                      stack_for_pmap)
from ddm_jax.training.train_state import create_train_state
from ddm_jax.training.steps import pmap_train_steps, train_steps, vdm_loss_fn
from configs import vdm_digits

assert jax.device_count() == 8, jax.devices()
config = vdm_digits.get_config()
model = build_vdm(tiny_model_config(schedule="learned_monotone"), (8, 8, 1), 17)
optimizer = make_optimizer(config.optimizer)
params = model.init(jax.random.PRNGKey(0), (8, 8, 1))
images = np.random.default_rng(0).integers(0, 17, (2, 16, 8, 8, 1))  # 2 substeps of a global batch of 16
finals = []
for num_devices in (1, 8):
    mesh = make_mesh(num_devices)
    step = jax.jit(functools.partial(train_steps, vdm_loss_fn(model), optimizer, 0.99),
                   out_shardings=(replicated(mesh), replicated(mesh)))
    batch = shard_batch({"image": images}, mesh, leading_axes=1)
    assert len(batch["image"].sharding.device_set) == num_devices
    state, metrics = step(replicate(create_train_state(params, optimizer), mesh), batch, jax.random.PRNGKey(1))
    finals.append(jax.device_get((state.params, metrics["loss"])))
pmap_step = pmap_train_steps(vdm_loss_fn(model), optimizer, 0.99)
state, metrics = pmap_step(stack_for_pmap(create_train_state(params, optimizer), 8),
                           split_for_pmap({"image": images}, 8, leading_axes=1), jax.random.PRNGKey(1))
assert metrics["loss"].shape == (8, 2), metrics["loss"].shape
finals.append(jax.device_get(jax.tree.map(lambda x: x[0], (state.params, metrics["loss"]))))
for other in finals[1:]:
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=2e-5, atol=1e-6), finals[0], other)
print("identical up to float reassociation")
"""


def test_eight_devices_jit_and_pmap_take_the_same_step_as_one():
    env = {
        **os.environ,
        "XLA_FLAGS": "--xla_force_host_platform_device_count=8",
        "PYTHONPATH": os.pathsep.join([ROOT, os.path.join(ROOT, "tests")]),
    }
    result = subprocess.run(
        [sys.executable, "-c", SCRIPT], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600
    )
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]
    assert "identical up to float reassociation" in result.stdout
