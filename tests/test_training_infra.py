"""Optimizer, train state, checkpoints, device mesh and image output."""

import os
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest
from PIL import Image

from ddm_jax.checks import ArgumentError
from ddm_jax.evaluation.images import image_grid, sample_grid, save_png, to_uint8, upscale_nearest
from ddm_jax.training.builders import check_device_split
from ddm_jax.training.checkpoints import CheckpointStore, make_fingerprint
from ddm_jax.training.optimizer import learning_rate_fn, make_optimizer
from ddm_jax.training.sharding import batch_sharded, make_mesh, replicate, replicated, shard_batch
from ddm_jax.training.train_state import apply_updates, create_train_state, ema_update

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def optimizer_config(**overrides) -> ml_collections.ConfigDict:
    cfg = ml_collections.ConfigDict(
        dict(lr=0.1, warmup_steps=0, b1=0.9, b2=0.99, eps=1e-8, weight_decay=0.0, grad_clip_norm=0.0)
    )
    cfg.update(overrides)
    return cfg


# ----------------------------------------------------------------------------- optimizer


def test_learning_rate_warmup_then_constant():
    schedule = learning_rate_fn(optimizer_config(lr=1e-3, warmup_steps=4))
    for step, expected in [(0, 0.0), (1, 2.5e-4), (2, 5e-4), (4, 1e-3), (100, 1e-3)]:
        np.testing.assert_allclose(schedule(step), expected, rtol=1e-6, atol=1e-12)


def test_learning_rate_warmup_then_cosine():
    cfg = optimizer_config(lr=2.0, warmup_steps=2, lr_schedule="cosine", decay_steps=10)
    schedule = learning_rate_fn(cfg)
    for step, expected in [(1, 1.0), (2, 2.0), (4, 1.0 + np.cos(np.pi / 4)), (6, 1.0), (10, 0.0), (50, 0.0)]:
        np.testing.assert_allclose(schedule(step), expected, rtol=1e-6, atol=1e-6)


def numpy_adamw(params, grad_fn, lrs, *, b1, b2, eps, weight_decay, clip_norm=None):
    """Reference AdamW (decoupled decay scaled by lr, bias-corrected moments), float64."""
    p = params.astype(np.float64)
    m, v = np.zeros_like(p), np.zeros_like(p)
    for t, lr in enumerate(lrs, start=1):
        g = grad_fn(p)
        if clip_norm:
            g = g * min(1.0, clip_norm / np.linalg.norm(g))
        m = b1 * m + (1 - b1) * g
        v = b2 * v + (1 - b2) * g**2
        m_hat, v_hat = m / (1 - b1**t), v / (1 - b2**t)
        p = p - lr * (m_hat / (np.sqrt(v_hat) + eps) + weight_decay * p)
    return p


def run_optimizer(cfg, params, grad_fn, steps):
    optimizer = make_optimizer(cfg)
    state = optimizer.init(params)
    for _ in range(steps):
        updates, state = optimizer.update(grad_fn(params), state, params)
        params = optax.apply_updates(params, updates)
    return np.asarray(params)


CURVATURE = np.array([1.0, 4.0, 0.5, 2.0])
CENTRE = np.array([3.0, -1.0, 2.0, 0.5])
START = np.array([0.5, 1.0, -2.0, 4.0], np.float32)


def quadratic_grad(p):
    """Gradient of 1/2 sum(CURVATURE (p - CENTRE)^2)."""
    return CURVATURE * (p - CENTRE)


def jax_quadratic_grad(p):
    return jax.grad(lambda q: 0.5 * jnp.sum(CURVATURE * (q - CENTRE) ** 2))(p)


@pytest.mark.parametrize("warmup_steps, lrs", [(0, [0.1, 0.1, 0.1]), (2, [0.0, 0.05, 0.1])])
def test_adamw_step_matches_numpy_reference(warmup_steps, lrs):
    cfg = optimizer_config(warmup_steps=warmup_steps, weight_decay=0.3)
    got = run_optimizer(cfg, jnp.asarray(START), jax_quadratic_grad, steps=3)
    want = numpy_adamw(START, quadratic_grad, lrs, b1=0.9, b2=0.99, eps=1e-8, weight_decay=0.3)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


def test_gradient_clipping_engages_above_the_limit():
    # A large eps makes Adam's step depend on the gradient's scale, so clipping shows.
    cfg = optimizer_config(eps=1.0, grad_clip_norm=0.5)
    assert np.linalg.norm(quadratic_grad(START)) > 0.5
    common = dict(b1=0.9, b2=0.99, eps=1.0, weight_decay=0.0)
    clipped = numpy_adamw(START, quadratic_grad, [0.1, 0.1], clip_norm=0.5, **common)
    unclipped = numpy_adamw(START, quadratic_grad, [0.1, 0.1], **common)
    got = run_optimizer(cfg, jnp.asarray(START), jax_quadratic_grad, steps=2)
    np.testing.assert_allclose(got, clipped, rtol=1e-5)
    assert not np.allclose(got, unclipped, rtol=1e-3)
    # Below the limit clipping changes nothing.
    loose = run_optimizer(optimizer_config(eps=1.0, grad_clip_norm=1e3), jnp.asarray(START), jax_quadratic_grad, 2)
    np.testing.assert_allclose(loose, unclipped, rtol=1e-5)


def test_learning_rate_scales_scale_each_part_and_clip_on_the_trained_parts_norm():
    """Parts "fast" and "slow" follow AdamW at 1 and 0.25 times the schedule, clipped together on
    their global norm (numpy reference on their concatenation); "frozen", whose gradient alone is far
    above the limit, neither moves nor counts in the norm."""
    cfg = optimizer_config(eps=1.0, grad_clip_norm=0.5, weight_decay=0.3)
    optimizer = make_optimizer(cfg, {"fast": 1.0, "slow": 0.25, "frozen": 0.0})
    params = {"fast": jnp.asarray(START[:2]), "slow": jnp.asarray(START[2:]), "frozen": jnp.ones(3)}

    def grads(params):
        trained = jax_quadratic_grad(jnp.concatenate([params["fast"], params["slow"]]))
        return {"fast": trained[:2], "slow": trained[2:], "frozen": jnp.full(3, 100.0)}

    state = optimizer.init(params)
    for _ in range(3):
        updates, state = optimizer.update(grads(params), state, params)
        params = optax.apply_updates(params, updates)
    lr = 0.1 * np.array([1.0, 1.0, 0.25, 0.25])
    want = numpy_adamw(START, quadratic_grad, [lr] * 3, b1=0.9, b2=0.99, eps=1.0, weight_decay=0.3, clip_norm=0.5)
    np.testing.assert_allclose(np.concatenate([params["fast"], params["slow"]]), want, rtol=1e-5)
    np.testing.assert_array_equal(params["frozen"], np.ones(3))
    assert np.linalg.norm(quadratic_grad(START)) > 0.5


@pytest.mark.parametrize(
    "field, overrides",
    [
        ("lr", dict(lr=0.0)),
        ("warmup_steps", dict(warmup_steps=-1)),
        ("b1", dict(b1=1.0)),
        ("b2", dict(b2=-0.1)),
        ("weight_decay", dict(weight_decay=-1e-4)),
        ("grad_clip_norm", dict(grad_clip_norm=-1.0)),
        ("lr_schedule", dict(lr_schedule="linear")),
        ("decay_steps", dict(lr_schedule="cosine", warmup_steps=10, decay_steps=10)),
    ],
)
def test_bad_optimizer_fields_raise_naming_the_field(field, overrides):
    with pytest.raises(ValueError, match=rf"optimizer\.{field}\b"):
        make_optimizer(optimizer_config(**overrides))


# ----------------------------------------------------------------------------- train state


def test_ema_matches_closed_form_for_constant_params():
    ema0 = {"w": jnp.array([1.0, -2.0, 0.0])}
    params = {"w": jnp.array([3.0, 5.0, -1.0])}
    decay, n = 0.9, 7
    ema = ema0
    update = jax.jit(ema_update)
    for _ in range(n):
        ema = update(ema, params, decay)
    want = decay**n * np.asarray(ema0["w"]) + (1 - decay**n) * np.asarray(params["w"])
    np.testing.assert_allclose(ema["w"], want, rtol=1e-6)


def test_apply_updates_steps_params_ema_and_counter():
    params = {"w": jnp.array([1.0, 2.0])}
    grads = {"w": jnp.array([0.5, -1.0])}
    optimizer = optax.sgd(0.1)
    state = create_train_state(params, optimizer)
    assert state.step.dtype == jnp.int32 and int(state.step) == 0
    np.testing.assert_array_equal(state.ema_params["w"], params["w"])
    # Under pmap (leading device axis of size 1) the update is the same as under jit.
    add_device_axis = lambda tree: jax.tree.map(lambda x: x[None], tree)
    pmapped = jax.pmap(apply_updates, static_broadcasted_argnums=(2, 3))(
        add_device_axis(state), add_device_axis(grads), optimizer, 0.5
    )
    state = jax.jit(apply_updates, static_argnums=2)(state, grads, optimizer, 0.5)
    assert_trees_equal(jax.tree.map(lambda x: x[0], pmapped), state)
    new_params = np.array([1.0, 2.0]) - 0.1 * np.array([0.5, -1.0])
    np.testing.assert_allclose(state.params["w"], new_params, rtol=1e-6)
    np.testing.assert_allclose(state.ema_params["w"], 0.5 * np.array([1.0, 2.0]) + 0.5 * new_params, rtol=1e-6)
    assert int(state.step) == 1


# ----------------------------------------------------------------------------- checkpoints


def tiny_params(features: int = 2):
    return {
        "dense": {
            "kernel": jnp.arange(3 * features, dtype=jnp.float32).reshape(3, features),
            "bias": jnp.zeros((features,), jnp.float32),
        }
    }


def trained_state(n_steps: int, features: int = 2):
    """A state whose params, EMA and Adam moments all differ from their initial values."""
    optimizer = optax.adamw(0.01)
    state = create_train_state(tiny_params(features), optimizer)
    for i in range(n_steps):
        grads = jax.tree.map(lambda p: jnp.full_like(p, i + 1.0) + p, state.params)
        state = apply_updates(state, grads, optimizer, 0.9)
    return state


def fingerprint(n_layers: int = 4, features: int = 2):
    return make_fingerprint({"score_net": {"n_layers": n_layers, "channels": (8, 16)}}, tiny_params(features))


def assert_trees_equal(a, b):
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        assert np.asarray(x).dtype == np.asarray(y).dtype
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def directory_snapshot(root):
    return sorted(
        (
            os.path.relpath(os.path.join(d, f), root),
            os.stat(os.path.join(d, f)).st_size,
            os.stat(os.path.join(d, f)).st_mtime_ns,
        )
        for d, _, files in os.walk(root)
        for f in files
    ) + sorted(os.path.relpath(d, root) for d, _, _ in os.walk(root))


def test_checkpoints_save_every_n_keep_n_and_restore_exactly(tmp_path):
    states = [trained_state(i) for i in range(6)]
    with CheckpointStore(tmp_path / "ckpt", fingerprint=fingerprint(), max_to_keep=2, save_interval_steps=2) as store:
        saved = [store.save(i, s) for i, s in enumerate(states)]
        store.wait_until_finished()
        assert saved == [True, False, True, False, True, False]
        assert store.all_steps() == [2, 4] and store.latest_step() == 4
        assert store.save(5, states[5], force=True)
        store.wait_until_finished()
        assert not store.save(5, states[5], force=True)  # never overwritten
        assert store.all_steps() == [4, 5]
        target = trained_state(0)
        for step in (4, 5):
            assert_trees_equal(store.restore(step, target), states[step])
        with pytest.raises(ValueError, match=r"no step 2; expected one of \[4, 5\]"):
            store.restore(2, target)


def test_restore_into_target_sharded_over_a_mesh(tmp_path):
    state = trained_state(2)
    with CheckpointStore(tmp_path, fingerprint=fingerprint()) as store:
        store.save(3, state)
    mesh = make_mesh(1)
    target = replicate(trained_state(0), mesh)
    with CheckpointStore(tmp_path, fingerprint=fingerprint()) as store:
        assert store.latest_step() == 3
        restored = store.restore(3, target)
    assert_trees_equal(restored, state)
    for leaf in jax.tree.leaves(restored):
        assert leaf.sharding == replicated(mesh)


def test_other_architecture_is_refused_and_nothing_is_touched(tmp_path):
    directory = tmp_path / "checkpoints"
    with CheckpointStore(directory, fingerprint=fingerprint(n_layers=4)) as store:
        store.save(1, trained_state(1))
    before = directory_snapshot(directory)
    with pytest.raises(ValueError) as refusal:
        CheckpointStore(directory, fingerprint=fingerprint(n_layers=8, features=3))
    message = str(refusal.value)
    assert str(directory) in message and "another architecture" in message
    assert "model.score_net.n_layers: 4 != 8" in message
    assert "params.dense/kernel: 'float32[3, 2]' != 'float32[3, 3]'" in message
    assert directory_snapshot(directory) == before
    # The same architecture (a tuple reads back from JSON as a list) resumes.
    with CheckpointStore(directory, fingerprint=fingerprint(n_layers=4)) as store:
        assert store.latest_step() == 1


@pytest.mark.parametrize("composite", [True, False])
def test_checkpoints_without_fingerprint_are_refused(tmp_path, composite):
    item = ocp.args.StandardSave(trained_state(0))
    with ocp.CheckpointManager(tmp_path) as foreign:
        foreign.save(7, args=ocp.args.Composite(state=item) if composite else item)
    before = directory_snapshot(tmp_path)
    with pytest.raises(ValueError, match="step 7 without an architecture fingerprint"):
        CheckpointStore(tmp_path, fingerprint=fingerprint())
    assert directory_snapshot(tmp_path) == before


def test_non_json_fingerprint_raises(tmp_path):
    with pytest.raises(ValueError, match="fingerprint=.*: expected only JSON values"):
        CheckpointStore(tmp_path, fingerprint={"model": {"dtype": jnp.float32}})


# ----------------------------------------------------------------------------- sharding


def test_shard_batch_on_available_devices():
    mesh = make_mesh()
    n = jax.device_count()
    batch = {"image": np.arange(2 * n * 3, dtype=np.uint8).reshape(2 * n, 3), "label": np.arange(2 * n)}
    sharded = shard_batch(batch, mesh)
    for key, value in batch.items():
        assert sharded[key].shape == value.shape
        assert sharded[key].sharding == batch_sharded(mesh)
        np.testing.assert_array_equal(np.asarray(sharded[key]), value)


@pytest.mark.parametrize(
    "kind, field",
    [("vdm", "training.batch_size"), ("vdm", "eval.batch_size"), ("text_to_image", "training.num_samples")],
)
def test_batches_the_mesh_splits_must_divide_by_its_devices_before_anything_is_built(kind, field):
    config = ml_collections.ConfigDict({"training": dict(batch_size=8, num_samples=8), "eval": dict(batch_size=8)})
    check_device_split(config, 4, kind)
    section, name = field.split(".")
    config[section][name] = 6
    with pytest.raises(ArgumentError) as error:
        check_device_split(config, 4, kind)
    assert str(error.value) == f"{field}=6: expected a multiple of the 4 devices of the mesh"
    check_device_split(config, 2, kind)


def test_four_fake_devices_split_the_batch_and_check_divisibility():
    script = textwrap.dedent("""
        import jax, numpy as np, pytest
        from ddm_jax.training.sharding import make_mesh, replicate, shard_batch
        assert jax.device_count() == 4
        mesh = make_mesh()
        batch = {"x": np.arange(8 * 2).reshape(8, 2)}
        x = shard_batch(batch, mesh)["x"]
        assert x.shape == (8, 2)
        shards = sorted(x.addressable_shards, key=lambda s: s.index[0].start)
        assert [s.device for s in shards] == list(mesh.devices.flat)
        for i, shard in enumerate(shards):
            np.testing.assert_array_equal(np.asarray(shard.data), batch["x"][2 * i:2 * i + 2])
        with pytest.raises(ValueError, match=r"training\\.batch_size = 6 .*4 devices"):
            shard_batch({"x": np.zeros((6, 2))}, mesh)
        assert make_mesh(2).devices.tolist() == jax.devices()[:2]
        with pytest.raises(ValueError, match="num_devices = 5"):
            make_mesh(5)
        w = replicate({"w": np.arange(3.0)}, mesh)["w"]
        assert len(w.addressable_shards) == 4
        for shard in w.addressable_shards:
            np.testing.assert_array_equal(np.asarray(shard.data), np.arange(3.0))
        print("OK")
    """)
    env = dict(
        os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=4", JAX_PLATFORMS="cpu", PYTHONPATH=REPO_ROOT
    )
    result = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0 and result.stdout.strip() == "OK", result.stderr[-3000:]


# ----------------------------------------------------------------------------- images


def test_image_grid_places_images_row_by_row():
    rng = np.random.default_rng(0)
    images = rng.integers(1, 256, size=(5, 2, 3, 1), dtype=np.uint8)
    grid = image_grid(images, pad=1)  # 3 columns, 2 rows
    blank = np.zeros_like(images[0])
    tiles = [np.pad(im, ((1, 0), (1, 0), (0, 0))) for im in [*images, blank]]
    rows = [np.concatenate(tiles[:3], axis=1), np.concatenate(tiles[3:], axis=1)]
    want = np.pad(np.concatenate(rows, axis=0), ((0, 1), (0, 1), (0, 0)))
    assert grid.shape == (7, 13, 1) and grid.dtype == np.uint8
    np.testing.assert_array_equal(grid, want)
    assert image_grid(images, ncols=2, pad=0).shape == (6, 6, 1)


def test_save_png_round_trips(tmp_path):
    rng = np.random.default_rng(1)
    gray = rng.integers(0, 256, size=(4, 5, 1), dtype=np.uint8)
    rgb = rng.integers(0, 256, size=(4, 5, 3), dtype=np.uint8)
    save_png(tmp_path / "gray.png", gray)
    save_png(tmp_path / "rgb.png", rgb)
    with Image.open(tmp_path / "gray.png") as im:
        assert im.mode == "L"
        np.testing.assert_array_equal(np.asarray(im), gray[..., 0])
    with Image.open(tmp_path / "rgb.png") as im:
        assert im.mode == "RGB"
        np.testing.assert_array_equal(np.asarray(im), rgb)


def test_to_uint8_spans_0_to_255():
    for vocab_size in (2, 3, 7, 256):
        k = np.arange(vocab_size)
        want = [round(int(i) * 255 / (vocab_size - 1)) for i in k]
        np.testing.assert_array_equal(to_uint8(k, vocab_size), want)
    with pytest.raises(ValueError, match="vocab_size = 4"):
        to_uint8(np.array([0, 4]), 4)


def test_sample_grids_are_scaled_up_by_an_integer_factor_towards_256_pixels():
    k = np.random.default_rng(0).integers(0, 17, (64, 8, 8, 1))
    small = image_grid(to_uint8(k, 17))  # 8 x 8 cells of 8 + 1 pixels, plus the border: 73 pixels
    large = sample_grid(k, 17)
    factor = round(256 / 73)
    assert small.shape == (73, 73, 1) and large.shape == (73 * factor, 73 * factor, 1)
    np.testing.assert_array_equal(large[::factor, ::factor], small)  # nearest neighbour: every value repeated
    np.testing.assert_array_equal(large[factor - 1 :: factor, factor - 1 :: factor], small)
    assert upscale_nearest(np.zeros((300, 20, 3), np.uint8)).shape == (300, 20, 3)  # already large: kept
