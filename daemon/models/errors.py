"""Errors about models: importing them into the store, finding and loading them, and running them.

A leaf module (no imports from the rest of the daemon), so that the store, the engine choice and the backends can all
raise these without importing one another.
"""

from __future__ import annotations


class ModelImportError(RuntimeError):
    """A model could not be imported: the message is one line that says what is wrong and, where it can, what to do."""


class ModelLoadError(RuntimeError):
    """A model could not be found or loaded; the message says how to get it (one line, no traceback)."""


class ModelRuntimeError(RuntimeError):
    """A loaded model failed while answering (a chat server went down or answered garbage): the ask gets
    ``model-error`` with this one-line message, and the daemon keeps serving."""
