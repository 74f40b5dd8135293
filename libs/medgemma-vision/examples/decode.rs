//! Decodes image files and prints their size and the time taken (never pixel values):
//! `cargo run --release -p medgemma-vision --example decode -- FILE...`

use std::time::Instant;

use medgemma_vision::{DecodeOptions, decode_image};

fn main() {
    for path in std::env::args().skip(1) {
        let bytes = match std::fs::read(&path) {
            Ok(b) => b,
            Err(e) => {
                println!("{path}: {e}");
                continue;
            }
        };
        let start = Instant::now();
        match decode_image(&bytes, &DecodeOptions::default()) {
            Ok(img) => println!(
                "{path}: {}x{} in {:.1} ms",
                img.width(),
                img.height(),
                start.elapsed().as_secs_f64() * 1e3
            ),
            Err(e) => println!(
                "{path}: error after {:.1} ms: {e}",
                start.elapsed().as_secs_f64() * 1e3
            ),
        }
    }
}
