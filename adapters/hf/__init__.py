"""Transformers adapter (``apply_lightkv(model, config)``). Not implemented yet: tracked as its own issue."""
