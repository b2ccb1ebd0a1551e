"""Where a model's instances run: Triton's instance_group rules applied to this host's GPUs.

Pure: it takes the configured groups, the GPUs CUDA numbers in this process and, when GPUs cannot be
used, the reason why; it returns one device per instance and a sentence saying why, or refuses with
the reason a model then shows as UNAVAILABLE. The repository loads backends per device afterwards.

Triton's semantics, kept:
- KIND_GPU: `count` instances on *each* GPU in `gpus`, or on each visible GPU when `gpus` is empty.
- KIND_CPU: `count` instances on the CPU; `gpus` is an error (the config parser refuses it).
- KIND_AUTO: as KIND_GPU when a GPU can serve the model, else `count` instances on the CPU.
- No instance_group at all: one KIND_AUTO group of one instance.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass

from tidal.backends.hardware import GpuInfo
from tidal.errors import ConfigError

KINDS = ("auto", "cpu", "gpu")


@dataclass(frozen=True, slots=True)
class InstanceGroup:
    """One instance_group entry of config.pbtxt, checked by the config parser."""

    kind: str = "auto"  # auto | cpu | gpu
    count: int = 1
    gpus: tuple[int, ...] = ()


@dataclass(frozen=True, slots=True, order=True)
class Device:
    kind: str  # cpu | gpu
    index: int = 0  # the CUDA device number for a GPU

    def __str__(self) -> str:
        return self.kind if self.kind == "cpu" else f"gpu:{self.index}"


CPU = Device("cpu")


@dataclass(frozen=True, slots=True)
class Placement:
    devices: tuple[Device, ...]  # one per instance, in instance order
    reason: str
    groups: tuple[int, ...] = ()  # the instance_group each instance came from, in instance order

    def pools(self) -> list[tuple[str, tuple[int, ...]]]:
        """(device kind, instance indices) per instance_group: what the controller may route a level to."""
        members: dict[int, list[int]] = {}
        for index, group in enumerate(self.groups):
            members.setdefault(group, []).append(index)
        return [(self.devices[m[0]].kind, tuple(m)) for _, m in sorted(members.items())]

    @property
    def kinds(self) -> frozenset[str]:
        return frozenset(d.kind for d in self.devices)

    def summary(self) -> str:
        """'2 x gpu:0, 1 x cpu': what a log line or `tidal control status` shows."""
        counts = Counter(self.devices)
        return ", ".join(f"{n} x {d}" for d, n in sorted(counts.items()))


class PlacementError(ConfigError):
    """The configuration asks for a device this host cannot give the model."""


def _gpu_devices(group: InstanceGroup, gpus: Sequence[GpuInfo], where: str) -> tuple[list[Device], str]:
    known = {g.index: g for g in gpus}
    missing = [i for i in group.gpus if i not in known]
    if missing:
        have = ", ".join(str(i) for i in sorted(known))
        raise PlacementError(
            f"{where} lists GPU {', '.join(map(str, missing))} but this host has GPU {have} "
            "(numbered as CUDA sees them, after CUDA_VISIBLE_DEVICES)"
        )
    chosen = group.gpus or tuple(sorted(known))
    devices = [Device("gpu", i) for i in chosen for _ in range(group.count)]
    names = ", ".join(f"{i} ({known[i].name})" for i in chosen)
    listed = "the GPUs listed" if group.gpus else "every visible GPU"
    return devices, f"{group.count} per GPU on {listed}: {names}"


def place(
    groups: Sequence[InstanceGroup], gpus: Sequence[GpuInfo], gpu_blocker: str | None, max_instances: int
) -> Placement:
    """Devices for every instance of one model.

    `gpu_blocker`: None when some backend can run this model on this host's GPUs, else why not (no GPU
    found, no GPU engine installed); it is the reason KIND_GPU is refused and KIND_AUTO stays on the CPU.
    """
    if gpu_blocker is None and not gpus:
        gpu_blocker = "no GPU on this host"
    devices: list[Device] = []
    reasons: list[str] = []
    members: list[int] = []
    for i, group in enumerate(groups or (InstanceGroup(),)):
        where = f"instance_group[{i}] (KIND_{group.kind.upper()})" if groups else "no instance_group (KIND_AUTO)"
        if group.kind == "cpu":
            devices += [CPU] * group.count
            reasons.append(f"{where}: {group.count} on the CPU as configured")
        elif gpu_blocker is None:
            placed, why = _gpu_devices(group, gpus, where)
            devices += placed
            reasons.append(f"{where}: {why}")
        elif group.kind == "gpu":
            raise PlacementError(f"{where} needs a GPU: {gpu_blocker}")
        else:
            devices += [CPU] * group.count
            reasons.append(f"{where}: {group.count} on the CPU, no GPU for it ({gpu_blocker})")
        members += [i] * (len(devices) - len(members))
    if len(devices) > max_instances:
        raise PlacementError(f"instance_group: {len(devices)} instances on this host, at most {max_instances}")
    return Placement(tuple(devices), "; ".join(reasons), tuple(members))


__all__ = ["CPU", "KINDS", "Device", "InstanceGroup", "Placement", "PlacementError", "place"]
