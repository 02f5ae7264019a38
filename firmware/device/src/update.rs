//! The update state machine: receive into the inactive slot, verify, trial-boot with a
//! self-test, confirm or revert. Every decision is one journal record (see [`crate::state`]), so a
//! power cut at any point leaves either the old decision or the new one on flash.
//!
//! ```text
//!            begin            chunk*            commit                 boot
//!  Idle ──────────────► Receiving ──────► Receiving ──────► Trial(slot) ───────► Active(slot)
//!   ▲  (persist target     (erase+program,    (all bytes, digest,    (boots_left-1 persisted,  self-test
//!   │   slot = empty)       checkpoint every   signature, policy,     verify + self-test)      passes:
//!   │                       few sectors)       model validates)                                 confirm,
//!   │                                                                     │                     counter
//!   └──────────────── refused (record: Refused) ◄─────────────────────────┴─ fails / no boots  advances
//!                                                                            left: revert
//! ```

use crate::flash::{FlashFailure, Layout, MappedFlash, Region};
use crate::keys::{KeyError, KeyRecord, KeyRing, MAX_ADMITTED_KEYS};
use crate::state::{Event, Journal, Receiving, SlotMeta, SlotStatus, State, Trial};
use crate::MAX_WRITE_SIZE;
use core::fmt;
use kiln_runtime::format::{parse_header, Container, Header, HEADER_LEN, TRAILER_FIXED_LEN};
use kiln_runtime::sections::run_self_test;
use kiln_runtime::signature::SignatureError;
use kiln_runtime::{Interpreter, InvokeError, Model, ModelError};
use sha2::{Digest, Sha256};

/// Most compiled-in keys a device may have.
pub const MAX_BUILT_IN_KEYS: usize = 8;

/// What a board tells the update logic about itself.
#[derive(Clone, Copy, Debug)]
pub struct Config<'k> {
    /// Board name; artifacts signed for another board are refused.
    pub board: &'k str,
    /// Public keys compiled into the firmware.
    pub keys: &'k [[u8; 32]],
    /// Trial boots a new model gets before the device reverts it (a watchdog reset or power
    /// loss during the self-test uses one up).
    pub max_boots: u8,
    /// Arena bytes the board can give the interpreter.
    pub arena_len: u32,
    /// Receive progress is made durable every this many bytes (rounded to erase sectors).
    pub checkpoint: u32,
    /// Refuse models without SELFTEST vectors.
    pub require_selftest: bool,
}

/// Why an update step, a boot check or an inference was refused. The old model stays in service.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum UpdateError {
    /// The artifact is larger than a slot.
    TooLarge {
        /// Largest artifact the device takes.
        max: u32,
    },
    /// A chunk or commit without a `begin`.
    NoUpdateInProgress,
    /// A chunk at the wrong offset.
    OffsetMismatch {
        /// The offset the device expects next.
        expected: u32,
    },
    /// Commit before every byte arrived.
    Incomplete {
        /// Bytes received.
        received: u32,
        /// Bytes announced.
        total: u32,
    },
    /// The received bytes do not hash to the announced digest.
    DigestMismatch,
    /// The artifact is malformed.
    Malformed(ModelError),
    /// Signature problem.
    Signature(SignatureError),
    /// The version is not newer than the active model's.
    Downgrade {
        /// Active version.
        active: u32,
        /// Offered version.
        offered: u32,
    },
    /// The security counter is lower than the device's.
    CounterRollback {
        /// The device's security counter.
        min: u32,
        /// The artifact's.
        offered: u32,
    },
    /// The artifact is signed for another board.
    WrongBoard,
    /// The model needs more arena than the board has.
    ArenaTooSmall {
        /// Bytes the model needs.
        needs: u32,
        /// Bytes the board has.
        has: u32,
    },
    /// The model carries no SELFTEST vectors and the board requires them.
    NoSelfTest,
    /// Self-test outputs differ from the expected ones.
    SelfTestFailed {
        /// Cases that matched.
        passed: u16,
        /// Cases that differed.
        failed: u16,
    },
    /// The trial model used up its boots (watchdog resets or power loss during the self-test).
    TooManyBoots,
    /// A model is on trial: reset the device to finish the trial first.
    Busy,
    /// Flash failed.
    Flash(FlashFailure),
    /// A key record was refused.
    Key(KeyError),
    /// No model is running.
    NoModel,
    /// The inference input has the wrong length.
    BadInputLength {
        /// Bytes the model's inputs take.
        expected: u32,
    },
    /// The output buffer is too small.
    OutputTooSmall {
        /// Bytes the model's outputs take.
        needs: u32,
    },
    /// The interpreter failed.
    Inference(InvokeError),
}

impl fmt::Display for UpdateError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            UpdateError::TooLarge { max } => write!(
                f,
                "the artifact is larger than a model slot ({max} bytes): prune or quantize the model further"
            ),
            UpdateError::NoUpdateInProgress => {
                write!(f, "no update in progress: send Begin first")
            }
            UpdateError::OffsetMismatch { expected } => write!(
                f,
                "chunk out of order: the device expects offset {expected}; resend from there"
            ),
            UpdateError::Incomplete { received, total } => write!(
                f,
                "commit before the whole artifact arrived ({received} of {total} bytes): send the rest"
            ),
            UpdateError::DigestMismatch => write!(
                f,
                "the received bytes do not match the artifact's SHA-256: the transfer was corrupted; send it again"
            ),
            UpdateError::Malformed(e) => write!(f, "malformed artifact: {e}"),
            UpdateError::Signature(e) => write!(f, "{e}"),
            UpdateError::Downgrade { active, offered } => write!(
                f,
                "version {offered} is not newer than the active version {active}: sign the model with a higher --version"
            ),
            UpdateError::CounterRollback { min, offered } => write!(
                f,
                "security counter {offered} is below the device's {min}: this model was retired; sign with --security-counter {min} or higher"
            ),
            UpdateError::WrongBoard => write!(
                f,
                "the artifact is signed for another board: sign it with --target for this board"
            ),
            UpdateError::ArenaTooSmall { needs, has } => write!(
                f,
                "the model needs a {needs}-byte arena but the board has {has}: use a smaller model"
            ),
            UpdateError::NoSelfTest => write!(
                f,
                "the model has no SELFTEST vectors and this board requires them: convert with --selftest"
            ),
            UpdateError::SelfTestFailed { passed, failed } => write!(
                f,
                "self-test failed on the device ({failed} of {} cases differ): the model was reverted",
                passed + failed
            ),
            UpdateError::TooManyBoots => write!(
                f,
                "the new model did not finish its trial boot (watchdog or power loss): it was reverted"
            ),
            UpdateError::Busy => write!(
                f,
                "a model is on trial: reset the device to finish the trial, then retry"
            ),
            UpdateError::Flash(e) => write!(f, "flash operation failed ({:?})", e.0),
            UpdateError::Key(e) => write!(f, "{e}"),
            UpdateError::NoModel => write!(f, "no model is installed: flash one first"),
            UpdateError::BadInputLength { expected } => write!(
                f,
                "the input must be exactly {expected} bytes (the model's inputs, concatenated)"
            ),
            UpdateError::OutputTooSmall { needs } => {
                write!(f, "the output buffer must hold {needs} bytes")
            }
            UpdateError::Inference(e) => write!(f, "inference failed: {e}"),
        }
    }
}

#[cfg(feature = "std")]
impl std::error::Error for UpdateError {}

impl From<FlashFailure> for UpdateError {
    fn from(e: FlashFailure) -> Self {
        UpdateError::Flash(e)
    }
}

/// An interpreter for `model` over the first `arena_bytes` of the board's arena.
fn interpreter<'m, 'a>(
    model: Model<'m>,
    arena: &'a mut [u8],
) -> Result<Interpreter<'m, 'a>, UpdateError> {
    let need = model.arena_bytes();
    let has = arena.len() as u32;
    let arena = arena.get_mut(..need).ok_or(UpdateError::ArenaTooSmall {
        needs: need as u32,
        has,
    })?;
    Interpreter::new(model, arena).map_err(UpdateError::Malformed)
}

/// Progress of the update being received (RAM only; `State::receiving` is the durable part).
#[derive(Clone, Debug)]
struct Rx {
    slot: u8,
    total: u32,
    digest: [u8; 32],
    /// Next byte offset expected.
    next: u32,
    /// Bytes before this offset went to the hasher.
    hasher: Sha256,
    /// The first 64 bytes, until the header is complete.
    head: [u8; HEADER_LEN],
    /// Body length from the header (0 until the header arrived).
    body_len: u32,
    /// Bytes not yet programmed (fewer than a write unit), ending at `next`.
    tail: [u8; MAX_WRITE_SIZE],
    tail_len: usize,
    /// Sectors below this offset (relative to the slot) are erased for this update.
    erased_to: u32,
    /// Last durable checkpoint.
    good: u32,
}

/// The model running after boot.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Running {
    /// Its slot.
    pub slot: u8,
    /// Its version.
    pub version: u32,
    /// Its security counter.
    pub counter: u32,
}

/// What a boot did.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct BootReport {
    /// The model in service, if any.
    pub running: Option<Running>,
    /// Trial outcome of this boot, if a model was on trial.
    pub trial: Option<Event>,
}

/// The device: flash, layout, configuration, durable state and the update in progress.
pub struct Device<'k, F: MappedFlash> {
    flash: F,
    layout: Layout,
    config: Config<'k>,
    journal: Journal,
    state: State,
    rx: Option<Rx>,
    running: Option<Running>,
}

/// Why the device could not start.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MountError {
    /// The layout does not fit the flash.
    Layout(crate::flash::LayoutError),
    /// Too many compiled-in keys.
    TooManyKeys,
}

impl<'k, F: MappedFlash> Device<'k, F> {
    /// Reads the durable state from flash. Call [`Device::boot`] next.
    ///
    /// # Errors
    /// [`MountError`].
    pub fn mount(flash: F, layout: Layout, config: Config<'k>) -> Result<Self, MountError> {
        layout.check(&flash).map_err(MountError::Layout)?;
        if config.keys.len() > MAX_BUILT_IN_KEYS {
            return Err(MountError::TooManyKeys);
        }
        let (journal, state) = Journal::open(&flash, layout.state);
        Ok(Device {
            flash,
            layout,
            config,
            journal,
            state: state.unwrap_or_default(),
            rx: None,
            running: None,
        })
    }

    /// Gives the flash back (the simulator's "power off").
    pub fn into_flash(self) -> F {
        self.flash
    }

    /// The flash.
    pub fn flash(&self) -> &F {
        &self.flash
    }

    /// The durable state.
    pub fn state(&self) -> &State {
        &self.state
    }

    /// The board configuration.
    pub fn config(&self) -> &Config<'k> {
        &self.config
    }

    /// The model in service.
    pub fn running(&self) -> Option<Running> {
        self.running
    }

    /// Largest artifact a slot holds.
    pub fn max_artifact_len(&self) -> u32 {
        self.layout.slots[0].len.min(self.layout.slots[1].len)
    }

    /// Bytes received of the update in progress (RAM), or the durable checkpoint.
    pub fn receive_progress(&self) -> Option<(u32, u32)> {
        match (&self.rx, &self.state.receiving) {
            (Some(rx), _) => Some((rx.next, rx.total)),
            (None, Some(r)) => Some((r.good, r.total)),
            _ => None,
        }
    }

    /// The trusted keys (compiled-in and admitted).
    pub fn key_ring(&self) -> KeyRing<'k> {
        KeyRing::new(self.config.keys, &self.state.admitted_keys)
    }

    fn persist(&mut self, mut next: State) -> Result<(), UpdateError> {
        self.journal.append(&mut self.flash, &mut next)?;
        self.state = next;
        Ok(())
    }

    fn slot_region(&self, slot: u8) -> Region {
        self.layout.slots[slot as usize & 1]
    }

    /// The bytes of a slot's artifact, as the state records its length.
    fn slot_bytes(&self, slot: u8) -> Option<&[u8]> {
        let meta = self.state.slots[slot as usize & 1]?;
        let r = self.slot_region(slot);
        self.flash
            .mapped()
            .get(r.offset as usize..r.offset as usize + meta.len as usize)
    }

    /// Version / counter / board policy for a header that is about to replace the active model.
    fn check_policy(&self, h: &Header, replacing_active: bool) -> Result<(), UpdateError> {
        let target = h.target_name();
        if !target.is_empty() && target != self.config.board {
            return Err(UpdateError::WrongBoard);
        }
        if h.security_counter < self.state.min_counter {
            return Err(UpdateError::CounterRollback {
                min: self.state.min_counter,
                offered: h.security_counter,
            });
        }
        if replacing_active {
            if let Some(a) = self
                .state
                .active
                .and_then(|a| self.state.slots[a as usize & 1])
            {
                if h.model_version <= a.version {
                    return Err(UpdateError::Downgrade {
                        active: a.version,
                        offered: h.model_version,
                    });
                }
            }
        }
        if h.arena_bytes > self.config.arena_len {
            return Err(UpdateError::ArenaTooSmall {
                needs: h.arena_bytes,
                has: self.config.arena_len,
            });
        }
        Ok(())
    }

    /// Full check of an artifact in flash: structure and digest, signature by a trusted key,
    /// policy, and a graph the runtime accepts.
    fn verify_bytes<'b>(
        &self,
        bytes: &'b [u8],
        replacing_active: bool,
    ) -> Result<Model<'b>, UpdateError> {
        let model = Model::load(bytes).map_err(UpdateError::Malformed)?;
        let ring = self.key_ring();
        let mut keys = [[0u8; 32]; MAX_BUILT_IN_KEYS + MAX_ADMITTED_KEYS];
        let n = ring.all(&mut keys);
        model
            .container()
            .verify_signatures(&keys[..n])
            .map_err(UpdateError::Signature)?;
        self.check_policy(&model.container().header, replacing_active)?;
        if self.config.require_selftest
            && model
                .container()
                .section(kiln_runtime::format::SectionKind::SelfTest)
                .is_none()
        {
            return Err(UpdateError::NoSelfTest);
        }
        Ok(model)
    }

    /// Verifies a slot against the state's record of it.
    fn verify_slot(&self, slot: u8, replacing_active: bool) -> Result<Running, UpdateError> {
        let meta = self.state.slots[slot as usize & 1].ok_or(UpdateError::Malformed(
            ModelError::Truncated { what: "slot" },
        ))?;
        let bytes = self.slot_bytes(slot).ok_or(UpdateError::TooLarge {
            max: self.max_artifact_len(),
        })?;
        let model = self.verify_bytes(bytes, replacing_active)?;
        if *model.container().digest != meta.digest {
            return Err(UpdateError::DigestMismatch);
        }
        let h = model.container().header;
        Ok(Running {
            slot,
            version: h.model_version,
            counter: h.security_counter,
        })
    }

    fn self_test(&self, slot: u8, arena: &mut [u8]) -> Result<(), UpdateError> {
        let bytes = self.slot_bytes(slot).ok_or(UpdateError::NoModel)?;
        let model = Model::load(bytes).map_err(UpdateError::Malformed)?;
        let mut interp = interpreter(model, arena)?;
        let report = run_self_test(&mut interp).map_err(UpdateError::Inference)?;
        if report.failed > 0 || (self.config.require_selftest && report.passed == 0) {
            return Err(UpdateError::SelfTestFailed {
                passed: report.passed,
                failed: report.failed,
            });
        }
        Ok(())
    }

    /// Boots: finishes a pending trial (self-test, then confirm or revert) and picks the model to
    /// run, verifying its signature. `arena` is the interpreter's arena (used for the self-test).
    ///
    /// # Errors
    /// Only flash failures; every refusal is recorded and the device keeps (or has) no model.
    pub fn boot(&mut self, arena: &mut [u8]) -> Result<BootReport, UpdateError> {
        self.rx = None;
        self.running = None;
        let mut report = BootReport::default();
        if let Some(t) = self.state.trial {
            if t.boots_left == 0 {
                report.trial = Some(self.revert(t.slot, UpdateError::TooManyBoots)?);
            } else {
                self.use_trial_boot(t)?;
                let outcome = self
                    .verify_slot(t.slot, true)
                    .and_then(|r| self.self_test(t.slot, arena).map(|()| r));
                report.trial = Some(match outcome {
                    Ok(r) => self.confirm(r)?,
                    Err(e) => self.revert(t.slot, e)?,
                });
            }
        }
        // The active model, or else the previous one if it is still allowed to run.
        let with_status = |status: SlotStatus| {
            (0..2u8).find(|&s| self.state.slots[s as usize].is_some_and(|m| m.status == status))
        };
        let candidates = [
            self.state.active.filter(|&a| {
                self.state.slots[a as usize & 1].is_some_and(|m| m.status == SlotStatus::Active)
            }),
            with_status(SlotStatus::Previous),
        ];
        for slot in candidates.into_iter().flatten() {
            if let Ok(r) = self.verify_slot(slot, false) {
                self.running = Some(r);
                break;
            }
        }
        report.running = self.running;
        Ok(report)
    }

    /// Spends one of the trial's boots (durably, before the trial model runs).
    fn use_trial_boot(&mut self, t: Trial) -> Result<(), UpdateError> {
        let mut next = self.state.clone();
        next.trial = Some(Trial {
            slot: t.slot,
            boots_left: t.boots_left.saturating_sub(1),
        });
        self.persist(next)
    }

    /// A boot that is reset by the watchdog while the trial model runs its self-test: the boot
    /// is spent, nothing else happens. For the simulator and tests (on hardware the watchdog does
    /// this).
    ///
    /// # Errors
    /// Flash failures.
    pub fn boot_reset_during_trial(&mut self) -> Result<(), UpdateError> {
        self.rx = None;
        self.running = None;
        match self.state.trial {
            Some(t) if t.boots_left > 0 => self.use_trial_boot(t),
            _ => Ok(()),
        }
    }

    fn confirm(&mut self, r: Running) -> Result<Event, UpdateError> {
        let mut next = self.state.clone();
        if let Some(old) = next.active {
            if old != r.slot {
                if let Some(m) = next.slots[old as usize & 1].as_mut() {
                    m.status = SlotStatus::Previous;
                }
            }
        }
        if let Some(m) = next.slots[r.slot as usize & 1].as_mut() {
            m.status = SlotStatus::Active;
        }
        next.active = Some(r.slot);
        next.trial = None;
        next.min_counter = next.min_counter.max(r.counter);
        let event = Event::Installed { version: r.version };
        next.last_event = Some(event);
        self.persist(next)?;
        Ok(event)
    }

    fn revert(&mut self, slot: u8, why: UpdateError) -> Result<Event, UpdateError> {
        let mut next = self.state.clone();
        let version = next.slots[slot as usize & 1].map_or(0, |m| m.version);
        if let Some(m) = next.slots[slot as usize & 1].as_mut() {
            m.status = SlotStatus::Invalid;
        }
        next.trial = None;
        let event = Event::Reverted {
            version,
            reason: why.code(),
        };
        next.last_event = Some(event);
        self.persist(next)?;
        Ok(event)
    }

    fn refuse(&mut self, why: UpdateError) -> UpdateError {
        self.rx = None;
        if matches!(why, UpdateError::Flash(_)) {
            return why;
        }
        let mut next = self.state.clone();
        if let Some(r) = next.receiving.take() {
            next.slots[r.slot as usize & 1] = None;
        }
        next.last_event = Some(Event::Refused { reason: why.code() });
        match self.persist(next) {
            Ok(()) => why,
            Err(flash) => flash,
        }
    }

    /// Starts (or resumes) receiving an artifact of `total` bytes whose body SHA-256 is `digest`.
    /// Returns the offset to send from: 0, or where an interrupted transfer of the same artifact
    /// left off.
    ///
    /// # Errors
    /// [`UpdateError::TooLarge`], [`UpdateError::Busy`], flash failures.
    pub fn begin(&mut self, total: u32, digest: [u8; 32]) -> Result<u32, UpdateError> {
        if self.state.trial.is_some() {
            return Err(UpdateError::Busy);
        }
        if total > self.max_artifact_len() {
            return Err(UpdateError::TooLarge {
                max: self.max_artifact_len(),
            });
        }
        if (total as usize) < HEADER_LEN + TRAILER_FIXED_LEN {
            return Err(UpdateError::Malformed(ModelError::Truncated {
                what: "artifact",
            }));
        }
        if let Some(rx) = &self.rx {
            if rx.digest == digest && rx.total == total {
                return Ok(rx.next);
            }
        }
        if let Some(r) = self.state.receiving {
            if r.digest == digest && r.total == total {
                return self.resume(r);
            }
        }
        // Never the slot the running model executes from (usually the active one; the previous
        // one when the active slot failed verification at boot).
        let slot = match (self.running, self.state.active) {
            (Some(r), _) => 1 - (r.slot & 1),
            (None, Some(a)) => 1 - (a & 1),
            (None, None) => 0,
        };
        let mut next = self.state.clone();
        next.slots[slot as usize] = None;
        if next.active == Some(slot) {
            next.active = None;
        }
        next.receiving = Some(Receiving {
            slot,
            total,
            digest,
            good: 0,
        });
        self.persist(next)?;
        self.rx = Some(Rx {
            slot,
            total,
            digest,
            next: 0,
            hasher: Sha256::new(),
            head: [0; HEADER_LEN],
            body_len: 0,
            tail: [0xFF; MAX_WRITE_SIZE],
            tail_len: 0,
            erased_to: 0,
            good: 0,
        });
        Ok(0)
    }

    fn resume(&mut self, r: Receiving) -> Result<u32, UpdateError> {
        let region = self.slot_region(r.slot);
        let start = region.offset as usize;
        let mapped = self.flash.mapped();
        let good = r.good.min(r.total) as usize;
        let prefix = &mapped[start..start + good];
        let mut rx = Rx {
            slot: r.slot,
            total: r.total,
            digest: r.digest,
            next: good as u32,
            hasher: Sha256::new(),
            head: [0; HEADER_LEN],
            body_len: 0,
            tail: [0xFF; MAX_WRITE_SIZE],
            tail_len: 0,
            erased_to: good as u32,
            good: good as u32,
        };
        if good >= HEADER_LEN {
            rx.head.copy_from_slice(&prefix[..HEADER_LEN]);
            let h = parse_header(&rx.head).map_err(UpdateError::Malformed)?;
            rx.body_len = h.body_len;
            let hashed = good.min(h.body_len as usize);
            rx.hasher.update(&prefix[..hashed]);
        } else {
            // Checkpoints are sector boundaries; nothing before the header is kept.
            rx.next = 0;
            rx.erased_to = 0;
            rx.good = 0;
        }
        let next = rx.next;
        self.rx = Some(rx);
        Ok(next)
    }

    /// Takes the chunk at `offset`. Returns the next offset expected.
    ///
    /// # Errors
    /// Out of order or oversized chunks (nothing is written), an early refusal from the header
    /// (wrong board, downgrade, counter, too large: the update is abandoned), flash failures.
    pub fn chunk(&mut self, offset: u32, data: &[u8]) -> Result<u32, UpdateError> {
        let rx = self.rx.as_ref().ok_or(UpdateError::NoUpdateInProgress)?;
        if offset != rx.next {
            return Err(UpdateError::OffsetMismatch { expected: rx.next });
        }
        let end = offset as u64 + data.len() as u64;
        if end > rx.total as u64 {
            return Err(UpdateError::TooLarge { max: rx.total });
        }
        // Header: collect it, then check it before more bytes are written.
        let mut rx = self.rx.take().ok_or(UpdateError::NoUpdateInProgress)?;
        if (offset as usize) < HEADER_LEN {
            let n = (HEADER_LEN - offset as usize).min(data.len());
            rx.head[offset as usize..offset as usize + n].copy_from_slice(&data[..n]);
            if offset as usize + n == HEADER_LEN {
                let checked = parse_header(&rx.head)
                    .map_err(UpdateError::Malformed)
                    .and_then(|h| {
                        let min_total = h.body_len as u64 + TRAILER_FIXED_LEN as u64;
                        if (rx.total as u64) < min_total {
                            return Err(UpdateError::Malformed(ModelError::Truncated {
                                what: "trailer",
                            }));
                        }
                        self.check_policy(&h, true).map(|()| h)
                    });
                match checked {
                    Ok(h) => rx.body_len = h.body_len,
                    Err(e) => return Err(self.refuse(e)),
                }
            }
        }
        // Hash the part of the body in this chunk (the header is always within the body).
        let body_end = if rx.body_len == 0 {
            u64::MAX
        } else {
            rx.body_len as u64
        };
        if (offset as u64) < body_end {
            let n = (body_end.min(end) - offset as u64) as usize;
            rx.hasher.update(&data[..n]);
        }
        // Program whole write units; keep the remainder in `tail`.
        let w = F::WRITE_SIZE;
        let region = self.slot_region(rx.slot);
        let mut data = data;
        let mut pos = offset - rx.tail_len as u32; // flash offset (slot-relative) of tail[0]
        if rx.tail_len > 0 {
            let n = (w - rx.tail_len).min(data.len());
            rx.tail[rx.tail_len..rx.tail_len + n].copy_from_slice(&data[..n]);
            rx.tail_len += n;
            data = &data[n..];
            if rx.tail_len == w {
                let unit = rx.tail;
                if let Err(e) = self.program(&mut rx, region, pos, &unit[..w]) {
                    self.rx = Some(rx);
                    return Err(e);
                }
                pos += w as u32;
                rx.tail_len = 0;
            }
        }
        let whole = data.len() / w * w;
        if whole > 0 {
            if let Err(e) = self.program(&mut rx, region, pos, &data[..whole]) {
                self.rx = Some(rx);
                return Err(e);
            }
        }
        let rest = &data[whole..];
        rx.tail[rx.tail_len..rx.tail_len + rest.len()].copy_from_slice(rest);
        rx.tail_len += rest.len();
        rx.next = end as u32;

        // Durable checkpoint at a sector boundary every `checkpoint` bytes.
        let erase = F::ERASE_SIZE as u32;
        let programmed = rx.next - rx.tail_len as u32;
        let good = programmed / erase * erase;
        if good >= rx.good + self.config.checkpoint.max(erase) {
            let mut next = self.state.clone();
            if let Some(r) = next.receiving.as_mut() {
                r.good = good;
            }
            let result = self.persist(next);
            if result.is_ok() {
                rx.good = good;
            }
            let n = rx.next;
            self.rx = Some(rx);
            result?;
            return Ok(n);
        }
        let n = rx.next;
        self.rx = Some(rx);
        Ok(n)
    }

    /// Programs `bytes` at slot-relative `pos`, erasing sectors first as the write reaches them.
    fn program(
        &mut self,
        rx: &mut Rx,
        region: Region,
        pos: u32,
        bytes: &[u8],
    ) -> Result<(), UpdateError> {
        let end = pos + bytes.len() as u32;
        let erase = F::ERASE_SIZE as u32;
        while rx.erased_to < end {
            let from = region.offset + rx.erased_to;
            self.flash
                .erase(from, from + erase)
                .map_err(FlashFailure::of)?;
            rx.erased_to += erase;
        }
        self.flash
            .write(region.offset + pos, bytes)
            .map_err(FlashFailure::of)?;
        Ok(())
    }

    /// Finishes the transfer: programs the last bytes, checks digest, signature, policy and the
    /// graph from flash, and makes the slot the trial model. Reset the device next: the boot runs
    /// the trial.
    ///
    /// # Errors
    /// Any refusal (recorded; the active model stays), flash failures.
    pub fn commit(&mut self) -> Result<Running, UpdateError> {
        let mut rx = self.rx.take().ok_or(UpdateError::NoUpdateInProgress)?;
        if rx.next != rx.total {
            let e = UpdateError::Incomplete {
                received: rx.next,
                total: rx.total,
            };
            self.rx = Some(rx);
            return Err(e);
        }
        let region = self.slot_region(rx.slot);
        if rx.tail_len > 0 {
            let w = F::WRITE_SIZE;
            let mut unit = [0xFFu8; MAX_WRITE_SIZE];
            unit[..rx.tail_len].copy_from_slice(&rx.tail[..rx.tail_len]);
            let pos = rx.total - rx.tail_len as u32;
            self.program(&mut rx, region, pos, &unit[..w])?;
            rx.tail_len = 0;
        }
        let digest: [u8; 32] = rx.hasher.clone().finalize().into();
        if digest != rx.digest {
            return Err(self.refuse(UpdateError::DigestMismatch));
        }
        let start = region.offset as usize;
        let checked = match self.flash.mapped().get(start..start + rx.total as usize) {
            None => Err(UpdateError::TooLarge {
                max: self.max_artifact_len(),
            }),
            Some(bytes) => self.verify_bytes(bytes, true).and_then(|m| {
                if *m.container().digest != rx.digest {
                    Err(UpdateError::DigestMismatch)
                } else {
                    Ok(m.container().header)
                }
            }),
        };
        let h = match checked {
            Ok(h) => h,
            Err(e) => return Err(self.refuse(e)),
        };
        let mut next = self.state.clone();
        next.slots[rx.slot as usize & 1] = Some(SlotMeta {
            status: SlotStatus::Trial,
            version: h.model_version,
            counter: h.security_counter,
            len: rx.total,
            digest: rx.digest,
        });
        next.trial = Some(Trial {
            slot: rx.slot,
            boots_left: self.config.max_boots.max(1),
        });
        next.receiving = None;
        self.persist(next)?;
        Ok(Running {
            slot: rx.slot,
            version: h.model_version,
            counter: h.security_counter,
        })
    }

    /// Verifies and applies a key record (admit or revoke a key); returns the number of trusted
    /// keys.
    ///
    /// # Errors
    /// [`UpdateError::Key`], flash failures.
    pub fn apply_key_record(&mut self, record: &[u8]) -> Result<usize, UpdateError> {
        let rec = KeyRecord::parse(record).map_err(UpdateError::Key)?;
        let mut ring = self.key_ring();
        ring.apply(&rec).map_err(UpdateError::Key)?;
        let mut next = self.state.clone();
        next.admitted_keys = ring.admitted.clone();
        self.persist(next)?;
        Ok(ring.len())
    }

    /// The running model's bytes (verified at boot).
    pub fn running_model(&self) -> Option<&[u8]> {
        self.slot_bytes(self.running?.slot)
    }

    /// Runs the model on `input` (every input tensor's bytes, concatenated) and writes every
    /// output tensor's bytes, concatenated, to `output`. Returns the output length.
    ///
    /// # Errors
    /// No model, wrong input length, output buffer too small, interpreter errors.
    pub fn infer(
        &self,
        arena: &mut [u8],
        input: &[u8],
        output: &mut [u8],
    ) -> Result<usize, UpdateError> {
        let bytes = self.running_model().ok_or(UpdateError::NoModel)?;
        // Verified at boot (digest and signature): skip re-hashing.
        let container = Container::parse_structure(bytes).map_err(UpdateError::Malformed)?;
        let model = Model::from_container(container).map_err(UpdateError::Malformed)?;
        let mut interp = interpreter(model, arena)?;
        let mut expected = 0usize;
        for i in 0..model.inputs().len() {
            expected += interp
                .input_bytes_mut(i)
                .map_err(UpdateError::Inference)?
                .len();
        }
        if input.len() != expected {
            return Err(UpdateError::BadInputLength {
                expected: expected as u32,
            });
        }
        let mut at = 0;
        for i in 0..model.inputs().len() {
            let dst = interp.input_bytes_mut(i).map_err(UpdateError::Inference)?;
            let n = dst.len();
            dst.copy_from_slice(&input[at..at + n]);
            at += n;
        }
        interp.invoke().map_err(UpdateError::Inference)?;
        let mut needs = 0usize;
        for i in 0..model.outputs().len() {
            needs += interp
                .output_bytes(i)
                .map_err(UpdateError::Inference)?
                .len();
        }
        if output.len() < needs {
            return Err(UpdateError::OutputTooSmall {
                needs: needs as u32,
            });
        }
        let mut at = 0;
        for i in 0..model.outputs().len() {
            let src = interp.output_bytes(i).map_err(UpdateError::Inference)?;
            output[at..at + src.len()].copy_from_slice(src);
            at += src.len();
        }
        Ok(at)
    }
}
