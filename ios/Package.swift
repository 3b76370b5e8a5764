// swift-tools-version:5.9
// The Unsee Swift package: the uniffi-generated Swift bindings (Sources/Unsee/UnseeFFI.swift, written by
// build-xcframework.sh), an async wrapper (Sources/Unsee/Unsee.swift) and the Rust library as an XCFramework.
import PackageDescription

let package = Package(
    name: "Unsee",
    platforms: [.iOS(.v16), .macOS(.v13)],
    products: [
        .library(name: "Unsee", targets: ["Unsee"]),
    ],
    targets: [
        // Built by ./build-xcframework.sh (static libraries for device and simulator + the C header/modulemap).
        .binaryTarget(name: "UnseeFFIFFI", path: "UnseeFFI.xcframework"),
        .target(
            name: "Unsee",
            dependencies: ["UnseeFFIFFI"],
            path: "Sources/Unsee",
            linkerSettings: [
                // wgpu's Metal backend and what the Rust standard library links on Apple platforms.
                .linkedFramework("Metal"),
                .linkedFramework("QuartzCore"),
                .linkedFramework("CoreGraphics"),
                .linkedFramework("Foundation"),
                .linkedLibrary("c++"),
            ]
        ),
    ]
)
