//! A/B model files and the agent's state in one directory.
//!
//! ```text
//! DIR/slot-a.kiln     a verified artifact (or absent)
//! DIR/slot-b.kiln     the other one
//! DIR/state.json      State: active slot, what each slot holds, security counter,
//!                     pending trial, unacknowledged events, device id + token
//! DIR/*.part          downloads in progress (resumed with HTTP Range)
//! ```
//!
//! Every file write is: write `NAME.tmp`, fsync, rename over `NAME`, fsync the directory. So a
//! crash leaves each file either old or new, never torn.
//!
//! Installing a new model, step by step (the numbers are the crash points tests abort at):
//!
//! ```text
//! step                                      state.json after       on restart
//! 0  begin                                  old                    old model runs
//! 1  slot-X.kiln.tmp written + fsynced      old                    old model runs (tmp ignored)
//! 2  renamed over slot-X.kiln, dir synced   old (X's record stale) old runs; X fails its digest
//! 3  state: slots[X] = new, trial = X       trial pending          trial finished: self-test,
//!                                                                  confirm or revert
//! 4  state: active = X, counter, event      new confirmed          new model runs
//! ```
//!
//! The active slot's file is never written while it is active, so the model in service is
//! always a complete, verified file.

use crate::api::DeviceEvent;
use serde::{Deserialize, Serialize};
use std::fs::{self, File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};

/// Most unacknowledged events kept (oldest dropped first).
pub const MAX_EVENTS: usize = 64;
/// Most refused artifact digests remembered.
pub const MAX_REFUSED: usize = 32;

/// What a slot holds, as recorded when it was written.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SlotRecord {
    /// Model name.
    pub model: String,
    /// Version.
    pub version: u32,
    /// Security counter.
    pub counter: u32,
    /// SHA-256 (hex) of the file.
    pub sha256: String,
}

/// A model written to a slot and waiting for its self-test.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Trial {
    /// The slot (0 = a, 1 = b).
    pub slot: u8,
    /// Whether the server ordered it as a rollback.
    pub rollback: bool,
}

/// The persisted state.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct State {
    /// Device id, once enrolled.
    pub device_id: Option<String>,
    /// Device token, once enrolled.
    pub token: Option<String>,
    /// The slot in service.
    pub active: Option<u8>,
    /// What each slot holds.
    pub slots: [Option<SlotRecord>; 2],
    /// Lowest security counter accepted (the confirmed model's).
    pub min_counter: u32,
    /// A model on trial.
    pub trial: Option<Trial>,
    /// Events the server has not acknowledged yet.
    pub events: Vec<DeviceEvent>,
    /// Digests of artifacts refused for good (bad signature, self-test failed): not retried.
    pub refused: Vec<String>,
}

impl State {
    /// The active slot's record.
    pub fn active_record(&self) -> Option<&SlotRecord> {
        self.slots.get(self.active? as usize)?.as_ref()
    }

    /// Queues an event (bounded).
    pub fn push_event(&mut self, e: DeviceEvent) {
        if self.events.len() >= MAX_EVENTS {
            self.events.remove(0);
        }
        self.events.push(e);
    }

    /// Remembers a refused digest (bounded).
    pub fn refuse(&mut self, sha256: &str) {
        if self.refused.iter().any(|s| s == sha256) {
            return;
        }
        if self.refused.len() >= MAX_REFUSED {
            self.refused.remove(0);
        }
        self.refused.push(sha256.to_string());
    }
}

/// Store errors.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StoreError {
    /// A file operation failed.
    #[error("{what} {path}: {source}")]
    Io {
        /// The operation.
        what: &'static str,
        /// The file.
        path: PathBuf,
        /// The cause.
        source: std::io::Error,
    },
    /// state.json does not parse.
    #[error("state file {path} is unreadable: {reason}")]
    BadState {
        /// The file.
        path: PathBuf,
        /// Why.
        reason: String,
    },
    /// A crash injected at a numbered step (tests and the simulator).
    #[error("injected crash at step {0}")]
    Crash(u32),
}

fn io<'p>(what: &'static str, path: &'p Path) -> impl FnOnce(std::io::Error) -> StoreError + 'p {
    move |source| StoreError::Io {
        what,
        path: path.to_path_buf(),
        source,
    }
}

/// The state directory.
#[derive(Debug)]
pub struct Store {
    dir: PathBuf,
    state: State,
    /// Abort with [`StoreError::Crash`] when reaching this install step.
    pub crash_at: Option<u32>,
}

/// File name of a slot.
pub fn slot_name(slot: u8) -> &'static str {
    if slot & 1 == 0 {
        "slot-a.kiln"
    } else {
        "slot-b.kiln"
    }
}

impl Store {
    /// Opens (creating) the directory and reads state.json (a fresh state when absent).
    ///
    /// # Errors
    /// The directory cannot be created, or state.json exists but does not parse.
    pub fn open(dir: &Path) -> Result<Self, StoreError> {
        fs::create_dir_all(dir).map_err(io("create", dir))?;
        let path = dir.join("state.json");
        let state = match fs::read(&path) {
            Ok(b) => serde_json::from_slice(&b).map_err(|e| StoreError::BadState {
                path: path.clone(),
                reason: e.to_string(),
            })?,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => State::default(),
            Err(e) => return Err(io("read", &path)(e)),
        };
        Ok(Store {
            dir: dir.to_path_buf(),
            state,
            crash_at: None,
        })
    }

    /// The directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The state.
    pub fn state(&self) -> &State {
        &self.state
    }

    /// Replaces the state durably.
    ///
    /// # Errors
    /// The write failed; the old state stays on disk and in memory.
    pub fn persist(&mut self, next: State) -> Result<(), StoreError> {
        let bytes = serde_json::to_vec_pretty(&next).map_err(|e| StoreError::BadState {
            path: self.dir.join("state.json"),
            reason: e.to_string(),
        })?;
        write_atomic(&self.dir, "state.json", &bytes)?;
        self.state = next;
        Ok(())
    }

    /// Changes the state with `f` and persists it.
    ///
    /// # Errors
    /// As [`Self::persist`].
    pub fn update(&mut self, f: impl FnOnce(&mut State)) -> Result<(), StoreError> {
        let mut next = self.state.clone();
        f(&mut next);
        self.persist(next)
    }

    /// Reads a slot's file.
    pub fn read_slot(&self, slot: u8) -> Option<Vec<u8>> {
        fs::read(self.dir.join(slot_name(slot))).ok()
    }

    /// Returns `Err(Crash)` when `step` is the injected crash point.
    ///
    /// # Errors
    /// [`StoreError::Crash`].
    pub fn step(&self, step: u32) -> Result<(), StoreError> {
        if self.crash_at == Some(step) {
            return Err(StoreError::Crash(step));
        }
        Ok(())
    }

    /// The slot an install writes: never the active one.
    pub fn inactive_slot(&self) -> u8 {
        match self.state.active {
            Some(a) => 1 - (a & 1),
            None => 0,
        }
    }

    /// Install steps 0..=3: writes `bytes` into the inactive slot and records a pending trial.
    ///
    /// # Errors
    /// I/O, or an injected crash.
    pub fn stage(
        &mut self,
        bytes: &[u8],
        record: SlotRecord,
        rollback: bool,
    ) -> Result<u8, StoreError> {
        let slot = self.inactive_slot();
        self.step(0)?;
        let name = slot_name(slot);
        let tmp = format!("{name}.tmp");
        write_synced(&self.dir.join(&tmp), bytes)?;
        self.step(1)?;
        rename_synced(&self.dir, &tmp, name)?;
        self.step(2)?;
        self.update(|s| {
            s.slots[slot as usize] = Some(record);
            s.trial = Some(Trial { slot, rollback });
        })?;
        self.step(3)?;
        Ok(slot)
    }

    /// Install step 4, after a passed self-test: the trial slot becomes active.
    ///
    /// # Errors
    /// I/O (the trial stays pending and is retried at the next start).
    pub fn confirm(&mut self, events: Vec<DeviceEvent>) -> Result<(), StoreError> {
        let Some(trial) = self.state.trial.clone() else {
            return Ok(());
        };
        self.update(|s| {
            s.active = Some(trial.slot);
            if let Some(r) = &s.slots[trial.slot as usize] {
                s.min_counter = s.min_counter.max(r.counter);
            }
            s.trial = None;
            for e in events {
                s.push_event(e);
            }
        })?;
        self.step(4)
    }

    /// After a failed self-test: forgets the trial slot, refuses its digest, queues `event`.
    ///
    /// # Errors
    /// I/O.
    pub fn revert(&mut self, event: DeviceEvent) -> Result<(), StoreError> {
        let Some(trial) = self.state.trial.clone() else {
            return Ok(());
        };
        self.update(|s| {
            if let Some(r) = s.slots[trial.slot as usize].take() {
                s.refuse(&r.sha256);
            }
            s.trial = None;
            s.push_event(event);
        })
    }

    /// Path of the partial download of an artifact.
    pub fn part_path(&self, sha256: &str) -> PathBuf {
        let safe: String = sha256
            .chars()
            .filter(|c| c.is_ascii_hexdigit())
            .take(64)
            .collect();
        self.dir.join(format!("download-{safe}.part"))
    }

    /// Removes leftover temp files (a crash between write and rename).
    pub fn clean_tmp(&self) {
        if let Ok(rd) = fs::read_dir(&self.dir) {
            for e in rd.flatten() {
                if e.file_name().to_string_lossy().ends_with(".tmp") {
                    let _ = fs::remove_file(e.path());
                }
            }
        }
    }

    /// Removes partial downloads other than `keep`, and leftover temp files.
    pub fn clean(&self, keep: Option<&Path>) {
        if let Ok(rd) = fs::read_dir(&self.dir) {
            for e in rd.flatten() {
                let p = e.path();
                let n = e.file_name().to_string_lossy().into_owned();
                if (n.ends_with(".part") && Some(p.as_path()) != keep) || n.ends_with(".tmp") {
                    let _ = fs::remove_file(&p);
                }
            }
        }
    }
}

fn write_synced(path: &Path, bytes: &[u8]) -> Result<(), StoreError> {
    let mut f = File::create(path).map_err(io("create", path))?;
    f.write_all(bytes).map_err(io("write", path))?;
    f.sync_all().map_err(io("fsync", path))
}

fn rename_synced(dir: &Path, from: &str, to: &str) -> Result<(), StoreError> {
    let to_path = dir.join(to);
    fs::rename(dir.join(from), &to_path).map_err(io("rename", &to_path))?;
    sync_dir(dir)
}

/// fsyncs a directory (so a rename in it is durable).
///
/// # Errors
/// I/O.
pub fn sync_dir(dir: &Path) -> Result<(), StoreError> {
    let d = OpenOptions::new()
        .read(true)
        .open(dir)
        .map_err(io("open", dir))?;
    d.sync_all().map_err(io("fsync", dir))
}

/// Writes `DIR/NAME` atomically: temp file, fsync, rename, fsync the directory.
///
/// # Errors
/// I/O.
pub fn write_atomic(dir: &Path, name: &str, bytes: &[u8]) -> Result<(), StoreError> {
    let tmp = format!("{name}.tmp");
    write_synced(&dir.join(&tmp), bytes)?;
    rename_synced(dir, &tmp, name)
}
