"""Errors raised while importing models into the store."""

from __future__ import annotations


class ModelImportError(RuntimeError):
    """A model could not be imported: the message is one line that says what is wrong and, where it can, what to do."""
