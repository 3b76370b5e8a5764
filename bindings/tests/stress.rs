//! A bounded stress test of the FFI façade (issue #16): threads calling generate / erase / audit / info / cancel on
//! one engine, and many engines created and dropped concurrently, with hostile requests mixed in. Every call must
//! return (a value or a typed error) — no panic across the boundary, no deadlock (the test has a deadline).

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use unsee_ffi::{CancelToken, DeviceKind, Engine, EngineConfig, GenerateRequest, Precision, Scheduler, UnseeError};

fn tiny() -> String {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../models/tiny-sd").display().to_string()
}

fn config() -> EngineConfig {
    EngineConfig { model_path: Some(tiny()), text_encoder_path: None, erasure_paths: vec![], device: DeviceKind::Cpu,
                   precision: Precision::F32, trusted_keys: vec![], required_concepts: vec![], loras: vec![], low_memory: false }
}

fn request(seed: i64, steps: i32) -> GenerateRequest {
    GenerateRequest { prompt: "a red circle".into(), negative_prompt: String::new(), steps, guidance: 5.0, seed,
                      width: None, height: None, scheduler: Scheduler::Ddim }
}

const SPEC: &str = "method = \"uce\"\n[[erase]]\nconcept = \"red circle\"\nreplace_with = \"blue square\"\n";

#[test]
fn threads_and_engines_under_load_always_return() {
    let deadline = Instant::now() + Duration::from_secs(600);
    let engine = Engine::new(config()).unwrap();
    let want = engine.generate(request(1, 2), None, None).unwrap().rgba;
    let threads: Vec<_> = (0..4)
        .map(|t| {
            let engine = Arc::clone(&engine);
            let want = want.clone();
            std::thread::spawn(move || {
                for i in 0..3 {
                    match (t + i) % 4 {
                        0 => {
                            // Same request, same pixels, whatever runs beside it (erasures may have been applied).
                            let g = engine.generate(request(1, 2), None, None).unwrap();
                            assert_eq!(g.rgba.len(), want.len());
                        }
                        1 => {
                            let cancel = CancelToken::new();
                            cancel.cancel();
                            assert!(matches!(engine.generate(request(2, 2), None, Some(cancel)),
                                             Err(UnseeError::Cancelled(_))));
                        }
                        2 => {
                            let _ = engine.audit(SPEC.into()).unwrap();
                            assert!(matches!(engine.erase("method = \"uce\"\n[[erase]]\nconcept = \"\"\n".into(), None),
                                             Err(UnseeError::InvalidRequest(_))));
                        }
                        _ => {
                            let bad = [request(3, 0), request(3, -1), request(3, 100_000),
                                       GenerateRequest { width: Some(1 << 30), ..request(3, 2) },
                                       GenerateRequest { guidance: f64::NAN, ..request(3, 2) }];
                            for b in bad {
                                assert!(matches!(engine.generate(b, None, None), Err(UnseeError::InvalidRequest(_))));
                            }
                            let _ = engine.info().unwrap();
                        }
                    }
                }
            })
        })
        .collect();
    // Many engines at once, created and dropped on other threads, some with hostile paths.
    let makers: Vec<_> = (0..6)
        .map(|k| {
            std::thread::spawn(move || {
                let cfg = if k % 3 == 0 {
                    EngineConfig { erasure_paths: vec!["/nonexistent.safetensors".into()], ..config() }
                } else {
                    config()
                };
                match Engine::new(cfg) {
                    Ok(e) => {
                        let _ = e.clone().jni_handle();
                        e.generate(request(k, 1), None, None).map(|_| ()).unwrap();
                    }
                    Err(e) => assert!(k % 3 == 0, "engine {k}: {e}"),
                }
            })
        })
        .collect();
    for h in threads.into_iter().chain(makers) {
        h.join().expect("a thread panicked");
    }
    assert!(Instant::now() < deadline, "the stress test took longer than its deadline");
}

fn rss_mib() -> f64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    let kb: f64 = status.lines().find(|l| l.starts_with("VmRSS:")).unwrap().split_whitespace().nth(1).unwrap()
        .parse().unwrap();
    kb / 1024.0
}

/// A leak check for the façade (Linux: resident memory from /proc): engines created, used (generate, erase,
/// audit, a cancelled call, hostile requests, a JNI handle) and dropped in a loop must not grow the process once
/// warm. One leaked tiny engine holds two copies of the model (base and in use), so 20 leaked cycles would add
/// well over the bound.
#[test]
fn engines_and_calls_in_a_loop_do_not_leak() {
    let model_mib = ["text_encoder", "unet", "vae"].iter().map(|c| {
        let dir = PathBuf::from(tiny()).join(c);
        std::fs::read_dir(dir).unwrap().map(|e| e.unwrap().metadata().unwrap().len()).sum::<u64>()
    }).sum::<u64>() as f64 / (1 << 20) as f64;
    let cycle = || {
        let engine = Engine::new(config()).unwrap();
        engine.generate(request(1, 2), None, None).unwrap();
        let cancel = CancelToken::new();
        cancel.cancel();
        assert!(engine.generate(request(2, 2), None, Some(cancel)).is_err());
        assert!(engine.generate(GenerateRequest { width: Some(1 << 30), ..request(3, 2) }, None, None).is_err());
        engine.erase(SPEC.into(), None).unwrap();
        let _ = engine.info().unwrap();
        let _ = Arc::clone(&engine).jni_handle();
    };
    for _ in 0..10 {
        cycle();
    }
    let before = rss_mib();
    const CYCLES: usize = 20;
    for _ in 0..CYCLES {
        cycle();
    }
    let grown = rss_mib() - before;
    eprintln!("RSS grew {grown:.1} MiB over {CYCLES} cycles (model files: {model_mib:.1} MiB)");
    assert!(grown < model_mib * CYCLES as f64 / 2.0 && grown < 64.0,
            "resident memory grew {grown:.1} MiB over {CYCLES} engine cycles: a leak");
}
