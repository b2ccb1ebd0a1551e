"""The on-disk repository: Triton's `REPO/<model>/config.pbtxt` + `REPO/<model>/<version>/`.

Model names come from the network, so every path is built here and checked
to stay inside the repository folder.
"""

from __future__ import annotations

import re
from pathlib import Path

from tidal.errors import ConfigError, InvalidArgument, NotFound
from tidal.proto import model_config_pb2 as mc

_NAME = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.\-]*$")
NAME_MAX = 255  # Linux's limit on a file name (the names are ASCII: characters are bytes)


def model_dir(root: Path, name: str) -> Path:
    """The folder of model `name`; rejects names that could leave the repository."""
    if not name or not _NAME.match(name) or name in (".", "..") or ".." in name:
        raise InvalidArgument(f"invalid model name {name[:64]!r}: use letters, digits, '_', '-', '.' and no '..'")
    if len(name) > NAME_MAX:  # no folder can have it: the file system would answer ENAMETOOLONG
        raise InvalidArgument(f"invalid model name {name[:64]!r}...: {len(name)} characters, at most {NAME_MAX}")
    try:
        path = (root / name).resolve()
    except RuntimeError as exc:  # pathlib's word for ELOOP
        raise ConfigError(f"{root / name}: the model folder is a symlink loop") from exc
    if path.parent != root.resolve():
        raise InvalidArgument(f"invalid model name {name!r}")
    return path


def list_models(root: Path) -> list[str]:
    return sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith(".") and _NAME.match(p.name))


def list_versions(path: Path) -> list[int]:
    """Numeric version folders, ascending (Triton ignores other names)."""
    return sorted(int(p.name) for p in path.iterdir() if p.is_dir() and p.name.isdigit() and int(p.name) > 0)


def select_versions(available: list[int], policy: mc.ModelVersionPolicy, source: str) -> list[int]:
    """Apply latest(n) / all / specific, as Triton does; the default is latest(1)."""
    choice = policy.WhichOneof("policy_choice")
    if choice == "all":
        return list(available)
    if choice == "specific":
        wanted = [int(v) for v in policy.specific.versions]
        missing = sorted(set(wanted) - set(available))
        if missing:
            raise ConfigError(f"{source}: version_policy asks for version(s) {missing}, which do not exist")
        return sorted(set(wanted))
    count = policy.latest.num_versions if choice == "latest" else 1
    if count < 1:
        raise ConfigError(f"{source}: version_policy latest needs num_versions >= 1")
    return available[-count:]


def require_model_dir(root: Path, name: str) -> Path:
    path = model_dir(root, name)
    if not path.is_dir():
        raise NotFound(f"model '{name}' is not in the repository")
    return path
