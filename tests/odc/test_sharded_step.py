"""The sharded ODC step (``clusterlearn.odc_shard``) equals the replicated one.

S shards run as S threads of one process, each calling the pure functions with a ``psum``
that sums the shards' arrays in shard order (the collective a process group or
``jax.lax.psum`` provides). After every step of a churning stream (labels change, DDP padding
repeats indices, a refused batch) the sharded memory must equal the replicated state of
:func:`clusterlearn.odc_state.step`: labels, sizes, sums, centroids and iteration bit for bit
on every shard, features identical row for row (compared by global row).
"""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest

import clusterlearn as cl
from clusterlearn import odc_shard, odc_state
from clusterlearn.shards import ShardLayout, shard_rows
from shard_threads import ThreadGroup
from streams import shard_stream as churning_stream
from xla_flags import with_devices

N, C, D = 241, 6, 8  # N is no multiple of the shard counts: the last shard is padded


@pytest.mark.parametrize("shards", [1, 2, 3])
def test_sharded_step_equals_replicated(backend, shards):
    if backend.name == "array_api_strict":
        pytest.skip("array-api-strict has no bit views")
    x0, batches = churning_stream(shards, steps=14)
    odc = cl.OnlineDeepClustering(N, C, D, momentum=0.3, min_cluster_size=0, centroid_update_interval=3)
    odc.initialize(backend.asarray(x0))
    config = odc.config
    full = odc_state.ODCState(*(backend.xp.asarray(x, copy=True) for x in odc.state))
    group = ThreadGroup(shards)
    layout = ShardLayout(N, shards)

    clone = lambda x: backend.xp.asarray(x, copy=True)  # noqa: E731
    states = [full._replace(**{n: clone(getattr(full, n)) for n in full._fields}) for _ in range(shards)]
    states = [s._replace(features=clone(shard_rows(s.features, layout, r))) for r, s in enumerate(states)]
    changed = refused = 0
    for idx, f in batches:
        i, x = backend.asarray(idx), backend.asarray(f)
        full, want = odc_state.step(full, i, x, config)
        out = group.run(lambda r: odc_shard.step(states[r], i, x, config, layout, r, group.psum(r)))
        states = [state for state, _ in out]
        for _, got in out:
            assert {k: backend.to_numpy(v).item() for k, v in got.items()} == {k: backend.to_numpy(v).item() for k, v in want.items()}
        for name in ("labels", "sizes", "sums", "centroids", "iteration"):
            for s in states:
                np.testing.assert_array_equal(backend.to_numpy(getattr(s, name)), backend.to_numpy(getattr(full, name)), err_msg=name)
        joined = np.concatenate([backend.to_numpy(s.features) for s in states])[:N]
        np.testing.assert_array_equal(joined, backend.to_numpy(full.features))
        changed += int(backend.to_numpy(want["num_changed"]))
        refused += not bool(backend.to_numpy(want["applied"]))
    assert changed > 32 and refused == 1  # the stream really moved labels and refused one batch


def test_sharded_resync_of_float32_sums_matches_within_rounding():
    """With float32 sums resynced every 4 steps, the sum over shards rounds in another order:
    equal to the replicated sums within n * eps per cluster (n members of unit norm)."""
    x0, batches = churning_stream(7, steps=9)
    odc = cl.OnlineDeepClustering(N, C, D, min_cluster_size=0, resync_interval=4)
    odc.initialize(x0)
    full = odc_state.ODCState(*(np.array(x) for x in odc.state))
    full = full._replace(sums=full.sums.astype(np.float32))
    group = ThreadGroup(2)
    layout = ShardLayout(N, 2)
    states = [full._replace(features=shard_rows(full.features.copy(), layout, r)) for r in range(2)]
    for idx, f in batches:
        full, _ = odc_state.step(full, idx, f, odc.config)
        states = [s for s, _ in group.run(lambda r: odc_shard.step(states[r], idx, f, odc.config, layout, r, group.psum(r)))]
    bound = N * float(np.finfo(np.float32).eps)
    for s in states:
        np.testing.assert_array_equal(s.labels, full.labels)
        np.testing.assert_allclose(s.sums, full.sums, rtol=0, atol=bound)
    np.testing.assert_array_equal(states[0].sums, states[1].sums)  # replicated: identical on every shard


@pytest.mark.parametrize("shards", [1, 3])
def test_sharded_init_equals_replicated(backend, shards):
    """Exact where the sums are float64 (NumPy, PyTorch); float32 sums (JAX without x64) add
    the shards' partial sums in another order: within n * eps of the one-pass sums."""
    if backend.name == "array_api_strict":
        pytest.skip("array-api-strict has no bit views")
    x0, _ = churning_stream(11, steps=0)
    unit = cl.sample_memory.l2_normalize(backend.asarray(x0))
    labels = backend.asarray(np.arange(N) % C)
    want = odc_state.init(unit, labels, C)
    group = ThreadGroup(shards)
    layout = ShardLayout(N, shards)
    states = group.run(lambda r: odc_shard.init(shard_rows(unit, layout, r), labels, C, layout, r, group.psum(r)))
    exact = cl.backend.is_float64(want.sums.dtype)
    for s in states:
        np.testing.assert_array_equal(backend.to_numpy(s.sizes), backend.to_numpy(want.sizes))
        got, ref = backend.to_numpy(s.sums), backend.to_numpy(want.sums)
        if exact or shards == 1:
            np.testing.assert_array_equal(got, ref)
        else:
            np.testing.assert_allclose(got, ref, rtol=0, atol=N * float(np.finfo(np.float32).eps))
        np.testing.assert_array_equal(got, backend.to_numpy(states[0].sums))


def test_layout_covers_every_row_once():
    for n, s in [(10, 3), (5, 4), (7, 7), (1000, 6), (3, 5)]:
        layout = ShardLayout(n, s)
        held = [np.arange(layout.start(k), layout.start(k) + layout.block) for k in range(s)]
        assert np.array_equal(np.concatenate(held)[:n], np.arange(n))
        x = np.arange(n, dtype=np.float32)[:, None] + 1
        blocks = [shard_rows(x, layout, k) for k in range(s)]
        assert all(b.shape == (layout.block, 1) for b in blocks)
        assert np.array_equal(np.concatenate(blocks)[:n], x) and not np.concatenate(blocks)[n:].any()
    with pytest.raises(ValueError, match="shard must be"):
        ShardLayout(10, 3).start(3)


def test_init_refuses_a_wrong_shard():
    with pytest.raises(ValueError, match="shard's 5 rows"):
        odc_shard.init(np.ones((4, D), np.float32), np.zeros(10, np.int64), C, ShardLayout(10, 2), 0, lambda x: x)


JAX_SCRIPT = r"""
import sys
import numpy as np, jax, jax.numpy as jnp
from jax.sharding import Mesh
import clusterlearn as cl
from clusterlearn import odc_state
from clusterlearn.adapters import jax as clj
sys.path.insert(0, sys.argv[1])
from streams import shard_stream as churning_stream
N, C, D = 241, 6, 8
devices = jax.devices()
assert len(devices) == int(sys.argv[2]), devices
x0, batches = churning_stream(4, 14)
odc = cl.OnlineDeepClustering(N, C, D, momentum=0.3, min_cluster_size=0, centroid_update_interval=3, resync_interval=5)
odc.initialize(x0)
full = odc_state.ODCState(*(jnp.asarray(np.asarray(a)) for a in odc.state))
mesh = Mesh(np.array(devices), ("data",))
state = clj.shard_memory(full, mesh, odc.config)
assert state.features.sharding.spec == jax.sharding.PartitionSpec("data", None)
assert state.features.addressable_shards[0].data.shape[0] == -(-N // len(devices))
sharded_step = clj.make_memory_sharded_step(mesh, odc.config)
replicated_step = jax.jit(odc_state.step, static_argnames="config")
eps = float(np.finfo(np.float32).eps)
changed = 0
for k, (i, f) in enumerate(batches, start=1):
    i, f = i[: len(i) - len(i) % len(devices)], f[: len(i) - len(i) % len(devices)]
    full, want = replicated_step(full, jnp.asarray(i), jnp.asarray(f), odc.config)
    state, got = sharded_step(state, jnp.asarray(i), jnp.asarray(f))
    assert {a: np.asarray(b).item() for a, b in got.items()} == {a: np.asarray(b).item() for a, b in want.items()}
    g = clj.gather_memory(state, odc.config)
    for name in ("labels", "sizes", "iteration"):
        np.testing.assert_array_equal(getattr(g, name), np.asarray(getattr(full, name)), err_msg=name)
    bound = 8 * eps * k  # two compiled programs fuse differently (see test_odc_state)
    np.testing.assert_allclose(g.features, np.asarray(full.features), rtol=0, atol=bound)
    np.testing.assert_allclose(g.centroids, np.asarray(full.centroids), rtol=0, atol=bound)
    np.testing.assert_allclose(g.sums, np.asarray(full.sums), rtol=0, atol=bound * N)
    changed += int(want["num_changed"])
assert changed > 32
print("ok", len(devices))
"""


@pytest.mark.slow
@pytest.mark.parametrize("devices", [2, 4])
def test_jax_memory_sharded_over_a_mesh(devices, tmp_path):
    """On 2 and 4 forced CPU devices the features live in one block per device
    (NamedSharding along N) and the jitted sharded step follows the replicated one: labels,
    sizes, statistics exactly, floats within the rounding of two differently fused programs."""
    pytest.importorskip("jax")
    script = tmp_path / "check.py"
    script.write_text(JAX_SCRIPT)
    env = {**os.environ, "XLA_FLAGS": with_devices(devices), "JAX_PLATFORMS": "cpu"}
    done = subprocess.run([sys.executable, str(script), os.path.dirname(os.path.dirname(os.path.abspath(__file__))), str(devices)],
                          env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.strip().endswith(f"ok {devices}")


JAX_PROCESS_SCRIPT = """
import sys
pid, nproc, port = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
sys.path.insert(0, sys.argv[4])
import jax
jax.config.update("jax_cpu_collectives_implementation", "gloo")
jax.distributed.initialize(f"127.0.0.1:{port}", num_processes=nproc, process_id=pid)
import numpy as np, jax.numpy as jnp
from jax.experimental import multihost_utils
from jax.sharding import Mesh
import clusterlearn as cl
from clusterlearn import odc_state
from clusterlearn.adapters import jax as clj
from streams import drifting_stream, shard_stream
N, C, D = 241, 6, 8
assert jax.device_count() == nproc and jax.local_device_count() == 1
x0, batches = shard_stream(4, 14)
odc = cl.OnlineDeepClustering(N, C, D, momentum=0.3, min_cluster_size=0, centroid_update_interval=3)
odc.initialize(jnp.asarray(x0))
full = odc_state.ODCState(*(jnp.asarray(a) for a in odc.state))
mesh = Mesh(np.array(jax.devices()), ("data",))
state = clj.shard_memory(full, mesh, odc.config)
assert state.features.addressable_shards[0].data.shape[0] == -(-N // nproc)  # this process holds one block
step = clj.make_memory_sharded_step(mesh, odc.config)
replicated_step = jax.jit(odc_state.step, static_argnums=3)
eps = float(np.finfo(np.float32).eps)
changed = 0
for i, f in batches:
    if not np.isfinite(f).all():
        continue
    i, f = i[: len(i) - len(i) % nproc], f[: len(i) - len(i) % nproc]
    full, want = replicated_step(full, jnp.asarray(i), jnp.asarray(f), odc.config)
    state, got = step(state, i, f)
    gathered = {k: np.asarray(multihost_utils.process_allgather(getattr(state, k), tiled=True))
                for k in ("features", "labels", "sizes", "centroids")}
    for k in ("labels", "sizes"):
        np.testing.assert_array_equal(gathered[k], np.asarray(getattr(full, k)), err_msg=k)
    np.testing.assert_allclose(gathered["features"][:N], np.asarray(full.features), rtol=0, atol=8 * eps * 8)
    np.testing.assert_allclose(gathered["centroids"], np.asarray(full.centroids), rtol=0, atol=8 * eps * 8)
    changed += int(want["num_changed"])
assert changed > 32
# small clusters form on a drifting stream: the handling on the sharded state (each process
# gathers the member rows it needs from the other) follows the replicated state's
x0, batches = drifting_stream(3, 20, num_samples=N)
odc = cl.OnlineDeepClustering(N, C, D, min_cluster_size=30, seed=1)
odc.initialize(jnp.asarray(x0))
full = clj.state_from_core(odc)
state = clj.shard_memory(full, mesh, odc.config)
step = clj.make_memory_sharded_step(mesh, odc.config)
small = splits = 0
for i, f in batches:
    full, _ = replicated_step(full, jnp.asarray(i), jnp.asarray(f), odc.config)
    full, want = clj.small_cluster_step(full, odc.config)
    state, _ = step(state, i, f)
    state, got = clj.small_cluster_step(state, odc.config)
    assert got == want, (got, want)
    small, splits = small + got.num_small_clusters, splits + got.num_splits
    for k in ("labels", "sizes", "iteration"):
        np.testing.assert_array_equal(np.asarray(getattr(state, k)), np.asarray(getattr(full, k)), err_msg=k)
    features = np.asarray(multihost_utils.process_allgather(state.features, tiled=True))[:N]
    np.testing.assert_allclose(features, np.asarray(full.features), rtol=0, atol=8 * eps * 8)
    np.testing.assert_allclose(np.asarray(state.centroids), np.asarray(full.centroids), rtol=0, atol=8 * eps * 8)
    np.testing.assert_allclose(np.asarray(state.sums), np.asarray(full.sums), rtol=0, atol=8 * eps * 8 * N)
assert state.features.sharding == clj.shard_memory(full, mesh, odc.config).features.sharding
print("handled", small, splits)
print("ok", pid)
"""


@pytest.mark.slow
def test_jax_memory_sharded_over_two_processes(tmp_path):
    """Two JAX processes (jax.distributed, gloo CPU collectives), one device each: the
    memory's features split between them, the jitted sharded step follows the replicated one
    (labels and sizes exactly, floats within the rounding of two differently fused programs);
    then on a stream where small clusters form, step + small_cluster_step (member rows
    gathered over the processes) follows the replicated path after every step: the same
    handling stats, labels, sizes and iteration exactly, floats within that rounding."""
    pytest.importorskip("jax")
    import socket

    script = tmp_path / "process.py"
    script.write_text(JAX_PROCESS_SCRIPT)
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    tests = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    procs = [subprocess.Popen([sys.executable, str(script), str(p), "2", str(port), tests], env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for p in range(2)]
    logs = [p.communicate(timeout=600)[0] for p in procs]
    for p, log in zip(procs, logs):
        assert p.returncode == 0, log[-3000:]
    assert [log.strip().splitlines()[-1] for log in logs] == ["ok 0", "ok 1"]
    handled = [log.strip().splitlines()[-2].split() for log in logs]
    assert handled[0] == handled[1] and handled[0][0] == "handled", handled
    assert int(handled[0][1]) > 0 and int(handled[0][2]) > 0, handled  # small clusters found and split


ORBAX_SCRIPT = """import sys, os
mode, path, ndev = sys.argv[1], sys.argv[2], int(sys.argv[3])
os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + f" --xla_force_host_platform_device_count={ndev}"
sys.path.insert(0, sys.argv[4])
import jax, jax.numpy as jnp, numpy as np
from jax.sharding import Mesh
import clusterlearn as cl
from clusterlearn import odc_state
from clusterlearn.adapters import jax as clj
from streams import shard_stream
N, C, D = 241, 6, 8
x0, batches = shard_stream(4, 14)
batches = [(i[:24], f[:24]) for i, f in batches if np.isfinite(f).all()]
odc = cl.OnlineDeepClustering(N, C, D, momentum=0.3, min_cluster_size=0, centroid_update_interval=3)
odc.initialize(jnp.asarray(x0))
mesh = Mesh(np.array(jax.devices()), ("data",))
step = clj.make_memory_sharded_step(mesh, odc.config)
if mode == "save":
    state = clj.shard_memory(odc_state.ODCState(*(jnp.asarray(a) for a in odc.state)), mesh, odc.config)
    for i, f in batches[:6]:
        state, _ = step(state, i, f)
    clj.save_memory(path, state, mesh, odc.config)
    for i, f in batches[6:]:
        state, _ = step(state, i, f)
else:
    other = cl.OnlineDeepClustering(N, C, D, momentum=0.4, min_cluster_size=0, centroid_update_interval=3).config
    try:
        clj.load_memory(path, mesh, other)
        raise AssertionError("a checkpoint of other settings loaded")
    except ValueError as err:
        assert "other settings" in str(err)
    state = clj.load_memory(path, mesh, odc.config)
    for i, f in batches[6:]:
        state, _ = step(state, i, f)
g = clj.gather_memory(state, odc.config)
np.savez(path + f"-{mode}.npz", **g._asdict())
print("done", mode, ndev)
"""


@pytest.mark.slow
def test_orbax_checkpoint_of_two_devices_resumes_on_four_and_one(tmp_path):
    """Saved by a 2-device mesh after 6 steps, loaded on 4 devices and on 1, the run continues
    as the uninterrupted one: labels, sizes, iteration exactly, floats within the rounding of
    differently compiled programs; a checkpoint of other settings is refused (ValueError)."""
    pytest.importorskip("orbax.checkpoint")
    script = tmp_path / "resume.py"
    script.write_text(ORBAX_SCRIPT)
    tests = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    ckpt = str(tmp_path / "ckpt")
    for mode, devices in (("save", 2), ("load", 4), ("load", 1)):
        out = ckpt + f"-{mode}" + ("" if mode == "save" else str(devices))
        done = subprocess.run([sys.executable, str(script), mode, ckpt, str(devices), tests], env=env,
                              capture_output=True, text=True, timeout=600)
        assert done.returncode == 0, done.stderr[-3000:]
        os.replace(ckpt + f"-{mode}.npz", out + ".npz")
    whole = np.load(ckpt + "-save.npz")
    bound = 8 * float(np.finfo(np.float32).eps) * 8
    for devices in (4, 1):
        resumed = np.load(ckpt + f"-load{devices}.npz")
        for name in ("labels", "sizes", "iteration"):
            np.testing.assert_array_equal(resumed[name], whole[name], err_msg=name)
        for name in ("features", "centroids"):
            np.testing.assert_allclose(resumed[name], whole[name], rtol=0, atol=bound, err_msg=name)
        np.testing.assert_allclose(resumed["sums"], whole["sums"], rtol=0, atol=bound * 241)


SMALL_CLUSTERS_SCRIPT = """import dataclasses, os
os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=2"
import sys; sys.path.insert(0, sys.argv[1])
import jax, jax.numpy as jnp, numpy as np
from jax.sharding import Mesh
import clusterlearn as cl
from clusterlearn import odc_state
from clusterlearn.adapters import jax as clj
from streams import drifting_stream
N, C, D = 241, 6, 8
x0, batches = drifting_stream(3, 40, num_samples=N)
odc = cl.OnlineDeepClustering(N, C, D, min_cluster_size=30, seed=1)
odc.initialize(jnp.asarray(x0))
full = clj.state_from_core(odc)
mesh = Mesh(np.array(jax.devices()), ("data",))
state = clj.shard_memory(full, mesh, odc.config)
step = clj.make_memory_sharded_step(mesh, odc.config)
rstep = jax.jit(odc_state.step, static_argnums=3)
splits = 0
for i, f in batches:
    full, _ = rstep(full, jnp.asarray(i), jnp.asarray(f), odc.config)
    full, h1 = clj.small_cluster_step(full, odc.config)
    state, _ = step(state, i, f)
    state, h2 = clj.small_cluster_step(state, odc.config)
    assert h1 == h2, (h1, h2)
    splits += h2.num_splits
    for k in ("labels", "sizes", "iteration"):
        assert np.array_equal(np.asarray(getattr(state, k)), np.asarray(getattr(full, k))), k
# bfloat16 features: the rows read from the devices come widened, as the replicated handling reads them
planted = np.asarray(odc.labels).astype(np.int64)
planted[planted == 1] = 0
planted[np.flatnonzero(planted == 2)[3:]] = 3
b16 = cl.OnlineDeepClustering(N, C, D, min_cluster_size=0, seed=1, like=jnp.zeros(1, dtype=jnp.bfloat16))
b16.initialize(jnp.asarray(x0), jnp.asarray(planted))
config = dataclasses.replace(clj.config_from_core(b16), min_cluster_size=30)
whole = clj.state_from_core(b16)
got_r, h_r = clj.handle_small_clusters(whole, config, key=5)
got_s, h_s = clj.handle_small_clusters(clj.shard_memory(whole, mesh, config), config, key=5)
assert h_r == h_s and h_r.num_small_clusters >= 2, (h_r, h_s)
for k in ("labels", "centroids", "sizes", "sums"):
    a, b = np.asarray(getattr(got_r, k)), np.asarray(getattr(got_s, k))
    assert a.dtype == b.dtype and np.array_equal(a.view(np.uint8), b.view(np.uint8)), k
print("ok splits", splits, state.features.sharding)
"""


@pytest.mark.slow
def test_jax_sharded_memory_handles_small_clusters_as_the_replicated_one(tmp_path):
    """small_cluster_step on a memory sharded over 2 forced devices (padded rows; the member
    rows gathered from the devices) dissolves and splits the same clusters as on the
    replicated state: labels, sizes and iteration equal after every step, and the stream
    really splits clusters; with bfloat16 features one handling gives the replicated one's bits."""
    pytest.importorskip("jax")
    script = tmp_path / "small.py"
    script.write_text(SMALL_CLUSTERS_SCRIPT)
    tests = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    done = subprocess.run([sys.executable, str(script), tests], env={**os.environ, "JAX_PLATFORMS": "cpu"},
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    last = done.stdout.strip().splitlines()[-1].split()
    assert last[:2] == ["ok", "splits"] and int(last[2]) > 0
