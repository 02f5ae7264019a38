//! Embeds the artifact named by `KILN_BENCH_MODEL` and the golden samples named by
//! `KILN_BENCH_INPUT` / `KILN_BENCH_OUTPUT` (raw int8 bytes: `KILN_BENCH_SAMPLES` inputs and their
//! TFLM outputs, back to back), and sizes the static arena from the artifact header.

use std::env;
use std::fs;
use std::path::{Path, PathBuf};

fn read(var: &str) -> (PathBuf, Vec<u8>) {
    println!("cargo:rerun-if-env-changed={var}");
    let path = match env::var(var) {
        Ok(p) => PathBuf::from(p),
        Err(_) => panic!(
            "{var} is not set: scripts/bench-m4.sh sets it (see firmware/bench-m4/README.md)"
        ),
    };
    let path =
        fs::canonicalize(&path).unwrap_or_else(|e| panic!("cannot read {}: {e}", path.display()));
    println!("cargo:rerun-if-changed={}", path.display());
    let bytes = fs::read(&path).unwrap_or_else(|e| panic!("cannot read {}: {e}", path.display()));
    (path, bytes)
}

fn include(name: &str, path: &Path, len: usize) -> String {
    format!(
        "pub static {name}: Aligned<[u8; {len}]> = Aligned(*include_bytes!({p:?}));\n",
        p = path.display().to_string()
    )
}

fn main() {
    let out = PathBuf::from(env::var_os("OUT_DIR").expect("OUT_DIR"));
    fs::copy("memory.x", out.join("memory.x")).expect("copy memory.x");
    println!("cargo:rustc-link-search={}", out.display());
    println!("cargo:rustc-link-arg=-Tlink.x");
    println!("cargo:rerun-if-changed=memory.x");
    println!("cargo:rerun-if-env-changed=KILN_BENCH_SAMPLES");
    let (model, bytes) = read("KILN_BENCH_MODEL");
    let (input, input_bytes) = read("KILN_BENCH_INPUT");
    let (output, output_bytes) = read("KILN_BENCH_OUTPUT");
    let samples: usize = env::var("KILN_BENCH_SAMPLES")
        .ok()
        .map(|s| {
            s.parse()
                .unwrap_or_else(|_| panic!("KILN_BENCH_SAMPLES={s} is not a count"))
        })
        .unwrap_or(1);
    assert!(samples >= 1, "KILN_BENCH_SAMPLES must be at least 1");
    assert!(
        input_bytes.len() % samples == 0 && output_bytes.len() % samples == 0,
        "KILN_BENCH_INPUT / KILN_BENCH_OUTPUT do not hold {samples} samples"
    );
    let header = bytes
        .get(..32)
        .unwrap_or_else(|| panic!("{} is too short to be an artifact", model.display()));
    let arena = u32::from_le_bytes([header[24], header[25], header[26], header[27]]);
    let mut code = format!(
        "/// Arena bytes stated by the artifact header.\npub const ARENA_BYTES: usize = {arena};\n\
         /// Golden samples embedded.\npub const SAMPLES: usize = {samples};\n"
    );
    code += &include("MODEL", &model, bytes.len());
    code += &include("INPUTS", &input, input_bytes.len());
    code += &include("OUTPUTS", &output, output_bytes.len());
    fs::write(out.join("model.rs"), code).expect("write model.rs");
}
