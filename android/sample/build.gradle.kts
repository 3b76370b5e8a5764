// Compose sample: prompt field, the erased concepts of the loaded bundle, progress bar, image, cancel button.
// It loads a signed int8 bundle of the shapes model with "circle" erased, in guarded mode: the bundle and its public
// key are made by models/make-sample-bundle.sh (run by the makeBundle task below; the secret key stays on the build
// machine) and copied into the app's files on first start.
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

// The signed bundle (assets/bundle) and the key the app trusts (assets/trusted.pub).
val makeBundle by tasks.registering(Exec::class) {
    commandLine(repoRoot.resolve("models/make-sample-bundle.sh").path)
}
val copyModel by tasks.registering(Copy::class) {
    dependsOn(makeBundle)
    from(repoRoot.resolve("models/sample-bundle")) { into("bundle") }
    from(repoRoot.resolve("models/sample-keys/sample.pub")) { rename { "trusted.pub" } }
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
