#![no_main]

// unsee catches panics of the `tokenizers` crate on malformed files (see `ClipTokenizer::from_dir`), so a caught
// panic is not a crash here: print it instead of libfuzzer-sys's abort-in-the-hook. A panic that escapes the
// harness still aborts (libfuzzer-sys checks the call with `catch_unwind`).
static QUIET: std::sync::Once = std::sync::Once::new();

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    QUIET.call_once(|| std::panic::set_hook(Box::new(|info| eprintln!("caught: {info}"))));
    unsee_fuzz::harness::tokenizer(data)
});
