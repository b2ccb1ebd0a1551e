"""config.pbtxt for a model that `tidal optimize` writes into a repository."""

from __future__ import annotations

from pathlib import Path

import onnx
from google.protobuf import text_format
from onnx import TensorProto

from tidal.errors import ConfigError
from tidal.optimize.graph import graph_inputs, graph_outputs
from tidal.repository.pbtxt import parse_model_config
from tidal.transport._gen import model_config_pb2 as mc

CONFIG_FILE = "config.pbtxt"

_TYPES = {
    TensorProto.BOOL: mc.TYPE_BOOL,
    TensorProto.UINT8: mc.TYPE_UINT8,
    TensorProto.UINT16: mc.TYPE_UINT16,
    TensorProto.UINT32: mc.TYPE_UINT32,
    TensorProto.UINT64: mc.TYPE_UINT64,
    TensorProto.INT8: mc.TYPE_INT8,
    TensorProto.INT16: mc.TYPE_INT16,
    TensorProto.INT32: mc.TYPE_INT32,
    TensorProto.INT64: mc.TYPE_INT64,
    TensorProto.FLOAT16: mc.TYPE_FP16,
    TensorProto.FLOAT: mc.TYPE_FP32,
    TensorProto.DOUBLE: mc.TYPE_FP64,
    TensorProto.STRING: mc.TYPE_STRING,
    TensorProto.BFLOAT16: mc.TYPE_BF16,
}


def existing_max_batch_size(model_dir: Path) -> int | None:
    """max_batch_size of a config already in the repository; None when there is none."""
    path = Path(model_dir) / CONFIG_FILE
    if not path.is_file():
        return None
    return int(parse_model_config(path).config.max_batch_size)


def write_config(model_dir: Path, name: str, model: onnx.ModelProto, max_batch_size: int) -> Path:
    """A batching config for `model`: batch dim left out of dims, dynamic batching on, one CPU instance."""
    config = mc.ModelConfig(name=name, backend="onnxruntime", max_batch_size=max_batch_size)
    for spec in graph_inputs(model):
        config.input.add(name=spec.name, data_type=_datatype(spec.name, spec.elem_type), dims=spec.row_shape)
    for spec in graph_outputs(model):
        config.output.add(name=spec.name, data_type=_datatype(spec.name, spec.elem_type), dims=spec.row_shape)
    config.dynamic_batching.SetInParent()
    config.instance_group.add(kind=mc.ModelInstanceGroup.KIND_CPU, count=1)
    path = Path(model_dir) / CONFIG_FILE
    path.write_text(text_format.MessageToString(config))
    return path


def _datatype(name: str, elem_type: int) -> int:
    if elem_type not in _TYPES:
        kind = TensorProto.DataType.Name(elem_type)
        raise ConfigError(f"tensor '{name}' has ONNX type {kind}, which tidal cannot serve")
    return _TYPES[elem_type]
