"""A broken config.pbtxt fails its own model's load with a line number, and never stalls the server."""

from __future__ import annotations

import asyncio
import os
import threading
from pathlib import Path

import pytest

from onnx_models import add_sub
from tidal.errors import ConfigError
from tidal.repository.manager import ModelManager
from tidal.repository.pbtxt import MAX_NESTING, parse_model_config_text

UNCLOSED = 'max_batch_size: 4\ninput [ { name: "x" data_type: TYPE_FP32 dims: [ '


@pytest.mark.timeout(20)  # before the fix this loop never ended: the timeout is what fails it
@pytest.mark.parametrize(
    "text",
    [UNCLOSED, "input [", "input [ { name: \"x\" }", "input [ { name: \"x\" },", "bogus_field [ 1, 2"],
)
def test_an_unclosed_list_is_an_error_naming_the_file_and_line(text: str) -> None:
    with pytest.raises(ConfigError, match=r"^m/config\.pbtxt: \d+:\d+ : .*(never closed|end of the file)"):
        parse_model_config_text(text, "m/config.pbtxt")


def test_the_line_of_the_unclosed_list_is_reported() -> None:
    with pytest.raises(ConfigError) as err:
        parse_model_config_text(UNCLOSED, "m/config.pbtxt")
    assert "m/config.pbtxt: 2:" in str(err.value) and "input.dims" in str(err.value)


@pytest.mark.parametrize("opener", ["{", "<"])
def test_nesting_beyond_the_limit_is_a_config_error_not_a_recursion_error(opener: str) -> None:
    depth = 5_000  # deep enough for a RecursionError without the limit
    text = f"model_warmup {opener} " + f"x {opener} " * depth
    with pytest.raises(ConfigError, match=f"nested deeper than {MAX_NESTING}"):
        parse_model_config_text(text, "c")
    # Within the limit, the same shape parses (Triton's not-acted-on blocks may nest freely).
    closer = {"{": "}", "<": ">"}[opener]
    text = "model_warmup " + f"{opener} x " * 4 + "{ }" + f" {closer}" * 4
    assert parse_model_config_text(text, "c").ignored == ["model_warmup"]


def test_errors_name_the_real_line_and_cut_a_long_echo() -> None:
    # The strict parse sees the text after unknown-but-Triton fields are cut: its line numbers are the file's.
    text = "max_batch_size: 4\nmodel_warmup [ { name: \"w\" } ]\n\ninstance_group [ { count: \"two\" } ]\n"
    with pytest.raises(ConfigError, match=r"^c: 4:\d+ : "):
        parse_model_config_text(text, "c")
    long_line = "max_batch_size: 4 " + "# " + "z" * 1_000_000
    with pytest.raises(ConfigError) as err:
        parse_model_config_text(long_line.replace("# ", "dims: "), "c")
    assert len(str(err.value)) < 300


@pytest.mark.timeout(30)  # on the event loop, the read would block it for good
def test_loading_reads_the_config_off_the_event_loop(tmp_path: Path, run_async) -> None:
    """config.pbtxt is a FIFO that nobody writes yet: reading it blocks. The load must wait on it in a
    thread while the event loop keeps running, then finish once the config arrives."""
    add_sub(tmp_path / "m" / "1" / "model.onnx")
    fifo = tmp_path / "m" / "config.pbtxt"
    os.mkfifo(fifo)

    def write_config() -> None:
        with open(fifo, "w") as f:
            f.write("max_batch_size: 4\n")

    async def scenario() -> int:
        manager = ModelManager(tmp_path)
        load = asyncio.create_task(manager.load("m"))
        ticks = 0
        while ticks < 20:  # a blocked loop would never come back here
            await asyncio.sleep(0)
            ticks += 1
        assert not load.done()
        writer = threading.Thread(target=write_config)
        writer.start()
        await load
        writer.join()
        inputs = len(manager.get("m").spec.inputs)
        await manager.close()
        return inputs

    assert run_async(scenario()) == 2


def test_a_hanging_config_fails_only_its_model(tmp_path: Path, run_async) -> None:
    add_sub(tmp_path / "good" / "1" / "model.onnx")
    add_sub(tmp_path / "bad" / "1" / "model.onnx")
    (tmp_path / "bad" / "config.pbtxt").write_text(UNCLOSED)

    async def scenario() -> tuple[bool, str]:
        manager = ModelManager(tmp_path)
        await manager.load_all()
        rows = {name: (state, reason) for name, _, state, reason in await manager.index()}
        ready = manager.ready("good")
        await manager.close()
        return ready, rows["bad"][1]

    ready, reason = run_async(scenario())
    assert ready
    assert "bad/config.pbtxt: 2:" in reason and "never closed" in reason
