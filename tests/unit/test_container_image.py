"""deploy/Dockerfile installs tidal exactly as README's Set-up does, and builds where a Docker daemon runs."""

from __future__ import annotations

import re
import shlex
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
DOCKERFILE = ROOT / "deploy" / "Dockerfile"
IMAGE_VENV = "/opt/tidal"


def instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    text = re.sub(r"\\\n\s*", " ", DOCKERFILE.read_text())
    rows = [line.strip() for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#")]
    return [(row.split(None, 1)[0].upper(), row.split(None, 1)[1]) for row in rows]


def stages() -> list[list[tuple[str, str]]]:
    out: list[list[tuple[str, str]]] = []
    for op, args in instructions():
        if op == "FROM":
            out.append([])
        if out:
            out[-1].append((op, args))
    return out


def readme_setup() -> str:
    text = (ROOT / "README.md").read_text()
    return text[text.index("## Set-up"):text.index("\n## ", text.index("## Set-up") + 1)]


def test_build_stage_installs_as_the_readme_says() -> None:
    setup = readme_setup()
    without_make = re.search(r"Without make: `([^`]+)`", setup).group(1)
    readme_install = [step.strip().replace(".venv", IMAGE_VENV) for step in without_make.split("&&")]
    packages = shlex.split(re.search(r"`apt-get install ([^`]+)`", setup).group(1))
    build, _ = stages()
    runs = [args for op, args in build if op == "RUN"]
    install = next(run for run in runs if "pip install" in run)
    extras = next(args for op, args in build if op == "ARG" and args.startswith("EXTRAS=")).split("=", 1)[1]
    image_install = [shlex.split(step.replace("${EXTRAS}", extras)) for step in install.split("&&")]
    assert image_install == [shlex.split(s) for s in readme_install if "tidal serve" not in s]
    apt = next(run for run in runs if "apt-get install" in run)
    listed = shlex.split(apt.split("apt-get install", 1)[1].split("&&")[0])
    assert sorted(p for p in listed if not p.startswith("-")) == sorted(packages)


def test_runtime_stage_is_lean_non_root_and_probed_by_grpc_health() -> None:
    _, runtime = stages()
    ops = dict(runtime)
    assert "g++" not in " ".join(args for op, args in runtime if op == "RUN")  # no compiler shipped
    assert f"--from=build {IMAGE_VENV} {IMAGE_VENV}" in ops["COPY"]
    user = ops["USER"].split(":")[0]
    assert user.isdigit() and int(user) != 0  # numeric, so runAsNonRoot can verify it
    assert ops["ENTRYPOINT"] == '["tidal", "serve"]'
    assert ops["HEALTHCHECK"].endswith('CMD ["tidal", "health", "--service", "liveness"]')


def _docker_unavailable() -> str | None:
    docker = shutil.which("docker")
    if docker is None:
        return "docker is not installed"
    info = subprocess.run([docker, "info"], capture_output=True, text=True, timeout=60)
    if info.returncode != 0:
        return "no Docker daemon: " + (info.stderr.strip().splitlines() or ["docker info failed"])[-1]
    return None


@pytest.mark.slow
def test_image_builds_and_serves_its_health() -> None:
    reason = _docker_unavailable()
    if reason:
        pytest.skip(reason)
    tag = "tidal-test:latest"
    subprocess.run(["docker", "build", "-f", str(DOCKERFILE), "-t", tag, str(ROOT)], check=True, timeout=3600)
    version = subprocess.run(["docker", "run", "--rm", "--entrypoint", "tidal", tag, "--version"],
                             capture_output=True, text=True, check=True, timeout=300)
    assert version.stdout.startswith("tidal ")
    user = subprocess.run(["docker", "run", "--rm", "--entrypoint", "id", tag, "-u"],
                          capture_output=True, text=True, check=True, timeout=300)
    assert user.stdout.strip() == "10001"
