"""Device mesh helpers: one "data" axis, batches split over it, state replicated.

The same code serves 1 device, N devices and N hosts: each process passes its own
slice of the batch to `shard_batch`, which assembles the global array.
"""

import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

from ddm_jax.checks import PyTree

DATA_AXIS = "data"


def make_mesh(num_devices: int | None = None) -> Mesh:
    """A 1-D mesh named "data" over all devices of all processes, or the first `num_devices`."""
    available = jax.device_count()
    num_devices = available if num_devices is None else num_devices
    if not 1 <= num_devices <= available:
        raise ValueError(f"num_devices = {num_devices}: expected between 1 and the {available} available devices")
    # Auto axes: shardings propagate through un-annotated model code (jax.make_mesh defaults to Explicit).
    return jax.make_mesh((num_devices,), (DATA_AXIS,), axis_types=(AxisType.Auto,), devices=jax.devices()[:num_devices])


def replicated(mesh: Mesh) -> NamedSharding:
    """Every device holds the whole array."""
    return NamedSharding(mesh, PartitionSpec())


def batch_sharded(mesh: Mesh, leading_axes: int = 0) -> NamedSharding:
    """The batch dimension (after `leading_axes` unsplit ones, e.g. substeps) split over "data"."""
    return NamedSharding(mesh, PartitionSpec(*(None,) * leading_axes, DATA_AXIS))


def local_mesh_device_count(mesh: Mesh) -> int:
    """How many of the mesh's devices belong to this process."""
    return sum(d.process_index == jax.process_index() for d in mesh.devices.flat)


def _check_batch_divisible(local_batch: PyTree, mesh: Mesh, leading_axes: int) -> None:
    leading = {np.shape(x)[leading_axes : leading_axes + 1] for x in jax.tree.leaves(local_batch)}
    if len(leading) != 1 or () in leading:
        raise ValueError(
            "shard_batch: expected arrays that all share one leading batch dimension, got "
            f"shapes {[np.shape(x) for x in jax.tree.leaves(local_batch)]}"
        )
    ((local_size,),) = leading
    local_devices = local_mesh_device_count(mesh)
    if local_devices == 0:
        raise ValueError(f"shard_batch: process {jax.process_index()} holds none of the mesh's devices")
    if local_size % local_devices:
        processes = mesh.size // local_devices
        raise ValueError(
            f"training.batch_size = {local_size * processes} (per process {local_size}) is not "
            f"divisible by the {mesh.size} devices of the mesh ({local_devices} per process): "
            f"expected a multiple of {mesh.size}"
        )


def shard_batch(local_batch: PyTree, mesh: Mesh, leading_axes: int = 0) -> PyTree:
    """Process-local numpy arrays [..., b, ...] -> global jax.Arrays [..., b * processes, ...] whose
    batch dimension (axis `leading_axes`) is split over "data"."""
    _check_batch_divisible(local_batch, mesh, leading_axes)
    sharding = batch_sharded(mesh, leading_axes)
    return jax.tree.map(lambda x: jax.make_array_from_process_local_data(sharding, np.asarray(x)), local_batch)


def replicate(tree: PyTree, mesh: Mesh) -> PyTree:
    """Places every leaf of `tree` on all devices of the mesh (same values on every process)."""
    return jax.device_put(tree, replicated(mesh))


def split_for_pmap(local_batch: PyTree, num_devices: int, leading_axes: int = 0) -> PyTree:
    """Batches [..., b, ...] (batch axis after `leading_axes`) -> [num_devices, ..., b / num_devices, ...]:
    device i gets rows [i b/n, (i + 1) b/n), the rows a mesh's device i holds."""

    def split(x):
        x = np.asarray(x)
        b = x.shape[leading_axes]
        if b % num_devices:
            raise ValueError(f"split_for_pmap: batch of {b} is not divisible by {num_devices} devices")
        x = x.reshape(*x.shape[:leading_axes], num_devices, b // num_devices, *x.shape[leading_axes + 1 :])
        return np.moveaxis(x, leading_axes, 0)

    return jax.tree.map(split, local_batch)


def stack_for_pmap(tree: PyTree, num_devices: int) -> PyTree:
    """Every leaf repeated along a new leading device axis, as jax.pmap takes replicated state."""
    return jax.tree.map(lambda x: np.broadcast_to(np.asarray(x), (num_devices, *np.shape(x))), tree)
