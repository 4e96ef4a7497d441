"""SGLang adapter: ``--kv-compress {none,lightkv,fastv}`` for SGLang's Qwen2-VL, Qwen2.5-VL and LLaVA servers.

Installing ``lightkv`` registers the SGLang plugin ``lightkv`` (``plugin.register``), which SGLang loads in every
server process. Importing this package imports nothing from SGLang. The flags, what the plugin does and its limits:
README, "SGLang"; what each module holds: README, "Layout".
"""
