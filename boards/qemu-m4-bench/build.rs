//! Puts `memory.x` on the linker search path.

use std::env;
use std::fs;
use std::path::PathBuf;

fn main() {
    let out_dir = PathBuf::from(
        env::var_os("OUT_DIR").expect("OUT_DIR is not set; run this build script through cargo"),
    );
    fs::write(out_dir.join("memory.x"), include_bytes!("memory.x"))
        .expect("failed to write memory.x to OUT_DIR");
    println!("cargo::rustc-link-search={}", out_dir.display());
    println!("cargo::rerun-if-changed=memory.x");
    println!("cargo::rerun-if-changed=build.rs");
}
