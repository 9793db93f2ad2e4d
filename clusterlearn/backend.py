"""The few backend-specific primitives the array API standard lacks.

Everything else in clusterlearn is written against the standard (through array-api-compat).
This module is the only place that knows individual libraries; each primitive has a native
path for NumPy, PyTorch, JAX and CuPy and a portable fallback (used by array-api-strict) that
only uses the standard.

Mutation contract: ``scatter_add`` and ``set_rows`` may update their first argument in place
(NumPy, PyTorch, CuPy) or return a new array (JAX, fallback). Always use the returned array and
treat the argument as consumed.

This module is public: the adapters, the examples and users who write their own memories call
these primitives rather than re-deriving them for one library.
"""

from __future__ import annotations

import math
import sys
from types import ModuleType
from typing import Any

import array_api_compat as aac
import numpy as np

Array = Any

__all__ = [
    "exact_bytes",
    "namespace",
    "check_array",
    "eager_namespace",
    "unsupported_torch_dtype",
    "to_numpy",
    "convert",
    "scatter_add",
    "scatter_add_rows",
    "bincount",
    "set_rows",
    "set_rows_where",
    "to_bits",
    "from_bits",
    "cond",
    "argmax_rows",
    "is_float64",
    "accumulator_dtype",
    "index_dtype",
    "rng",
    "power_of_two_exponent",
    "times_power_of_two",
]


def namespace(**arrays: Array) -> ModuleType:
    """Array-API namespace shared by the keyword arrays.

    Raises
    ------
    TypeError
        If an argument is not a supported array (``None``, a list, a NumPy subclass such as
        ``numpy.ma.MaskedArray`` or ``numpy.matrix``, a non-standard NumPy dtype such as
        ml_dtypes' bfloat16, a sparse or quantised torch tensor), or the arrays
        come from different libraries; the message names the arguments.
    """
    found: dict[str, ModuleType] = {}
    for name, x in arrays.items():
        check_array(x, name)
        found[name] = aac.array_namespace(x)
    if not found:
        raise TypeError("expected at least one array")
    spaces = {id(xp): xp for xp in found.values()}
    if len(spaces) > 1:
        desc = ", ".join(f"{n} from {xp.__name__}" for n, xp in found.items())
        raise TypeError(f"arrays from different namespaces cannot be mixed: {desc}")
    return next(iter(found.values()))


def check_array(x: Any, name: str) -> None:
    """Raise TypeError, naming ``name``, unless ``x`` is an array the core can work on.

    Accepted: plain ``numpy.ndarray`` (and ``numpy.memmap``, e.g. ``np.load(..., mmap_mode="r")``)
    of a standard NumPy dtype, dense strided torch tensors,
    concrete JAX arrays, CuPy arrays and other array-API arrays. Everything else is refused
    before any state changes, because it would fail (or silently misbehave) later: masked
    arrays lose their mask and break broadcasting, ``numpy.matrix`` keeps 2-D shapes, ml_dtypes
    are not array-API dtypes, sparse tensors have no strided indexing.
    """
    if x is None:
        raise TypeError(f"{name} must be an array, got None")
    if isinstance(x, np.ndarray) and type(x) not in (np.ndarray, np.memmap):  # memmap: a file-backed ndarray
        raise TypeError(
            f"{name} must be a plain numpy.ndarray, got the subclass {type(x).__module__}.{type(x).__name__}"
            " (convert with numpy.asarray, after filling masked values)"
        )
    if not aac.is_array_api_obj(x):
        raise TypeError(f"{name} must be an array (NumPy, PyTorch, JAX, CuPy, ...), got {type(x).__name__}")
    if isinstance(x, (np.ndarray, np.generic)) and (x.dtype.kind not in "biufc" or x.dtype.type.__module__ != "numpy"):
        raise TypeError(f"{name} has the non-standard NumPy dtype {x.dtype}; cast it to float32 or an integer dtype")
    if aac.is_torch_array(x):
        import torch

        if x.layout != torch.strided:
            raise TypeError(f"{name} must be a dense (strided) tensor, got layout {x.layout}")
        if x.is_quantized:
            raise TypeError(f"{name} must not be a quantized tensor")


def eager_namespace(**arrays: Array) -> ModuleType:
    """:func:`namespace` for functions that read values on the host (checks, state changes).

    Also refuses JAX tracers, naming the argument: such a call runs inside ``jax.jit``,
    where values cannot be checked and no state can be changed in place.
    """
    xp = namespace(**arrays)
    if aac.is_jax_namespace(xp):
        import jax

        for name, x in arrays.items():
            if isinstance(x, jax.core.Tracer):
                raise TypeError(
                    f"{name} is a JAX tracer: this function runs eagerly and cannot be traced by jax.jit "
                    "(for the ODC step inside jit use clusterlearn.adapters.jax.step)"
                )
    return xp


def compiles_per_shape(xp: ModuleType) -> bool:
    """Whether eager operations of ``xp`` compile once per input shape (JAX): host-side code
    with data-dependent shapes then costs a compilation per operation and call, and runs on
    NumPy copies instead."""
    return aac.is_jax_namespace(xp)


def to_numpy(x: Array) -> np.ndarray:
    """Copy-free where possible host NumPy view of any supported array (detached, on CPU).

    2-byte floats of PyTorch and JAX's bfloat16 (no standard NumPy dtype) come as float32.
    """
    if isinstance(x, (np.ndarray, np.generic)):
        return np.asarray(x)
    if aac.is_torch_array(x):
        x = x.detach().cpu()
        return (x.float() if x.dtype.is_floating_point and x.element_size() == 2 else x).numpy()
    if aac.is_cupy_array(x):
        return x.get()
    if aac.is_jax_array(x):
        y = np.asarray(x)
        return y.astype(np.float32) if y.dtype.kind == "V" else y  # ml_dtypes' bfloat16
    try:
        return np.from_dlpack(x)
    except (TypeError, RuntimeError, BufferError):
        return np.asarray(x)


def exact_bytes(x: Array) -> tuple[str, tuple[int, ...], bytes]:
    """``(dtype name, shape, bytes)`` of any supported array, the same on every backend.

    The dtype name is NumPy's (``"float32"``, ``"bfloat16"``, ``"int64"``, ``"bool"``); the
    bytes are the elements in C order, each little-endian, copied to the host. Unlike
    :func:`to_numpy`, 2-byte floats are not widened: their own bits are kept.
    """
    if aac.is_torch_array(x):
        x = x.detach().cpu().contiguous()
        name = str(x.dtype).removeprefix("torch.")
        if x.dtype.is_floating_point and x.element_size() == 2:
            torch = sys.modules["torch"]  # loaded: x is one of its tensors (the core imports no torch)
            return name, tuple(x.shape), _little_endian(x.view(torch.int16).numpy())
        a = x.numpy()
        return name, tuple(a.shape), _little_endian(a)
    a = np.asarray(x) if aac.is_jax_array(x) else np.asarray(to_numpy(x))  # JAX: bfloat16 as itself
    return a.dtype.name, tuple(a.shape), _little_endian(a)


def _little_endian(a: np.ndarray) -> bytes:
    """The bytes of ``a``'s elements in C order, each little-endian."""
    a = np.ascontiguousarray(a)
    unsigned = a.view(f"=u{a.itemsize}") if a.itemsize in (1, 2, 4, 8) else a
    return unsigned.astype(unsigned.dtype.newbyteorder("<"), copy=False).tobytes()


def convert(x: Array, xp: ModuleType, device: Any = None) -> Array:
    """Return ``x`` as an array of namespace ``xp`` on ``device`` (no copy when already there).

    Torch tensors are detached: memories never hold autograd history.
    """
    if aac.is_torch_array(x):
        x = x.detach()
    if aac.array_namespace(x) is xp:
        return x if device is None or aac.device(x) == device else aac.to_device(x, device)
    host = to_numpy(x)
    if not host.flags.writeable:  # e.g. a view of a JAX buffer; torch warns on those
        host = host.copy()
    return xp.asarray(host) if device is None else xp.asarray(host, device=device)


def index_dtype(xp: ModuleType, device: Any = None) -> Any:
    """Default integer dtype of ``xp`` (int64, or int32 on JAX without x64)."""
    return xp.__array_namespace_info__().default_dtypes(device=device)["integral"]


def accumulator_dtype(xp: ModuleType, device: Any = None) -> Any:
    """float64 where the namespace/device supports it, else float32 (JAX without x64, MPS)."""
    floats = xp.__array_namespace_info__().dtypes(device=device, kind="real floating")
    return floats.get("float64", xp.float32)


def power_of_two_exponent(x: Array) -> int:
    """``e`` such that ``x * 2**-e`` is safe to square and sum, 0 when ``x`` already is.

    With ``max|x| = m * 2**e``, ``m`` in [0.5, 1), ``x * 2**-e`` (:func:`times_power_of_two`)
    has entries below 1, so squares and their sums can neither overflow nor (for the large
    entries) underflow. Data whose largest entry lies within 2**±(maxexp / 4) of 1 (2**±32 in
    float32, 2**±256 in float64) are already safe and get 0, which spares the caller a copy;
    16-bit floats (float16 squares overflow at 256) are always rescaled.
    """
    if math.prod(x.shape) == 0:
        return 0
    xp = aac.array_namespace(x)
    e = math.frexp(float(xp.max(xp.abs(x))))[1]
    info = xp.finfo(x.dtype)
    safe = int(math.log2(float(info.max))) // 4 if info.bits > 16 else 0
    return 0 if abs(e) <= safe else e


def times_power_of_two(x: Array, e: int) -> Array:
    """``x * 2**e`` in ``x``'s dtype, exact barring under/overflow of the result.

    Multiplies by factors small enough to be finite in ``x``'s dtype (2**7 for float16, 2**63
    for float32, 2**511 for float64), so ``e`` may exceed the dtype's exponent range as long
    as the result does not: 3e38 * 2**-128 and its inverse are both exact in float32.
    """
    if e == 0:
        return x
    xp = aac.array_namespace(x)
    chunk = max(1, int(math.log2(float(xp.finfo(x.dtype).max))) // 2)
    while e != 0:
        part = max(-chunk, min(chunk, e))
        x = x * 2.0**part
        e -= part
    return x


def unsupported_torch_dtype(x: Array) -> bool:
    """Whether ``x`` is a torch tensor of a dtype torch itself barely computes with.

    float8 (no reductions, no matmul on most devices) and uint16/32/64 (no ``min``/``max``,
    no indexing): they would fail deep inside a step with ``NotImplementedError``.
    """
    if not aac.is_torch_array(x):
        return False
    import torch

    return x.dtype in (torch.uint16, torch.uint32, torch.uint64) or "float8" in str(x.dtype)


def rng(*keys: int) -> np.random.Generator:
    """Host-side generator seeded from integer keys: same draws on every backend."""
    return np.random.default_rng([int(k) for k in keys])


def _onehot(index: Array, length: int, dtype: Any, xp: ModuleType) -> Array:
    """(len(index), length) one-hot matrix; the portable scatter for small sizes."""
    cols = xp.arange(length, device=aac.device(index), dtype=index.dtype)
    return xp.astype(index[:, None] == cols[None, :], dtype)


def scatter_add(x: Array, index: Array, values: Array) -> Array:
    """``x[index[i]] += values[i]`` along axis 0, accumulating repeated indices.

    Parameters
    ----------
    x : (M,) or (M, D) array
        Accumulator; may be modified in place (see module docstring).
    index : (B,) integer array with values in [0, M)
    values : (B,) or (B, D) array, cast to ``x.dtype``

    Returns
    -------
    The updated accumulator, same shape and dtype as ``x``.
    """
    xp = aac.array_namespace(x)
    if isinstance(x, np.ndarray):
        _numpy_scatter_add(x, np.asarray(index), np.asarray(values))
        return x
    values = xp.astype(values, x.dtype, copy=False)
    if aac.is_torch_array(x):
        return x.index_add_(0, index, values)
    if aac.is_jax_array(x):
        return x.at[index].add(values)
    if aac.is_cupy_array(x):
        import cupyx

        cupyx.scatter_add(x, index, values)
        return x
    onehot = _onehot(index, x.shape[0], x.dtype, xp)
    if x.ndim == 1:
        return x + xp.sum(onehot * values[:, None], axis=0)
    return x + xp.matmul(xp.matrix_transpose(onehot), values)


#: Elements of ``values`` cast at a time by :func:`scatter_add_rows` (32 MiB in float64).
_ROWS_BLOCK_ELEMENTS = 1 << 22


def scatter_add_rows(x: Array, index: Array, values: Array) -> Array:
    """:func:`scatter_add` of many (N, D) ``values``, a block of rows at a time.

    The same sums as one :func:`scatter_add` up to the order of additions, but the cast of
    ``values`` to ``x.dtype`` (float32 features into float64 sums) never holds more than
    about 2**22 elements: summing a data set's features needs O(D) extra memory per block,
    not a float64 copy of all N rows. JAX arrays take one scatter: XLA fuses the cast into it
    (and a blocked loop would copy the accumulator per block).
    """
    if aac.is_jax_array(x):  # XLA fuses the cast into the scatter: no copy to save, one scatter is faster
        return scatter_add(x, index, values)
    step = max(1, _ROWS_BLOCK_ELEMENTS // max(1, math.prod(values.shape[1:])))
    n = values.shape[0]
    for start in range(0, n, step):
        stop = min(start + step, n)
        x = scatter_add(x, index[start:stop], values[start:stop, ...])
    return x


_NUMPY_CHUNK = 1 << 16
_NUMPY_MAX_ROUNDS = 16


def _numpy_scatter_add(x: np.ndarray, index: np.ndarray, values: np.ndarray) -> None:
    """In-place scatter-add for NumPy, fast for ODC batches and for whole data sets alike.

    1-D: ``np.add.at``. 2-D: indices are sorted and each row gets its rank among equal
    indices. Low multiplicity (an
    ODC batch, where a cluster id recurs a few times): one fancy-indexed add per rank, each
    over distinct indices. High multiplicity (N points into k clusters): sorted chunks reduced
    with ``np.add.reduceat`` in ``x``'s dtype, so nothing of size N is copied in float64.
    """
    if x.ndim == 1:  # ufunc.at has a fast 1-D path
        np.add.at(x, index, values.astype(x.dtype, copy=False))
        return
    order = np.argsort(index, kind="stable")
    sorted_index = index[order]
    starts = np.flatnonzero(np.r_[True, sorted_index[1:] != sorted_index[:-1]])
    rank = np.arange(index.shape[0]) - np.repeat(starts, np.diff(np.r_[starts, index.shape[0]]))
    if int(rank.max()) < _NUMPY_MAX_ROUNDS:
        for r in range(int(rank.max()) + 1):
            pick = order[rank == r]
            x[index[pick]] += values[pick]
        return
    for start in range(0, index.shape[0], _NUMPY_CHUNK):
        part = order[start : start + _NUMPY_CHUNK]
        chunk_index = sorted_index[start : start + _NUMPY_CHUNK]
        bounds = np.flatnonzero(np.r_[True, chunk_index[1:] != chunk_index[:-1]])
        x[chunk_index[bounds]] += np.add.reduceat(values[part], bounds, axis=0, dtype=x.dtype)


def bincount(labels: Array, length: int) -> Array:
    """Counts of each value in ``labels`` (1-D, integers in [0, length)), shape (length,).

    The result has the namespace's default integer dtype and ``labels``' device.
    """
    xp = aac.array_namespace(labels)
    dtype = index_dtype(xp, aac.device(labels))
    if isinstance(labels, np.ndarray):
        return np.bincount(labels, minlength=length).astype(dtype, copy=False)
    if aac.is_torch_array(labels):
        import torch

        return torch.bincount(labels, minlength=length).to(dtype)
    if aac.is_jax_array(labels):
        import jax.numpy as jnp

        return jnp.bincount(labels, length=length).astype(dtype)
    if aac.is_cupy_array(labels):
        import cupy

        return cupy.bincount(labels, minlength=length).astype(dtype)
    return xp.sum(_onehot(labels, length, dtype, xp), axis=0)


def set_rows(x: Array, index: Array, values: Array) -> Array:
    """``x[index] = values`` along axis 0; may write in place.

    Parameters
    ----------
    x : (M,) or (M, D) array
    index : (B,) integer array in [0, M); a repeated index must come with equal rows of
        ``values`` (which copy is written is then irrelevant)
    values : (B,) or (B, D) array, cast to ``x.dtype``
    """
    xp = aac.array_namespace(x)
    values = xp.astype(values, x.dtype, copy=False)
    if isinstance(x, np.ndarray) or aac.is_torch_array(x) or aac.is_cupy_array(x):
        x[index] = values
        return x
    if aac.is_jax_array(x):
        return x.at[index].set(values)
    match = _onehot(index, x.shape[0], xp.int8, xp)  # (B, M)
    hit = xp.any(match == 1, axis=0)
    pos = xp.argmax(match, axis=0)
    picked = xp.take(values, pos, axis=0)
    mask = hit if x.ndim == 1 else hit[:, None]
    return xp.where(mask, picked, x)


def cond(pred: Array, true_fn: Any, false_fn: Any, *operands: Array) -> Any:
    """``true_fn(*operands)`` if ``pred`` else ``false_fn(*operands)``, also under ``jax.jit``.

    Python's ``if`` needs a concrete boolean; a traced JAX ``pred`` goes to ``lax.cond``
    (both branches must return arrays of equal shapes and dtypes; only one runs). Every
    other ``pred`` (a 0-d array of any namespace, or a Python bool) is read on the host.
    """
    if aac.is_jax_array(pred):
        import jax

        if isinstance(pred, jax.core.Tracer):
            return jax.lax.cond(pred, true_fn, false_fn, *operands)
    return true_fn(*operands) if bool(pred) else false_fn(*operands)


def argmax_rows(x: Array) -> Array:
    """(B,) position of the largest entry of every row of ``x`` (B, K); ties: the lowest position.

    ``argmax(x, axis=1)`` in the namespace's default integer dtype: the one labelling rule of
    every nearest-centroid assignment.
    """
    return aac.array_namespace(x).argmax(x, axis=1)


def is_float64(dtype: Any) -> bool:
    """Whether ``dtype`` (a NumPy, JAX, PyTorch, CuPy or array-api-strict dtype) is float64."""
    return str(dtype).rsplit(".", 1)[-1].strip("'>") == "float64"


def top_k_indices(s: Array, k: int) -> Array | None:
    """(B, k) column indices of the ``k`` largest entries of each row of (B, N) ``s``, in any order
    (the backend's native top-k: ``argpartition``, ``torch.topk``, ``jax.lax.top_k``).

    ``None`` where the namespace has no native top-k (array-api-strict): the caller sorts.
    """
    if isinstance(s, np.ndarray):
        return np.argpartition(s, s.shape[1] - k, axis=1)[:, s.shape[1] - k :]
    if aac.is_torch_array(s):
        import torch

        return torch.topk(s, k, dim=1, largest=True, sorted=False).indices
    if aac.is_jax_array(s):
        import jax

        return jax.lax.top_k(s, k)[1]
    if aac.is_cupy_array(s):
        import cupy

        return cupy.argpartition(s, s.shape[1] - k, axis=1)[:, s.shape[1] - k :]
    return None


def set_rows_where(x: Array, index: Array, values: Array, where: Array) -> Array:
    """``x[index[where]] = values[where]`` along axis 0, with static shapes; may write in place.

    Rows whose ``where`` is False are not written (their ``index`` may be any value in
    [0, M)); under ``jax.jit`` they are sent out of bounds and dropped.

    Parameters
    ----------
    x : (M,) or (M, D) array
    index : (B,) integer array in [0, M); repeated written positions need equal rows
    values : (B,) or (B, D) array, cast to ``x.dtype``
    where : (B,) bool
    """
    xp = aac.array_namespace(x)
    if aac.is_jax_array(x):
        out = xp.where(where, index, xp.full_like(index, x.shape[0]))
        return x.at[out].set(xp.astype(values, x.dtype), mode="drop")
    if isinstance(x, np.ndarray) or aac.is_torch_array(x) or aac.is_cupy_array(x):
        x[index[where]] = xp.astype(values, x.dtype, copy=False)[where]
        return x
    return set_rows(x, index, xp.where(where if values.ndim == 1 else where[:, None], values, xp.take(x, index, axis=0)))


_BITS = {2: "int16", 4: "int32", 8: "int64"}


def to_bits(x: Array) -> Array:
    """The bit patterns of floating ``x`` as signed integers (int32 for 16- and 32-bit floats,
    int64 for float64), so that summing them where every position has at most one non-zero
    term reproduces that term's float bit for bit (a collective that moves floats exactly).

    ``TypeError`` for a namespace without bit views (array-api-strict).
    """
    xp = aac.array_namespace(x)
    size = _itemsize(x)
    if isinstance(x, np.ndarray) or aac.is_cupy_array(x):
        bits = x.view(getattr(np, _BITS[size]) if isinstance(x, np.ndarray) else _BITS[size])
    elif aac.is_torch_array(x):
        import torch

        bits = x.view(getattr(torch, _BITS[size]))
    elif aac.is_jax_array(x):
        import jax

        bits = jax.lax.bitcast_convert_type(x, getattr(xp, _BITS[size]))
    else:
        raise TypeError(f"{xp.__name__} arrays have no bit views; use NumPy, PyTorch, JAX or CuPy")
    return xp.astype(bits, xp.int32) if size == 2 else bits


def from_bits(bits: Array, dtype: Any) -> Array:
    """Inverse of :func:`to_bits`: the floats of ``dtype`` whose patterns ``bits`` holds."""
    xp = aac.array_namespace(bits)
    probe = xp.zeros((), dtype=dtype)
    size = _itemsize(probe)
    if size == 2:
        bits = xp.astype(bits, xp.int16)
    if isinstance(bits, np.ndarray) or aac.is_cupy_array(bits):
        return bits.view(dtype)
    if aac.is_torch_array(bits):
        return bits.view(dtype)
    import jax

    return jax.lax.bitcast_convert_type(bits, dtype)


def _itemsize(x: Array) -> int:
    """Bytes per element of ``x``."""
    if aac.is_torch_array(x):
        return x.element_size()
    return np.dtype(x.dtype).itemsize if not aac.is_jax_array(x) else x.dtype.itemsize
