"""Fixtures shared by the adapter tests.

- ``decoder``: the tiny reference decoder (:data:`helpers.decoder_cases.CONFIG`, seeded weights), built once per
  run for the decoder's parity, generation and reduction tests.
- ``plugins_loaded``: SGLang's own plugin loading in this process, once per run for the SGLang plugin's tests
  (``test_sglang_plugin_*.py``; requested only by modules that skip where SGLang is not installed).
"""

from __future__ import annotations

import pytest
import torch
from helpers.decoder_cases import CONFIG

from lightkv_adapters.reference.decoder import Decoder


@pytest.fixture(scope="session")
def decoder() -> Decoder:
    with torch.random.fork_rng():
        torch.manual_seed(1234)
        return Decoder(CONFIG).eval()


@pytest.fixture(scope="session")
def plugins_loaded() -> None:
    """SGLang's own plugin loading in this process (runs the ``lightkv`` entry point, applies its hooks)."""
    from lightkv_adapters.sglang import cpu_env

    cpu_env.install()
    from sglang.srt.plugins import load_plugins

    load_plugins()
