"""Run ``lumos`` in-process for the tests: exit code, stdout and stderr, and never a traceback or colour."""

from __future__ import annotations

from lumos.cli import main


def run_cli(capsys, *args: object) -> tuple[int, str, str]:
    """``lumos ARGS`` through :func:`lumos.cli.main` (not a terminal: no colour, no progress bar)."""
    code = main([str(a) for a in args])
    out, err = capsys.readouterr()
    assert "Traceback" not in out + err
    assert "\x1b" not in out + err
    return code, out, err
