//! Runs the SELFTEST vectors of an embedded artifact on a bare-metal Cortex-M with kiln-runtime:
//! no allocator exists in this image, so it links only if the runtime never allocates. Exits
//! (through semihosting) with status 0 when every vector matches bit for bit.
#![no_std]
#![no_main]

use core::panic::PanicInfo;
use cortex_m_rt::entry;
use cortex_m_semihosting::{debug, hprintln};
use kiln_runtime::interpreter::{Arena, Interpreter};
use kiln_runtime::model::Model;
use kiln_runtime::sections::run_self_test;

/// Keeps the embedded artifact 16-byte aligned.
#[repr(C, align(16))]
pub struct Aligned<T: ?Sized>(T);

include!(concat!(env!("OUT_DIR"), "/model.rs"));

static mut ARENA: Arena<ARENA_BYTES> = Arena::new();

fn fail(what: &str) -> ! {
    hprintln!("kiln-runtime-check: FAILED: {}", what);
    debug::exit(debug::EXIT_FAILURE);
    loop {}
}

#[entry]
fn main() -> ! {
    // SAFETY-free access: the arena is taken exactly once, here, before anything else runs.
    let arena = cortex_m::singleton!(: &'static mut Arena<ARENA_BYTES> = unsafe { &mut *core::ptr::addr_of_mut!(ARENA) })
        .unwrap_or_else(|| fail("arena taken twice"));
    let model = match Model::load(&MODEL.0) {
        Ok(m) => m,
        Err(e) => {
            hprintln!("kiln-runtime-check: model refused: {}", e);
            fail("load")
        }
    };
    let mut interp = match Interpreter::new(model, arena.as_mut_slice()) {
        Ok(i) => i,
        Err(e) => {
            hprintln!("kiln-runtime-check: {}", e);
            fail("arena")
        }
    };
    match run_self_test(&mut interp) {
        Ok(r) if r.failed == 0 && r.passed > 0 => {
            hprintln!(
                "kiln-runtime-check: {} of {} self-tests bit-exact, arena {} bytes, model {} bytes",
                r.passed,
                r.passed,
                ARENA_BYTES,
                MODEL.0.len()
            );
            debug::exit(debug::EXIT_SUCCESS);
        }
        Ok(r) => {
            hprintln!("kiln-runtime-check: {} passed, {} failed", r.passed, r.failed);
            fail("self-test mismatch")
        }
        Err(e) => {
            hprintln!("kiln-runtime-check: {}", e);
            fail("self-test error")
        }
    }
    loop {}
}

#[panic_handler]
fn panic(_: &PanicInfo) -> ! {
    fail("panic")
}
