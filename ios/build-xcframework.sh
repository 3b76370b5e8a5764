#!/usr/bin/env bash
# Builds ios/UnseeFFI.xcframework (device + simulator static libraries) and writes the Swift bindings into
# ios/Sources/Unsee/UnseeFFI.swift. Run on a Mac with Xcode and rustup:
#   rustup target add aarch64-apple-ios aarch64-apple-ios-sim x86_64-apple-ios
#   ios/build-xcframework.sh
set -euo pipefail
cd "$(dirname "$0")/.."

TARGETS=(aarch64-apple-ios aarch64-apple-ios-sim x86_64-apple-ios)
for t in "${TARGETS[@]}"; do
  cargo build --release -p unsee-ffi --lib --target "$t"
done

# One simulator library for both simulator architectures.
mkdir -p target/ios-simulator
lipo -create \
  target/aarch64-apple-ios-sim/release/libunsee_ffi.a \
  target/x86_64-apple-ios/release/libunsee_ffi.a \
  -output target/ios-simulator/libunsee_ffi.a

# Swift bindings in library mode, from a host build of the same source (the interface is identical).
cargo build --release -p unsee-ffi --lib
cargo run --release -p unsee-ffi --bin uniffi-bindgen -- generate \
  --library target/release/libunsee_ffi.dylib --language swift --out-dir target/swift --no-format

rm -rf target/xcframework-headers
mkdir -p target/xcframework-headers
cp target/swift/UnseeFFIFFI.h target/xcframework-headers/
cp target/swift/UnseeFFIFFI.modulemap target/xcframework-headers/module.modulemap
cp target/swift/UnseeFFI.swift ios/Sources/Unsee/UnseeFFI.swift

rm -rf ios/UnseeFFI.xcframework
xcodebuild -create-xcframework \
  -library target/aarch64-apple-ios/release/libunsee_ffi.a -headers target/xcframework-headers \
  -library target/ios-simulator/libunsee_ffi.a -headers target/xcframework-headers \
  -output ios/UnseeFFI.xcframework
echo "wrote ios/UnseeFFI.xcframework and ios/Sources/Unsee/UnseeFFI.swift"
