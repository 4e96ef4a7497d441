#!/usr/bin/env bash
# Sets up .venv (scripts/setup.sh), then runs the main job: the shipped tiny LVLM answering held-out questions
# with and without LightKV (answers, per-layer KV tokens, vision KV bytes, prefill time, accuracy).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh demo
exec .venv/bin/lightkv demo "$@"
