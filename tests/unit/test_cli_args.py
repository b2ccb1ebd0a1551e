"""Command-line values that would fail late, silently or with a traceback are refused when parsed."""

from __future__ import annotations

from pathlib import Path

import pytest

from tidal.cli import build_parser, main


@pytest.mark.parametrize(
    "argv",
    [
        ["serve", "--grpc-port", "70000"],
        ["serve", "--grpc-port", "-1"],
        ["serve", "--metrics-port", "65536"],
        ["serve", "--drain-grace-s", "nan"],
        ["serve", "--repository-poll-secs", "0"],
        ["control", "set", "m", "--period-ms", "-5"],
        ["control", "set", "m", "--period-ms", "99999999999"],
        ["bench", "-m", "m", "--concurrency", "1", "--duration-s", "-1"],
        ["bench", "-m", "m", "--concurrency", "1", "--warmup-s", "inf"],
        ["bench", "-m", "m", "--concurrency", "1", "--request-timeout-s", "0"],
    ],
)
def test_out_of_range_values_are_usage_errors(argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exited:
        build_parser().parse_args(argv)
    assert exited.value.code == 2
    err = capsys.readouterr().err
    assert "must be" in err and "Traceback" not in err


def test_in_range_values_parse() -> None:
    args = build_parser().parse_args(["serve", "--grpc-port", "0", "--metrics-port", "65535", "--drain-grace-s", "0"])
    assert (args.grpc_port, args.metrics_port, args.drain_grace_s) == (0, 65535, 0.0)


@pytest.mark.parametrize("flag", ["--load-model", "--strict-readiness"])
def test_a_model_name_not_in_the_repository_is_refused_before_start(
    flag: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "present").mkdir()
    assert main(["serve", "--model-repository", str(tmp_path), flag, "present", flag, "typo_name"]) == 2
    assert f"{flag} typo_name: no such model folder in {tmp_path}" in capsys.readouterr().err
