"""tidal bench: where result files go, and bad output paths refused before any load is sent."""

from __future__ import annotations

from pathlib import Path

import pytest

from tidal.bench.output import check_writable, output_paths
from tidal.cli import main as tidal_main
from tidal.errors import InvalidArgument


def test_a_prefix_names_the_files_beside_it(tmp_path: Path) -> None:
    assert output_paths(str(tmp_path / "run")) == [tmp_path / "run.json", tmp_path / "run.csv",
                                                   tmp_path / "run-timeseries.csv"]


def test_a_directory_or_trailing_slash_means_inside_it(tmp_path: Path) -> None:
    assert output_paths(f"{tmp_path}/new/")[0] == tmp_path / "new" / "bench.json"
    (tmp_path / "old").mkdir()
    assert output_paths(str(tmp_path / "old"))[1] == tmp_path / "old" / "bench.csv"


def test_writable_paths_get_their_folders_and_no_stray_files(tmp_path: Path) -> None:
    kept = tmp_path / "kept.json"
    kept.write_text("old")
    fresh = tmp_path / "a" / "b" / "fresh.csv"
    check_writable([kept, fresh])
    assert kept.read_text() == "old"
    assert fresh.parent.is_dir() and not fresh.exists()


@pytest.mark.parametrize("relative", ["afile/run.json", "adir"])
def test_unwritable_paths_are_user_errors(tmp_path: Path, relative: str) -> None:
    (tmp_path / "afile").touch()
    (tmp_path / "adir").mkdir()
    with pytest.raises(InvalidArgument, match="cannot write"):
        check_writable([tmp_path / relative])


@pytest.mark.parametrize("flag", ["-o", "--plot"])
def test_bad_output_paths_fail_before_the_run(tmp_path: Path, flag: str, capsys: pytest.CaptureFixture) -> None:
    if flag == "--plot":
        pytest.importorskip("matplotlib")  # without it --plot is refused earlier, for that reason
    (tmp_path / "afile").touch()
    # Nothing listens on port 1: reaching the run would fail with a different message.
    args = ["bench", "-u", "127.0.0.1:1", "-m", "a", "--rate", "5", "--no-progress", flag, str(tmp_path / "afile/x")]
    assert tidal_main(args) == 2
    assert "cannot write" in capsys.readouterr().err
