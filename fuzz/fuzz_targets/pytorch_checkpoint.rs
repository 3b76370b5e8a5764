#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| unsee_fuzz::harness::pytorch_checkpoint(data));
