"""perf/loadgen.write_section: a benchmark's generated block is replaced in its own section only."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "perf"))

from loadgen import write_section

BEGIN, END = "<!-- b: generated -->", "<!-- b: end -->"


def test_the_block_of_the_named_section_is_replaced_and_no_other(tmp_path: Path) -> None:
    results = tmp_path / "RESULTS.md"
    results.write_text(f"# R\n\n## One\n\n{BEGIN}\nold one\n{END}\n\nprose one\n\n## Two\n\n{BEGIN}\nold two\n{END}\n"
                       "\nprose two\n")
    write_section(results, f"{BEGIN}\nnew two\n{END}", BEGIN, END, "## Two")
    assert results.read_text() == (f"# R\n\n## One\n\n{BEGIN}\nold one\n{END}\n\nprose one\n\n## Two\n\n{BEGIN}\n"
                                   f"new two\n{END}\n\nprose two\n")


def test_a_section_without_a_block_gets_one_and_a_missing_section_is_added(tmp_path: Path) -> None:
    results = tmp_path / "RESULTS.md"
    results.write_text(f"# R\n\n## One\n\n{BEGIN}\nold one\n{END}\n\n## Two\n\nprose two\n")
    write_section(results, f"{BEGIN}\nnew two\n{END}", BEGIN, END, "## Two")
    write_section(results, "three", BEGIN, END, "## Three")
    assert results.read_text() == (f"# R\n\n## One\n\n{BEGIN}\nold one\n{END}\n\n## Two\n\n{BEGIN}\nnew two\n{END}\n"
                                   "\n\nprose two\n\n## Three\n\nthree\n")
