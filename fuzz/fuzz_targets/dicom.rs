//! libFuzzer driver of `bodies/dicom.rs` (its doc says what is checked); `scripts/fuzz.sh`
//! runs it, and CI runs the same body over the seeds and their mutations
//! (`services/medgemma-suite/tests/fuzz_bodies.rs`).
#![no_main]

#[path = "../bodies/dicom.rs"]
mod body;

// A panic inside a decoder (dicom-rs, openjp2, image) is caught by `decode_image`'s guard
// and returned as an error, as in the services: that is the contract checked here, so caught
// panics stay quiet (libfuzzer-sys's hook would abort on them). One that escapes the guard
// still aborts the run (libfuzzer-sys's `catch_unwind`); replay the input with
// `cargo test -p medgemma-suite --test fuzz_bodies` to see its message.
libfuzzer_sys::fuzz_target!(
    init: std::panic::set_hook(Box::new(|_| {})),
    |data: &[u8]| body::run(data)
);
