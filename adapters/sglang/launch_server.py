"""``python -m lightkv_adapters.sglang.launch_server <sglang args> --kv-compress lightkv``: SGLang's
``python -m sglang.launch_server`` with the ``lightkv`` plugin installed in the launcher itself, for when
``SGLANG_PLUGINS`` keeps SGLang from loading it (see :func:`lightkv_adapters.sglang.plugin.install`).
"""

from __future__ import annotations

import os
import sys

from sglang.launch_server import run_server
from sglang.srt import server_args as sglang_server_args
from sglang.srt.plugins import load_plugins
from sglang.srt.utils import kill_process_tree

from lightkv_adapters.sglang.plugin import install


def setup() -> None:
    """Installs the plugin in this process (and its model classes for the processes it spawns), then loads the
    plugins ``SGLANG_PLUGINS`` allows, as SGLang's launcher does."""
    install()
    load_plugins()


def main(argv: list[str] | None = None) -> None:
    """Parses SGLang's arguments and ours (``argv``, default ``sys.argv[1:]``) and runs the server until it
    exits, then ends the processes it started."""
    setup()
    server_args = sglang_server_args.prepare_server_args(sys.argv[1:] if argv is None else argv)
    try:
        run_server(server_args)
    finally:
        kill_process_tree(os.getpid(), include_parent=False)


if __name__ == "__main__":
    main()
