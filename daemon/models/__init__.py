"""The user's model store (``store``), importers (``importer``, ``registry``) and the converters that make MLX copies of
CTranslate2 Whisper and GGUF chat models offline (``ct2_whisper``, ``gguf_llm``).

Which engine runs a model, and how a model spec from the settings is found, is ``sottovoce.daemon.engines``.
"""
