"""ODC memories for PyTorch, consistent across ``torch.distributed`` ranks.

Every rank keeps a full replica of the memories. :meth:`OnlineDeepClustering.step` gathers
the local batches of all ranks (in rank order) and every replica applies the same
deterministic update on that global batch, so replicas stay bit-identical and equal to one
process stepping on the concatenated batches. Initialisation is computed on rank 0 and
broadcast.
"""

from __future__ import annotations

import dataclasses
import warnings
from typing import Any

import torch

from clusterlearn.validation import check_features, check_labels
from clusterlearn.odc import OnlineDeepClustering as _CoreODC
from clusterlearn.odc_state import ODCState, check_replicas, fingerprint, fingerprint_parts, state_shapes

from . import _torch_distributed as D

__all__ = ["OnlineDeepClustering"]


def _default_device() -> torch.device:
    return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")


class OnlineDeepClustering(_CoreODC):
    """:class:`clusterlearn.OnlineDeepClustering` on torch tensors, kept identical on all ranks.

    Same constructor and methods as the core class, plus:

    Parameters
    ----------
    device : where the memories live (default: the current CUDA device if CUDA is available,
        else the CPU); independent of the model's device
    dtype : floating dtype of the sample memory and centroids (default ``torch.float32``)
    feature_device : the device ``step`` expects features on (default: the memory's device);
        features on any other device raise ``ValueError`` (the promise is checked, not
        silently copied). Indices may be on the CPU or on this device.
    group : the ``torch.distributed`` process group (default: the world)

    Notes
    -----
    When ``torch.distributed`` is initialised with several ranks, :meth:`step`,
    :meth:`initialize`, :meth:`check_consistency` and :meth:`sync_from_rank0` are
    collectives: every rank must call them, with batches of the same size (pad the last
    batch, as ``DistributedSampler`` does by repeating indices), on replicas constructed with
    the same settings and dtype. Any exception raised by one rank's checks (bad input, no
    memories) makes every rank raise instead of hanging, before any memory changes.

    Examples
    --------
    >>> odc = OnlineDeepClustering(len(dataset), 10_000, 256, device="cuda")  # doctest: +SKIP
    >>> odc.initialize(extract_features(model, loader))                        # doctest: +SKIP
    >>> for idx, x in loader:                                                  # doctest: +SKIP
    ...     f = model(x); y = odc.labels_of(idx).to(f.device)
    ...     loss = cross_entropy(head(f), y, weight=odc.loss_weights(like=f))
    ...     loss.backward(); opt.step(); opt.zero_grad()
    ...     stats = odc.step(idx, f.detach())
    """

    def __init__(
        self,
        num_samples: int,
        num_clusters: int,
        feat_dim: int,
        *,
        device: torch.device | str | None = None,
        dtype: torch.dtype = torch.float32,
        feature_device: torch.device | str | None = None,
        group: Any = None,
        **kwargs: Any,
    ) -> None:
        if "like" in kwargs:
            raise TypeError("the torch adapter takes device= and dtype= instead of like=")
        if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
            raise TypeError(f"dtype must be a floating torch.dtype, got {dtype!r}")
        device = _default_device() if device is None else torch.device(device)
        super().__init__(num_samples, num_clusters, feat_dim, like=torch.empty(0, dtype=dtype, device=device), **kwargs)
        self.feature_device = device if feature_device is None else torch.device(feature_device)
        self.group = group

    @property
    def world_size(self) -> int:
        """Number of ranks whose batches each step combines."""
        return D.world_size(self.group)

    # ------------------------------------------------------------------ checks
    def _check_tensor_device(self, name: str, x: Any, allowed: tuple[torch.device, ...]) -> None:
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
        if not any(_same_device(x.device, d) for d in allowed):
            want = " or ".join(str(d) for d in allowed)
            raise ValueError(
                f"{name} is on {x.device}, this memory expects it on {want} "
                "(set feature_device= in the constructor to the model's device)"
            )

    def _check_devices(self, indices: Any, features: Any) -> None:
        self._check_tensor_device("indices", indices, (torch.device("cpu"), self.feature_device))
        self._check_tensor_device("features", features, (self.feature_device,))
        _check_torch_input("indices", indices, integral=True)
        _check_torch_input("features", features, integral=False)

    def _check_batch(self, indices: Any, features: Any) -> None:
        self.require_initialized()
        self._check_devices(indices, features)
        self.samples.validate_batch(indices, features)

    def _replica_header(self) -> tuple[list[Any], list[str]]:
        """The settings, memory dtypes and step counter every replica must share."""
        settings = {**dataclasses.asdict(self.config), "memory dtype": str(self.samples.dtype)}
        return [*settings.values(), self.iteration], [*settings, "iteration"]

    # ------------------------------------------------------------------ collectives
    def initialize(
        self,
        features: Any,
        labels: Any = None,
        *,
        n_iter: int = 20,
        init: str = "k-means++",
        kmeans_iters: int | None = None,
        kmeans_init: str | None = None,
    ) -> dict[str, int]:
        """Fill the memories from the (N, D) features of the whole data set (a collective).

        Under ``torch.distributed`` rank 0's features are used on every rank and k-means runs on
        rank 0 only (:meth:`initial_labels`); its labels are broadcast. Pass the same ``labels``
        (or None) on every rank. ``kmeans_iters``/``kmeans_init``: deprecated names of
        ``n_iter``/``init``.
        """
        if kmeans_iters is not None or kmeans_init is not None:
            warnings.warn("initialize(kmeans_iters=, kmeans_init=) are deprecated, use n_iter=, init= "
                          "(docs/glossary.md)", DeprecationWarning, stacklevel=2)
            n_iter = n_iter if kmeans_iters is None else kmeans_iters
            init = init if kmeans_init is None else kmeans_init
        if self.world_size == 1:
            _check_torch_input("features", features, integral=False)
            _check_torch_input("labels", labels, integral=True)
            return super().initialize(features, labels, n_iter=n_iter, init=init)

        def check() -> None:
            if not isinstance(features, torch.Tensor):
                raise TypeError(f"features must be a torch.Tensor, got {type(features).__name__}")
            _check_torch_input("features", features, integral=False)
            _check_torch_input("labels", labels, integral=True)
            check_features(features, "features", dim=self.feat_dim, rows=self.num_samples)
            if labels is not None:
                if not isinstance(labels, torch.Tensor):
                    raise TypeError(f"labels must be a torch.Tensor, got {type(labels).__name__}")
                check_labels(labels, "labels", upper=self.num_clusters, length=self.num_samples)

        what = "OnlineDeepClustering.initialize"
        _, err = D.first_error(check)
        header, names = self._replica_header()
        header, names = [*header[:-1], labels is None], [*names[:-1], "labels omitted"]  # the counter restarts
        D.agree(header, err, what=what, names=names, group=self.group)
        if labels is None:
            labels, err = None, None
            if D.rank(self.group) == 0:
                # the core's own initial labels: they must not depend on the world size
                labels, err = D.first_error(lambda: self.initial_labels(features, n_iter=n_iter, init=init))
            D.agree([], err, what=what + " (k-means on rank 0)", names=[], group=self.group)
            if labels is None:
                labels = torch.zeros(self.num_samples, dtype=torch.int64)
        labels = D.broadcast_(torch.as_tensor(labels).to(torch.int64), group=self.group)
        feats = D.broadcast_(features.to(self.samples.dtype), group=self.group)
        return super().initialize(feats, labels)

    def step(self, indices: Any, features: Any) -> dict[str, float | int | bool]:
        """One ODC memory iteration on this rank's batch; a collective under torch.distributed.

        Parameters
        ----------
        indices : (b,) integer dataset indices of this rank's batch (CPU or ``feature_device``)
        features : (b, D) their features on ``feature_device`` (detached here)

        Notes
        -----
        Every rank must pass the same b, and the replicas must share their settings and step
        counter ``iteration`` (compared before any data moves: ``ValueError`` on every rank,
        e.g. after one rank alone loaded a checkpoint; :meth:`sync_from_rank0` repairs). Any
        exception the local checks raise on one rank is raised on every rank. The global batch
        (world·b rows, rank order) updates every replica identically; the returned statistics
        describe the global batch.
        """
        if isinstance(features, torch.Tensor):
            features = features.detach()
        if self.world_size == 1:
            self._check_devices(indices, features)
            return super().step(indices, features)  # validates the batch before any change
        _, err = D.first_error(lambda: self._check_batch(indices, features))
        header, names = self._replica_header()
        shape = list(features.shape) if err is None else []
        D.agree([*shape, *header], err, what="OnlineDeepClustering.step", names=["batch size", "feature dim", *names],
                group=self.group)
        dev = D.comm_device(self.group)
        global_idx = D.all_gather_cat(indices.to(device=dev, dtype=torch.int64), self.group)
        global_feats = D.all_gather_cat(features.to(device=dev, dtype=self.samples.dtype), self.group)
        return super().step(global_idx, global_feats)

    def fingerprint(self) -> str:
        """:func:`clusterlearn.odc_state.fingerprint` of this replica's state and config.

        A SHA-256 digest of every state array's exact bytes with its dtype and shape, the
        step counter and the settings; equal to the JAX adapter's digest of an equal state.
        """
        return fingerprint(self.state, self.config)

    def check_consistency(self) -> None:
        """Raise ``RuntimeError`` if any rank's replica differs from rank 0's (a collective).

        Compares the memories' bytes, the step counter and the settings (:meth:`fingerprint`'s
        parts) and names what differs. Replicas stay identical when every rank runs the same
        deterministic kernels (always on CPU; on CUDA, float atomics in scatter-adds may differ
        in the last bits across GPUs). Call it, e.g., once per epoch; :meth:`sync_from_rank0`
        repairs a divergence. A rank without memories makes every rank raise.
        """
        if self.world_size == 1:
            return
        parts, err = D.first_error(lambda: fingerprint_parts(self.state, self.config))
        header = [] if parts is None else [[k, v] for k, v in parts.items()]
        rows = D.agree(header, err, what="OnlineDeepClustering.check_consistency", names=[], group=self.group)
        check_replicas({f"rank {r}": dict(row) for r, row in enumerate(rows)}, "sync_from_rank0() makes them equal again")

    def sync_from_rank0(self) -> None:
        """Overwrite every rank's replica with rank 0's: memories and step counter (a collective).

        Ranks without memories (not initialised, or not loaded from a checkpoint) receive
        them, so rank 0 alone may :meth:`load_state_dict`. Every rank must have been
        constructed with the same settings and dtype (``ValueError`` on every rank otherwise);
        rank 0 must have memories (every rank raises otherwise).
        """
        if self.world_size == 1:
            return
        err = None
        if D.rank(self.group) == 0:
            _, err = D.first_error(self.require_initialized)
        header, names = self._replica_header()
        D.agree(header[:-1], err, what="OnlineDeepClustering.sync_from_rank0", names=names[:-1], group=self.group)
        if D.rank(self.group) == 0:
            current = self.state
        else:  # buffers to receive into
            device = self.samples.device
            current = ODCState(*(torch.empty(shape, dtype=dtype, device=device)
                                 for shape, dtype in zip(state_shapes(self.config), self.state_dtypes)))
        self.state = ODCState(*(D.broadcast_(x, group=self.group) for x in current))


#: Unsigned index dtypes torch cannot reduce on the CPU (``min``/``max`` raise NotImplementedError).
_UNSIGNED_WIDE = tuple(getattr(torch, name) for name in ("uint16", "uint32", "uint64") if hasattr(torch, name))

#: Feature dtypes the memory update computes with (float8 types cannot be reduced).
_FEATURE_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def _check_torch_input(name: str, x: Any, *, integral: bool) -> None:
    """TypeError if the torch tensor ``x`` is sparse, or of a dtype torch cannot reduce on the
    CPU (wide unsigned indices, float8 features), which the core's checks would meet as
    ``NotImplementedError``. Anything else (other namespaces, None) is left to the core."""
    if not isinstance(x, torch.Tensor):
        return
    if x.layout != torch.strided:
        raise TypeError(f"{name} must be a dense (strided) tensor, got layout {x.layout}")
    if integral and x.dtype in _UNSIGNED_WIDE:
        raise TypeError(
            f"{name} must have a signed integer dtype (or uint8), got {x.dtype}: torch cannot take its "
            "minimum on the CPU; pass int64"
        )
    if not integral and x.dtype.is_floating_point and x.dtype not in _FEATURE_DTYPES:
        raise TypeError(f"{name} must be float16, bfloat16, float32 or float64, got {x.dtype}")


def _same_device(a: torch.device, b: torch.device) -> bool:
    """Equal devices, treating ``cuda`` as the current CUDA device."""
    if a.type != b.type:
        return False
    if a.type != "cuda":
        return True
    current = torch.cuda.current_device()
    return (a.index if a.index is not None else current) == (b.index if b.index is not None else current)
