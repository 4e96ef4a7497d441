"""The live-server suite: real SGLang HTTP servers on 127.0.0.1 serving the tiny models of
:mod:`helpers.live_models` (every test here carries the marker ``live_server``: ``pytest -m live_server``).

- ``live``: one server configuration of :data:`CONFIGS`, started once per test session (tests ask for it by name
  with ``indirect`` parametrisation; pytest groups the tests by configuration and stops a server before it starts
  the next, so one runs at a time) together with the Transformers adapter's answers to
  :data:`helpers.live_requests.CORRECTNESS_PROMPTS`, computed in a child process while the server starts.
- The servers get the CPU shims of ``tests/live/site`` (test set-up only); see ``helpers.live_server``.
"""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import pytest

pytest.importorskip("sglang")

from helpers import live_models  # noqa: E402
from helpers.live_requests import CORRECTNESS_PROMPTS  # noqa: E402
from helpers.live_server import LiveServer, live_env  # noqa: E402

#: The image grid (rows x cols of merged tokens) whose prefill the servers' fault injector fails
#: (``LIGHTKV_LIVE_FAULT_GRID``, tests/live/site/sitecustomize.py): a 392 x 56-pixel Qwen image.
FAULT_GRID = (2, 14)
#: Chunk size of the ``qwen-radix`` and ``qwen-overlap`` servers.
CHUNK_TOKENS = 32


@dataclass(frozen=True)
class Config:
    """A server configuration: the model family, the ``--kv-compress`` method, further server arguments and
    environment, and whether SGLang's radix cache and overlap scheduler are on (off unless a test is about them:
    a request's answer then does not depend on what the server served before)."""

    family: str
    method: str
    args: tuple[str, ...] = ()
    env: tuple[tuple[str, str], ...] = ()
    radix_cache: bool = False
    overlap: bool = False

    def server_args(self) -> tuple[str, ...]:
        method = () if self.method == "none" else ("--kv-compress", self.method)
        radix = () if self.radix_cache else ("--disable-radix-cache",)
        overlap = () if self.overlap else ("--disable-overlap-schedule",)
        return (*method, *radix, *overlap, *self.args)


CONFIGS = {
    "qwen-none": Config("qwen2.5-vl", "none"),
    "qwen-lightkv": Config("qwen2.5-vl", "lightkv"),
    "qwen-fastv": Config("qwen2.5-vl", "fastv"),
    "llava-none": Config("llava", "none"),
    # a last layer group of 159 slots, so that a prompt of six images does not fit it (test_live_requests.py)
    "llava-lightkv": Config("llava", "lightkv", ("--kv-compress-pool-ratios", "0.5,0.3,0.025")),
    "llava-fastv": Config("llava", "fastv"),
    # production settings (test_live_settings.py): chunked prefill with 32-token chunks, so that text-only prompts
    # are split while prompts with images are prefilled whole, up to 400 tokens; and the radix cache on: text-only
    # prompts share cached prefixes, prompts with images stay out of the tree
    "qwen-radix": Config(
        "qwen2.5-vl",
        "lightkv",
        ("--chunked-prefill-size", str(CHUNK_TOKENS), "--max-prefill-tokens", "400"),
        radix_cache=True,
    ),
    # SGLang's overlap scheduler (batch N+1 prepared while batch N runs), with the radix cache and chunked prefill
    # of qwen-radix: SGLang's defaults but for the attention backend and CUDA graphs
    "qwen-overlap": Config(
        "qwen2.5-vl",
        "lightkv",
        ("--chunked-prefill-size", str(CHUNK_TOKENS), "--max-prefill-tokens", "400"),
        radix_cache=True,
        overlap=True,
    ),
    # tensor parallelism over two CPU processes (gloo), one core each (SGLang's CPU engine needs the binding when
    # there are more ranks than NUMA nodes)
    "qwen-tp2": Config("qwen2.5-vl", "lightkv", ("--tp-size", "2"), (("SGLANG_CPU_OMP_THREADS_BIND", "0|1"),)),
    # SGLang's Triton attention backend (its kernels run in Triton's interpreter on the CPU)
    "qwen-triton": Config("qwen2.5-vl", "lightkv", ("--attention-backend", "triton")),
}


@dataclass
class Live:
    """A running server of one configuration and the Transformers adapter's answers to the same prompts."""

    name: str
    config: Config
    server: LiveServer
    model_dir: Path
    _reference: subprocess.Popen
    _reference_out: Path
    _answers: list | None = None

    def reference(self) -> list[dict]:
        """Per prompt of ``CORRECTNESS_PROMPTS[family]``: ``tokens``, ``logprobs``, ``prompt_tokens``."""
        if self._answers is None:
            self._reference.wait(timeout=600)
            log = self._reference_out.with_suffix(".log")
            assert self._reference.returncode == 0, f"the Transformers reference failed:\n{log.read_text()[-4000:]}"
            self._answers = json.loads(self._reference_out.read_text())
        return self._answers

    @cached_property
    def tokenizer(self):
        """The model's tokenizer, loaded once per server."""
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(self.model_dir)


@pytest.fixture(scope="session")
def live_model_dirs(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("live-models")
    return {family: live_models.save(family, root / family) for family in live_models.FAMILIES}


@pytest.fixture(scope="session")
def live(request, live_model_dirs, tmp_path_factory) -> Live:
    name = request.param
    config = CONFIGS[name]
    model_dir = live_model_dirs[config.family]
    work = tmp_path_factory.mktemp(f"live-{name}")
    prompts = work / "prompts.json"
    prompts.write_text(json.dumps([prompt.reference_request() for prompt in CORRECTNESS_PROMPTS[config.family]]))
    out = work / "reference.json"
    with open(out.with_suffix(".log"), "wb") as log:
        reference = subprocess.Popen(
            [sys.executable, str(Path(__file__).with_name("hf_reference.py")), str(model_dir), config.method,
             str(prompts), str(out)],
            env=live_env(),
            stdout=log,
            stderr=subprocess.STDOUT,
        )  # fmt: skip
    fault = f"{FAULT_GRID[0]}x{FAULT_GRID[1]}"
    env = {"LIGHTKV_LIVE_FAULT_GRID": fault, **dict(config.env)}
    server = LiveServer(name, model_dir, config.server_args(), work, env=env)
    try:
        server.start()
        yield Live(name, config, server, model_dir, reference, out)
    finally:
        server.stop()
        if reference.poll() is None:
            reference.kill()
            reference.wait()
