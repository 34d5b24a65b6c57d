"""Every verb in the CLI table imports and answers --help; unknown verbs are a usage error."""

from __future__ import annotations

import pytest

from recipe_runner.cli import VERBS, main


@pytest.mark.parametrize("verb", sorted(VERBS))
def test_every_verb_has_help(verb, capsys):
    with pytest.raises(SystemExit) as e:
        main([verb, "--help"])
    assert e.value.code == 0
    assert f"recipe-runner {verb}" in capsys.readouterr().out


def test_unknown_verb_is_a_usage_error(capsys):
    with pytest.raises(SystemExit) as e:
        main(["trian"])
    assert e.value.code == 2
    assert "invalid choice" in capsys.readouterr().err
