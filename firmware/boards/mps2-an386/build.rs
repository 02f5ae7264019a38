//! Puts `memory.x` on the linker's path, and compiles in the trusted public keys named by
//! `KILN_TRUSTED_KEYS` (comma-separated `NAME.pub` files written by `kiln keygen -o NAME`) as
//! `TRUSTED_KEYS` (`$OUT_DIR/keys.rs`).

use kiln_device::keys::parse_public_key;
use kiln_device::update::MAX_BUILT_IN_KEYS;
use std::env;
use std::fmt::Write as _;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

const HINT: &str =
    "set KILN_TRUSTED_KEYS=a.pub,b.pub (paths to public key files) — create keys with `kiln keygen -o NAME`";

fn main() -> ExitCode {
    match run() {
        Ok(()) => ExitCode::SUCCESS,
        Err(message) => {
            // Cargo prints this as its own `error:` line.
            println!("cargo::error={message}");
            ExitCode::FAILURE
        }
    }
}

fn run() -> Result<(), String> {
    let out =
        PathBuf::from(env::var_os("OUT_DIR").ok_or("OUT_DIR is not set (run through cargo)")?);
    fs::copy("memory.x", out.join("memory.x")).map_err(|e| format!("cannot copy memory.x: {e}"))?;
    println!("cargo:rustc-link-search={}", out.display());
    println!("cargo:rustc-link-arg=-Tlink.x");
    println!("cargo:rerun-if-changed=memory.x");
    println!("cargo:rerun-if-env-changed=KILN_TRUSTED_KEYS");

    let list = env::var("KILN_TRUSTED_KEYS").unwrap_or_default();
    let paths: Vec<&str> = list
        .split(',')
        .map(str::trim)
        .filter(|p| !p.is_empty())
        .collect();
    if paths.is_empty() {
        return Err(format!(
            "KILN_TRUSTED_KEYS is not set: the firmware needs at least one trusted key to accept model updates; {HINT}"
        ));
    }
    if paths.len() > MAX_BUILT_IN_KEYS {
        return Err(format!(
            "KILN_TRUSTED_KEYS names {} keys but the firmware holds at most {MAX_BUILT_IN_KEYS}; admit more later with key records (`kiln admit-key`)",
            paths.len()
        ));
    }
    let mut keys = Vec::new();
    for path in paths {
        keys.push(read_key(Path::new(path))?);
    }

    let mut code = String::new();
    let _ = writeln!(
        code,
        "/// Ed25519 public keys compiled in from `KILN_TRUSTED_KEYS` (one per `.pub` file, in order).\n\
         pub static TRUSTED_KEYS: [[u8; 32]; {}] = [",
        keys.len()
    );
    for key in &keys {
        let _ = writeln!(code, "    {key:?},");
    }
    code.push_str("];\n");
    fs::write(out.join("keys.rs"), code).map_err(|e| format!("cannot write keys.rs: {e}"))
}

/// Reads and parses one public key file (a relative path is taken from this crate's folder).
fn read_key(path: &Path) -> Result<[u8; 32], String> {
    println!("cargo:rerun-if-changed={}", path.display());
    let text = fs::read_to_string(path).map_err(|e| {
        format!(
            "KILN_TRUSTED_KEYS: cannot read {}: {e}; {HINT}",
            path.display()
        )
    })?;
    parse_public_key(&text).map_err(|e| {
        format!(
            "KILN_TRUSTED_KEYS: {} is not a public key file ({e}); pass the NAME.pub file, not NAME.key; {HINT}",
            path.display()
        )
    })
}
