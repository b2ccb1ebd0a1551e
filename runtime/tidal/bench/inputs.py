"""Request bodies: input tensors from random data, zeros or a .npy/.npz file.

Each (traffic class, deadline) pair gets one serialized ModelInferRequest,
built before the run from the server's model metadata, with tensors in
`raw_input_contents` (little-endian; BYTES elements length-prefixed as the
KServe v2 binary form requires).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from tidal.bench.client import ModelInfo
from tidal.bench.spec import TrafficClass
from tidal.errors import InvalidArgument
from tidal.proto import grpc_service_pb2 as pb
from tidal.types import DataType

INPUT_KINDS = ("random", "zeros")


class InputSource:
    """Where tensor values come from: 'random', 'zeros', or arrays loaded from a file."""

    def __init__(self, spec: str, seed: int = 0) -> None:
        self.kind = spec if spec in INPUT_KINDS else "file"
        self._arrays: dict[str, np.ndarray] = {}
        self._rng = np.random.default_rng(seed)
        if self.kind == "file":
            self._arrays = _load(Path(spec))

    def values(self, name: str, dtype: DataType, shape: list[int], per_sample: list[int]) -> np.ndarray:
        if self.kind == "zeros":
            if dtype is DataType.BYTES:
                return _objects(shape, [b""] * int(np.prod(shape)))
            return np.zeros(shape, dtype=dtype.np_dtype)
        if self.kind == "random":
            return self._random(dtype, shape)
        return _fit(self._file_array(name), name, dtype, shape, per_sample)

    def _file_array(self, name: str) -> np.ndarray:
        if name in self._arrays:
            return self._arrays[name]
        if len(self._arrays) == 1 and "" in self._arrays:
            return self._arrays[""]
        raise InvalidArgument(f"input data file has no array for input '{name}' (has {sorted(self._arrays)})")

    def _random(self, dtype: DataType, shape: list[int]) -> np.ndarray:
        np_dtype = dtype.np_dtype
        if dtype is DataType.BYTES:
            letters = self._rng.integers(ord("a"), ord("z") + 1, size=(*shape, 8), dtype=np.uint8)
            return _objects(shape, [bytes(row) for row in letters.reshape(-1, 8)])
        if dtype is DataType.BOOL:
            return self._rng.integers(0, 2, size=shape).astype(np.bool_)
        if np_dtype.kind == "f":
            return self._rng.random(size=shape).astype(np_dtype)
        # Small non-negative integers stay valid as indices or token ids for most models.
        return self._rng.integers(0, 64, size=shape).astype(np_dtype)


def _load(path: Path) -> dict[str, np.ndarray]:
    # An .npz reads each array lazily, so a damaged member or an object array only fails on access:
    # everything is read here. numpy raises whatever its zip, inflate and header parsers hit on a
    # damaged file (BadZipFile, zlib.error, EOFError, even SyntaxError), hence the broad except.
    try:
        loaded = np.load(path, allow_pickle=False)
        if isinstance(loaded, np.ndarray):
            return {"": loaded}
        with loaded:
            return {key: loaded[key] for key in loaded.files}
    except Exception as exc:
        raise InvalidArgument(f"cannot read input data {path}: {type(exc).__name__}: {exc}") from None


def _objects(shape: list[int], values: list[bytes]) -> np.ndarray:
    """An object array of `shape`: each element keeps its own length, where np.array would pad to one width."""
    arr = np.empty(len(values), dtype=object)
    arr[:] = values
    return arr.reshape(shape)


def _fit(arr: np.ndarray, name: str, dtype: DataType, shape: list[int], per_sample: list[int]) -> np.ndarray:
    """Takes a full batch as is, tiles one sample, or takes the first rows of a longer array."""
    if list(arr.shape) == shape:
        out = arr
    elif list(arr.shape) == per_sample and len(shape) == len(per_sample) + 1:
        out = np.broadcast_to(arr, shape)
    elif len(shape) == arr.ndim and list(arr.shape[1:]) == shape[1:] and arr.shape[0] >= shape[0]:
        out = arr[: shape[0]]
    else:
        raise InvalidArgument(f"input '{name}': file array of shape {list(arr.shape)} does not fit {shape}")
    if dtype is DataType.BYTES:
        return out.astype(object)
    if not np.can_cast(out.dtype, dtype.np_dtype, casting="same_kind"):
        raise InvalidArgument(f"input '{name}': file array is {out.dtype}, model wants {dtype.wire_name}")
    return out.astype(dtype.np_dtype)


def _raw(arr: np.ndarray, dtype: DataType) -> bytes:
    if dtype is DataType.BYTES:
        parts = []
        for item in arr.reshape(-1):
            data = item if isinstance(item, bytes) else str(item).encode()
            parts.append(len(data).to_bytes(4, "little") + data)
        return b"".join(parts)
    return np.ascontiguousarray(arr, dtype=dtype.np_dtype.newbyteorder("<")).tobytes()


def request_shapes(info: ModelInfo, batch_size: int, overrides: dict[str, list[int]]) -> dict[str, tuple[list, list]]:
    """(full shape, per-sample shape) for each input; `overrides` give per-sample dims for variable ones."""
    model = info.metadata.name
    batched = info.max_batch_size > 0 if info.max_batch_size is not None else None
    shapes = {}
    for tensor in info.metadata.inputs:
        dims = list(tensor.shape)
        if batched is None:
            batched = bool(dims) and dims[0] == -1
        sample = dims[1:] if batched else dims
        if tensor.name in overrides:
            sample = list(overrides[tensor.name])
        if any(d < 0 for d in sample):
            raise InvalidArgument(f"model '{model}' input '{tensor.name}' has variable dims {dims}: pass --shape")
        if not batched and batch_size != 1:
            raise InvalidArgument(f"model '{model}' does not batch; batch size must be 1, not {batch_size}")
        shapes[tensor.name] = ([batch_size, *sample] if batched else sample, sample)
    return shapes


def build_request(
    info: ModelInfo,
    cls: TrafficClass,
    source: InputSource,
    overrides: dict[str, list[int]],
    deadline_us: int | None = None,
) -> bytes:
    """One serialized ModelInferRequest for `cls`; priority and timeout travel as request parameters."""
    request = pb.ModelInferRequest(model_name=cls.model)
    if cls.priority:
        request.parameters["priority"].uint64_param = cls.priority
    if deadline_us:
        request.parameters["timeout"].int64_param = deadline_us
    shapes = request_shapes(info, cls.batch_size, overrides)
    for tensor in info.metadata.inputs:
        dtype = DataType.from_wire(tensor.datatype)
        shape, sample = shapes[tensor.name]
        request.inputs.add(name=tensor.name, datatype=tensor.datatype, shape=shape)
        request.raw_input_contents.append(_raw(source.values(tensor.name, dtype, shape, sample), dtype))
    return request.SerializeToString()
