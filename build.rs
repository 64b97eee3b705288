//! Sets `cfg(fixedpc_dsp)` on targets whose cores all have the Arm DSP extension, so that the
//! kernels use `SMLAD`-family instructions there.
//!
//! `cfg(target_feature = "dsp")` would be the direct test, but stable Rust (1.95) sets no Arm
//! target-feature cfgs, so the target name decides: every `thumbv7em` core (Cortex-M4 and
//! Cortex-M7) has the DSP extension, while on `thumbv8m.main` (Cortex-M33 and others) it is
//! optional and is left out.

fn main() {
    println!("cargo::rustc-check-cfg=cfg(fixedpc_dsp)");
    println!("cargo::rerun-if-changed=build.rs");
    let target = std::env::var("TARGET").unwrap_or_default();
    if target.starts_with("thumbv7em") {
        println!("cargo::rustc-cfg=fixedpc_dsp");
    }
}
