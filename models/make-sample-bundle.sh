#!/usr/bin/env bash
# Builds what the Android and iOS samples load in guarded mode: the shapes model with "circle" erased (UCE,
# models/specs/shapes-circle.toml), as a signed int8 bundle in models/sample-bundle/, and the key pair in
# models/sample-keys/ (sample.key stays on the build machine; the apps embed only sample.pub). Both folders are
# ignored by git. Idempotent: an existing bundle is kept. An OEM does the same with its own key.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ -f models/sample-bundle/manifest.json ] && [ -f models/sample-keys/sample.pub ]; then
    exit 0
fi
# UNSEE_BIN: an unsee binary to use instead of building one (`cargo run --release`).
if [ -n "${UNSEE_BIN:-}" ]; then unsee=("$UNSEE_BIN"); else unsee=(cargo run --release --quiet -p unsee --); fi
mkdir -p models/sample-keys
[ -f models/sample-keys/sample.key ] || "${unsee[@]}" keygen --out models/sample-keys/sample
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
"${unsee[@]}" erase --spec models/specs/shapes-circle.toml --out "$tmp/circle.safetensors"
rm -rf models/sample-bundle
"${unsee[@]}" bundle build --erasure "$tmp/circle.safetensors" --quant int8 \
    --sign models/sample-keys/sample.key --creator "unsee sample" --out models/sample-bundle
"${unsee[@]}" bundle verify models/sample-bundle --key models/sample-keys/sample.pub
