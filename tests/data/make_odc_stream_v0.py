"""Writes odc_stream_v0.npz: an ODC checkpoint and a 16-step stream, run by the code of commit
d95d341 (before the step became the pure ``clusterlearn.odc_state.step``).

Run from a checkout of that commit: ``PYTHONPATH=$PWD python tests/data/make_odc_stream_v0.py``
(with ``tests/streams.py`` copied in: the stream was then ``tests/test_jax_adapter.py``'s
``make_stream``, the same numbers).
Keys: ``before/*`` (the state_dict after ``initialize``), ``indices`` (16, 32) and
``features`` (16, 32, 8) (the batches; each repeats 3 indices), ``stats`` (16, 4):
change_ratio, num_small_clusters, num_splits, centroids_refreshed per step, ``after/*``
(the state_dict after the 16 steps).
"""

import os
import sys

import numpy as np

import clusterlearn as cl

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
from streams import C, D, N, drifting_stream  # noqa: E402

x0, batches = drifting_stream(3, steps=16)
kw = dict(momentum=0.2, min_cluster_size=35, centroid_update_interval=3, small_cluster_interval=2, seed=5, resync_interval=4)
odc = cl.OnlineDeepClustering(N, C, D, **kw)
odc.initialize(x0)
out = {f"before/{k}": np.asarray(v) for k, v in odc.state_dict().items()}
stats = []
for idx, f in batches:
    s = odc.step(idx, f)
    stats.append([s["change_ratio"], s["num_small_clusters"], s["num_splits"], s["centroids_refreshed"]])
out.update({f"after/{k}": np.asarray(v) for k, v in odc.state_dict().items()})
out["indices"] = np.stack([b[0] for b in batches])
out["features"] = np.stack([b[1] for b in batches])
out["stats"] = np.asarray(stats, dtype=np.float64)
np.savez(os.path.join(os.path.dirname(__file__), "odc_stream_v0.npz"), **out)
