//! Owned copies of what a device says ([`Reply`], [`Info`]), for the host: they outlive the
//! receive buffer, print as a table and serialize as JSON.

use kiln_device::protocol::{self, ErrorCode, Response};
use serde::{Serialize, Serializer};
use std::fmt::Write as _;

/// A device's answer, owned.
#[derive(Clone, Debug, PartialEq)]
pub enum Reply {
    /// Answer to `Info`.
    Info(Info),
    /// Answer to `Begin`.
    BeginOk {
        /// Bytes of this artifact the device already holds.
        resume_from: u32,
        /// Most bytes per chunk.
        max_chunk: u16,
    },
    /// Answer to `Chunk`.
    ChunkOk {
        /// Offset of the next chunk.
        next: u32,
    },
    /// Answer to `Commit`; the device reboots into a trial of the new model.
    Committed {
        /// The new model's version.
        version: u32,
        /// Its slot.
        slot: u8,
    },
    /// Answer to `InstallKeyRecord`.
    KeyRecordOk {
        /// Keys the device trusts now.
        trusted_keys: u8,
    },
    /// Answer to `Infer`.
    InferOk {
        /// The output tensors' bytes.
        output: Vec<u8>,
        /// Cycles (or the device's time unit) the inference took.
        cycles: u32,
    },
    /// Answer to `Reset`.
    Ok,
    /// A refusal.
    Error {
        /// What went wrong.
        code: ErrorCode,
        /// Its detail value.
        detail: u32,
    },
}

impl Reply {
    /// The response's name, for messages.
    pub fn name(&self) -> &'static str {
        match self {
            Reply::Info(_) => "Info",
            Reply::BeginOk { .. } => "BeginOk",
            Reply::ChunkOk { .. } => "ChunkOk",
            Reply::Committed { .. } => "Committed",
            Reply::KeyRecordOk { .. } => "KeyRecordOk",
            Reply::InferOk { .. } => "InferOk",
            Reply::Ok => "Ok",
            Reply::Error { code, .. } => code.name(),
        }
    }
}

impl From<Response<'_>> for Reply {
    fn from(r: Response<'_>) -> Self {
        match r {
            Response::Info(i) => Reply::Info(Info::from(&i)),
            Response::BeginOk {
                resume_from,
                max_chunk,
            } => Reply::BeginOk {
                resume_from,
                max_chunk,
            },
            Response::ChunkOk { next } => Reply::ChunkOk { next },
            Response::Committed { version, slot } => Reply::Committed { version, slot },
            Response::KeyRecordOk { trusted_keys } => Reply::KeyRecordOk { trusted_keys },
            Response::InferOk { output, cycles } => Reply::InferOk {
                output: output.to_vec(),
                cycles,
            },
            Response::Ok => Reply::Ok,
            Response::Error { code, detail } => Reply::Error { code, detail },
        }
    }
}

/// What a device reports about itself (an owned [`protocol::DeviceInfo`]).
///
/// As JSON (`kiln device-info --json`): `{"protocol": 1, "board": "…", "firmware": "…",
/// "active": {"slot": 1, "version": 2, "name": "kws", …} | null, "slots": [{"slot": 0,
/// "state": "previous", "version": 1, …}, …], "security_counter": 0, …, "last_event":
/// {"kind": "installed", "version": 2} | null}`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Info {
    /// Protocol version the device speaks.
    pub protocol: u16,
    /// Board name (matched against an artifact's target board).
    pub board: String,
    /// Firmware name and version.
    pub firmware: String,
    /// The model in service.
    pub active: Option<ActiveModel>,
    /// Both slots, slot 0 first.
    pub slots: Vec<Slot>,
    /// Artifacts with a lower security counter are refused.
    pub security_counter: u32,
    /// The largest artifact a slot holds, in bytes.
    pub max_artifact_len: u32,
    /// The longest request frame the device reads, in bytes.
    pub max_frame: u32,
    /// The most artifact bytes per chunk.
    pub max_chunk: u16,
    /// Keys the device trusts.
    pub trusted_keys: u8,
    /// What happened at the last update or boot.
    pub last_event: Option<LastEvent>,
}

/// The model in service.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct ActiveModel {
    /// Its slot.
    pub slot: u8,
    /// Its version.
    pub version: u32,
    /// Its security counter.
    pub security_counter: u32,
    /// Its name (from the manifest).
    pub name: String,
    /// Arena bytes it needs.
    pub arena_bytes: u32,
    /// Bytes of all its inputs together (what `Infer` takes).
    pub input_len: u32,
    /// Bytes of all its outputs together (what `Infer` returns).
    pub output_len: u32,
}

/// One slot.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Slot {
    /// 0 or 1.
    pub slot: u8,
    /// `empty`, `receiving`, `ready`, `trial`, `active`, `previous` or `invalid`.
    pub state: SlotState,
    /// Version of the model it holds (0 when none).
    pub version: u32,
    /// Its security counter.
    pub security_counter: u32,
    /// Artifact length in bytes.
    pub len: u32,
    /// While receiving: bytes received so far.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub received: Option<u32>,
}

/// Where a slot stands in the update cycle.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum SlotState {
    /// Erased or never written.
    Empty,
    /// An update is being received into it.
    Receiving,
    /// Committed, waiting for its trial boot.
    Ready,
    /// Booted on trial.
    Trial,
    /// In service.
    Active,
    /// In service before the active one.
    Previous,
    /// Failed verification or its self-test.
    Invalid,
}

impl SlotState {
    /// The state's name, as in JSON.
    pub fn name(self) -> &'static str {
        match self {
            SlotState::Empty => "empty",
            SlotState::Receiving => "receiving",
            SlotState::Ready => "ready",
            SlotState::Trial => "trial",
            SlotState::Active => "active",
            SlotState::Previous => "previous",
            SlotState::Invalid => "invalid",
        }
    }
}

/// What happened at the last update or boot.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum LastEvent {
    /// A model passed its trial and is active.
    Installed {
        /// Its version.
        version: u32,
    },
    /// A model on trial failed; the previous one was restored.
    Reverted {
        /// The failed model's version.
        version: u32,
        /// Why.
        #[serde(serialize_with = "code_name")]
        reason: ErrorCode,
    },
    /// An update was refused.
    Refused {
        /// Why.
        #[serde(serialize_with = "code_name")]
        reason: ErrorCode,
    },
}

fn code_name<S: Serializer>(code: &ErrorCode, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(code.name())
}

impl std::fmt::Display for LastEvent {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            LastEvent::Installed { version } => write!(f, "installed v{version}"),
            LastEvent::Reverted { version, reason } => {
                write!(f, "reverted v{version}: {}", reason.name())
            }
            LastEvent::Refused { reason } => write!(f, "refused an update: {}", reason.name()),
        }
    }
}

impl From<&protocol::DeviceInfo<'_>> for Info {
    fn from(d: &protocol::DeviceInfo<'_>) -> Self {
        Info {
            protocol: d.protocol,
            board: d.board.to_string(),
            firmware: d.firmware.to_string(),
            active: d.active.map(|m| ActiveModel {
                slot: m.slot,
                version: m.version,
                security_counter: m.security_counter,
                name: m.name.to_string(),
                arena_bytes: m.arena_bytes,
                input_len: m.input_len,
                output_len: m.output_len,
            }),
            slots: d
                .slots
                .iter()
                .zip(0u8..)
                .map(|(s, slot)| {
                    let (state, received) = match s.state {
                        protocol::SlotState::Empty => (SlotState::Empty, None),
                        protocol::SlotState::Receiving { received, .. } => {
                            (SlotState::Receiving, Some(received))
                        }
                        protocol::SlotState::Ready => (SlotState::Ready, None),
                        protocol::SlotState::Trial => (SlotState::Trial, None),
                        protocol::SlotState::Active => (SlotState::Active, None),
                        protocol::SlotState::Previous => (SlotState::Previous, None),
                        protocol::SlotState::Invalid => (SlotState::Invalid, None),
                    };
                    let len = match s.state {
                        protocol::SlotState::Receiving { total, .. } => total,
                        _ => s.len,
                    };
                    Slot {
                        slot,
                        state,
                        version: s.version,
                        security_counter: s.security_counter,
                        len,
                        received,
                    }
                })
                .collect(),
            security_counter: d.security_counter,
            max_artifact_len: d.max_artifact_len,
            max_frame: d.max_frame,
            max_chunk: d.max_chunk,
            trusted_keys: d.trusted_keys,
            last_event: d.last_event.map(|e| match e {
                protocol::Event::Installed { version } => LastEvent::Installed { version },
                protocol::Event::Reverted { version, reason } => {
                    LastEvent::Reverted { version, reason }
                }
                protocol::Event::Refused { reason } => LastEvent::Refused { reason },
            }),
        }
    }
}

impl Info {
    /// The slot holding `version` that is committed but not yet booted (or booting) on trial.
    pub fn pending(&self, version: u32) -> Option<&Slot> {
        self.slots.iter().find(|s| {
            s.version == version && matches!(s.state, SlotState::Ready | SlotState::Trial)
        })
    }

    /// The table `kiln device-info` prints for people.
    pub fn render(&self) -> String {
        let mut t = String::new();
        let mut row = |k: &str, v: String| {
            let _ = writeln!(t, "{k:<18} {v}");
        };
        row("board", self.board.clone());
        row("firmware", self.firmware.clone());
        row("protocol", self.protocol.to_string());
        match &self.active {
            Some(a) => {
                let name = if a.name.is_empty() {
                    "(unnamed)"
                } else {
                    &a.name
                };
                row(
                    "active model",
                    format!(
                        "{name} v{} (security counter {}) in slot {}",
                        a.version, a.security_counter, a.slot
                    ),
                );
                row(
                    "  arena / io",
                    format!(
                        "{} B arena, {} B in, {} B out",
                        a.arena_bytes, a.input_len, a.output_len
                    ),
                );
            }
            None => row("active model", "none".into()),
        }
        for s in &self.slots {
            let what = match (s.state, s.received) {
                (SlotState::Empty, _) => "empty".to_string(),
                (SlotState::Receiving, Some(r)) => format!("receiving: {r} of {} B", s.len),
                (state, _) => format!(
                    "{} v{} ({} B, counter {})",
                    state.name(),
                    s.version,
                    s.len,
                    s.security_counter
                ),
            };
            row(&format!("slot {}", s.slot), what);
        }
        row("security counter", self.security_counter.to_string());
        row("trusted keys", self.trusted_keys.to_string());
        row(
            "limits",
            format!(
                "artifact {} B, request frame {} B, chunk {} B",
                self.max_artifact_len, self.max_frame, self.max_chunk
            ),
        );
        row(
            "last event",
            self.last_event
                .map_or_else(|| "none".to_string(), |e| e.to_string()),
        );
        t
    }
}
