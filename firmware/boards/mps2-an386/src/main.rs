//! Kiln firmware for the Arm MPS2 AN386 (Cortex-M4F), run under QEMU `-M mps2-an386`.
//!
//! At boot it mounts the model flash (the upper half of SSRAM1, see [`flash`]), finishes a
//! pending trial (self-test, then confirm or revert) and picks the model to run. Then it serves
//! the update protocol (`docs/UPDATE_PROTOCOL.md`) on UART0: device info, signed model updates
//! into the inactive slot, inference. After a commit it resets itself into the trial boot.
//!
//! UART0 carries only protocol frames. Human-readable lines go to semihosting stdout (QEMU's
//! stdout with `-semihosting-config enable=on,target=native`).
//!
//! Memory: the arena (192 KiB), the receive frame buffer (sized for a 32 KiB inference input),
//! the response and output buffers are statics in RAM; there is no allocator.
#![no_std]
#![no_main]
#![deny(missing_docs)]

mod flash;
mod uart;

/// Keys compiled in by build.rs from `KILN_TRUSTED_KEYS`.
mod keys {
    include!(concat!(env!("OUT_DIR"), "/keys.rs"));
}

use core::panic::PanicInfo;
use cortex_m::peripheral::SCB;
use cortex_m_rt::entry;
use cortex_m_semihosting::{debug, hprintln};
use embedded_io::{Read, Write};
use flash::{ModelFlash, LAYOUT, SLOT_LEN};
use keys::TRUSTED_KEYS;
use kiln_device::frame::FrameDecoder;
use kiln_device::protocol::{max_message_frame_len, ErrorCode, MAX_REQUEST_FRAME_LEN};
use kiln_device::service::{Service, MIN_RESPONSE_BUF};
use kiln_device::state::Event;
use kiln_device::{Config, Device};
use kiln_runtime::interpreter::Arena;
use kiln_runtime::signature::{key_id, KeyIdHex};
use uart::Uart;

/// Prefix of every log line.
const NAME: &str = "kiln-board-mps2-an386";
/// Firmware name and version, as `Info` reports it.
const FIRMWARE: &str = concat!("kiln-board-mps2-an386 ", env!("CARGO_PKG_VERSION"));
/// The board name artifacts are signed for (`kiln sign --target mps2-an386`).
const BOARD: &str = "mps2-an386";

/// The interpreter's arena: the largest `arena_bytes` a model may state.
const ARENA_LEN: usize = 192 * 1024;
/// The largest inference input the receive buffer holds (the 96×96×3 VWW input is 27 648 bytes).
const MAX_INPUT_LEN: usize = 32 * 1024;
/// Receive buffer: an `Infer` of [`MAX_INPUT_LEN`] bytes, and every other request.
const RX_FRAME_LEN: usize = max_message_frame_len(MAX_INPUT_LEN);
/// Inference outputs, at most.
const MAX_OUTPUT_LEN: usize = 4096;
/// Response buffer: an `Info`, or an `InferOk` carrying [`MAX_OUTPUT_LEN`] bytes.
const TX_FRAME_LEN: usize = max(MIN_RESPONSE_BUF, max_message_frame_len(MAX_OUTPUT_LEN));
/// UART0 baud divider (QEMU ignores it; on the FPGA board 25 MHz / 16 ≈ 1.5 Mbaud).
const BAUDDIV: u32 = 16;

const _: () = assert!(RX_FRAME_LEN >= MAX_REQUEST_FRAME_LEN);

const fn max(a: usize, b: usize) -> usize {
    if a > b {
        a
    } else {
        b
    }
}

/// A line on semihosting stdout, prefixed with the firmware's name.
macro_rules! log {
    ($($arg:tt)*) => {
        hprintln!("{}: {}", NAME, format_args!($($arg)*))
    };
}

/// Logs and ends the program (QEMU exits with status 1).
fn fatal(what: &str) -> ! {
    log!("fatal: {}", what);
    debug::exit(debug::EXIT_FAILURE);
    loop {
        cortex_m::asm::wfi();
    }
}

/// The wire error code's name and message for a persisted reason.
fn reason(code: u16) -> (&'static str, &'static str) {
    ErrorCode::from_code(code).map_or(("unknown", "unknown reason"), |c| (c.name(), c.message()))
}

fn log_event(event: Event) {
    match event {
        Event::Installed { version } => {
            log!(
                "installed v{}: its self-test passed; it is now the active model",
                version
            )
        }
        Event::Reverted { version, reason: r } => {
            let (name, message) = reason(r);
            log!("reverted v{} ({}): {}", version, name, message)
        }
        Event::Refused { reason: r } => {
            let (name, message) = reason(r);
            log!("update refused ({}): {}", name, message)
        }
    }
}

fn log_running<F: kiln_device::MappedFlash>(service: &Service<'_, F>) {
    match service.info().active {
        Some(m) => log!(
            "running \"{}\" v{} (slot {}): arena {} of {} bytes, input {} bytes, output {} bytes",
            m.name,
            m.version,
            m.slot,
            m.arena_bytes,
            ARENA_LEN,
            m.input_len,
            m.output_len
        ),
        None => log!("no model yet: flash one with `kiln flash`"),
    }
}

#[entry]
fn main() -> ! {
    let Some(arena) = cortex_m::singleton!(ARENA: Arena<ARENA_LEN> = Arena::new()) else {
        fatal("arena taken twice")
    };
    let arena = arena.as_mut_slice();
    let Some(decoder) =
        cortex_m::singleton!(RX_FRAME: FrameDecoder<RX_FRAME_LEN> = FrameDecoder::new())
    else {
        fatal("receive buffer taken twice")
    };
    let Some(scratch) = cortex_m::singleton!(OUTPUT: [u8; MAX_OUTPUT_LEN] = [0; MAX_OUTPUT_LEN])
    else {
        fatal("output buffer taken twice")
    };
    let Some(out) = cortex_m::singleton!(TX_FRAME: [u8; TX_FRAME_LEN] = [0; TX_FRAME_LEN]) else {
        fatal("response buffer taken twice")
    };
    let Some(mut uart) = Uart::take(BAUDDIV) else {
        fatal("UART0 taken twice")
    };
    let Some(model_flash) = ModelFlash::take() else {
        fatal("model flash taken twice")
    };

    let config = Config {
        board: BOARD,
        keys: &TRUSTED_KEYS,
        max_boots: 3,
        arena_len: ARENA_LEN as u32,
        checkpoint: 16 * 1024,
        require_selftest: true,
    };
    let device = match Device::mount(model_flash, LAYOUT, config) {
        Ok(d) => d,
        Err(e) => {
            log!("cannot mount the model flash: {:?}", e);
            fatal("no model flash")
        }
    };
    // The decoder holds large inference inputs: say so in Info (delimiter included).
    let mut service = Service::new(device, FIRMWARE).with_max_frame((RX_FRAME_LEN + 1) as u32);
    log!(
        "board {}, slots 2 x {} KiB, arena {} KiB, {} trusted key(s)",
        BOARD,
        SLOT_LEN / 1024,
        ARENA_LEN / 1024,
        TRUSTED_KEYS.len()
    );
    for key in &TRUSTED_KEYS {
        log!("trusts key {}", KeyIdHex(&key_id(key)));
    }

    match service.boot(arena) {
        Ok(report) => {
            if let Some(event) = report.trial {
                log_event(event);
            }
        }
        // Only a flash failure; keep serving so the host can still ask what happened.
        Err(e) => log!("boot failed: {}", e),
    }
    log_running(&service);

    let mut last_event = service.device().state().last_event;
    let mut rx = [0u8; 64];
    loop {
        // An overrun lost a byte: the frame it belonged to fails its CRC and is answered with an
        // error, so there is nothing else to do.
        let Ok(n) = uart.read(&mut rx) else { continue };
        let mut input = rx.get(..n).unwrap_or_default();
        while !input.is_empty() {
            let (frame, rest) = decoder.feed_slice(input);
            input = rest;
            let Some(frame) = frame else { continue };
            let reply = service.handle(frame, arena, scratch, out);
            let sent = out.get(..reply.len).unwrap_or_default();
            // Writes wait for room and cannot fail.
            let _ = uart.write_all(sent);
            let _ = uart.flush();

            let event = service.device().state().last_event;
            if event != last_event {
                if let Some(event) = event {
                    log_event(event);
                }
                last_event = event;
            }
            if reply.reset_after {
                match service.device().state().trial {
                    Some(t) => log!(
                        "committed to slot {}: resetting into its trial boot",
                        t.slot
                    ),
                    None => log!("reset requested: resetting"),
                }
                SCB::sys_reset();
            }
        }
    }
}

#[panic_handler]
fn panic(info: &PanicInfo) -> ! {
    log!("panic: {}", info);
    debug::exit(debug::EXIT_FAILURE);
    loop {
        cortex_m::asm::wfi();
    }
}
