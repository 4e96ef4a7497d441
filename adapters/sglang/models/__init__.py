"""SGLang model classes with ``--kv-compress``: same-named subclasses of SGLang's own, registered in place of
them (the plugin, or ``SGLANG_EXTERNAL_MODEL_PACKAGE=lightkv_adapters.sglang.models``). Each module that
defines classes lists them in ``EntryClass``, as SGLang's model registry expects."""
