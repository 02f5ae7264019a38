//! Embeds the artifact named by `KILN_CHECK_MODEL` and sizes the static arena from its header.

use std::env;
use std::fs;
use std::path::PathBuf;

fn main() {
    let out = PathBuf::from(env::var_os("OUT_DIR").expect("OUT_DIR"));
    fs::copy("memory.x", out.join("memory.x")).expect("copy memory.x");
    println!("cargo:rustc-link-search={}", out.display());
    println!("cargo:rustc-link-arg=-Tlink.x");
    println!("cargo:rerun-if-changed=memory.x");
    println!("cargo:rerun-if-env-changed=KILN_CHECK_MODEL");
    let model = match env::var("KILN_CHECK_MODEL") {
        Ok(p) => PathBuf::from(p),
        Err(_) => panic!(
            "KILN_CHECK_MODEL is not set: point it at a .kiln artifact with SELFTEST vectors, e.g. \
             `kiln convert kws_ref_model.tflite -o kws.kiln --selftest golden.npz` (see firmware/runtime-check/README.md)"
        ),
    };
    let model = fs::canonicalize(&model).unwrap_or_else(|e| panic!("cannot read {}: {e}", model.display()));
    println!("cargo:rerun-if-changed={}", model.display());
    let bytes = fs::read(&model).unwrap_or_else(|e| panic!("cannot read {}: {e}", model.display()));
    let header = bytes.get(..32).unwrap_or_else(|| panic!("{} is too short to be an artifact", model.display()));
    let arena = u32::from_le_bytes([header[24], header[25], header[26], header[27]]);
    let code = format!(
        "/// Arena bytes stated by the artifact header.\npub const ARENA_BYTES: usize = {arena};\n\
         /// The artifact, 16-byte aligned in flash.\npub static MODEL: Aligned<[u8; {len}]> = Aligned(*include_bytes!({path:?}));\n",
        len = bytes.len(),
        path = model.display().to_string(),
    );
    fs::write(out.join("model.rs"), code).expect("write model.rs");
}
