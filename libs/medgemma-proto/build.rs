//! Compiles `proto/medgemma/**/*.proto` with protox (no `protoc` needed) and generates messages,
//! clients and servers with tonic's prost code generator. Also writes the encoded file
//! descriptor set (with source info, so reflection clients see the comments).

use std::path::{Path, PathBuf};

/// The protos, relative to the proto root. Each must also appear in `src/lib.rs`.
const PROTOS: &[&str] = &[
    "medgemma/tokenizer/v1/tokenizer.proto",
    "medgemma/vision/v1/vision.proto",
    "medgemma/generation/v1/generation.proto",
    "medgemma/gateway/v1/gateway.proto",
];

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let manifest_dir = PathBuf::from(std::env::var("CARGO_MANIFEST_DIR")?);
    let root = manifest_dir.join("../../proto");
    let out_dir = PathBuf::from(std::env::var("OUT_DIR")?);

    println!("cargo:rerun-if-changed=build.rs");
    for proto in PROTOS {
        println!("cargo:rerun-if-changed={}", root.join(proto).display());
    }

    let mut compiler = protox::Compiler::new([&root])?;
    compiler.include_source_info(true).include_imports(true);
    compiler.open_files(PROTOS.iter().map(Path::new))?;
    let fds = compiler.file_descriptor_set();
    std::fs::write(
        out_dir.join("medgemma_descriptor.bin"),
        compiler.encode_file_descriptor_set(),
    )?;

    tonic_prost_build::configure()
        .build_server(true)
        .build_client(true)
        .emit_rerun_if_changed(false)
        .compile_fds(fds)?;
    Ok(())
}
