"""What a new user met following README's deployment, bench and plan sections, each pinned so it stays fixed."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest

from tidal.bench.output import _notes
from tidal.bench.plot import require_matplotlib
from tidal.cli import _command_of, main
from tidal.errors import InvalidArgument

# Modules only the server, bench, optimizer and planner need: an exec probe's `tidal health` loads none of them.
SERVER_MODULES = ("onnxruntime", "aiohttp", "tidal.app", "tidal.dataplane", "tidal.transport.server",
                  "tidal.optimize", "tidal.bench", "sklearn")


def test_tidal_health_runs_without_importing_the_server() -> None:
    # A fresh interpreter, as a probe starts one: what `main` pulls in for `health` is what the probe pays for.
    code = textwrap.dedent(f"""
        import sys
        from tidal.cli import main
        rc = main(["health", "-u", "unix:///nonexistent/tidal.sock", "--timeout-s", "0.2"])
        loaded = [m for m in {SERVER_MODULES!r} if m in sys.modules]
        print(rc, loaded)
    """)
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True)
    assert done.stdout.split(maxsplit=1) == ["1", "[]\n"], done.stdout + done.stderr


@pytest.mark.parametrize(("argv", "command"), [
    (["health"], "health"),
    (["--log-level", "debug", "--log-format", "json", "health", "--service", "liveness"], "health"),
    (["--log-level=debug", "health"], "health"),
    (["serve", "--model-repository", "health"], "serve"),
    (["--log-level", "health"], None),  # 'health' is the flag's value here: the full parser reports it
    ([], None),
])
def test_the_sub_command_is_found_past_the_global_flags(argv: list[str], command: str | None) -> None:
    assert _command_of(argv) == command


def test_health_keeps_the_global_flags_and_help(capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["--log-format", "json", "health", "--help"])
    assert exit_info.value.code == 0
    assert "--service" in capsys.readouterr().out


def test_plan_without_variants_names_optimize_not_profile(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    # `tidal profile` refuses a model with no variants.json ("run `tidal optimize` first"): sending users
    # there from `tidal plan` (the demo's add_sub) cost them a second error.
    model = tmp_path / "add_sub"
    (model / "1").mkdir(parents=True)
    (model / "config.pbtxt").write_text(textwrap.dedent("""
        name: "add_sub"
        platform: "onnxruntime_onnx"
        max_batch_size: 8
        input { name: "INPUT0" data_type: TYPE_FP32 dims: 16 }
        output { name: "OUTPUT0" data_type: TYPE_FP32 dims: 16 }
        slo { p99_ms: 50 }
    """))
    rc = main(["plan", "--model", "add_sub", "--rate", "100", "--path-rps", "1000",
               "--model-repository", str(tmp_path)])
    err = capsys.readouterr().err
    assert rc == 1
    assert "tidal optimize" in err and "tidal profile" not in err, err


def test_plot_without_matplotlib_names_an_install_that_works(monkeypatch: pytest.MonkeyPatch) -> None:
    # tidal is not on PyPI: `pip install 'tidal[plot]'` would fetch nothing of it, or another project's package.
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # makes `import matplotlib` raise ImportError
    with pytest.raises(InvalidArgument) as refused:
        require_matplotlib()
    message = str(refused.value)
    assert f"{sys.executable} -m pip install matplotlib" in message
    assert "tidal[plot]" not in message


def _result(server: str, errors: dict[str, int], stragglers: int = 0) -> dict[str, Any]:
    point = {"label": "concurrency=128",
             "totals": {"errors": errors, "error_details": {}, "stragglers": stragglers},
             "client": {"bottleneck": False, "reasons": []}}
    return {"mode": "closed", "server": {"name": server}, "points": [point], "metrics": None}


def test_cancelled_calls_from_tidal_are_explained() -> None:
    # README's first sweep, concurrency 1:128:x2 against the demo, meets the 64-call backlog at 128.
    notes = " ".join(_notes(_result("tidal", {"CANCELLED": 500})))
    assert "--max-pending-rpcs" in notes and "backlog" in notes


@pytest.mark.parametrize(("server", "errors", "stragglers"), [
    ("triton", {"CANCELLED": 500}, 0),  # another server's CANCELLED means what that server means by it
    ("tidal", {"CANCELLED": 3}, 3),  # only tidal bench's own cancellations at the end of the drain
    ("tidal", {"UNAVAILABLE": 5}, 0),
])
def test_no_backlog_note_where_it_does_not_apply(server: str, errors: dict[str, int], stragglers: int) -> None:
    assert "--max-pending-rpcs" not in " ".join(_notes(_result(server, errors, stragglers)))
