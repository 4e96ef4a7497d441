"""SGLang adapter: ``--kv-compress {none,lightkv,fastv}`` for SGLang's Qwen2-VL, Qwen2.5-VL and LLaVA servers.

Installing ``lightkv`` registers the SGLang plugin ``lightkv`` (``plugin.register``), which SGLang loads in every
server process::

    sglang serve --model-path Qwen/Qwen2.5-VL-7B-Instruct --kv-compress lightkv \\
        --disable-radix-cache --chunked-prefill-size -1 --disable-overlap-schedule --attention-backend triton \\
        --cuda-graph-backend-decode disabled --cuda-graph-backend-prefill disabled

- ``plugin``: the ``--kv-compress*`` flags, their checks against the other server arguments, and the model
  classes routed into SGLang's model registry;
- ``settings``: what the flags asked for, carried on ``ServerArgs`` into every subprocess;
- ``models``: same-named subclasses of SGLang's model classes that compress the vision tokens in prefill;
- ``engine.Engine``: ``sglang.Engine`` with ``kv_compress=...`` keyword arguments;
- ``python -m lightkv_adapters.sglang.launch_server``: SGLang's launcher with the plugin loaded in-process, for
  when ``SGLANG_PLUGINS`` filters it out.

Importing this package imports nothing from SGLang.
"""
