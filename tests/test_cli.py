"""The command line as a user meets it: every command's help, and the words params.yaml uses for unset values."""

from __future__ import annotations

import pytest
from click.testing import CliRunner

from pipeline.cli import main

COMMANDS = ("extract", "propose", "fit", "evaluate", "inspect", "predict", "report", "head")


@pytest.mark.parametrize("command", COMMANDS)
def test_every_command_shows_its_help(command):
    result = CliRunner().invoke(main, [command, "--help"])
    assert result.exit_code == 0, result.output
    assert "--params" in result.output


def test_unset_words_are_accepted_and_typos_are_refused(tmp_path):
    runner = CliRunner()
    refused = runner.invoke(main, ["extract", "--dataset", "sample", "--resolution", "big", "--out", str(tmp_path / "x.h5")])
    assert refused.exit_code == 2 and "'big' is not a valid integer" in refused.output
    refused = runner.invoke(main, ["propose", "--features", str(tmp_path / "x.h5"), "--out", str(tmp_path / "m"),
                                   "--psi", "autoo"])
    assert refused.exit_code == 2 and "--psi" in refused.output
    missing = runner.invoke(main, ["propose", "--features", str(tmp_path / "x.h5"), "--out", str(tmp_path / "m"),
                                   "--psi", "auto", "--center", "auto"])
    assert missing.exit_code == 1 and "feature file not found" in missing.output
