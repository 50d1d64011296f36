"""The README's test command is exactly what CI runs."""

from __future__ import annotations

from pathlib import Path

TOP = Path(__file__).resolve().parent.parent


def test_ci_runs_the_readme_test_command() -> None:
    readme = (TOP / "README.md").read_text()
    commands = [line.strip() for line in readme.splitlines() if line.startswith("    apt-get")]
    assert len(commands) >= 2
    ci = (TOP / ".ci" / "run").read_text().splitlines()
    assert commands[1] in ci
