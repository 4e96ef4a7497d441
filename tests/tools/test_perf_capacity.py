"""The capacity simulation (``perf/capacity_sim.py``) on a small KV budget: every filled mix is decoded, freed and
leak-checked inside :func:`fill`, with and without a cached system prompt (SGLang's radix cache on), and the layer
groups sharing an arena never hold fewer requests than one pool."""

from __future__ import annotations

import importlib.util

import pytest

if importlib.util.find_spec("sglang") is None:
    pytest.skip("SGLang is not installed", allow_module_level=True)

from lightkv_adapters.sglang import cpu_env  # noqa: E402

cpu_env.install()

from lightkv_core.config import PRESET_DEPTHS, LightKVConfig  # noqa: E402
from lightkv_core.methods import LightKV  # noqa: E402
from lightkv_perf.capacity_requests import SHAPE, llava_next_request, text_request, with_system_prompt  # noqa: E402
from lightkv_perf.capacity_sim import LAYOUTS, SlotSim, fill, static_default_ratios  # noqa: E402

LAYERS = PRESET_DEPTHS["llava-next"]
METHOD = LightKV(LightKVConfig.preset("llava-1.5"))
#: slots of an 8 GiB single pool of the LLaVA-NeXT shape
TOKENS = 8 * (1 << 30) // (SHAPE.kv.bytes_per_token_layer * LAYERS)
MIXES = {
    "vision": (llava_next_request(),),
    "text": (text_request(),),
    "50/50": (llava_next_request(), text_request()),
}


def _held(mix: str, system: int) -> dict[str, int]:
    cycle = tuple(with_system_prompt(req, system) for req in MIXES[mix])
    ratios = static_default_ratios(METHOD)
    return {
        layout: fill(SlotSim(layout, TOKENS, METHOD, LAYERS, ratios, cached_prefix=system), cycle, 32)["requests"]
        for layout in LAYOUTS
    }


@pytest.mark.parametrize("mix", sorted(MIXES))
def test_a_cached_system_prompt_is_held_once(mix):
    """With the radix cache on, one pool lends the system prompt to every request, so prompts longer by it hold
    about as many requests as without it (the cached copy costs its 200 slots once); the arena lends it to
    text-only requests only (in every layer group), so it holds as many text-only requests as one pool and never
    fewer of any mix."""
    without, with_cache = _held(mix, 0), _held(mix, 200)
    assert without["one"] - 1 <= with_cache["one"] <= without["one"] and with_cache["one"] > 2
    assert with_cache["shared"] >= with_cache["one"]
    if mix == "text":
        assert with_cache["shared"] == with_cache["one"]
    else:  # a prompt with images holds its own copy of the system prompt
        assert with_cache["shared"] < without["shared"]
