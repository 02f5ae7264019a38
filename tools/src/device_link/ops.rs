//! What `kiln flash`, `kiln device-info` and `kiln infer` do over a [`Link`].

use super::info::{Info, LastEvent, Reply, SlotState};
use super::link::{Link, LinkStats};
use super::LinkError;
use kiln_device::keys::KeyRecord;
use kiln_device::protocol::{max_message_frame_len, ErrorCode, Request, MAX_CHUNK};
use kiln_runtime::format::Container;
use serde::Serialize;
use std::time::{Duration, Instant};

/// How often a lost place in the transfer is recovered (`OffsetMismatch`, a device that
/// restarted the update) before giving up.
const MAX_RESYNCS: u32 = 16;
/// How often the update is begun again when the device lost it mid-transfer.
const MAX_REBEGINS: u32 = 3;
/// Pause between two `Info` polls while the device boots its trial.
const POLL_PAUSE: Duration = Duration::from_millis(200);

/// Why an operation failed: the link, the artifact, or the device's verdict. One line each.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum OpError {
    /// Talking to the device failed.
    #[error(transparent)]
    Link(#[from] LinkError),
    /// The artifact file is not a valid, intact artifact.
    #[error("not a valid Kiln artifact: {why}")]
    Artifact {
        /// What is wrong.
        why: String,
    },
    /// The artifact is signed for another board.
    #[error("the model is built for board `{target}` but the device is a `{board}`: sign it with `kiln sign --target {board}`")]
    WrongBoard {
        /// The artifact's target board.
        target: String,
        /// The device's board.
        board: String,
    },
    /// The artifact does not fit a slot.
    #[error("the model is {len} bytes but the device's slots hold {max}: shrink it (kiln prune, int8) or use a board with larger slots")]
    TooLarge {
        /// Artifact bytes.
        len: u64,
        /// Slot capacity.
        max: u32,
    },
    /// The device runs the same or a newer version.
    #[error("the device already runs {}, and v{offered} is not newer (devices only install newer versions): sign the model with `kiln sign --version {}` or higher", named(name, *active), active + 1)]
    NotNewer {
        /// The artifact's version.
        offered: u32,
        /// The device's active version.
        active: u32,
        /// The active model's name.
        name: String,
    },
    /// The artifact's security counter is below the device's.
    #[error("the model's security counter {offered} is below the device's {device}, so the device would refuse it as retired: sign it with `kiln sign --security-counter {device}` or higher")]
    CounterRollback {
        /// The artifact's counter.
        offered: u32,
        /// The device's counter.
        device: u32,
    },
    /// The device refused the update.
    #[error("the device refused v{version} at {stage}: {} — {}{}", code.name(), code.message(), detail_note(*code, *detail))]
    Refused {
        /// The step: `Begin`, `Chunk`, `Commit`.
        stage: &'static str,
        /// The artifact's version.
        version: u32,
        /// The device's reason.
        code: ErrorCode,
        /// Its detail value.
        detail: u32,
    },
    /// The transfer broke off; running the flash again resumes it.
    #[error("the transfer stopped at byte {at} of {total}: {}; run the same `kiln flash` again to resume from there", error.cause())]
    Interrupted {
        /// Bytes the device acknowledged.
        at: u32,
        /// Artifact bytes.
        total: u32,
        /// Why.
        error: LinkError,
    },
    /// The new model failed its trial boot and the device went back to the previous one.
    #[error("the device reverted v{version}: {} — {} (active now: {})", reason.name(), reason.message(), active_text(*active))]
    Reverted {
        /// The new model's version.
        version: u32,
        /// Why the trial failed.
        reason: ErrorCode,
        /// The version in service now.
        active: Option<u32>,
    },
    /// After the commit the device still runs another model and says nothing about the new one.
    #[error("the device did not switch to v{version}: it runs {} (last event: {}); check it with `kiln device-info` and the device log", active_text(*active), last_event.map_or_else(|| "none".to_string(), |e| e.to_string()))]
    NotInstalled {
        /// The new model's version.
        version: u32,
        /// The version in service.
        active: Option<u32>,
        /// What the device last reported.
        last_event: Option<LastEvent>,
    },
    /// The trial did not end in time.
    #[error("v{version} was committed, but the device did not confirm it within {} s (it may still be on trial, or did not come back after the reset): check it with `kiln device-info`, or give it longer with --timeout", waited.as_secs())]
    NotSettled {
        /// The new model's version.
        version: u32,
        /// How long it was polled.
        waited: Duration,
    },
    /// The key record file is not a key record.
    #[error("{why}")]
    KeyRecord {
        /// What is wrong.
        why: String,
    },
    /// The device refused a request.
    #[error("the device refused {request}: {}{}", code.message(), detail_note(*code, *detail))]
    Device {
        /// The request.
        request: &'static str,
        /// Its reason.
        code: ErrorCode,
        /// Its detail value.
        detail: u32,
    },
    /// An input that is not the model's input size.
    #[error("the input sample is {got} bytes but the device's model takes {expected} bytes (its inputs' bytes, concatenated): pass samples of the model's input shape and type, or give --model so kiln can convert them")]
    InputLength {
        /// Bytes given.
        got: usize,
        /// Bytes the model takes.
        expected: u32,
    },
    /// An `Infer` frame longer than the device reads.
    #[error("an Infer request for this input is {frame} bytes, but the device reads frames of at most {max_frame}: this model's input is too large for the device's receive buffer")]
    InputTooLarge {
        /// Frame bytes.
        frame: usize,
        /// The device's limit.
        max_frame: u32,
    },
    /// An answer that does not fit the request.
    #[error("the device answered {request} with {got}: it does not follow the Kiln update protocol; use firmware and a kiln release that match")]
    Unexpected {
        /// The request.
        request: &'static str,
        /// The answer's name.
        got: &'static str,
    },
}

impl OpError {
    /// A stable name of the failure for scripts (`"error"` in `--json` output).
    pub fn code(&self) -> &'static str {
        match self {
            OpError::Link(_) => "link",
            OpError::Artifact { .. } => "artifact",
            OpError::WrongBoard { .. } => "wrong_board",
            OpError::TooLarge { .. } => "too_large",
            OpError::NotNewer { .. } => "not_newer",
            OpError::CounterRollback { .. } => "counter_rollback",
            OpError::Refused { .. } => "refused",
            OpError::Interrupted { .. } => "interrupted",
            OpError::Reverted { .. } => "reverted",
            OpError::NotInstalled { .. } => "not_installed",
            OpError::NotSettled { .. } => "not_settled",
            OpError::KeyRecord { .. } => "key_record",
            OpError::Device { .. } => "device",
            OpError::InputLength { .. } => "input_length",
            OpError::InputTooLarge { .. } => "input_too_large",
            OpError::Unexpected { .. } => "unexpected",
        }
    }

    /// The device's error code, when the device said no (or reverted).
    pub fn device_code(&self) -> Option<ErrorCode> {
        match self {
            OpError::Refused { code, .. } | OpError::Device { code, .. } => Some(*code),
            OpError::Reverted { reason, .. } => Some(*reason),
            _ => None,
        }
    }
}

fn named(name: &str, version: u32) -> String {
    if name.is_empty() {
        format!("v{version}")
    } else {
        format!("{name} v{version}")
    }
}

fn active_text(active: Option<u32>) -> String {
    active.map_or_else(|| "no model".to_string(), |v| format!("v{v}"))
}

fn detail_note(code: ErrorCode, detail: u32) -> String {
    match code {
        ErrorCode::TooLarge => format!(" (slot capacity {detail} bytes)"),
        ErrorCode::Downgrade => format!(" (installed: v{detail})"),
        ErrorCode::CounterRollback => format!(" (device counter {detail})"),
        ErrorCode::BadInputLength => format!(" (the model takes {detail} bytes)"),
        ErrorCode::Incomplete => format!(" ({detail} bytes received)"),
        ErrorCode::OffsetMismatch => format!(" (the device expects offset {detail})"),
        ErrorCode::FrameTooLong if detail > 0 => format!(" (limit {detail} bytes)"),
        _ => String::new(),
    }
}

fn unexpected(request: &'static str, got: &Reply) -> OpError {
    OpError::Unexpected {
        request,
        got: got.name(),
    }
}

/// Asks the device about itself.
///
/// # Errors
/// Link failures, or a device that answers `Info` with something else.
pub fn device_info(link: &mut Link) -> Result<Info, OpError> {
    match link.request(&Request::Info)? {
        Reply::Info(info) => Ok(info),
        Reply::Error { code, detail } => Err(OpError::Device {
            request: "Info",
            code,
            detail,
        }),
        other => Err(unexpected("Info", &other)),
    }
}

/// Installs a key record (admit or revoke a signing key); returns the keys the device trusts now.
///
/// # Errors
/// A malformed record (checked here first), the device's refusal, link failures.
pub fn install_key_record(link: &mut Link, record: &[u8]) -> Result<u8, OpError> {
    KeyRecord::parse(record).map_err(|e| OpError::KeyRecord { why: e.to_string() })?;
    match link.request(&Request::InstallKeyRecord { record })? {
        Reply::KeyRecordOk { trusted_keys } => Ok(trusted_keys),
        Reply::Error { code, detail } => Err(OpError::Device {
            request: "InstallKeyRecord",
            code,
            detail,
        }),
        other => Err(unexpected("InstallKeyRecord", &other)),
    }
}

/// One inference's result.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Inference {
    /// The output tensors' bytes, concatenated in output order.
    pub output: Vec<u8>,
    /// CPU cycles (or the device's time unit) it took.
    pub cycles: u32,
}

/// Runs the active model once on `input` (its input tensors' bytes, concatenated). Checks the
/// length and the frame size against `info` (from [`device_info`]) first.
///
/// # Errors
/// [`OpError::InputLength`], [`OpError::InputTooLarge`], the device's refusal (`NoModel`,
/// `InferenceFailed`), link failures.
pub fn infer(link: &mut Link, info: &Info, input: &[u8]) -> Result<Inference, OpError> {
    let active = info.active.as_ref().ok_or(OpError::Device {
        request: "Infer",
        code: ErrorCode::NoModel,
        detail: 0,
    })?;
    if input.len() != active.input_len as usize {
        return Err(OpError::InputLength {
            got: input.len(),
            expected: active.input_len,
        });
    }
    let frame = max_message_frame_len(input.len());
    if frame > info.max_frame as usize {
        return Err(OpError::InputTooLarge {
            frame,
            max_frame: info.max_frame,
        });
    }
    match link.request(&Request::Infer { input })? {
        Reply::InferOk { output, cycles } => Ok(Inference { output, cycles }),
        Reply::Error { code, detail } => Err(OpError::Device {
            request: "Infer",
            code,
            detail,
        }),
        other => Err(unexpected("Infer", &other)),
    }
}

/// Progress of [`flash`], for a progress bar.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FlashEvent {
    /// The device took `Begin`: chunks go from `resume_from` to `total`.
    Begin {
        /// Bytes the device already held.
        resume_from: u32,
        /// Artifact bytes.
        total: u32,
    },
    /// The device acknowledged bytes up to `offset`.
    Sent {
        /// Bytes acknowledged.
        offset: u32,
        /// Artifact bytes.
        total: u32,
    },
    /// All bytes sent; the device is verifying.
    Committing,
    /// The device accepted the model and reboots into its trial.
    Committed {
        /// The new version.
        version: u32,
    },
}

/// What [`flash`] did.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct FlashReport {
    /// The installed (confirmed) version.
    pub version: u32,
    /// The version that was active before.
    pub previous_version: Option<u32>,
    /// The model's name as the device reports it.
    pub name: String,
    /// The slot it runs from.
    pub slot: u8,
    /// Artifact bytes.
    pub total_bytes: u32,
    /// Bytes the device already held from an interrupted transfer (sent from there on).
    pub resume_from: u32,
    /// Artifact bytes the device took in this run (`total_bytes - resume_from` when all went
    /// well).
    pub bytes_sent: u64,
    /// Chunks acknowledged.
    pub chunks: u32,
    /// Times the transfer recovered its place (`OffsetMismatch`, update begun again).
    pub resyncs: u32,
    /// What the link coped with.
    pub link: LinkStats,
    /// Wall time, seconds.
    pub seconds: f64,
    /// The device's state after the confirmation.
    pub device: Info,
}

/// What the artifact's header says, checked locally before anything is sent.
struct Artifact {
    version: u32,
    counter: u32,
    target: String,
    digest: [u8; 32],
    total: u32,
}

fn read_artifact(bytes: &[u8]) -> Result<Artifact, OpError> {
    let c = Container::parse(bytes).map_err(|e| OpError::Artifact { why: e.to_string() })?;
    let total = u32::try_from(bytes.len()).map_err(|_| OpError::TooLarge {
        len: bytes.len() as u64,
        max: u32::MAX,
    })?;
    Ok(Artifact {
        version: c.header.model_version,
        counter: c.header.security_counter,
        target: c.header.target_name().to_string(),
        digest: *c.digest,
        total,
    })
}

/// The checks a device would make at `Begin` or the first chunk, made from its `Info` so that
/// a hopeless update fails at once with a precise message.
fn precheck(a: &Artifact, info: &Info) -> Result<(), OpError> {
    if !a.target.is_empty() && a.target != info.board {
        return Err(OpError::WrongBoard {
            target: a.target.clone(),
            board: info.board.clone(),
        });
    }
    if a.total > info.max_artifact_len {
        return Err(OpError::TooLarge {
            len: a.total.into(),
            max: info.max_artifact_len,
        });
    }
    if let Some(active) = &info.active {
        if a.version <= active.version {
            return Err(OpError::NotNewer {
                offered: a.version,
                active: active.version,
                name: active.name.clone(),
            });
        }
    }
    if a.counter < info.security_counter {
        return Err(OpError::CounterRollback {
            offered: a.counter,
            device: info.security_counter,
        });
    }
    Ok(())
}

/// Installs `artifact` on the device and waits until the device has confirmed it.
///
/// 1. `Info`: the board, the slot size, the version and the security counter are checked
///    against the artifact's header (and the artifact's own SHA-256 locally) before anything is
///    sent.
/// 2. `Begin` with the artifact's digest: a device that holds part of this artifact from an
///    interrupted transfer answers where to resume.
/// 3. `Chunk`s of the device's `max_chunk`; a lost chunk or answer is recovered from the
///    offset the device expects (`OffsetMismatch`), a device that lost the update is begun again.
/// 4. `Commit`: the device verifies everything and reboots into a trial of the new model.
/// 5. `Info` is polled (reconnecting if the transport dropped) until the trial is over: success
///    only when the new version is the active, confirmed model.
///
/// `progress` sees each step.
///
/// # Errors
/// Local checks ([`OpError::Artifact`], [`OpError::WrongBoard`], [`OpError::TooLarge`],
/// [`OpError::NotNewer`], [`OpError::CounterRollback`]), the device's refusal
/// ([`OpError::Refused`]), a revert after the trial ([`OpError::Reverted`]),
/// [`OpError::NotInstalled`], [`OpError::NotSettled`], a broken transfer
/// ([`OpError::Interrupted`]: run again to resume) and other link failures.
pub fn flash(
    link: &mut Link,
    artifact: &[u8],
    progress: &mut dyn FnMut(FlashEvent),
) -> Result<FlashReport, OpError> {
    let started = Instant::now();
    let a = read_artifact(artifact)?;
    let info = device_info(link)?;
    precheck(&a, &info)?;
    let previous_version = info.active.as_ref().map(|m| m.version);
    let refused = |stage, code, detail| OpError::Refused {
        stage,
        version: a.version,
        code,
        detail,
    };

    let (resume_from, chunk) = begin(link, &a, &info, refused)?;
    progress(FlashEvent::Begin {
        resume_from,
        total: a.total,
    });
    let mut offset = resume_from;
    let (mut bytes_sent, mut chunks, mut resyncs, mut rebegins) = (0u64, 0u32, 0u32, 0u32);
    while offset < a.total {
        let end = (offset as usize + chunk).min(a.total as usize);
        let data = artifact.get(offset as usize..end).unwrap_or_default();
        let reply = link
            .request(&Request::Chunk { offset, data })
            .map_err(|error| OpError::Interrupted {
                at: offset,
                total: a.total,
                error,
            })?;
        match reply {
            Reply::ChunkOk { next } if next > offset && next <= a.total => {
                bytes_sent += data.len() as u64;
                chunks += 1;
                if next != end as u32 {
                    resyncs += 1;
                }
                offset = next;
            }
            Reply::Error {
                code: ErrorCode::OffsetMismatch,
                detail,
            } if detail <= a.total && resyncs < MAX_RESYNCS => {
                // Our chunk was stored but its answer lost (the device is ahead), or a chunk
                // went missing (behind): go on from where the device is.
                resyncs += 1;
                bytes_sent += u64::from(detail.saturating_sub(offset));
                offset = detail;
            }
            Reply::Error {
                code: ErrorCode::NoUpdateInProgress | ErrorCode::OffsetMismatch,
                ..
            } if rebegins < MAX_REBEGINS => {
                // The device lost the update (it rebooted): begin again, it resumes from its
                // last checkpoint.
                rebegins += 1;
                resyncs += 1;
                offset = begin(link, &a, &info, refused)?.0;
            }
            Reply::Error { code, detail } => return Err(refused("Chunk", code, detail)),
            other => return Err(unexpected("Chunk", &other)),
        }
        progress(FlashEvent::Sent {
            offset,
            total: a.total,
        });
    }

    progress(FlashEvent::Committing);
    match link.request(&Request::Commit) {
        Ok(Reply::Committed { .. }) => {}
        // A resend after a lost `Committed`: the device already rebooted. The outcome is in Info.
        Ok(Reply::Error {
            code: ErrorCode::NoUpdateInProgress,
            ..
        }) => {}
        Ok(Reply::Error { code, detail }) => return Err(refused("Commit", code, detail)),
        Ok(other) => return Err(unexpected("Commit", &other)),
        // The answer was lost in the reset: the outcome is in Info.
        Err(LinkError::NoAnswer { .. } | LinkError::Closed { .. } | LinkError::Io { .. }) => {}
        Err(e) => return Err(e.into()),
    }
    progress(FlashEvent::Committed { version: a.version });

    let device = settle(link, a.version)?;
    let (name, slot) = device
        .active
        .as_ref()
        .map(|m| (m.name.clone(), m.slot))
        .unwrap_or_default();
    Ok(FlashReport {
        version: a.version,
        previous_version,
        name,
        slot,
        total_bytes: a.total,
        resume_from,
        bytes_sent,
        chunks,
        resyncs,
        link: link.stats(),
        seconds: started.elapsed().as_secs_f64(),
        device,
    })
}

/// `Begin`: returns where to resume and the chunk size.
fn begin(
    link: &mut Link,
    a: &Artifact,
    info: &Info,
    refused: impl Fn(&'static str, ErrorCode, u32) -> OpError,
) -> Result<(u32, usize), OpError> {
    let request = Request::Begin {
        total_len: a.total,
        digest: a.digest,
    };
    match link.request(&request)? {
        Reply::BeginOk {
            resume_from,
            max_chunk,
        } if resume_from <= a.total && max_chunk > 0 => {
            let chunk = usize::from(max_chunk)
                .min(usize::from(info.max_chunk.max(1)))
                .min(MAX_CHUNK);
            Ok((resume_from, chunk))
        }
        Reply::Error { code, detail } => Err(refused("Begin", code, detail)),
        other => Err(unexpected("Begin", &other)),
    }
}

/// What an `Info` after the commit says about `version`.
enum Verdict {
    Installed,
    Pending,
    Reverted(ErrorCode),
    NotInstalled,
}

fn judge(info: &Info, version: u32) -> Verdict {
    if info.pending(version).is_some() {
        return Verdict::Pending;
    }
    if let Some(active) = &info.active {
        if active.version == version {
            let confirmed = info
                .slots
                .iter()
                .any(|s| s.slot == active.slot && s.state == SlotState::Active);
            return if confirmed {
                Verdict::Installed
            } else {
                Verdict::Pending
            };
        }
    }
    match info.last_event {
        Some(LastEvent::Reverted { version: v, reason }) if v == version => {
            Verdict::Reverted(reason)
        }
        _ => Verdict::NotInstalled,
    }
}

/// Polls `Info` until the trial of `version` is over; reconnects when the transport dropped.
fn settle(link: &mut Link, version: u32) -> Result<Info, OpError> {
    let wait = link.timeouts().settle;
    let deadline = Instant::now() + wait;
    let per_try = link.timeouts().request;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match link.request_with(&Request::Info, per_try.min(left.max(POLL_PAUSE)), 0) {
            Ok(Reply::Info(info)) => match judge(&info, version) {
                Verdict::Installed => return Ok(info),
                Verdict::Pending => {}
                Verdict::Reverted(reason) => {
                    return Err(OpError::Reverted {
                        version,
                        reason,
                        active: info.active.as_ref().map(|m| m.version),
                    })
                }
                Verdict::NotInstalled => {
                    return Err(OpError::NotInstalled {
                        version,
                        active: info.active.as_ref().map(|m| m.version),
                        last_event: info.last_event,
                    })
                }
            },
            // Booting: not listening yet, or answering garbage while its UART starts.
            Ok(_) | Err(LinkError::NoAnswer { .. }) => {}
            Err(LinkError::Closed { .. } | LinkError::Io { .. }) => {
                std::thread::sleep(POLL_PAUSE);
                let left = deadline.saturating_duration_since(Instant::now());
                // A failed reconnect is retried at the next turn until the deadline.
                let _ = link.reconnect(left.min(link.timeouts().connect).max(POLL_PAUSE));
            }
            Err(e) => return Err(e.into()),
        }
        if Instant::now() >= deadline {
            return Err(OpError::NotSettled {
                version,
                waited: wait,
            });
        }
        std::thread::sleep(POLL_PAUSE);
    }
}
