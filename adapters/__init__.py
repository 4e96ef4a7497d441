"""lightkv_adapters: put lightkv_core into inference engines.

Installed from the folder ``adapters/`` under the import name ``lightkv_adapters`` (so it never shadows
the PyPI package ``adapters``). Subpackages: ``hf`` (Transformers), ``sglang`` (SGLang plugin) and
``reference`` (a minimal decoder for custom engines). Adapters translate an engine's tensors into
``lightkv_core`` calls; they never re-implement the method.
"""
