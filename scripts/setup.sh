#!/usr/bin/env bash
# Installs what a fresh machine needs: redis-server (Debian) and Encore with its extras.
set -euo pipefail
cd "$(dirname "$0")/.."
if ! command -v redis-server >/dev/null 2>&1; then
  if [ "$(id -u)" = 0 ]; then
    apt-get update -qq && apt-get install -y -qq redis-server >/dev/null
  else
    sudo apt-get update -qq && sudo apt-get install -y -qq redis-server >/dev/null
  fi
fi
if ! command -v java >/dev/null 2>&1; then
  echo "note: no java on PATH; the Spark engine and its test need Java 17 (apt-get install -y openjdk-17-jre-headless)" >&2
fi
python3 -m pip install -q --disable-pip-version-check -e '.[dev,spark]'
