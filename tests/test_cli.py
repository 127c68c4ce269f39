"""``brainseg --help`` and each command's help: what the tool does for a user, every option's default, an example."""

from __future__ import annotations

import argparse
import re

import pytest

from brainseg_monai.cli import EXAMPLES, build_parser, main


def _commands() -> dict[str, argparse.ArgumentParser]:
    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return dict(sub.choices)


def test_top_level_help_tells_a_user_what_the_tool_does(capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit) as done:
        main(["--help"])
    assert done.value.code == 0
    text = capsys.readouterr().out
    assert "Find brain tumours in MRI" in text and "not a medical device" in text
    assert "argument parsing" not in text  # the module's docstring is for developers
    assert "brainseg infer SCANS --out predictions/" in text and "'brainseg COMMAND --help'" in text
    assert "log progress (INFO level; default: warnings and errors only)" in " ".join(text.split())
    for name in _commands():
        assert re.search(rf"^    {re.escape(name)}\b", text, re.MULTILINE), name


@pytest.mark.parametrize("name", sorted(EXAMPLES))
def test_each_command_shows_every_options_default_and_one_example(name: str) -> None:
    command = _commands()[name]
    text = _squeezed(command.format_help())
    assert _squeezed(f"example: {EXAMPLES[name]}") in text
    assert EXAMPLES[name].startswith(f"brainseg {name} ")
    formatter = command._get_formatter()
    for action in command._actions:
        if not action.option_strings or action.default is argparse.SUPPRESS:
            continue  # arguments without a default, and --help
        shown = formatter._get_help_string(action)
        assert "default" in shown.lower() or shown.endswith("(required)"), (name, action.option_strings, shown)
        assert _squeezed(shown % {"default": action.default}) in text


def _squeezed(text: str) -> str:
    """``text`` without white space: argparse wraps help lines, also inside words such as ``--open-above``."""
    return re.sub(r"\s+", "", text)


def test_defaults_are_shown_as_values_flags_as_off() -> None:
    commands = _commands()
    serve = " ".join(commands["serve"].format_help().split())
    assert "port of the page, http://HOST:PORT (default: 8000)" in serve
    assert "(default: 127.0.0.1, this machine only)" in serve
    synth = " ".join(commands["synth"].format_help().split())
    assert "random seed: the same seed writes the same bytes (default: 0)" in synth
    assert "tilted slice orientation (nifti, dicom) (default: off)" in synth
    infer = " ".join(commands["infer"].format_help().split())
    assert "by the pattern [_-]<channel>.(nii|mha|mhd|nrrd), as in case_flair.nii.gz" in infer
    assert "--out OUT output folder" in infer and "(required)" in infer
    tune = " ".join(commands["tune-threshold"].format_help().split())
    assert "auto, cpu, cuda or cuda:N (default: auto)" in tune and "(default: 16)" in tune
