#!/usr/bin/env bash
# The main job on a built-in sample: set up, then run the most complete path that exists.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/python scripts/demo.py "$@"
