//! Runs inferences of an embedded artifact on TFLM's golden inputs on a bare-metal Cortex-M, for
//! counting guest instructions and stack under QEMU (scripts/bench-m4.sh drives it).
//!
//! The mode is the last word of the semihosting command line
//! (`-semihosting-config enable=on,target=native,arg=MODE`), so every mode runs the same image:
//!
//! - `base`: loads the model, builds the interpreter, sets the first golden input, exits;
//! - `infer`: the same plus one `invoke` and a byte comparison with TFLM's output for that
//!   input: `infer - base` instructions is one inference;
//! - `check`: paints the stack below `main`'s frame, runs every embedded sample, compares each
//!   output with TFLM's byte for byte, then prints `stack_bytes` (the deepest painted word that
//!   inference overwrote) and `samples`.
//!
//! Exits (semihosting) with status 0 only when every output it compared was bit-exact.
#![no_std]
#![no_main]

use core::hint::black_box;
use core::panic::PanicInfo;
use cortex_m_rt::entry;
use cortex_m_semihosting::{debug, hprintln, nr, syscall1};
use kiln_runtime::interpreter::{Arena, Interpreter};
use kiln_runtime::model::Model;

/// Keeps the embedded artifact and samples 16-byte aligned.
#[repr(C, align(16))]
pub struct Aligned<T: ?Sized>(T);

include!(concat!(env!("OUT_DIR"), "/model.rs"));

static mut ARENA: Arena<ARENA_BYTES> = Arena::new();

/// Stack painting: the window below `main`'s frame that is filled with [`PATTERN`] before the
/// inferences, and the gap left above it for `paint`'s own frame.
const WINDOW: usize = 64 * 1024;
const MARGIN: usize = 256;
const PATTERN: u32 = 0xDEAD_BEEF;

extern "C" {
    /// End of `.bss` (cortex-m-rt's linker script): no heap here, so RAM from this address up to
    /// the stack pointer belongs to no object.
    static __sheap: u32;
}

fn finish(ok: bool, what: &str) -> ! {
    if ok {
        debug::exit(debug::EXIT_SUCCESS);
    } else {
        hprintln!("kiln-bench-m4: FAILED: {}", what);
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

/// Fills the words of `[lo, hi)` with [`PATTERN`].
///
/// # Safety
/// `[lo, hi)` must be word-aligned RAM that no Rust object occupies and that no frame uses while
/// this runs: unused stack below the caller's frame, at least [`MARGIN`] bytes below it.
#[inline(never)]
unsafe fn paint(lo: usize, hi: usize) {
    let mut a = lo;
    while a < hi {
        // SAFETY: `a` is word-aligned and inside the caller-guaranteed free range.
        unsafe { core::ptr::write_volatile(a as *mut u32, PATTERN) };
        a += 4;
    }
}

/// The lowest word of `[lo, hi)` that no longer holds [`PATTERN`] (`hi` when none).
///
/// # Safety
/// As for [`paint`]: the range was painted and is still free RAM (reading it races nothing).
#[inline(never)]
unsafe fn lowest_touched(lo: usize, hi: usize) -> usize {
    let mut a = lo;
    while a < hi {
        // SAFETY: `a` is word-aligned inside the free range.
        if unsafe { core::ptr::read_volatile(a as *const u32) } != PATTERN {
            return a;
        }
        a += 4;
    }
    hi
}

#[entry]
fn main() -> ! {
    let mut buf = [0u8; 128];
    let mode = mode(&mut buf);
    let arena = cortex_m::singleton!(: &'static mut Arena<ARENA_BYTES> = unsafe { &mut *core::ptr::addr_of_mut!(ARENA) })
        .unwrap_or_else(|| finish(false, "arena taken twice"));
    let model = match Model::load(black_box(&MODEL.0)) {
        Ok(m) => m,
        Err(e) => {
            hprintln!("kiln-bench-m4: model refused: {}", e);
            finish(false, "load")
        }
    };
    let mut interp = match Interpreter::new(model, arena.as_mut_slice()) {
        Ok(i) => i,
        Err(e) => {
            hprintln!("kiln-bench-m4: {}", e);
            finish(false, "arena")
        }
    };
    let in_len = INPUTS.0.len() / SAMPLES;
    let out_len = OUTPUTS.0.len() / SAMPLES;
    let mut run = |s: usize, invoke: bool| -> bool {
        let src = &INPUTS.0[s * in_len..][..in_len];
        match interp.input_bytes_mut(0) {
            Ok(dst) if dst.len() == src.len() => dst.copy_from_slice(src),
            _ => finish(false, "input size differs from the model's"),
        }
        if !invoke {
            return true;
        }
        if let Err(e) = interp.invoke() {
            hprintln!("kiln-bench-m4: {}", e);
            finish(false, "invoke");
        }
        matches!(interp.output_bytes(0), Ok(out) if out == &OUTPUTS.0[s * out_len..][..out_len])
    };
    match mode {
        b"base" => finish(run(0, false), "base"),
        b"infer" => finish(run(0, true), "output differs from TFLM's"),
        b"check" => {
            let top = cortex_m::register::msp::read() as usize - MARGIN;
            // Taking the address of a linker symbol reads nothing.
            let heap = core::ptr::addr_of!(__sheap) as usize;
            let lo = top.saturating_sub(WINDOW).max((heap + 3) & !3);
            let top = top & !3;
            // SAFETY: [lo, top) lies between the end of .bss and MARGIN bytes below main's frame:
            // free stack that only callees of main will claim (there are no interrupts here).
            unsafe { paint(lo, top) };
            let mut exact = 0;
            for s in 0..SAMPLES {
                exact += usize::from(run(s, true));
            }
            // SAFETY: the same free range, painted above.
            let low = unsafe { lowest_touched(lo, top) };
            if low == lo {
                finish(
                    false,
                    "stack window too small: the inference used all of it",
                );
            }
            hprintln!(
                "samples: {} of {} bit-exact\nstack_bytes: {}\narena_bytes: {}",
                exact,
                SAMPLES,
                top + MARGIN - low,
                ARENA_BYTES
            );
            finish(exact == SAMPLES, "output differs from TFLM's")
        }
        _ => finish(false, "mode: base | infer | check"),
    }
}

#[panic_handler]
fn panic(_: &PanicInfo) -> ! {
    finish(false, "panic")
}
