"""The `loraplex` command line."""

import pytest

from loraplex.cli import main


def test_check_passes_on_a_small_model(capsys):
    assert main(["check", "--hidden-size", "128", "--layers", "1"]) == 0
    out = capsys.readouterr().out
    assert "7 linears checked" in out and "all ok" in out
    assert "0.5159 bytes/weight" in out


def test_check_rejects_a_width_that_is_not_a_multiple_of_64():
    with pytest.raises(SystemExit, match="multiple of 64"):
        main(["check", "--hidden-size", "100"])


def test_version(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--version"])
    assert exit_info.value.code == 0
    assert capsys.readouterr().out.startswith("loraplex ")
