#!/usr/bin/env bash
# Installs what a fresh machine needs: redis-server (Debian) and Encore with its extras.
set -euo pipefail
cd "$(dirname "$0")/.."
# redis-server (and redis-cli); stunnel4 and openssl for the TLS tests (a TLS endpoint in front
# of the broker, throw-away certificates); chromium for the dashboard test.
missing=""
command -v redis-server >/dev/null 2>&1 || missing="$missing redis-server"
command -v stunnel4 >/dev/null 2>&1 || missing="$missing stunnel4"
command -v openssl >/dev/null 2>&1 || missing="$missing openssl"
# Debian's chromium: the dashboard's test loads the page in it headless (no browser download).
command -v chromium >/dev/null 2>&1 || missing="$missing chromium"
if [ -n "$missing" ]; then
  sudo_=""; [ "$(id -u)" = 0 ] || sudo_="sudo"
  $sudo_ apt-get update -qq && $sudo_ apt-get install -y -qq $missing >/dev/null
fi
if ! command -v java >/dev/null 2>&1; then
  echo "note: no java on PATH; the Spark engine and its test need Java 17 (apt-get install -y openjdk-17-jre-headless)" >&2
fi
python3 -m pip install -q --disable-pip-version-check -e '.[dev,spark]'
