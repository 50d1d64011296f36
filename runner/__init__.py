"""Run a program inside an extracted rpack root: workspace, sandbox, init and exit status."""

from runner.sandbox import RunError, run
from runner.workspace import workspace

__all__ = ["RunError", "run", "workspace"]
