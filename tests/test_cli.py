"""The ``worldgen`` command as a new user first meets it: its help texts."""

from __future__ import annotations

import subprocess
import sys

import pytest

from worldgen.cli import COMMANDS, build_parser
from worldgen.training.cli import TRAINERS


def test_top_level_help_is_whole_and_imports_no_command():
    """`worldgen --help` lists every command in full sentences and imports none of their modules
    (no torch), so it answers at once."""
    probe = (
        "import sys; from worldgen.cli import build_parser; h = build_parser([]).format_help(); "
        "print(repr(h)); print(sorted(m for m in sys.modules if m == 'torch' or m.startswith('worldgen.')))"
    )
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    help_text, loaded = done.stdout.splitlines()
    assert "'torch'" not in loaded and loaded == "['worldgen.cli']", loaded
    assert all(name in help_text for name in COMMANDS)
    assert "world models." in help_text and "which provides" not in help_text  # not cut mid-sentence


def test_command_help_names_every_trainer_and_hides_unset_defaults(capsys):
    for argv in (["train", "--help"], ["eval", "--help"], ["train", "dynamics", "--help"], ["play", "--help"]):
        with pytest.raises(SystemExit):
            build_parser(argv).parse_args(argv)
        out = capsys.readouterr().out
        assert "default None" not in out and "default: None" not in out, argv
        if argv == ["train", "--help"]:
            assert all(name in out for name in TRAINERS)
        if argv == ["play", "--help"]:
            assert "--threads" in out
    assert all(name in COMMANDS["train"][1] for name in ("tokenizer", "dynamics", "reward", "geometry"))


def test_every_trainer_help_prints(capsys):
    """Every trainer's --help renders: a help text with a literal '%' (e.g. "~2% of play") once
    made argparse raise instead of printing."""
    import argparse

    from worldgen.training.cli import TRAINERS, add_arguments

    parser = argparse.ArgumentParser()
    add_arguments(parser)
    for name in TRAINERS:
        with pytest.raises(SystemExit) as done:
            parser.parse_args([name, "--help"])
        assert done.value.code == 0, name
        assert "--data" in capsys.readouterr().out, name
