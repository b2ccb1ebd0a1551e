"""Fuzzing config.pbtxt: mutations of valid configs parse, or fail with a ConfigError naming the file;
none hangs (the unclosed-list loop) or escapes as another exception."""

from __future__ import annotations

import pytest
from fuzz_strategies import VALID_CONFIGS, mutated_configs, parse_like_the_repository
from hypothesis import given, settings

from tidal.repository.config import build_spec
from tidal.repository.pbtxt import parse_model_config_text


@pytest.mark.parametrize("text", VALID_CONFIGS)
def test_the_seeds_are_valid(text: str) -> None:
    build_spec(parse_model_config_text(text, "seed").config)


@pytest.mark.timeout(120)
@settings(max_examples=300, deadline=None)
@given(mutated_configs())
def test_a_mutated_config_parses_or_fails_naming_its_file(text: str) -> None:
    parse_like_the_repository(text)
