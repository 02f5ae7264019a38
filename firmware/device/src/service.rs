//! The device's request loop, independent of the transport: one decoded frame in, one encoded
//! response frame out. Boards (UART), the Linux agent and host-side simulators all run this.
//!
//! Nothing a frame contains can make the service panic, hang or reset: garbage, truncated,
//! unknown and out-of-order frames get an error frame back and the model in service is untouched.
//! The only resets are the ones the protocol asks for: after `Commit` (the trial boot) and
//! `Reset`.

use crate::flash::MappedFlash;
use crate::frame::FrameResult;
use crate::protocol::{
    decode_request, encode_response, DeviceInfo, ErrorCode, Event as WireEvent, ModelInfo, Request,
    Response, SlotInfo, SlotState, MAX_CHUNK, MAX_REQUEST_FRAME_LEN, PROTOCOL_VERSION, SEQ_UNKNOWN,
};
use crate::state::{Event, SlotStatus};
use crate::update::{BootReport, Device, UpdateError};
use kiln_runtime::format::Container;
use kiln_runtime::model::tensor_bytes;
use kiln_runtime::sections::Manifest;
use kiln_runtime::signature::SignatureError;
use kiln_runtime::Model;

/// A response frame never needs more than this (an `Info` with full names, or an error).
pub const MIN_RESPONSE_BUF: usize = crate::protocol::MAX_INFO_FRAME_LEN;

/// What to do after sending a reply.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Reply {
    /// Length of the encoded response frame at the start of the output buffer.
    pub len: usize,
    /// Reset the device once the reply is sent (after `Commit` and `Reset`).
    pub reset_after: bool,
}

/// The request loop's state: the device and the firmware's name.
pub struct Service<'k, F: MappedFlash> {
    device: Device<'k, F>,
    firmware: &'k str,
    max_frame: u32,
    clock: Option<fn() -> u32>,
}

impl UpdateError {
    /// The wire error code and its detail value.
    pub fn wire(&self) -> (ErrorCode, u32) {
        match *self {
            UpdateError::TooLarge { max } => (ErrorCode::TooLarge, max),
            UpdateError::NoUpdateInProgress => (ErrorCode::NoUpdateInProgress, 0),
            UpdateError::OffsetMismatch { expected } => (ErrorCode::OffsetMismatch, expected),
            UpdateError::Incomplete { received, .. } => (ErrorCode::Incomplete, received),
            UpdateError::DigestMismatch => (ErrorCode::DigestMismatch, 0),
            UpdateError::Malformed(_) => (ErrorCode::Malformed, 0),
            UpdateError::Signature(SignatureError::Unsigned) => (ErrorCode::Unsigned, 0),
            UpdateError::Signature(SignatureError::UntrustedKey { .. }) => {
                (ErrorCode::UntrustedKey, 0)
            }
            UpdateError::Signature(SignatureError::BadSignature { .. }) => {
                (ErrorCode::BadSignature, 0)
            }
            UpdateError::Downgrade { active, .. } => (ErrorCode::Downgrade, active),
            UpdateError::CounterRollback { min, .. } => (ErrorCode::CounterRollback, min),
            UpdateError::WrongBoard => (ErrorCode::WrongBoard, 0),
            UpdateError::ArenaTooSmall { needs, .. } => (ErrorCode::WrongBoard, needs),
            UpdateError::NoSelfTest => (ErrorCode::SelfTestFailed, 0),
            UpdateError::SelfTestFailed { failed, .. } => {
                (ErrorCode::SelfTestFailed, u32::from(failed))
            }
            UpdateError::TooManyBoots => (ErrorCode::SelfTestFailed, 0),
            UpdateError::Busy => (ErrorCode::Busy, 0),
            UpdateError::Flash(_) => (ErrorCode::FlashError, 0),
            UpdateError::Key(_) => (ErrorCode::BadKeyRecord, 0),
            UpdateError::NoModel => (ErrorCode::NoModel, 0),
            UpdateError::BadInputLength { expected } => (ErrorCode::BadInputLength, expected),
            UpdateError::OutputTooSmall { needs } => (ErrorCode::InferenceFailed, needs),
            UpdateError::Inference(_) => (ErrorCode::InferenceFailed, 0),
        }
    }

    /// The stable numeric code (the wire [`ErrorCode`] value), as persisted in events.
    pub fn code(&self) -> u16 {
        self.wire().0.code()
    }
}

fn wire_event(e: Event) -> WireEvent {
    let code = |c: u16| ErrorCode::from_code(c).unwrap_or(ErrorCode::Malformed);
    match e {
        Event::Installed { version } => WireEvent::Installed { version },
        Event::Reverted { version, reason } => WireEvent::Reverted {
            version,
            reason: code(reason),
        },
        Event::Refused { reason } => WireEvent::Refused {
            reason: code(reason),
        },
    }
}

/// Name, arena and I/O sizes of a verified model.
fn model_info<'b>(bytes: &'b [u8], slot: u8) -> Option<ModelInfo<'b>> {
    let model = Model::from_container(Container::parse_structure(bytes).ok()?).ok()?;
    let h = model.container().header;
    let io_len = |ids: &[u16]| -> u32 {
        ids.iter()
            .filter_map(|&i| model.tensor(i).ok())
            .map(|t| tensor_bytes(&t) as u32)
            .sum()
    };
    let name = Manifest::of(&model)
        .ok()
        .flatten()
        .map_or("", |m| crate::protocol::fit_name(m.name));
    Some(ModelInfo {
        slot,
        version: h.model_version,
        security_counter: h.security_counter,
        name,
        arena_bytes: h.arena_bytes,
        input_len: io_len(model.inputs()),
        output_len: io_len(model.outputs()),
    })
}

impl<'k, F: MappedFlash> Service<'k, F> {
    /// Wraps a mounted device. `firmware` names the firmware and its version (for `Info`).
    pub fn new(device: Device<'k, F>, firmware: &'k str) -> Self {
        Service {
            device,
            firmware,
            max_frame: MAX_REQUEST_FRAME_LEN as u32,
            clock: None,
        }
    }

    /// Advertises a larger request frame (delimiter included) than the default
    /// [`MAX_REQUEST_FRAME_LEN`]: boards whose frame decoder holds large inference inputs.
    pub fn with_max_frame(mut self, bytes: u32) -> Self {
        self.max_frame = bytes.max(MAX_REQUEST_FRAME_LEN as u32);
        self
    }

    /// A free-running cycle (or tick) counter; `InferOk::cycles` reports the difference around
    /// the inference (wrapping). Without one it reports 0.
    pub fn with_cycle_counter(mut self, clock: fn() -> u32) -> Self {
        self.clock = Some(clock);
        self
    }

    /// The device.
    pub fn device(&self) -> &Device<'k, F> {
        &self.device
    }

    /// Gives the device back.
    pub fn into_device(self) -> Device<'k, F> {
        self.device
    }

    /// Boots the device (see [`Device::boot`]).
    ///
    /// # Errors
    /// Flash failures.
    pub fn boot(&mut self, arena: &mut [u8]) -> Result<BootReport, UpdateError> {
        self.device.boot(arena)
    }

    /// What the device reports about itself.
    pub fn info(&self) -> DeviceInfo<'_> {
        let d = &self.device;
        let s = d.state();
        let running = d.running();
        let active = running.and_then(|r| model_info(d.running_model()?, r.slot));
        let mut slots = [SlotInfo {
            state: SlotState::Empty,
            version: 0,
            security_counter: 0,
            len: 0,
        }; 2];
        for (i, info) in slots.iter_mut().enumerate() {
            if let Some(m) = s.slots[i] {
                info.version = m.version;
                info.security_counter = m.counter;
                info.len = m.len;
                info.state = match m.status {
                    SlotStatus::Trial => SlotState::Ready,
                    SlotStatus::Active => SlotState::Active,
                    SlotStatus::Previous => SlotState::Previous,
                    SlotStatus::Invalid => SlotState::Invalid,
                };
            }
            if let Some(r) = s.receiving.filter(|r| r.slot as usize == i) {
                let (received, total) = d.receive_progress().unwrap_or((r.good, r.total));
                info.state = SlotState::Receiving { received, total };
                info.len = total;
            }
        }
        DeviceInfo {
            protocol: PROTOCOL_VERSION,
            board: crate::protocol::fit_name(d.config().board),
            firmware: crate::protocol::fit_name(self.firmware),
            active,
            slots,
            security_counter: s.min_counter,
            max_artifact_len: d.max_artifact_len(),
            max_frame: self.max_frame,
            max_chunk: MAX_CHUNK as u16,
            trusted_keys: d.key_ring().len() as u8,
            last_event: s.last_event.map(wire_event),
        }
    }

    /// Handles one frame from the transport: `frame` as the [`crate::frame::FrameDecoder`]
    /// yielded it. Writes the response frame to `out` (at least [`MIN_RESPONSE_BUF`] bytes, and
    /// enough for the largest inference output) and says whether to reset after sending it.
    /// `arena` is the interpreter's arena; `scratch` receives inference outputs.
    pub fn handle(
        &mut self,
        frame: FrameResult<'_>,
        arena: &mut [u8],
        scratch: &mut [u8],
        out: &mut [u8],
    ) -> Reply {
        let payload = match frame {
            Ok(p) => p,
            Err(e) => return error_reply(SEQ_UNKNOWN, ErrorCode::from(e), 0, out),
        };
        let (seq, request) = match decode_request(payload) {
            Ok(r) => r,
            Err(e) => {
                return error_reply(e.seq.unwrap_or(SEQ_UNKNOWN), e.code, e.detail, out);
            }
        };
        let mut reset_after = false;
        let result: Result<Response<'_>, UpdateError> = match request {
            Request::Info => {
                let info = self.info();
                return finish(seq, &Response::Info(info), false, out);
            }
            Request::Begin { total_len, digest } => {
                self.device
                    .begin(total_len, digest)
                    .map(|resume_from| Response::BeginOk {
                        resume_from,
                        max_chunk: MAX_CHUNK as u16,
                    })
            }
            Request::Chunk { offset, data } => self
                .device
                .chunk(offset, data)
                .map(|next| Response::ChunkOk { next }),
            Request::Commit => self.device.commit().map(|r| {
                reset_after = true;
                Response::Committed {
                    version: r.version,
                    slot: r.slot,
                }
            }),
            Request::InstallKeyRecord { record } => {
                self.device
                    .apply_key_record(record)
                    .map(|n| Response::KeyRecordOk {
                        trusted_keys: n as u8,
                    })
            }
            Request::Infer { input } => {
                self.device
                    .infer(arena, input, scratch)
                    .map(|n| Response::InferOk {
                        output: &scratch[..n],
                        cycles: 0,
                    })
            }
            Request::Reset => {
                reset_after = true;
                Ok(Response::Ok)
            }
        };
        match result {
            Ok(response) => finish(seq, &response, reset_after, out),
            Err(e) => {
                let (code, detail) = e.wire();
                error_reply(seq, code, detail, out)
            }
        }
    }
}

fn finish(seq: u16, response: &Response<'_>, reset_after: bool, out: &mut [u8]) -> Reply {
    match encode_response(seq, response, out) {
        Ok(frame) => Reply {
            len: frame.len(),
            reset_after,
        },
        Err(code) => error_reply(seq, code, out.len() as u32, out),
    }
}

fn error_reply(seq: u16, code: ErrorCode, detail: u32, out: &mut [u8]) -> Reply {
    let len = encode_response(seq, &Response::Error { code, detail }, out)
        .map(<[u8]>::len)
        .unwrap_or(0);
    Reply {
        len,
        reset_after: false,
    }
}
