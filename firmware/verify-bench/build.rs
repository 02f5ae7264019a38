//! Embeds the signed artifact named by `KILN_VERIFY_MODEL` (16-byte aligned) and the trusted
//! public key named by `KILN_VERIFY_PUBKEY` (a `kiln-ed25519-public <hex>` file from `kiln keygen`).

use std::env;
use std::fs;
use std::path::PathBuf;

fn input(var: &str, what: &str) -> (PathBuf, Vec<u8>) {
    println!("cargo:rerun-if-env-changed={var}");
    let path = env::var_os(var).map(PathBuf::from).unwrap_or_else(|| {
        panic!("{var} is not set: point it at {what} (see scripts/verify-instructions.sh)")
    });
    let path =
        fs::canonicalize(&path).unwrap_or_else(|e| panic!("cannot read {}: {e}", path.display()));
    println!("cargo:rerun-if-changed={}", path.display());
    let bytes = fs::read(&path).unwrap_or_else(|e| panic!("cannot read {}: {e}", path.display()));
    (path, bytes)
}

/// The same rules as `kiln_device::keys::parse_public_key`: the first line that is neither blank
/// nor a `#` comment reads `kiln-ed25519-public` followed by 64 hex digits.
fn parse_public_key(text: &str) -> Option<[u8; 32]> {
    let line = text
        .lines()
        .map(str::trim)
        .find(|l| !l.is_empty() && !l.starts_with('#'))?;
    let mut words = line.split_ascii_whitespace();
    if words.next()? != "kiln-ed25519-public" {
        return None;
    }
    let hex = words.next()?;
    if hex.len() != 64 {
        return None;
    }
    let mut key = [0u8; 32];
    for (i, k) in key.iter_mut().enumerate() {
        *k = u8::from_str_radix(hex.get(2 * i..2 * i + 2)?, 16).ok()?;
    }
    Some(key)
}

fn main() {
    let out = PathBuf::from(env::var_os("OUT_DIR").expect("OUT_DIR"));
    fs::copy("memory.x", out.join("memory.x")).expect("copy memory.x");
    println!("cargo:rustc-link-search={}", out.display());
    println!("cargo:rustc-link-arg=-Tlink.x");
    println!("cargo:rerun-if-changed=memory.x");

    let (model, bytes) = input("KILN_VERIFY_MODEL", "a signed .kiln artifact (`kiln sign`)");
    if bytes.get(..4) != Some(b"KILN".as_slice()) {
        panic!("{} is not a .kiln artifact", model.display());
    }
    let (pubkey, text) = input(
        "KILN_VERIFY_PUBKEY",
        "the NAME.pub file of the signing key (`kiln keygen`)",
    );
    let key = std::str::from_utf8(&text)
        .ok()
        .and_then(parse_public_key)
        .unwrap_or_else(|| {
            panic!(
                "{} is not a `kiln-ed25519-public <64 hex digits>` file",
                pubkey.display()
            )
        });
    let code = format!(
        "/// The signed artifact, 16-byte aligned in flash.\n\
         pub static MODEL: Aligned<[u8; {len}]> = Aligned(*include_bytes!({path:?}));\n\
         /// The trusted Ed25519 public key.\n\
         pub static PUBKEY: [u8; 32] = {key:?};\n",
        len = bytes.len(),
        path = model.display().to_string(),
    );
    fs::write(out.join("model.rs"), code).expect("write model.rs");
}
