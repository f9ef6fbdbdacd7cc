"""The ``actvar`` command line: parse options, call one command, render its result with Rich."""

from . import convert, generate, measure, model_files, train  # noqa: F401  (each registers its commands)
from .app import app, main

__all__ = ["app", "main"]
