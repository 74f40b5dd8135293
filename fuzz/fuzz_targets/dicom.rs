//! libFuzzer driver of `bodies/dicom.rs` (its doc says what is checked); `scripts/fuzz.sh`
//! runs it, and CI runs the same body over the seeds and their mutations
//! (`services/medgemma-suite/tests/fuzz_bodies.rs`).
#![no_main]

#[path = "../bodies/dicom.rs"]
mod body;

libfuzzer_sys::fuzz_target!(|data: &[u8]| body::run(data));
