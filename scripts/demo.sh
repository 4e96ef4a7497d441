#!/usr/bin/env bash
# Sets up .venv (scripts/setup.sh), then runs the main job: the LightKV schedule on generated inputs.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/lightkv simulate "$@"
