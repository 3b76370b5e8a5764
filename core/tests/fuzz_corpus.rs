//! Replays every committed fuzz corpus (`fuzz/corpus/<target>/`: seeds and the inputs of past crashes) through
//! the fuzz targets' harnesses, so CI keeps every fixed crash fixed without a nightly toolchain. The long fuzzing
//! runs are `cargo +nightly fuzz run <target>` (README, "Fuzzing").

#[path = "../../fuzz/src/harness.rs"]
mod harness;

#[test]
fn every_corpus_input_returns() {
    let corpus = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../fuzz/corpus");
    let mut total = 0;
    for (name, target) in harness::TARGETS {
        let dir = corpus.join(name);
        let mut inputs: Vec<_> = std::fs::read_dir(&dir).unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
            .map(|e| e.unwrap().path())
            .collect();
        inputs.sort();
        assert!(!inputs.is_empty(), "{name}: empty corpus");
        for input in inputs {
            let data = std::fs::read(&input).unwrap();
            target(&data);
            total += 1;
        }
    }
    eprintln!("{total} corpus inputs replayed");
}
