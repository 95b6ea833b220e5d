#!/usr/bin/env bash
# Quickstart: set up, then run the main job on embedded servers (Ctrl-C stops everything).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec encore up "$@"
