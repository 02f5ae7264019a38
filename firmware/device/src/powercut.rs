//! The power-cut walk (host only, feature `std`): scenarios of updates on the flash simulator,
//! replayed once per cut point, each followed by the survival check.
//!
//! For every scenario the walk first runs it without faults to count its flash operations `N`,
//! then for each operation `k < N` and each [`CUT_KINDS`] entry it restores the scenario's
//! starting flash, arms the cut at `k`, runs the scenario until power dies, powers on, and checks
//! that the device **survived**:
//! 1. the boot completes and programs no word that was not erased;
//! 2. the model in service (if any) verifies — digest and a signature by a trusted key — and its
//!    version is one the scenario allows at that point; only a device that never had a model may
//!    come back without one;
//! 3. the device takes the next update: a fresh, signed artifact is installed from scratch, passes
//!    its trial boot and runs.

use crate::flash::{Layout, Region};
use crate::sim::{CutKind, SimFlash};
use crate::testkit::{self, Spec};
use crate::update::{Config, Device, UpdateError};
use ed25519_dalek::SigningKey;
use kiln_runtime::format::Container;
use std::string::{String, ToString};
use std::vec;
use std::vec::Vec;

/// The simulated part: 8-byte program unit, 4 KiB sectors.
pub type Flash = SimFlash<8, 4096>;

/// Cut kinds tried at every operation.
pub const CUT_KINDS: [CutKind; 5] = [
    CutKind::Before,
    CutKind::Torn { quarters: 0 },
    CutKind::Torn { quarters: 1 },
    CutKind::Torn { quarters: 2 },
    CutKind::Torn { quarters: 3 },
];

/// Board name the simulated device answers to.
pub const BOARD: &str = "sim-board";
/// Bytes per chunk, as the host sends them.
pub const CHUNK: usize = 1024;

/// Flash layout for slots of `slot_len` bytes: two 4 KiB state banks (8 records each, so the
/// walks cross bank switches), then slots A and B.
pub fn layout(slot_len: u32) -> Layout {
    Layout {
        state: Region {
            offset: 0,
            len: 8 * 1024,
        },
        slots: [
            Region {
                offset: 8 * 1024,
                len: slot_len,
            },
            Region {
                offset: 8 * 1024 + slot_len,
                len: slot_len,
            },
        ],
    }
}

/// Keys and artifacts of a walk.
pub struct Lab {
    /// Key 0 is compiled in; key 1 is admitted by a key record in the rotation scenario.
    pub keys: Vec<SigningKey>,
    built_in: Vec<[u8; 32]>,
    /// Approximate artifact size.
    pub size: u32,
    layout: Layout,
    arena: Vec<u8>,
}

/// One step of a scenario.
#[derive(Clone, Debug)]
pub enum Step {
    /// Reset and boot.
    Reboot,
    /// Begin (or resume), send every chunk, commit, reset and boot (the trial).
    Install(Vec<u8>),
    /// Begin (or resume) and send chunks up to this many bytes.
    Partial(Vec<u8>, usize),
    /// Begin, chunks, commit; no reset (the trial waits for the next boot).
    Commit(Vec<u8>),
    /// Apply a key record.
    KeyRecord(Vec<u8>),
    /// Reset, and a boot that the watchdog resets while the trial model runs.
    WatchdogBoot,
}

/// A scenario: how the flash is prepared (not walked), then the steps that are walked.
pub struct Scenario {
    /// Name in reports.
    pub name: &'static str,
    /// Steps run before the walk (no cuts).
    pub setup: Vec<Step>,
    /// Steps walked cut point by cut point.
    pub steps: Vec<Step>,
    /// Versions the device may be running after any cut.
    pub allowed: Vec<u32>,
    /// Whether coming back without a model is allowed (a device that never had one).
    pub may_have_none: bool,
}

/// Result of walking one scenario.
#[derive(Clone, Debug, Default)]
pub struct WalkReport {
    /// Scenario name.
    pub name: String,
    /// Flash operations in the scenario.
    pub ops: u64,
    /// Cut points tried.
    pub cuts: u64,
    /// Cut points after which the device survived.
    pub survived: u64,
    /// Torn operations among the cuts.
    pub torn: u64,
    /// First failures (scenario, cut point, reason).
    pub failures: Vec<String>,
}

/// Why a run stopped.
#[derive(Debug)]
enum Stop {
    PowerLost,
    Unexpected(String),
}

impl Lab {
    /// A lab with artifacts of about `size` bytes.
    pub fn new(size: u32) -> Self {
        let keys = vec![testkit::test_key(1), testkit::test_key(2)];
        let built_in = vec![testkit::public(&keys[0])];
        let slot_len = (size + 8192).next_multiple_of(4096);
        Lab {
            keys,
            built_in,
            size,
            layout: layout(slot_len),
            arena: vec![0u8; 64 * 1024],
        }
    }

    /// A fresh, erased flash for this lab's layout.
    pub fn flash(&self) -> Flash {
        Flash::new(self.layout.slots[1].end() as usize)
    }

    /// The device configuration.
    pub fn config(&self) -> Config<'_> {
        Config {
            board: BOARD,
            keys: &self.built_in,
            max_boots: 3,
            arena_len: 64 * 1024,
            checkpoint: 16 * 1024,
            require_selftest: true,
        }
    }

    /// A signed artifact.
    pub fn artifact(&self, version: u32, counter: u32, key: usize, bad_selftest: bool) -> Vec<u8> {
        let mut spec = Spec::sized(version, self.size);
        spec.counter = counter;
        spec.target = BOARD.to_string();
        spec.bad_selftest = bad_selftest;
        testkit::signed(&spec, &self.keys[key])
    }

    /// A key record admitting key `subject`, signed by key `signer`.
    pub fn admit(&self, subject: usize, signer: usize) -> Vec<u8> {
        use crate::keys::{KeyAction, KeyRecord};
        use ed25519_dalek::Signer;
        let subject = testkit::public(&self.keys[subject]);
        let signer_key = &self.keys[signer];
        let id = kiln_runtime::signature::key_id(&testkit::public(signer_key));
        let msg = KeyRecord::signed_bytes(KeyAction::Admit, &subject, &id);
        KeyRecord {
            action: KeyAction::Admit,
            subject,
            signer: id,
            signature: signer_key.sign(&msg).to_bytes(),
        }
        .to_bytes()
        .to_vec()
    }

    fn mount<'a>(&'a self, flash: &'a mut Flash) -> Result<Device<'a, &'a mut Flash>, Stop> {
        Device::mount(flash, self.layout, self.config())
            .map_err(|e| Stop::Unexpected(std::format!("mount: {e:?}")))
    }

    /// Runs steps on `flash` (powered on), from a reset. Stops when power is lost.
    fn run(&mut self, flash: &mut Flash, steps: &[Step]) -> Result<(), Stop> {
        let mut arena = core::mem::take(&mut self.arena);
        let result = self.run_with(flash, steps, &mut arena);
        self.arena = arena;
        result
    }

    fn run_with(&self, flash: &mut Flash, steps: &[Step], arena: &mut [u8]) -> Result<(), Stop> {
        let mut dev = self.mount(flash)?;
        // Power on: boot, unless the first step is itself a (possibly interrupted) boot.
        if !matches!(steps.first(), Some(Step::Reboot | Step::WatchdogBoot)) {
            dev.boot(arena).map_err(stop)?;
        }
        for step in steps {
            match step {
                Step::Reboot => {
                    let f = dev.into_flash();
                    dev = self.mount(f)?;
                    dev.boot(arena).map_err(stop)?;
                }
                Step::Install(a) => {
                    send(&mut dev, a, a.len())?;
                    dev.commit().map_err(stop)?;
                    let f = dev.into_flash();
                    dev = self.mount(f)?;
                    dev.boot(arena).map_err(stop)?;
                }
                Step::Commit(a) => {
                    send(&mut dev, a, a.len())?;
                    dev.commit().map_err(stop)?;
                }
                Step::Partial(a, upto) => send(&mut dev, a, *upto)?,
                Step::KeyRecord(r) => {
                    dev.apply_key_record(r).map_err(stop)?;
                }
                Step::WatchdogBoot => {
                    let f = dev.into_flash();
                    dev = self.mount(f)?;
                    dev.boot_reset_during_trial().map_err(stop)?;
                    let f = dev.into_flash();
                    dev = self.mount(f)?;
                }
            }
        }
        Ok(())
    }

    /// After power returns: boot, check what runs, then take a fresh update.
    fn check_survival(&mut self, flash: &mut Flash, sc: &Scenario) -> Result<(), String> {
        flash.power_on();
        let violations = flash.violations;
        let mut arena = core::mem::take(&mut self.arena);
        let result = self.survival(flash, sc, &mut arena, violations);
        self.arena = arena;
        result
    }

    fn survival(
        &self,
        flash: &mut Flash,
        sc: &Scenario,
        arena: &mut [u8],
        violations: u64,
    ) -> Result<(), String> {
        let trusted: Vec<[u8; 32]> = self.keys.iter().map(testkit::public).collect();
        let next_version;
        {
            let mut dev = self.mount(flash).map_err(|e| std::format!("{e:?}"))?;
            let report = dev
                .boot(arena)
                .map_err(|e| std::format!("boot failed: {e}"))?;
            match report.running {
                None if sc.may_have_none => {}
                None => return Err("no model runs after the cut".to_string()),
                Some(r) => {
                    if !sc.allowed.contains(&r.version) {
                        return Err(std::format!("runs version {} (not allowed)", r.version));
                    }
                    let bytes = dev.running_model().ok_or("running model has no bytes")?;
                    let c = Container::parse(bytes)
                        .map_err(|e| std::format!("running model does not parse: {e}"))?;
                    c.verify_signatures(&trusted)
                        .map_err(|e| std::format!("running model: {e}"))?;
                    if c.header.model_version != r.version {
                        return Err("running model's header disagrees with the state".into());
                    }
                }
            }
            let top = sc.allowed.iter().copied().max().unwrap_or(0);
            next_version = top + 1000;
            let min_counter = dev.state().min_counter;
            let next = self.artifact(next_version, min_counter, 0, false);
            send(&mut dev, &next, next.len()).map_err(|e| std::format!("next update: {e:?}"))?;
            dev.commit()
                .map_err(|e| std::format!("next update refused: {e}"))?;
        }
        let mut dev = self.mount(flash).map_err(|e| std::format!("{e:?}"))?;
        let report = dev
            .boot(arena)
            .map_err(|e| std::format!("boot after the next update: {e}"))?;
        if report.running.map(|r| r.version) != Some(next_version) {
            return Err(std::format!(
                "the next update did not take: running {:?}, trial {:?}",
                report.running,
                report.trial
            ));
        }
        if dev.flash().violations != violations {
            return Err("the device programmed a word that was not erased".to_string());
        }
        Ok(())
    }

    /// Walks every cut point of a scenario.
    pub fn walk(&mut self, sc: &Scenario, mut progress: impl FnMut(u64, u64)) -> WalkReport {
        let mut report = WalkReport {
            name: sc.name.to_string(),
            ..WalkReport::default()
        };
        let mut start = self.flash();
        if let Err(e) = self.run(&mut start, &sc.setup) {
            report.failures.push(std::format!("setup failed: {e:?}"));
            return report;
        }
        start.power_on();
        let base_ops = start.ops();
        // The uncut run: count operations and check it ends well.
        let mut clean = start.clone();
        if let Err(e) = self.run(&mut clean, &sc.steps) {
            report
                .failures
                .push(std::format!("uncut run failed: {e:?}"));
            return report;
        }
        let n = clean.ops() - base_ops;
        report.ops = n;
        let total = n * CUT_KINDS.len() as u64;
        for k in 0..n {
            for (i, kind) in CUT_KINDS.iter().enumerate() {
                let mut flash = start.clone();
                flash.arm_cut(base_ops + k, *kind, k * 7 + i as u64);
                let torn_before = flash.torn;
                let outcome = match self.run(&mut flash, &sc.steps) {
                    Err(Stop::PowerLost) => Ok(()),
                    Err(Stop::Unexpected(e)) => Err(e),
                    Ok(()) => Err("the cut was never reached".to_string()),
                };
                report.cuts += 1;
                report.torn += flash.torn - torn_before;
                match outcome.and_then(|()| self.check_survival(&mut flash, sc)) {
                    Ok(()) => report.survived += 1,
                    Err(e) => {
                        if report.failures.len() < 10 {
                            report.failures.push(std::format!("op {k} {kind:?}: {e}"));
                        }
                    }
                }
                progress(report.cuts, total);
            }
        }
        report
    }

    /// Runs steps once without cuts (for tests) and returns the flash.
    ///
    /// # Errors
    /// A step failed.
    pub fn run_clean(&mut self, flash: &mut Flash, steps: &[Step]) -> Result<(), String> {
        self.run(flash, steps).map_err(|e| std::format!("{e:?}"))
    }

    /// Runs steps with one cut armed at operation `at` (counted from now), then powers on and
    /// checks survival.
    ///
    /// # Errors
    /// The device did not survive.
    pub fn cut_and_check(
        &mut self,
        flash: &mut Flash,
        sc: &Scenario,
        at: u64,
        kind: CutKind,
        seed: u64,
    ) -> Result<bool, String> {
        let base = flash.ops();
        flash.arm_cut(base + at, kind, seed);
        let hit = match self.run(flash, &sc.steps) {
            Err(Stop::PowerLost) => true,
            Ok(()) => false,
            Err(Stop::Unexpected(e)) => return Err(e),
        };
        self.check_survival(flash, sc)?;
        Ok(hit)
    }
}

fn stop(e: UpdateError) -> Stop {
    match e {
        UpdateError::Flash(_) => Stop::PowerLost,
        other => Stop::Unexpected(other.to_string()),
    }
}

/// Begin (or resume) and send chunks of `a` up to `upto` bytes.
fn send(dev: &mut Device<'_, &mut Flash>, a: &[u8], upto: usize) -> Result<(), Stop> {
    let c = Container::parse(a).map_err(|e| Stop::Unexpected(e.to_string()))?;
    let mut at = dev.begin(a.len() as u32, *c.digest).map_err(stop)? as usize;
    while at < upto {
        let end = (at + CHUNK).min(upto);
        at = dev.chunk(at as u32, &a[at..end]).map_err(stop)? as usize;
    }
    Ok(())
}

/// The scenarios of `cargo run --release -p kiln-device --example power_cut`.
pub fn scenarios(lab: &Lab) -> Vec<Scenario> {
    let v1 = lab.artifact(1, 0, 0, false);
    let v2 = lab.artifact(2, 0, 0, false);
    let v2_counter = lab.artifact(2, 1, 0, false);
    let bad3 = lab.artifact(3, 0, 0, true);
    let v2_key1 = lab.artifact(2, 0, 1, false);
    let v4 = lab.artifact(4, 0, 0, false);
    let half = v2.len() * 3 / 5;
    vec![
        Scenario {
            name: "first install",
            setup: vec![],
            steps: vec![Step::Install(v1.clone())],
            allowed: vec![1],
            may_have_none: true,
        },
        Scenario {
            name: "upgrade v1 -> v2",
            setup: vec![Step::Install(v1.clone())],
            steps: vec![Step::Install(v2.clone())],
            allowed: vec![1, 2],
            may_have_none: false,
        },
        Scenario {
            name: "upgrade raising the security counter",
            setup: vec![Step::Install(v1.clone())],
            steps: vec![Step::Install(v2_counter)],
            allowed: vec![1, 2],
            may_have_none: false,
        },
        Scenario {
            name: "self-test fails: revert to v1",
            setup: vec![Step::Install(v1.clone())],
            steps: vec![Step::Install(bad3.clone())],
            allowed: vec![1],
            may_have_none: false,
        },
        Scenario {
            name: "interrupted revert (trial boots)",
            setup: vec![Step::Install(v1.clone()), Step::Commit(bad3)],
            steps: vec![Step::Reboot, Step::Reboot],
            allowed: vec![1],
            may_have_none: false,
        },
        Scenario {
            name: "watchdog resets in every trial boot: revert",
            setup: vec![Step::Install(v1.clone()), Step::Commit(v2.clone())],
            steps: vec![
                Step::WatchdogBoot,
                Step::WatchdogBoot,
                Step::WatchdogBoot,
                Step::Reboot,
            ],
            // A cut before the third watchdog reset gives v2 a normal trial boot, which it passes.
            allowed: vec![1, 2],
            may_have_none: false,
        },
        Scenario {
            name: "two upgrades in a row",
            setup: vec![Step::Install(v1.clone())],
            steps: vec![Step::Install(v2.clone()), Step::Install(v4)],
            allowed: vec![1, 2, 4],
            may_have_none: false,
        },
        Scenario {
            name: "update interrupted and resumed",
            setup: vec![Step::Install(v1.clone())],
            steps: vec![
                Step::Partial(v2.clone(), half),
                Step::Reboot,
                Step::Install(v2),
            ],
            allowed: vec![1, 2],
            may_have_none: false,
        },
        Scenario {
            name: "key rotation, then an update signed by the new key",
            setup: vec![Step::Install(v1)],
            steps: vec![Step::KeyRecord(lab.admit(1, 0)), Step::Install(v2_key1)],
            allowed: vec![1, 2],
            may_have_none: false,
        },
    ]
}
