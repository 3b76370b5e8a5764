#!/usr/bin/env bash
# Installs what the test suite needs beyond Rust, from the package registries, if it is missing:
#   - lavapipe (Mesa's software Vulkan driver): the wgpu path is tested on it;
#   - JNA (Debian's libjna-java, with its native dispatch library): the Kotlin bindings run on the JVM through it;
#   - the Kotlin compiler (npm package kotlin-compiler, into tests/tools/node_modules).
# Java 17 (javac/java) and python3 are expected on the machine. Safe to run again: it only installs what is absent.
set -euo pipefail
cd "$(dirname "$0")/.."

export DEBIAN_FRONTEND=noninteractive
missing=()
for pkg in mesa-vulkan-drivers libvulkan1 libjna-java; do
  dpkg -s "$pkg" >/dev/null 2>&1 || missing+=("$pkg")
done
if [ ${#missing[@]} -gt 0 ]; then
  sudo=""
  [ "$(id -u)" -ne 0 ] && sudo="sudo"
  $sudo apt-get update -qq
  $sudo apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

if [ ! -x tests/tools/node_modules/kotlin-compiler/bin/kotlinc ]; then
  (cd tests/tools && npm ci --no-audit --no-fund --loglevel=error)
fi
