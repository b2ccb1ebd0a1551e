"""Reading config.pbtxt the way Triton users expect.

tidal's model_config.proto is a field-compatible subset of Triton's. Before
parsing, the text is walked against that schema so that every field it
contains is classified: modelled and acted on, Triton's but not acted on
(accepted, one warning naming them all), or nobody's (an error naming the
field and the file). Protobuf's own parser cannot tell the last two apart.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import NamedTuple

from google.protobuf import descriptor as _descriptor
from google.protobuf import text_format
from google.protobuf.message import Message

from tidal.errors import ConfigError
from tidal.proto import model_config_pb2

# Triton ModelConfig fields tidal accepts but does not act on, as dotted paths.
TRITON_NOT_ACTED_ON = frozenset(
    {
        "runtime",
        "batch_input",
        "batch_output",
        "sequence_batching",
        "ensemble_scheduling",
        "model_warmup",
        "model_operations",
        "model_transaction_policy",
        "model_repository_agents",
        "response_cache",
        "model_metrics",
        "cc_model_filenames",
        "metric_tags",
        "input.format",
        "input.reshape",
        "input.is_shape_tensor",
        "input.allow_ragged_batch",
        "input.optional",
        "input.is_non_linear_format_io",
        "output.reshape",
        "output.label_filename",
        "output.is_shape_tensor",
        "output.is_non_linear_format_io",
        "instance_group.rate_limiter",
        "instance_group.secondary_devices",
        "instance_group.profile",
        "instance_group.passive",
        "instance_group.host_policy",
        "optimization.priority",
        "optimization.cuda",
        "optimization.execution_accelerators",
        "optimization.input_pinned_memory",
        "optimization.output_pinned_memory",
        "optimization.gather_kernel_buffer_threshold",
        "optimization.eager_batching",
    }
)

_OPEN = {"{": "}", "<": ">"}
# Deeper nesting than any real config: beyond it the walk would end in a RecursionError, not a named line.
MAX_NESTING = 64


class _Walker:
    """Walks pbtxt tokens against the schema, re-emitting all but unknown fields.

    Protobuf's own skipping of unknown fields fails on Triton's common
    `field [ { ... } ]` form, so unknown fields are cut out here instead and
    the rest is parsed strictly.
    """

    def __init__(self, text: str) -> None:
        self.tok = text_format.Tokenizer(text.splitlines())
        self.kept: list[str] = []
        self.seen: set[str] = set()
        self.unknown: set[str] = set()
        self.depth = 0
        self._line = 0

    def _take(self, keep: bool) -> str:
        token = self.tok.token
        if keep:
            while self._line < self.tok._line:  # kept tokens stay on their lines, so errors name the right one
                self.kept.append("\n")
                self._line += 1
            self.kept.append(token)
        self.tok.NextToken()
        return token

    def _expect(self, token: str, keep: bool) -> None:
        if self.tok.token != token:
            found = f"'{self.tok.token}'" if not self.tok.AtEnd() else "the end of the file"
            raise self.tok.ParseError(f"expected '{token}' but found {found}")
        self._take(keep)

    def message(self, desc: _descriptor.Descriptor | None, prefix: str, closer: str | None, keep: bool) -> None:
        while not self.tok.AtEnd() and self.tok.token != closer:
            name = self.tok.token
            path = prefix + name
            field = desc.fields_by_name.get(name) if desc is not None else None
            if desc is not None:
                (self.seen if field is not None else self.unknown).add(path)
            keep_field = keep and field is not None
            # Inside a field nobody models, nothing further is reported.
            sub = field.message_type if field is not None else None
            self._take(keep_field)
            has_colon = self.tok.token == ":"
            if has_colon:
                self._take(keep_field)
            if self.tok.token == "[":
                self._take(keep_field)
                while self.tok.token != "]":
                    if self.tok.AtEnd():  # an unclosed list: without this check the walk never ends
                        raise self.tok.ParseError(f"'{path}': list opened with '[' is never closed with ']'")
                    self.value(sub, path, keep_field, has_colon=True, known=field is not None)
                    if self.tok.token == ",":
                        self._take(keep_field)
                self._take(keep_field)
            else:
                self.value(sub, path, keep_field, has_colon, known=field is not None)
            if self.tok.token in (",", ";"):
                self._take(False)

    def value(self, sub: _descriptor.Descriptor | None, path: str, keep: bool, has_colon: bool, known: bool) -> None:
        closer = _OPEN.get(self.tok.token)
        if closer is not None:
            if self.depth >= MAX_NESTING:
                raise self.tok.ParseError(f"'{path}': blocks nested deeper than {MAX_NESTING} levels")
            self._take(keep)
            self.depth += 1
            self.message(sub if known else None, path + ".", closer, keep)
            self.depth -= 1
            self._expect(closer, keep)
            return
        if not has_colon:
            raise self.tok.ParseError(f"expected ':' or a block after '{path}'")
        if self.tok.token[:1] in ("'", '"'):
            while self.tok.token[:1] in ("'", '"'):
                self._take(keep)
        else:
            self._take(keep)


_ECHOED_LINE = re.compile(r"^(\d+:\d+ : )'(.*)': ", re.DOTALL)
_ECHO_CHARS = 80


def _config_error(source: str, exc: text_format.ParseError) -> ConfigError:
    """protobuf's message repeats the whole offending line; a file with one huge line would make the error
    (kept in RepositoryIndex, sent in gRPC metadata) as large as the file, so the echo is cut."""
    text = str(exc)
    match = _ECHOED_LINE.match(text)
    if match and len(match.group(2)) > _ECHO_CHARS:
        text = f"{match.group(1)}'{match.group(2)[:_ECHO_CHARS]}...': {text[match.end():]}"
    return ConfigError(f"{source}: {text}")


class ParsedConfig(NamedTuple):
    config: model_config_pb2.ModelConfig
    ignored: list[str]  # Triton fields it sets that tidal does not act on
    present: frozenset[str]  # dotted paths of every field the text sets (proto3 cannot tell 0 from unset)
    source: str  # what errors about this config name: the config.pbtxt, or the folder when there is none


def parse_model_config(path: Path) -> ParsedConfig:
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read: {exc.strerror}") from exc
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{path}: not UTF-8 text (byte {exc.start}): is it a config.pbtxt?") from exc
    return parse_model_config_text(text, str(path))


def parse_model_config_text(text: str, source: str) -> ParsedConfig:
    walker = _Walker(text)
    try:
        walker.message(model_config_pb2.ModelConfig.DESCRIPTOR, "", None, keep=True)
    except text_format.ParseError as exc:
        raise _config_error(source, exc) from exc
    foreign = sorted(walker.unknown - TRITON_NOT_ACTED_ON)
    if foreign:
        raise ConfigError(f"{source}: unknown field(s) {', '.join(foreign)} (neither Triton's nor tidal's)")
    config = model_config_pb2.ModelConfig()
    try:
        text_format.Parse(" ".join(walker.kept), config)
    except text_format.ParseError as exc:
        raise _config_error(source, exc) from exc
    _check_enums(config, "", source)
    ignored = sorted((walker.seen | walker.unknown) & TRITON_NOT_ACTED_ON)
    return ParsedConfig(config, ignored, frozenset(walker.seen), source)


def _check_enums(message: Message, prefix: str, source: str) -> None:
    """Reject enum numbers the schema does not name: proto3 text format accepts any integer for an enum
    (`mode: 7`), and code that later asks for its name or compares it to the known values would fail
    far from the file, or quietly take it for something else."""
    for fd, value in message.ListFields():
        path = prefix + fd.name
        if fd.message_type is not None and fd.message_type.GetOptions().map_entry:
            value_fd = fd.message_type.fields_by_name["value"]
            if value_fd.message_type is not None:
                for item in value.values():
                    _check_enums(item, path + ".", source)
            continue
        items = value if fd.is_repeated else [value]
        if fd.enum_type is not None:
            for number in items:
                if number not in fd.enum_type.values_by_number:
                    known = ", ".join(v.name for v in fd.enum_type.values)
                    raise ConfigError(f"{source}: {path}: {number} is not a {fd.enum_type.name} value ({known})")
        elif fd.message_type is not None:
            for item in items:
                _check_enums(item, path + ".", source)
