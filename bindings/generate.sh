#!/usr/bin/env bash
# Generates the Kotlin, Swift and Python bindings of unsee-ffi in uniffi library mode, with the workspace's own
# uniffi-bindgen (so generator and library always agree).
#
#   bindings/generate.sh                       # builds the library (debug), writes target/bindings/{kotlin,swift,python}
#   PROFILE=release bindings/generate.sh       # same from a release build
#   bindings/generate.sh path/to/libunsee_ffi.so out/dir   # from an existing library (e.g. one cargo-ndk built)
#
# Library mode reads the interface from the compiled library itself, so any build of the crate works — a host
# build, an Android .so or an iOS static library — as long as it is the same source.
set -euo pipefail
cd "$(dirname "$0")/.."

PROFILE=${PROFILE:-debug}
case "$(uname -s)" in
  Darwin) ext=dylib ;;
  MINGW*|MSYS*|CYGWIN*) ext=dll ;;
  *) ext=so ;;
esac
flag=()
[ "$PROFILE" = release ] && flag=(--release)

LIB=${1:-}
OUT=${2:-target/bindings}
if [ -z "$LIB" ]; then
  cargo build -p unsee-ffi --lib "${flag[@]}"
  LIB="target/$PROFILE/libunsee_ffi.$ext"
  [ -f "$LIB" ] || LIB="target/$PROFILE/unsee_ffi.$ext"
fi
cargo build -p unsee-ffi --bin uniffi-bindgen "${flag[@]}"
BINDGEN="target/$PROFILE/uniffi-bindgen"

for lang in kotlin swift python; do
  rm -rf "$OUT/$lang"
  "$BINDGEN" generate --library "$LIB" --language "$lang" --out-dir "$OUT/$lang" --no-format
done
echo "bindings for $LIB:"
find "$OUT" -type f | sort
