"""config.pbtxt for a model that `tidal optimize` writes into a repository."""

from __future__ import annotations

from pathlib import Path

from google.protobuf import text_format

from tidal.proto import model_config_pb2 as mc
from tidal.repository.config import autocomplete
from tidal.repository.pbtxt import parse_model_config

CONFIG_FILE = "config.pbtxt"


def existing_max_batch_size(model_dir: Path) -> int | None:
    """max_batch_size of a config already in the repository; None when there is none."""
    path = Path(model_dir) / CONFIG_FILE
    if not path.is_file():
        return None
    return int(parse_model_config(path).config.max_batch_size)


def write_config(model_dir: Path, name: str, model_path: Path, max_batch_size: int) -> Path:
    """A batching config for the ONNX file: the repository's own auto-complete fills the signature."""
    config = mc.ModelConfig(name=name, backend="onnxruntime", max_batch_size=max_batch_size)
    autocomplete(config, model_path, frozenset({"max_batch_size"}))
    config.instance_group.add(kind=mc.ModelInstanceGroup.KIND_CPU, count=1)
    path = Path(model_dir) / CONFIG_FILE
    path.write_text(text_format.MessageToString(config))
    return path
