#!/usr/bin/env bash
# Installs what the test suite needs beyond Rust, from the package registries, if it is missing:
#   - lavapipe (Mesa's software Vulkan driver): the wgpu path is tested on it;
#   - JNA (Debian's libjna-java, with its native dispatch library): the Kotlin bindings run on the JVM through it;
#   - the Kotlin compiler (npm package kotlin-compiler, into tests/tools/node_modules);
#   - Chromium (the real-browser test of `unsee serve`'s page) and python3-requests (an unchanged
#     AUTOMATIC1111 client script runs against `unsee serve`).
# Java 17 (javac/java) and python3 are expected on the machine. Safe to run again: it only installs what is absent.
set -euo pipefail
cd "$(dirname "$0")/.."

export DEBIAN_FRONTEND=noninteractive
missing=()
for pkg in mesa-vulkan-drivers libvulkan1 libjna-java chromium; do
  dpkg -s "$pkg" >/dev/null 2>&1 || missing+=("$pkg")
done
if [ ${#missing[@]} -gt 0 ]; then
  sudo=""
  [ "$(id -u)" -ne 0 ] && sudo="sudo"
  $sudo apt-get update -qq
  $sudo apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

if ! python3 -c 'import requests' 2>/dev/null; then
  python3 -m pip install --quiet requests 2>/dev/null || python3 -m pip install --quiet --break-system-packages requests
fi

if [ ! -x tests/tools/node_modules/kotlin-compiler/bin/kotlinc ]; then
  (cd tests/tools && npm ci --no-audit --no-fund --loglevel=error)
fi
