// Compose sample: prompt field, the erased concepts of the loaded bundle, progress bar, image, cancel button.
// The model is copied from the repository's models/shapes-sd (or any diffusers folder you put in
// src/main/assets/model) into the app's files on first start.
plugins {
    id("com.android.application")
    id("org.jetbrains.kotlin.android")
    id("org.jetbrains.kotlin.plugin.compose")
}

val repoRoot = rootProject.projectDir.parentFile

android {
    namespace = "app.unsee.sample"
    compileSdk = 35
    defaultConfig {
        applicationId = "app.unsee.sample"
        minSdk = 26
        targetSdk = 35
        versionCode = 1
        versionName = "0.1.0"
        ndk { abiFilters += listOf("arm64-v8a", "x86_64") }
    }
    buildFeatures { compose = true }
    sourceSets["main"].apply {
        java.srcDirs("src/main/kotlin")
        assets.srcDir(layout.buildDirectory.dir("modelAssets"))
    }
    compileOptions {
        sourceCompatibility = JavaVersion.VERSION_17
        targetCompatibility = JavaVersion.VERSION_17
    }
    kotlinOptions { jvmTarget = "17" }
}

// The embedded model (and an erasure bundle, if models/bundle exists) as assets/model, assets/erasures.
val copyModel by tasks.registering(Copy::class) {
    from(repoRoot.resolve("models/shapes-sd")) { into("model") }
    from(repoRoot.resolve("models/bundle")) { into("erasures") }
    into(layout.buildDirectory.dir("modelAssets"))
}
tasks.named("preBuild") { dependsOn(copyModel) }

dependencies {
    implementation(project(":unsee"))
    implementation(platform("androidx.compose:compose-bom:2024.12.01"))
    implementation("androidx.compose.material3:material3")
    implementation("androidx.compose.ui:ui")
    implementation("androidx.activity:activity-compose:1.9.3")
    implementation("androidx.lifecycle:lifecycle-runtime-compose:2.8.7")
}
