"""The user's model store: importers that turn CTranslate2 Whisper and GGUF chat models into MLX folders offline.

``resolve`` turns a model spec from the settings (a store name, a local folder or a hub id) into what the MLX loaders
take; ``import_model`` converts a downloaded model into the store atomically.
"""

from __future__ import annotations

from sottovoce.daemon.models.errors import ModelImportError
from sottovoce.daemon.models.importer import import_model
from sottovoce.daemon.models.store import ModelEntry, list_models, models_dir, resolve

__all__ = ["ModelEntry", "ModelImportError", "import_model", "list_models", "models_dir", "resolve"]
