//! The update wire protocol: the messages a host (`kiln flash`, `kiln device-info`,
//! `kiln infer`) and a device exchange over a serial line, and their encoding.
//!
//! Each message travels in one frame of [`crate::frame`] (COBS, a CRC-32, a `0x00` delimiter). The
//! frame's payload is postcard:
//!
//! ```text
//! payload = header ‖ message
//! header  = protocol: u16 (varint) ‖ seq: u16 (varint)      ← frozen across protocol versions
//! message = Request or Response: variant index (varint) ‖ its fields, postcard-encoded
//! ```
//!
//! * `protocol` is [`PROTOCOL_VERSION`]. Both sides check it before anything else, and the
//!   header layout never changes, so mismatched host and device always learn each other's
//!   version: a device answers a frame of another version with
//!   [`ErrorCode::ProtocolVersion`] (`detail` = its own version), and a host reading a response
//!   of another version gets a [`DecodeError`] naming that version.
//! * `seq` is chosen by the host for each request and echoed in the response, so a late answer
//!   to an earlier (timed-out) request is recognised and dropped. The host numbers requests from
//!   1 and skips 0 when wrapping; the device answers a frame it could not read (bad COBS, CRC,
//!   overlong, unreadable header) with seq [`SEQ_UNKNOWN`] (0).
//!
//! The exchange is strictly one request, one response. `docs/UPDATE_PROTOCOL.md` describes the
//! sequences (info; begin → chunks → commit; resume; inference), timeouts and retries.
//!
//! # Device loop
//!
//! ```
//! use kiln_device::frame::FrameDecoder;
//! use kiln_device::protocol::{
//!     decode_request, encode_response, ErrorCode, Request, Response, MAX_REQUEST_FRAME_LEN,
//!     MAX_INFO_FRAME_LEN,
//! };
//!
//! fn handle(request: Request<'_>) -> Response<'static> {
//!     match request {
//!         Request::Reset => Response::Ok,
//!         _ => Response::error(ErrorCode::Busy, 0),
//!     }
//! }
//!
//! # let mut uart = [0x00u8].into_iter();
//! let mut decoder = FrameDecoder::<MAX_REQUEST_FRAME_LEN>::new();
//! let mut tx = [0u8; MAX_INFO_FRAME_LEN];
//! while let Some(byte) = uart.next() {
//!     let Some(frame) = decoder.feed(byte) else { continue };
//!     let (seq, response) = match frame.map_err(Into::into).and_then(decode_request) {
//!         Ok((seq, request)) => (seq, handle(request)),
//!         Err(refused) => refused.reply(),
//!     };
//!     let out = encode_response(seq, &response, &mut tx);
//!     // write `out` to the UART …
//! #   let _ = out;
//! }
//! ```

use crate::frame::{self, FrameError};
use core::fmt;
use serde::de::{Error as _, Unexpected};
use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// The protocol version this crate speaks, carried in every frame's header.
pub const PROTOCOL_VERSION: u16 = 1;

/// The `seq` of a response to a frame the device could not read (so it does not know the
/// request's `seq`). Hosts never use it for a request.
pub const SEQ_UNKNOWN: u16 = 0;

/// The most artifact bytes one [`Request::Chunk`] carries. A device may ask for less
/// ([`Response::BeginOk`]'s `max_chunk`), never more.
pub const MAX_CHUNK: usize = 1024;

/// The longest string ([`DeviceInfo::board`], [`DeviceInfo::firmware`], [`ModelInfo::name`])
/// that [`MAX_INFO_FRAME_LEN`] accounts for; devices shorten longer ones with [`fit_name`].
pub const MAX_NAME_LEN: usize = 64;

/// Worst-case postcard bytes of the header: two `u16` varints of up to 3 bytes.
const HEADER_MAX: usize = 3 + 3;
/// Varint bytes of a `u32` (and of a slice length, which is a `usize` ≤ `u32::MAX` here).
const U32_MAX: usize = 5;

/// Postcard bytes a message adds to its one byte slice, at most: the header, the variant index
/// (one byte below 128) and one `u32` field besides the slice (a chunk's offset, an output's
/// cycle count) and the slice's length prefix.
pub const MESSAGE_OVERHEAD: usize = HEADER_MAX + 1 + U32_MAX + U32_MAX;

/// The longest frame of a [`Request::Chunk`], [`Request::Infer`], [`Request::InstallKeyRecord`]
/// or [`Response::InferOk`] carrying `data_len` bytes (delimiter included). Every other message
/// except [`Response::Info`] fits in `max_message_frame_len(0) + 32`.
pub const fn max_message_frame_len(data_len: usize) -> usize {
    frame::max_frame_len(MESSAGE_OVERHEAD + data_len)
}

/// The longest request frame other than an [`Request::Infer`] whose input is over
/// [`MAX_CHUNK`] bytes: a device whose model inputs fit in [`MAX_CHUNK`] reads every request
/// with a [`FrameDecoder<MAX_REQUEST_FRAME_LEN>`](frame::FrameDecoder). Larger inputs need
/// [`max_message_frame_len`]`(input_len)`.
pub const MAX_REQUEST_FRAME_LEN: usize = max_message_frame_len(MAX_CHUNK);

/// Worst-case postcard bytes of a string of up to [`MAX_NAME_LEN`] bytes (one-byte length).
const NAME_MAX: usize = 1 + MAX_NAME_LEN;
const _: () = assert!(
    MAX_NAME_LEN < 128,
    "names must keep a one-byte length prefix"
);
const MODEL_INFO_MAX: usize = 1 + U32_MAX + U32_MAX + NAME_MAX + 3 * U32_MAX;
const SLOT_INFO_MAX: usize = (1 + 2 * U32_MAX) + 3 * U32_MAX;
const EVENT_MAX: usize = 1 + U32_MAX + 3;
const DEVICE_INFO_MAX: usize = 3
    + 2 * NAME_MAX
    + (1 + MODEL_INFO_MAX)
    + 2 * SLOT_INFO_MAX
    + 4 * U32_MAX
    + 3
    + 1
    + (1 + EVENT_MAX);

/// The longest [`Response::Info`] frame when its strings are at most [`MAX_NAME_LEN`] bytes; a
/// device's transmit buffer of this size (or of [`max_message_frame_len`]`(output_len)` if that
/// is larger) holds every response.
pub const MAX_INFO_FRAME_LEN: usize = frame::max_frame_len(HEADER_MAX + 1 + DEVICE_INFO_MAX);

/// Shortens `s` to at most [`MAX_NAME_LEN`] bytes, at a character boundary.
pub fn fit_name(s: &str) -> &str {
    let mut end = s.len().min(MAX_NAME_LEN);
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    s.get(..end).unwrap_or_default()
}

/// The frozen first part of every payload.
#[derive(Serialize, Deserialize)]
struct Header {
    protocol: u16,
    seq: u16,
}

/// A request from the host to the device. Byte fields borrow from the received frame.
///
/// Wire: the variant index (in declaration order, from 0) as a varint, then the fields in
/// order; `u32`/`u16` are varints, `[u8; 32]` is 32 raw bytes, `&[u8]` is a varint length and
/// the bytes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Request<'a> {
    /// Describe yourself: answered by [`Response::Info`].
    Info,
    /// Start (or resume) receiving an artifact of `total_len` bytes into the inactive slot.
    /// Answered by [`Response::BeginOk`]: when an update with the same `digest` was interrupted,
    /// `resume_from` is how much of it the device already holds.
    Begin {
        /// Length of the whole artifact in bytes.
        total_len: u32,
        /// The SHA-256 from the artifact's trailer: identifies this update for resuming, and
        /// must match the received bytes at [`Request::Commit`].
        digest: [u8; 32],
    },
    /// Artifact bytes `[offset, offset + data.len())`. `offset` must be exactly the device's
    /// `next` (else [`ErrorCode::OffsetMismatch`] with the expected offset as `detail`).
    /// Answered by [`Response::ChunkOk`].
    Chunk {
        /// Offset of `data` in the artifact.
        offset: u32,
        /// At most `max_chunk` bytes (from [`Response::BeginOk`]; never over [`MAX_CHUNK`]).
        data: &'a [u8],
    },
    /// All bytes sent: verify the artifact (digest, signature, version, counter, board) and
    /// switch to it for a trial boot. Answered by [`Response::Committed`], after which the
    /// device reboots into the new model (which it confirms once its self-test passes).
    Commit,
    /// Admit or revoke a signing key: a 120-byte key record (see [`crate::keys`]). Answered by
    /// [`Response::KeyRecordOk`].
    InstallKeyRecord {
        /// The key record's bytes.
        record: &'a [u8],
    },
    /// Run the active model once. Answered by [`Response::InferOk`].
    Infer {
        /// The model's input tensors' raw bytes, concatenated in input order
        /// ([`ModelInfo::input_len`] bytes in all).
        input: &'a [u8],
    },
    /// Reboot. Answered by [`Response::Ok`] before the device resets.
    Reset,
}

/// Number of [`Request`] variants (indices `0..REQUEST_KINDS` are known).
const REQUEST_KINDS: u32 = 7;

impl Request<'_> {
    /// The request's name, for logs and messages.
    pub const fn name(&self) -> &'static str {
        match self {
            Request::Info => "Info",
            Request::Begin { .. } => "Begin",
            Request::Chunk { .. } => "Chunk",
            Request::Commit => "Commit",
            Request::InstallKeyRecord { .. } => "InstallKeyRecord",
            Request::Infer { .. } => "Infer",
            Request::Reset => "Reset",
        }
    }
}

/// A response from the device to the host: exactly one per request.
///
/// Wire: as for [`Request`], the variant index then the fields.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Response<'a> {
    /// Answer to [`Request::Info`].
    Info(#[serde(borrow)] DeviceInfo<'a>),
    /// Answer to [`Request::Begin`]: send chunks from `resume_from`.
    BeginOk {
        /// Bytes of this artifact (same digest) the device already holds: 0 for a new update.
        resume_from: u32,
        /// The most bytes a chunk may carry (≤ [`MAX_CHUNK`]).
        max_chunk: u16,
    },
    /// Answer to [`Request::Chunk`]: the chunk is stored.
    ChunkOk {
        /// Offset the next chunk must start at (the bytes received so far).
        next: u32,
    },
    /// Answer to [`Request::Commit`]: the artifact verified and will be tried at the next boot,
    /// which follows at once.
    Committed {
        /// The new model's version.
        version: u32,
        /// The slot it was written to (0 or 1).
        slot: u8,
    },
    /// Answer to [`Request::InstallKeyRecord`]: the key ring was updated.
    KeyRecordOk {
        /// Keys the device now trusts (compiled-in ones included).
        trusted_keys: u8,
    },
    /// Answer to [`Request::Infer`].
    InferOk {
        /// The model's output tensors' raw bytes, concatenated in output order.
        output: &'a [u8],
        /// CPU cycles (or the device's time unit) the inference took.
        cycles: u32,
    },
    /// Answer to [`Request::Reset`] (and to any request with nothing more to say).
    Ok,
    /// The request was refused or failed: see [`ErrorCode`] for `code` and `detail`.
    Error {
        /// What went wrong.
        code: ErrorCode,
        /// A number qualifying it (see each [`ErrorCode`]; 0 when it has none).
        detail: u32,
    },
}

/// Number of [`Response`] variants.
const RESPONSE_KINDS: u32 = 8;

impl Response<'_> {
    /// An error response.
    pub const fn error(code: ErrorCode, detail: u32) -> Response<'static> {
        Response::Error { code, detail }
    }

    /// The response's name, for logs and messages.
    pub const fn name(&self) -> &'static str {
        match self {
            Response::Info(_) => "Info",
            Response::BeginOk { .. } => "BeginOk",
            Response::ChunkOk { .. } => "ChunkOk",
            Response::Committed { .. } => "Committed",
            Response::KeyRecordOk { .. } => "KeyRecordOk",
            Response::InferOk { .. } => "InferOk",
            Response::Ok => "Ok",
            Response::Error { .. } => "Error",
        }
    }
}

/// What a device reports about itself ([`Response::Info`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeviceInfo<'a> {
    /// The protocol version the device speaks ([`PROTOCOL_VERSION`]).
    pub protocol: u16,
    /// Board name, matched against the artifact's target board.
    pub board: &'a str,
    /// Firmware name and version.
    pub firmware: &'a str,
    /// The model in service, if any.
    #[serde(borrow)]
    pub active: Option<ModelInfo<'a>>,
    /// The two model slots.
    pub slots: [SlotInfo; 2],
    /// The device's security counter: artifacts with a lower one are refused.
    pub security_counter: u32,
    /// The largest artifact a slot holds, in bytes.
    pub max_artifact_len: u32,
    /// The longest request frame the device reads, delimiter included (an [`Request::Infer`]
    /// must fit: see [`max_message_frame_len`]).
    pub max_frame: u32,
    /// The most bytes a [`Request::Chunk`] may carry.
    pub max_chunk: u16,
    /// Keys the device trusts for signatures.
    pub trusted_keys: u8,
    /// What happened at the last update or boot, if anything worth reporting.
    pub last_event: Option<Event>,
}

/// The model in service.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ModelInfo<'a> {
    /// The slot it runs from (0 or 1).
    pub slot: u8,
    /// Model version (from the artifact header).
    pub version: u32,
    /// Security counter (from the artifact header).
    pub security_counter: u32,
    /// Model name (from the manifest).
    pub name: &'a str,
    /// Arena bytes the model needs.
    pub arena_bytes: u32,
    /// Bytes of all input tensors together: the length of [`Request::Infer`]'s `input`.
    pub input_len: u32,
    /// Bytes of all output tensors together: the length of [`Response::InferOk`]'s `output`.
    pub output_len: u32,
}

/// One model slot.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SlotInfo {
    /// Where the slot stands in the update cycle.
    pub state: SlotState,
    /// Version of the model it holds (0 when none).
    pub version: u32,
    /// Security counter of the model it holds (0 when none).
    pub security_counter: u32,
    /// Artifact length in bytes (0 when none).
    pub len: u32,
}

/// Where a slot stands in the update cycle.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum SlotState {
    /// Erased or never written.
    Empty,
    /// An update is being received into it.
    Receiving {
        /// Bytes received so far.
        received: u32,
        /// Bytes announced by [`Request::Begin`].
        total: u32,
    },
    /// Verified and committed, waiting for the trial boot.
    Ready,
    /// Booted on trial: confirmed when its self-test passes, reverted otherwise.
    Trial,
    /// The model in service.
    Active,
    /// The model that was in service before the active one (the revert target).
    Previous,
    /// Holds bytes that failed verification or a self-test.
    Invalid,
}

/// Something that happened at the last update or boot.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Event {
    /// A new model passed its trial and is now active.
    Installed {
        /// Its version.
        version: u32,
    },
    /// A model on trial failed and the previous one was restored.
    Reverted {
        /// The failed model's version.
        version: u32,
        /// Why it failed (e.g. [`ErrorCode::SelfTestFailed`]).
        reason: ErrorCode,
    },
    /// An update was refused.
    Refused {
        /// Why.
        reason: ErrorCode,
    },
}

/// Why a request was refused or failed. The discriminants are the wire values (a varint `u16`)
/// and never change within a [`PROTOCOL_VERSION`]; a new code means a new version.
///
/// | code | range        | meaning                    |
/// |------|--------------|----------------------------|
/// | 1–15 | framing      | the frame itself was bad   |
/// | 16–31| sequencing   | the request came at the wrong time |
/// | 32–63| update       | the artifact was refused   |
/// | 64–79| inference    | the model could not run    |
///
/// [`Display`](fmt::Display) gives a one-line message: what happened, why, what to do.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
#[repr(u16)]
#[non_exhaustive]
pub enum ErrorCode {
    // Framing.
    /// The frame's COBS or postcard encoding is invalid (or has trailing bytes).
    BadFrame = 1,
    /// The frame's CRC does not match its payload.
    BadCrc = 2,
    /// The frame is longer than the receiver's buffer. `detail`: the receiver's limit in bytes,
    /// when known.
    FrameTooLong = 3,
    /// The message kind is unknown to the receiver. `detail`: the variant index.
    UnknownRequest = 4,
    /// The frame's protocol version differs. `detail`: the device's version.
    ProtocolVersion = 5,
    // Sequencing.
    /// A chunk or commit without an update in progress (no `Begin`, or after a reboot that lost
    /// it).
    NoUpdateInProgress = 16,
    /// A chunk that does not start at the next expected offset. `detail`: the expected offset.
    OffsetMismatch = 17,
    /// The device is busy (e.g. erasing); retry later.
    Busy = 18,
    // Update refusals.
    /// The artifact is larger than a slot. `detail`: the slot's capacity in bytes.
    TooLarge = 32,
    /// Commit before all announced bytes arrived. `detail`: bytes received.
    Incomplete = 33,
    /// The received bytes' SHA-256 differs from the digest announced in `Begin` (or from the
    /// artifact's trailer).
    DigestMismatch = 34,
    /// The artifact's structure is invalid (header, sections, trailer).
    Malformed = 35,
    /// The artifact carries no signature and the device requires one.
    Unsigned = 36,
    /// The artifact is signed only by keys the device does not trust.
    UntrustedKey = 37,
    /// A signature by a trusted key does not verify.
    BadSignature = 38,
    /// The model version is not newer than the installed one. `detail`: the installed version.
    Downgrade = 39,
    /// The artifact's security counter is below the device's. `detail`: the device's counter.
    CounterRollback = 40,
    /// The artifact targets another board or needs more than the device has (e.g. arena).
    WrongBoard = 41,
    /// The new model failed its self-test; the previous one stays in service.
    SelfTestFailed = 42,
    /// Writing or erasing flash failed.
    FlashError = 43,
    /// The key record was refused (malformed, unknown signer, bad signature, ring full, last
    /// key).
    BadKeyRecord = 44,
    // Inference.
    /// No model is installed.
    NoModel = 64,
    /// The input is not the model's input size. `detail`: the expected size in bytes.
    BadInputLength = 65,
    /// The model failed to run. `detail`: a device-specific reason.
    InferenceFailed = 66,
}

impl ErrorCode {
    /// Every code, in wire-value order.
    pub const ALL: [ErrorCode; 24] = [
        ErrorCode::BadFrame,
        ErrorCode::BadCrc,
        ErrorCode::FrameTooLong,
        ErrorCode::UnknownRequest,
        ErrorCode::ProtocolVersion,
        ErrorCode::NoUpdateInProgress,
        ErrorCode::OffsetMismatch,
        ErrorCode::Busy,
        ErrorCode::TooLarge,
        ErrorCode::Incomplete,
        ErrorCode::DigestMismatch,
        ErrorCode::Malformed,
        ErrorCode::Unsigned,
        ErrorCode::UntrustedKey,
        ErrorCode::BadSignature,
        ErrorCode::Downgrade,
        ErrorCode::CounterRollback,
        ErrorCode::WrongBoard,
        ErrorCode::SelfTestFailed,
        ErrorCode::FlashError,
        ErrorCode::BadKeyRecord,
        ErrorCode::NoModel,
        ErrorCode::BadInputLength,
        ErrorCode::InferenceFailed,
    ];

    /// The wire value.
    pub const fn code(self) -> u16 {
        self as u16
    }

    /// The code with wire value `code`, if there is one.
    pub fn from_code(code: u16) -> Option<ErrorCode> {
        ErrorCode::ALL.into_iter().find(|c| c.code() == code)
    }

    /// The variant's name (stable, for `--json` output).
    pub const fn name(self) -> &'static str {
        match self {
            ErrorCode::BadFrame => "BadFrame",
            ErrorCode::BadCrc => "BadCrc",
            ErrorCode::FrameTooLong => "FrameTooLong",
            ErrorCode::UnknownRequest => "UnknownRequest",
            ErrorCode::ProtocolVersion => "ProtocolVersion",
            ErrorCode::NoUpdateInProgress => "NoUpdateInProgress",
            ErrorCode::OffsetMismatch => "OffsetMismatch",
            ErrorCode::Busy => "Busy",
            ErrorCode::TooLarge => "TooLarge",
            ErrorCode::Incomplete => "Incomplete",
            ErrorCode::DigestMismatch => "DigestMismatch",
            ErrorCode::Malformed => "Malformed",
            ErrorCode::Unsigned => "Unsigned",
            ErrorCode::UntrustedKey => "UntrustedKey",
            ErrorCode::BadSignature => "BadSignature",
            ErrorCode::Downgrade => "Downgrade",
            ErrorCode::CounterRollback => "CounterRollback",
            ErrorCode::WrongBoard => "WrongBoard",
            ErrorCode::SelfTestFailed => "SelfTestFailed",
            ErrorCode::FlashError => "FlashError",
            ErrorCode::BadKeyRecord => "BadKeyRecord",
            ErrorCode::NoModel => "NoModel",
            ErrorCode::BadInputLength => "BadInputLength",
            ErrorCode::InferenceFailed => "InferenceFailed",
        }
    }

    /// The one-line message: what happened, why, what to do.
    pub const fn message(self) -> &'static str {
        match self {
            ErrorCode::BadFrame => "a frame could not be decoded (bad COBS or message encoding): the line is noisy or the other side speaks something else; retry, and check the port and baud rate",
            ErrorCode::BadCrc => "a frame's CRC did not match: bytes were corrupted on the line; retry, and check the cable and baud rate if it keeps happening",
            ErrorCode::FrameTooLong => "a frame was longer than the receiver accepts: the request carries too much data; send smaller chunks or inputs",
            ErrorCode::UnknownRequest => "the device does not know this request: its firmware is older than this host tool; update the firmware or use a matching kiln",
            ErrorCode::ProtocolVersion => "host and device speak different protocol versions; use a kiln release that matches the device firmware",
            ErrorCode::NoUpdateInProgress => "no update is in progress on the device (it was never begun, or the device rebooted); start the update again",
            ErrorCode::OffsetMismatch => "a chunk did not start where the device expected (a chunk or an answer was lost); resume from the offset the device expects",
            ErrorCode::Busy => "the device is busy with another operation; retry in a moment",
            ErrorCode::TooLarge => "the artifact is larger than the device's model slot; shrink the model (kiln prune, int8) or use a board with a larger slot",
            ErrorCode::Incomplete => "commit came before the whole artifact arrived; send the missing chunks, then commit again",
            ErrorCode::DigestMismatch => "the received artifact's SHA-256 differs from the announced one: it was corrupted or changed in transit; restart the update",
            ErrorCode::Malformed => "the artifact is malformed (header, sections or trailer); rebuild it with kiln and check it with `kiln inspect`",
            ErrorCode::Unsigned => "the artifact is not signed and the device accepts only signed models; sign it with `kiln sign`",
            ErrorCode::UntrustedKey => "the artifact is signed by a key the device does not trust; sign it with a trusted key, or admit the key with a key record",
            ErrorCode::BadSignature => "the artifact's signature does not verify: it was changed after signing; sign it again",
            ErrorCode::Downgrade => "the model version is not newer than the installed one; give the new model a higher version",
            ErrorCode::CounterRollback => "the artifact's security counter is below the device's, so it could be a revoked model; rebuild it with a counter at least the device's",
            ErrorCode::WrongBoard => "the artifact was built for another board or needs more memory than this device has; build it for this board",
            ErrorCode::SelfTestFailed => "the new model failed its self-test on the device, so the previous model stays in service; check the model and its SELFTEST vectors with `kiln eval`",
            ErrorCode::FlashError => "writing or erasing the device's flash failed; retry, and if it persists check the flash and the partition layout",
            ErrorCode::BadKeyRecord => "the key record was refused (malformed, unknown signer, bad signature, full ring or last key); check it and sign it with a trusted key",
            ErrorCode::NoModel => "no model is installed on the device; flash one with `kiln flash`",
            ErrorCode::BadInputLength => "the input does not have the model's input size; pass all input tensors' bytes, in input order",
            ErrorCode::InferenceFailed => "the model failed to run on the device; check the device log, or flash the model again",
        }
    }
}

impl fmt::Display for ErrorCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.message())
    }
}

#[cfg(feature = "std")]
impl std::error::Error for ErrorCode {}

impl From<FrameError> for ErrorCode {
    fn from(e: FrameError) -> Self {
        match e {
            FrameError::TooLong => ErrorCode::FrameTooLong,
            FrameError::BadCrc => ErrorCode::BadCrc,
            FrameError::BadCobs | FrameError::TooShort => ErrorCode::BadFrame,
        }
    }
}

impl Serialize for ErrorCode {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_u16(self.code())
    }
}

impl<'de> Deserialize<'de> for ErrorCode {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let code = u16::deserialize(deserializer)?;
        ErrorCode::from_code(code).ok_or_else(|| {
            D::Error::invalid_value(Unexpected::Unsigned(code.into()), &"a Kiln error code")
        })
    }
}

/// Why a received frame or payload could not be used, with what is known of the request.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DecodeError {
    /// The frame's `seq`, when its header could be read.
    pub seq: Option<u16>,
    /// What was wrong: a framing code ([`ErrorCode::BadFrame`], [`ErrorCode::BadCrc`],
    /// [`ErrorCode::FrameTooLong`], [`ErrorCode::UnknownRequest`],
    /// [`ErrorCode::ProtocolVersion`]).
    pub code: ErrorCode,
    /// For [`ErrorCode::ProtocolVersion`]: the version in the frame. For
    /// [`ErrorCode::UnknownRequest`]: the variant index. Otherwise 0.
    pub detail: u32,
}

impl DecodeError {
    const fn new(seq: Option<u16>, code: ErrorCode) -> Self {
        DecodeError {
            seq,
            code,
            detail: 0,
        }
    }

    /// What a device answers to a request it could not use: the seq to echo and an
    /// [`Response::Error`]. For a version mismatch, `detail` is the device's own version.
    pub const fn reply(&self) -> (u16, Response<'static>) {
        let seq = match self.seq {
            Some(seq) => seq,
            None => SEQ_UNKNOWN,
        };
        let detail = match self.code {
            ErrorCode::ProtocolVersion => PROTOCOL_VERSION as u32,
            _ => self.detail,
        };
        (seq, Response::error(self.code, detail))
    }
}

impl From<FrameError> for DecodeError {
    fn from(e: FrameError) -> Self {
        DecodeError::new(None, e.into())
    }
}

impl fmt::Display for DecodeError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.code {
            ErrorCode::ProtocolVersion => write!(
                f,
                "the other side speaks protocol version {}, this one speaks {PROTOCOL_VERSION}; use a kiln release that matches the device firmware",
                self.detail
            ),
            code => code.fmt(f),
        }
    }
}

#[cfg(feature = "std")]
impl std::error::Error for DecodeError {}

/// Encodes `request` with sequence number `seq` as one complete frame (delimiter included) into
/// `buf`, and returns the frame.
///
/// # Errors
/// [`ErrorCode::FrameTooLong`] when `buf` is too small.
pub fn encode_request<'b>(
    seq: u16,
    request: &Request<'_>,
    buf: &'b mut [u8],
) -> Result<&'b [u8], ErrorCode> {
    encode_message(seq, request, buf)
}

/// Encodes `response` to the request numbered `seq` as one complete frame (delimiter included)
/// into `buf`, and returns the frame.
///
/// # Errors
/// [`ErrorCode::FrameTooLong`] when `buf` is too small (answer with that error instead: an
/// error response always fits in `max_message_frame_len(0)`).
pub fn encode_response<'b>(
    seq: u16,
    response: &Response<'_>,
    buf: &'b mut [u8],
) -> Result<&'b [u8], ErrorCode> {
    encode_message(seq, response, buf)
}

fn encode_message<'b, T: Serialize>(
    seq: u16,
    message: &T,
    buf: &'b mut [u8],
) -> Result<&'b [u8], ErrorCode> {
    let header = Header {
        protocol: PROTOCOL_VERSION,
        seq,
    };
    let flavor = frame::sealing_flavor(buf)?;
    let frame = postcard::serialize_with_flavor(&(header, message), flavor)
        .map_err(|_| ErrorCode::FrameTooLong)?;
    Ok(frame)
}

/// Decodes a request from a frame's payload (as yielded by
/// [`FrameDecoder`](frame::FrameDecoder) or [`frame::decode_frame`]): returns its `seq` and the
/// request, which borrows from `payload`.
///
/// # Errors
/// A [`DecodeError`]: [`ErrorCode::ProtocolVersion`], [`ErrorCode::UnknownRequest`] or
/// [`ErrorCode::BadFrame`] (unreadable header or fields, trailing bytes).
pub fn decode_request(payload: &[u8]) -> Result<(u16, Request<'_>), DecodeError> {
    decode_message(payload, REQUEST_KINDS, ErrorCode::UnknownRequest)
}

/// Decodes a response from a frame's payload: returns its `seq` (the request's, or
/// [`SEQ_UNKNOWN`]) and the response, which borrows from `payload`.
///
/// # Errors
/// A [`DecodeError`]: [`ErrorCode::ProtocolVersion`] (`detail`: the device's version) or
/// [`ErrorCode::BadFrame`].
pub fn decode_response(payload: &[u8]) -> Result<(u16, Response<'_>), DecodeError> {
    decode_message(payload, RESPONSE_KINDS, ErrorCode::BadFrame)
}

fn decode_message<'a, T: Deserialize<'a>>(
    payload: &'a [u8],
    kinds: u32,
    unknown: ErrorCode,
) -> Result<(u16, T), DecodeError> {
    let (header, body) = postcard::take_from_bytes::<Header>(payload)
        .map_err(|_| DecodeError::new(None, ErrorCode::BadFrame))?;
    let seq = Some(header.seq);
    if header.protocol != PROTOCOL_VERSION {
        return Err(DecodeError {
            detail: header.protocol.into(),
            ..DecodeError::new(seq, ErrorCode::ProtocolVersion)
        });
    }
    let bad = DecodeError::new(seq, ErrorCode::BadFrame);
    let (kind, _) = postcard::take_from_bytes::<u32>(body).map_err(|_| bad)?;
    if kind >= kinds {
        return Err(DecodeError {
            detail: kind,
            ..DecodeError::new(seq, unknown)
        });
    }
    match postcard::take_from_bytes::<T>(body) {
        Ok((message, [])) => Ok((header.seq, message)),
        _ => Err(bad),
    }
}

/// Encodes `request` as one frame in a new `Vec` (host side).
#[cfg(feature = "std")]
pub fn encode_request_vec(seq: u16, request: &Request<'_>) -> std::vec::Vec<u8> {
    encode_vec(seq, request)
}

/// Encodes `response` as one frame in a new `Vec` (host side, simulators).
#[cfg(feature = "std")]
pub fn encode_response_vec(seq: u16, response: &Response<'_>) -> std::vec::Vec<u8> {
    encode_vec(seq, response)
}

#[cfg(feature = "std")]
fn encode_vec<T: Serialize>(seq: u16, message: &T) -> std::vec::Vec<u8> {
    let header = Header {
        protocol: PROTOCOL_VERSION,
        seq,
    };
    let payload_len =
        postcard::serialize_with_flavor(&(header, message), postcard::ser_flavors::Size::default())
            .unwrap_or(usize::MAX / 2);
    let mut buf = std::vec![0; frame::max_frame_len(payload_len)];
    let len = encode_message(seq, message, &mut buf)
        .map(<[u8]>::len)
        .expect("a buffer of max_frame_len(payload) holds the frame");
    buf.truncate(len);
    buf
}

#[cfg(test)]
mod tests {
    extern crate std;
    use super::*;

    fn payload_of(frame: &[u8]) -> std::vec::Vec<u8> {
        let mut f = frame.to_vec();
        frame::decode_frame(&mut f).unwrap().to_vec()
    }

    #[test]
    fn error_codes_round_trip_and_are_unique() {
        for (i, code) in ErrorCode::ALL.iter().enumerate() {
            assert_eq!(ErrorCode::from_code(code.code()), Some(*code));
            assert!(ErrorCode::ALL[..i].iter().all(|c| c.code() != code.code()));
            assert!(ErrorCode::ALL[..i].iter().all(|c| c.code() < code.code()));
            assert!(!code.message().is_empty() && !code.name().is_empty());
        }
        assert_eq!(ErrorCode::from_code(0), None);
        assert_eq!(ErrorCode::from_code(6), None);
    }

    #[test]
    fn variant_counts_match_the_enums() {
        // The last variant of each enum is at index KINDS - 1.
        let mut buf = [0; 64];
        let f = encode_request(1, &Request::Reset, &mut buf).unwrap();
        assert_eq!(*payload_of(f).last().unwrap(), (REQUEST_KINDS - 1) as u8);
        let f = encode_response(1, &Response::error(ErrorCode::Busy, 0), &mut buf).unwrap();
        let p = payload_of(f);
        assert_eq!(p[2], (RESPONSE_KINDS - 1) as u8);
    }

    #[test]
    fn fit_name_cuts_at_char_boundary() {
        let long = "é".repeat(40); // 80 bytes
        let cut = fit_name(&long);
        assert_eq!(cut.len(), 64);
        let odd = std::format!("a{long}");
        assert_eq!(fit_name(&odd).len(), 63);
        assert_eq!(fit_name("kws"), "kws");
    }
}
