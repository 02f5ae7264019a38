//! Verifies an embedded signed artifact on a bare-metal Cortex-M the way a device does before it
//! installs or boots a model: `Container::parse` (structure + SHA-256 of the body) and
//! `Container::verify_signatures` (Ed25519 against the trusted key). Run under QEMU with the
//! instruction-counting plugin (benches/qemu-insn); scripts/verify-instructions.sh drives it.
//!
//! The mode is the last word of the semihosting command line
//! (`-semihosting-config enable=on,target=native,arg=MODE`), so every mode runs the same image:
//!
//! - `base`: touches the artifact and exits (startup, command line and exit cost only);
//! - `structure`: `Container::parse_structure` (header, section table, trailer; no hashing);
//! - `hash`: `Container::parse` (the above plus SHA-256 over the body);
//! - `verify`: `Container::parse` + `verify_signatures` (what the figure reports);
//! - `tampered`: negative control: one bit of the signature flipped must be refused.
//!
//! Exits (semihosting) with status 0 only if the mode's check succeeded, and prints nothing then.
#![no_std]
#![no_main]

use core::hint::black_box;
use core::panic::PanicInfo;
use cortex_m_rt::entry;
use cortex_m_semihosting::{debug, hprintln, nr, syscall1};
use kiln_runtime::format::Container;
use kiln_runtime::signature::verify_ed25519;

/// Keeps the embedded artifact 16-byte aligned.
#[repr(C, align(16))]
pub struct Aligned<T: ?Sized>(T);

include!(concat!(env!("OUT_DIR"), "/model.rs"));

fn finish(ok: bool, what: &str) -> ! {
    if ok {
        debug::exit(debug::EXIT_SUCCESS);
    } else {
        hprintln!("kiln-verify-bench: FAILED: {}", what);
        debug::exit(debug::EXIT_FAILURE);
    }
    loop {
        cortex_m::asm::wfi();
    }
}

/// The last word of the semihosting command line (SYS_GET_CMDLINE), into `buf`.
fn mode(buf: &mut [u8; 128]) -> &[u8] {
    let mut block = [buf.as_mut_ptr() as usize, buf.len()];
    // SAFETY: the host writes at most `block[1]` bytes into `buf` and the length into `block[1]`.
    let status = unsafe { syscall1(nr::GET_CMDLINE, block.as_mut_ptr() as usize) };
    if status != 0 {
        return b"";
    }
    let line = &buf[..block[1].min(buf.len())];
    line.rsplit(|&b| b == b' ').next().unwrap_or(b"")
}

fn parse() -> Container<'static> {
    match Container::parse(black_box(&MODEL.0)) {
        Ok(c) => c,
        Err(e) => {
            hprintln!("kiln-verify-bench: artifact refused: {}", e);
            finish(false, "parse")
        }
    }
}

#[entry]
fn main() -> ! {
    let mut buf = [0u8; 128];
    let trusted = [*black_box(&PUBKEY)];
    match mode(&mut buf) {
        b"base" => {
            let bytes: &[u8] = black_box(&MODEL.0);
            finish(bytes.len() > 4 && bytes[0] == b'K', "base")
        }
        b"structure" => finish(
            Container::parse_structure(black_box(&MODEL.0)).is_ok(),
            "parse_structure",
        ),
        b"hash" => {
            black_box(parse());
            finish(true, "parse")
        }
        b"verify" => match parse().verify_signatures(&trusted) {
            Ok(_) => finish(true, "verify"),
            Err(e) => {
                hprintln!("kiln-verify-bench: signature refused: {}", e);
                finish(false, "verify_signatures")
            }
        },
        b"tampered" => {
            let c = parse();
            let Some(rec) = c.signatures().next() else {
                finish(false, "the artifact is unsigned")
            };
            let mut sig = *rec.signature;
            sig[32] ^= 0x01; // lowest bit of S: still canonical, so the full check runs
            let genuine = verify_ed25519(&trusted[0], c.digest, rec.signature);
            let forged = verify_ed25519(&trusted[0], c.digest, &sig);
            finish(genuine && !forged, "tampered signature accepted")
        }
        _ => {
            hprintln!("kiln-verify-bench: mode (semihosting arg) must be base, structure, hash, verify or tampered");
            finish(false, "mode")
        }
    }
}

#[panic_handler]
fn panic(_: &PanicInfo) -> ! {
    finish(false, "panic")
}
