"""Token files: format, scopes, and reloads that never leave the server without its previous tokens."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from tidal.errors import ConfigError
from tidal.transport.security import TOKEN_RELOAD_S, Scope, TokenFile, parse_tokens


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def _replace(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".new")
    tmp.write_text(text)
    os.replace(tmp, path)


@pytest.mark.parametrize("line", ["reader abc", "infer", "infer a b", "ADMIN abc"])
def test_a_line_that_is_not_scope_and_token_names_its_line(line: str) -> None:
    with pytest.raises(ConfigError, match=r"^tokens:2: expected 'infer TOKEN' or 'admin TOKEN'"):
        parse_tokens(f"infer ok\n{line}\n", "tokens")


def test_the_highest_scope_of_a_token_wins_and_unknown_tokens_have_none(tmp_path: Path) -> None:
    path = tmp_path / "tokens"
    path.write_text("# comment\ninfer shared\nadmin shared\ninfer reader\n")
    tokens = TokenFile(path)
    assert tokens.scope_of(b"shared") is Scope.ADMIN
    assert tokens.scope_of(b"reader") is Scope.INFER
    assert tokens.scope_of(b"reade") is None and tokens.scope_of(b"") is None


def test_changes_are_read_after_the_reload_period_and_a_bad_file_keeps_the_old_tokens(tmp_path: Path) -> None:
    path = tmp_path / "tokens"
    path.write_text("infer old\n")
    clock = Clock()
    tokens = TokenFile(path, clock)
    _replace(path, "infer new\n")
    assert tokens.scope_of(b"old") is Scope.INFER  # not looked at yet
    clock.now += TOKEN_RELOAD_S
    assert tokens.scope_of(b"new") is Scope.INFER and tokens.scope_of(b"old") is None
    _replace(path, "infer\n")  # broken: the tokens in force stay
    clock.now += TOKEN_RELOAD_S
    assert tokens.scope_of(b"new") is Scope.INFER
    path.unlink()  # gone: the same
    clock.now += TOKEN_RELOAD_S
    assert tokens.scope_of(b"new") is Scope.INFER
    _replace(path, "")  # emptied on purpose: nobody gets in
    clock.now += TOKEN_RELOAD_S
    assert tokens.scope_of(b"new") is None


def test_an_unreadable_file_stops_start_up(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"--auth-tokens .*cannot read"):
        TokenFile(tmp_path / "missing")
