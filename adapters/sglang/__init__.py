"""SGLang plugin (``--kv-compress lightkv``). Not implemented yet: tracked as its own issue."""
