"""PyTorch adapter: drop clusterlearn into a training loop, on one device or many under torchrun.

What a PyTorch user imports::

    from clusterlearn.adapters import torch as clt

- :class:`OnlineDeepClustering`: the core ODC memories on torch tensors (memory on the GPU or
  the CPU, whatever the model's device); under ``torch.distributed`` every ``step`` gathers
  all ranks' batches so all replicas stay bit-identical.
- :class:`ShardedOnlineDeepClustering`: the same memories with the (N, D) features split over
  the ranks (each holds N / world rows; O(B D) bytes moved per step), checkpointed with
  ``torch.distributed.checkpoint`` so that a run resumes on another number of ranks.
- :class:`ODCNeck`, :class:`ODCHead`: ODC's non-linear neck and its cluster-size re-weighted
  classifier; :class:`SelfClassifierHead`: the projection MLP and bias-free heads.
- :class:`SelfClassifierLoss`: the Self-Classifier loss as an ``nn.Module`` with an analytic
  backward, over the global batch under DDP (all-gather with gradient to the local part).
- :class:`UniformClusterSampler`: a DDP-aware sampler uniform over clusters (DeepCluster).
- :func:`extract_features`: the whole data set's features in dataset order on every rank
  (DeepCluster's per-epoch clustering, ODC's initialisation).
- :func:`all_gather_with_grad`: the gather with the correct gradient, for your own losses.
- :func:`psum`: the sum over ranks as a function, for the core's sharded functions
  (DeepCluster over shards: :class:`clusterlearn.deepcluster_shard.ShardedDeepClusterLabeler`).
- :func:`row_sharded`, :func:`local_rows`: this rank's block of an (N, ...) array as a
  ``DTensor`` sharded along the rows, so that ``torch.distributed.checkpoint`` saves every
  rank's rows once and loads them under any number of ranks (sharded labels, features).

Nothing here changes results with the world size at equal global batch. Under
``torch.distributed`` every collective here first exchanges a small fixed-size header (each
rank's local exception, if any, and the shapes, dtypes and settings it is about to use), so
that a failure or a mismatch on one rank raises on every rank instead of aborting one and
stalling or corrupting the others; a rank that never reaches the collective is caught only
by the process group's ``timeout``.
"""

from ._torch_data import UniformClusterSampler, extract_features
from ._torch_distributed import all_gather_with_grad, psum
from ._torch_modules import ODCHead, ODCNeck, SelfClassifierHead
from ._torch_row_shards import local_rows, row_sharded
from ._torch_odc import OnlineDeepClustering
from ._torch_self_classifier import SelfClassifierLoss
from ._torch_sharded_odc import ShardedOnlineDeepClustering

__all__ = [
    "OnlineDeepClustering",
    "ShardedOnlineDeepClustering",
    "ODCNeck",
    "ODCHead",
    "SelfClassifierHead",
    "SelfClassifierLoss",
    "UniformClusterSampler",
    "extract_features",
    "all_gather_with_grad",
    "psum",
    "row_sharded",
    "local_rows",
]
