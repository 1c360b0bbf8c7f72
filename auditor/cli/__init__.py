"""The `audit` command: a thin typer layer over the library (every command is one call into it).

app.py holds what commands share and the entry point; commands.py, distill.py, encoder.py, evaluate.py and model.py
declare the commands, each module registering its own on import.
"""

from . import commands, distill, encoder, evaluate, model
from .app import app, main

__all__ = ["app", "commands", "distill", "encoder", "evaluate", "main", "model"]
