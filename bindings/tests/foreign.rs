//! The bindings as apps use them: the library cargo just built, bindings generated from it by the workspace's
//! `uniffi-bindgen` in library mode, and tests in Python, Java (the JNI path) and Kotlin (uniffi + the coroutine
//! wrapper of `android/`) run against the embedded model.
//!
//! Needs `python3`; the JVM test needs `javac`/`java` (17+), the Kotlin compiler (`tests/setup.sh` installs the npm
//! package `kotlin-compiler` into `tests/tools/node_modules`; or set `KOTLINC`) and JNA (Debian's `libjna-java`;
//! or set `JNA_JAR`). `UNSEE_SKIP_JVM_TESTS=1` skips the JVM test explicitly; a missing tool otherwise fails it.

use std::path::{Path, PathBuf};
use std::process::Command;

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..").canonicalize().unwrap()
}

/// `target/<profile>`, where cargo put the cdylib next to the `uniffi-bindgen` binary.
fn target_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_uniffi-bindgen")).parent().unwrap().to_path_buf()
}

/// The shared library apps load. `cargo test` builds only the rlib of a package under test, so README's test
/// command runs `cargo build --workspace --lib --tests` first (the workspace's feature set: burn is not compiled a
/// second time, as `cargo build -p unsee-ffi --lib` would); a library older than the Rust sources is refused, so a
/// stale build is never tested by mistake.
fn cdylib() -> PathBuf {
    let p = target_dir().join(format!("{}unsee_ffi{}", std::env::consts::DLL_PREFIX, std::env::consts::DLL_SUFFIX));
    let hint = "run `cargo build --workspace --lib --tests` before `cargo test` (README's test command does)";
    let built = std::fs::metadata(&p).and_then(|m| m.modified()).unwrap_or_else(|_| panic!("{} missing: {hint}", p.display()));
    let mut newest = None;
    for dir in ["bindings/src", "core/src"] {
        newest_source(&repo().join(dir), &mut newest);
    }
    if let Some((t, f)) = newest {
        assert!(t <= built, "{} is older than {}: {hint}", p.display(), f.display());
    }
    p
}

fn newest_source(dir: &Path, newest: &mut Option<(std::time::SystemTime, PathBuf)>) {
    for e in std::fs::read_dir(dir).unwrap() {
        let p = e.unwrap().path();
        if p.is_dir() {
            newest_source(&p, newest);
        } else if p.extension().is_some_and(|x| x == "rs") {
            let t = std::fs::metadata(&p).unwrap().modified().unwrap();
            if newest.as_ref().is_none_or(|(n, _)| t > *n) {
                *newest = Some((t, p));
            }
        }
    }
}

fn scratch(name: &str) -> PathBuf {
    // cargo's per-target scratch folder, named by the test: a run replaces the previous run's folder
    let d = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join(format!("unsee-ffi-{name}"));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

fn run(cmd: &mut Command, what: &str) -> String {
    let out = cmd.output().unwrap_or_else(|e| panic!("{what}: cannot start {cmd:?}: {e}"));
    let (stdout, stderr) = (String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success(), "{what} failed ({}):\n--- stdout\n{stdout}\n--- stderr\n{stderr}", out.status);
    eprintln!("{what}:\n{stdout}{stderr}");
    format!("{stdout}{stderr}")
}

/// Generates the bindings for `language` into `out` (library mode, as `bindings/generate.sh` does).
fn generate(language: &str, out: &Path) {
    run(
        Command::new(env!("CARGO_BIN_EXE_uniffi-bindgen"))
            .args(["generate", "--library"])
            .arg(cdylib())
            .args(["--no-format", "--language", language, "--out-dir"])
            .arg(out)
            .current_dir(repo()),
        &format!("uniffi-bindgen ({language})"),
    );
}

/// A signed int8 bundle of the tiny model with "red circle" erased, its trusted key and another key, built with
/// the core library (what `unsee keygen` + `unsee bundle build --erasure … --sign` do): (bundle, trusted .pub,
/// other .pub).
fn signed_bundle(dir: &Path) -> (PathBuf, PathBuf, PathBuf) {
    let (key, trusted) = unsee::bundle::keygen(&dir.join("trusted"), None).unwrap();
    let (_, other) = unsee::bundle::keygen(&dir.join("other"), None).unwrap();
    let opts = unsee::engine::EngineOptions { model: repo().join("models/tiny-sd"),
                                              device: unsee::device::DeviceChoice::Cpu,
                                              ..unsee::engine::EngineOptions::default() };
    let mut engine = unsee::engine::Engine::open(&opts).unwrap();
    let spec = unsee::erase::spec::Spec::parse_inline(
        "method = \"uce\"\npreserve = [\"a blue square\"]\n[[erase]]\nconcept = \"red circle\"\nreplace_with = \"yellow ring\"\n",
    ).unwrap();
    engine.erase(&spec, None).unwrap();
    let bundle = dir.join("bundle");
    let build = unsee::bundle::BuildOptions { quant: unsee::quant::Quant::Int8, sign: Some((key, None)),
                                              creator: "bindings test".into() };
    engine.build_bundle(&build, &bundle, &mut |_, _, _| {}).unwrap();
    (bundle, trusted, other)
}

#[test]
fn python_bindings_drive_the_engine() {
    let dir = scratch("python");
    generate("python", &dir);
    std::fs::copy(cdylib(), dir.join(cdylib().file_name().unwrap())).unwrap();
    let tmp = dir.join("tmp");
    std::fs::create_dir_all(&tmp).unwrap();
    let (bundle, trusted, other) = signed_bundle(&dir);
    let out = run(
        Command::new("python3")
            .arg(repo().join("bindings/tests/python/test_engine.py"))
            .env("UNSEE_BUNDLE", &bundle)
            .env("UNSEE_BUNDLE_KEY", &trusted)
            .env("UNSEE_OTHER_KEY", &other)
            .env("PYTHONPATH", &dir)
            .env("UNSEE_REPO", repo())
            .env("UNSEE_TMP", &tmp)
            .env("UNSEE_CACHE_DIR", dir.join("cache"))
            .env("PYTHONDONTWRITEBYTECODE", "1"),
        "python test_engine.py",
    );
    assert!(out.contains("OK"), "{out}");
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn swift_bindings_are_generated_with_the_api_the_wrapper_uses() {
    // Swift cannot be compiled here (no Xcode); check that library mode writes the three files the XCFramework
    // script packages, and that they declare what ios/Sources/Unsee/Unsee.swift and the README example call.
    let dir = scratch("swift");
    generate("swift", &dir);
    let swift = std::fs::read_to_string(dir.join("UnseeFFI.swift")).unwrap();
    for needle in [
        "open class Engine",
        "public convenience init(config: EngineConfig)throws",
        "open func generate(request: GenerateRequest, progress: ProgressListener?, cancel: CancelToken?)throws  -> GeneratedImage",
        "open func erase(specToml: String, saveTo: String?)throws  -> ErasureSummary",
        "open func audit(specToml: String)throws  -> AuditReport",
        "public protocol ProgressListener",
        "func onStep(step: Int32, total: Int32)",
        "open class CancelToken",
        "enum UnseeError: Swift.Error",
        "case Cancelled(message: String)",
        "public init(prompt: String, negativePrompt: String = \"\", steps: Int32 = 20",
        "import UnseeFFIFFI",
    ] {
        assert!(swift.contains(needle), "generated Swift lacks {needle:?}");
    }
    let header = std::fs::read_to_string(dir.join("UnseeFFIFFI.h")).unwrap();
    assert!(header.contains("uniffi_unsee_ffi_fn_method_engine_generate"), "header lacks the generate symbol");
    let modulemap = std::fs::read_to_string(dir.join("UnseeFFIFFI.modulemap")).unwrap();
    assert!(modulemap.contains("module UnseeFFIFFI"), "{modulemap}");
    let _ = std::fs::remove_dir_all(&dir);
}

fn find_tool(env_var: &str, candidates: &[PathBuf]) -> Option<PathBuf> {
    if let Some(p) = std::env::var_os(env_var) {
        return Some(PathBuf::from(p));
    }
    candidates.iter().find(|p| p.is_file()).cloned()
}

fn classpath(parts: &[&Path]) -> String {
    std::env::join_paths(parts).unwrap().into_string().unwrap()
}

#[test]
fn jvm_bindings_kotlin_and_jni() {
    if std::env::var_os("UNSEE_SKIP_JVM_TESTS").is_some() {
        eprintln!("UNSEE_SKIP_JVM_TESTS is set: Kotlin and Java binding tests skipped");
        return;
    }
    let repo = repo();
    let kotlin_home = repo.join("tests/tools/node_modules/kotlin-compiler");
    let path_kotlinc = std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).map(|d| d.join("kotlinc")).collect::<Vec<_>>())
        .unwrap_or_default();
    let kotlinc = find_tool("KOTLINC", &[vec![kotlin_home.join("bin/kotlinc")], path_kotlinc].concat())
        .expect("no Kotlin compiler: run tests/setup.sh (npm kotlin-compiler), set KOTLINC, or UNSEE_SKIP_JVM_TESTS=1");
    let lib = kotlinc.parent().unwrap().join("../lib");
    let stdlib = lib.join("kotlin-stdlib.jar");
    let coroutines = lib.join("kotlinx-coroutines-core-jvm.jar");
    let jna = find_tool("JNA_JAR", &[PathBuf::from("/usr/share/java/jna.jar")])
        .expect("no JNA: install Debian's libjna-java (tests/setup.sh), set JNA_JAR, or UNSEE_SKIP_JVM_TESTS=1");
    for p in [&stdlib, &coroutines] {
        assert!(p.is_file(), "{} missing next to {}", p.display(), kotlinc.display());
    }

    let dir = scratch("jvm");
    let (bundle, trusted, other) = signed_bundle(&dir);
    let gen_dir = dir.join("generated");
    generate("kotlin", &gen_dir);
    let native_dir = dir.join("native");
    std::fs::create_dir_all(&native_dir).unwrap();
    std::fs::copy(cdylib(), native_dir.join(cdylib().file_name().unwrap())).unwrap();

    // 1. The JNI classes of the Android library (plain Java, no Android dependency).
    let java_main = repo.join("android/unsee/src/main/java/app/unsee");
    let jni_classes = dir.join("jni-classes");
    run(
        Command::new("javac")
            .args(["-d"])
            .arg(&jni_classes)
            .arg(java_main.join("UnseeNative.java"))
            .arg(java_main.join("UnseeNativeException.java")),
        "javac (JNI classes)",
    );
    // 2. Generated Kotlin bindings + the coroutine wrapper + the Kotlin test, in one jar.
    let kotlin_jar = dir.join("unsee-kotlin.jar");
    let mut sources: Vec<PathBuf> = vec![];
    for root in [gen_dir.clone(), repo.join("android/unsee/src/main/kotlin"), repo.join("bindings/tests/kotlin")] {
        collect(&root, "kt", &mut sources);
    }
    run(
        Command::new(&kotlinc)
            .args(["-no-reflect", "-jvm-target", "17", "-cp"])
            .arg(classpath(&[&jna, &coroutines, &jni_classes]))
            .arg("-d")
            .arg(&kotlin_jar)
            .args(&sources),
        "kotlinc",
    );
    let runtime: [&Path; 5] = [&kotlin_jar, &jni_classes, &stdlib, &coroutines, &jna];
    let runtime_cp = classpath(&runtime);
    let jvm = |main: &str, classes: Option<&Path>| {
        let cp = match classes {
            Some(c) => classpath(&[&[c][..], &runtime[..]].concat()),
            None => runtime_cp.clone(),
        };
        let mut c = Command::new("java");
        c.arg("-cp")
            .arg(cp)
            .arg(format!("-Djna.library.path={}", native_dir.display()))
            .arg(format!("-Djava.library.path={}", native_dir.display()))
            .arg(main)
            .env("UNSEE_REPO", &repo)
            .env("UNSEE_BUNDLE", &bundle)
            .env("UNSEE_BUNDLE_KEY", &trusted)
            .env("UNSEE_OTHER_KEY", &other)
            .env("UNSEE_CACHE_DIR", dir.join("cache"));
        c
    };
    // 3. The Kotlin test: uniffi bindings and the coroutine wrapper, on the JVM through JNA.
    let out = run(&mut jvm("app.unsee.test.KotlinBindingsTestKt", None), "Kotlin test");
    assert!(out.contains("Kotlin bindings test: OK"), "{out}");
    // 4. The Java test: the JNI ByteBuffer path against the uniffi path.
    let java_classes = dir.join("java-test-classes");
    run(
        Command::new("javac")
            .arg("-cp")
            .arg(&runtime_cp)
            .arg("-d")
            .arg(&java_classes)
            .arg(repo.join("bindings/tests/java/JniPathTest.java")),
        "javac (JniPathTest)",
    );
    let out = run(&mut jvm("JniPathTest", Some(&java_classes)), "Java JNI test");
    assert!(out.contains("JNI path test: OK"), "{out}");
    let _ = std::fs::remove_dir_all(&dir);
}

fn collect(dir: &Path, ext: &str, out: &mut Vec<PathBuf>) {
    for e in std::fs::read_dir(dir).unwrap_or_else(|e| panic!("{}: {e}", dir.display())) {
        let p = e.unwrap().path();
        if p.is_dir() {
            collect(&p, ext, out);
        } else if p.extension().is_some_and(|x| x == ext) {
            out.push(p);
        }
    }
}
