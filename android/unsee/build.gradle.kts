// The unsee Android library (AAR): the uniffi-generated Kotlin bindings, the coroutine wrapper `app.unsee.Unsee`,
// the JNI fast path `app.unsee.UnseeNative`, and libunsee_ffi.so for arm64-v8a and x86_64, built by cargo-ndk.
//
// Prerequisites: Android SDK + NDK (ANDROID_NDK_HOME), `cargo install cargo-ndk`,
// `rustup target add aarch64-linux-android x86_64-linux-android`.
import org.gradle.api.tasks.Exec

plugins {
    id("com.android.library")
    id("org.jetbrains.kotlin.android")
}

val repoRoot = rootProject.projectDir.parentFile
val rustJniLibs = layout.buildDirectory.dir("rustJniLibs")
val generatedBindings = layout.buildDirectory.dir("generated/uniffi")

android {
    namespace = "app.unsee"
    compileSdk = 35
    defaultConfig {
        minSdk = 26
        consumerProguardFiles("consumer-rules.pro")
        ndk { abiFilters += listOf("arm64-v8a", "x86_64") }
    }
    sourceSets["main"].apply {
        java.srcDirs("src/main/java", "src/main/kotlin", "src/android/kotlin", generatedBindings.get().asFile.path)
        jniLibs.srcDir(rustJniLibs.get().asFile)
    }
    compileOptions {
        sourceCompatibility = JavaVersion.VERSION_17
        targetCompatibility = JavaVersion.VERSION_17
    }
    kotlinOptions { jvmTarget = "17" }
}

// Release builds of the Rust library for both ABIs (`--features vulkan` is not needed: wgpu's WGSL path runs on
// Android's Vulkan driver).
val cargoNdk by tasks.registering(Exec::class) {
    workingDir = repoRoot
    commandLine(
        "cargo", "ndk", "-t", "arm64-v8a", "-t", "x86_64", "--platform", "26",
        "-o", rustJniLibs.get().asFile.path, "build", "--release", "-p", "unsee-ffi", "--lib",
    )
}

// Kotlin bindings generated in library mode from the arm64 library that cargoNdk just built.
val generateBindings by tasks.registering(Exec::class) {
    dependsOn(cargoNdk)
    workingDir = repoRoot
    commandLine(
        "cargo", "run", "-p", "unsee-ffi", "--bin", "uniffi-bindgen", "--",
        "generate", "--library", rustJniLibs.get().file("arm64-v8a/libunsee_ffi.so").asFile.path,
        "--language", "kotlin", "--out-dir", generatedBindings.get().asFile.path, "--no-format",
    )
}

tasks.named("preBuild") { dependsOn(generateBindings) }

dependencies {
    // uniffi's Kotlin bindings call the library through JNA (the AAR carries its Android native parts).
    api("net.java.dev.jna:jna:5.14.0@aar")
    api("org.jetbrains.kotlinx:kotlinx-coroutines-android:1.8.1")
}
