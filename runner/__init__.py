"""Run a program inside an extracted rpack root: workspace, sandbox, init and exit status."""

from runner.errors import RunError
from runner.mounts import Bind
from runner.sandbox import run
from runner.workspace import workspace

__all__ = ["Bind", "RunError", "run", "workspace"]
