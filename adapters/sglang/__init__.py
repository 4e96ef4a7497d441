"""SGLang adapter: ``--kv-compress {none,lightkv,fastv}`` for SGLang's Qwen2-VL, Qwen2.5-VL and LLaVA servers.

Installing ``lightkv`` registers the SGLang plugin ``lightkv`` (``plugin.register``), which SGLang loads in every
server process::

    sglang serve --model-path Qwen/Qwen2.5-VL-7B-Instruct --kv-compress lightkv \\
        --disable-radix-cache --chunked-prefill-size -1 --disable-overlap-schedule --attention-backend triton \\
        --cuda-graph-backend-decode disabled --cuda-graph-backend-prefill disabled

- ``plugin``: the entry point, wiring the hooks below into SGLang;
- ``settings``: the ``--kv-compress*`` flags and what they asked for, carried on ``ServerArgs`` into every
  subprocess; ``validation``: their checks against the other server arguments;
- ``routing``: this package's model classes put into SGLang's model registry;
- ``models``: same-named subclasses of SGLang's model classes that compress the vision tokens in prefill;
- ``pools``: one KV pool per layer group; ``admission``: the scheduler hooks that drive them;
- ``engine.Engine``: ``sglang.Engine`` with ``kv_compress=...`` keyword arguments;
- ``python -m lightkv_adapters.sglang.launch_server``: SGLang's launcher with the plugin loaded in-process, for
  when ``SGLANG_PLUGINS`` filters it out;
- ``cpu_env``: stubs that let SGLang import and run without a GPU (tests, ``lightkv_perf.capacity``).

Importing this package imports nothing from SGLang.
"""
