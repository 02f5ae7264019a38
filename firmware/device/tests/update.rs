//! The update state machine on the flash simulator: installs, refusals that leave the running
//! model in service, trial boots, revert, resume, key rotation, inference, and random power cuts.

use kiln_device::powercut::{layout, scenarios, Flash, Lab, BOARD, CHUNK};
use kiln_device::state::{Event, SlotStatus};
use kiln_device::testkit::{self, Spec};
use kiln_device::{Config, Device, UpdateError};
use kiln_runtime::format::Container;
use kiln_runtime::signature::SignatureError;
use proptest::prelude::*;

const SIZE: u32 = 12 * 1024;

/// Which refusal a case expects.
type Expect = fn(&UpdateError) -> bool;

struct Bench {
    lab: Lab,
    flash: Flash,
    arena: Vec<u8>,
}

impl Bench {
    fn new() -> Self {
        let lab = Lab::new(SIZE);
        let flash = lab.flash();
        Bench {
            lab,
            flash,
            arena: vec![0u8; 64 * 1024],
        }
    }

    fn config(&self) -> Config<'_> {
        self.lab.config()
    }

    /// Mounts and boots; returns the running version.
    fn boot(&mut self) -> Option<u32> {
        let cfg = self.lab.config();
        let layout = layout(self.slot_len());
        let mut dev = Device::mount(&mut self.flash, layout, cfg).unwrap();
        dev.boot(&mut self.arena)
            .unwrap()
            .running
            .map(|r| r.version)
    }

    fn slot_len(&self) -> u32 {
        (SIZE + 8192).next_multiple_of(4096)
    }

    fn device(&mut self) -> Device<'_, &mut Flash> {
        let cfg = self.lab.config();
        let layout = layout(self.slot_len());
        let mut dev = Device::mount(&mut self.flash, layout, cfg).unwrap();
        dev.boot(&mut self.arena).unwrap();
        dev
    }

    /// Sends the whole artifact and commits; the error of the first refused step.
    fn update(&mut self, a: &[u8]) -> Result<(), UpdateError> {
        let mut dev = self.device();
        send(&mut dev, a)?;
        dev.commit().map(|_| ())
    }

    /// Update, then reset and boot (the trial); returns the running version.
    fn install(&mut self, a: &[u8]) -> Result<Option<u32>, UpdateError> {
        self.update(a)?;
        Ok(self.boot())
    }
}

fn send(dev: &mut Device<'_, &mut Flash>, a: &[u8]) -> Result<(), UpdateError> {
    let digest = match Container::parse_structure(a) {
        Ok(c) => *c.digest,
        Err(_) => [0u8; 32],
    };
    let mut at = dev.begin(a.len() as u32, digest)? as usize;
    while at < a.len() {
        let end = (at + CHUNK).min(a.len());
        at = dev.chunk(at as u32, &a[at..end])? as usize;
    }
    Ok(())
}

#[test]
fn first_install_then_upgrade_runs_the_new_model() {
    let mut b = Bench::new();
    assert_eq!(b.boot(), None, "a fresh device runs nothing");
    let v1 = b.lab.artifact(1, 0, 0, false);
    assert_eq!(b.install(&v1).unwrap(), Some(1));
    let v2 = b.lab.artifact(2, 0, 0, false);
    assert_eq!(b.install(&v2).unwrap(), Some(2));
    let dev = b.device();
    let s = dev.state();
    assert_eq!(s.last_event, Some(Event::Installed { version: 2 }));
    let active = s.active.unwrap() as usize;
    assert_eq!(s.slots[active].unwrap().status, SlotStatus::Active);
    assert_eq!(s.slots[1 - active].unwrap().status, SlotStatus::Previous);
    assert_eq!(s.slots[1 - active].unwrap().version, 1);
}

/// Every refusal leaves v1 running.
#[test]
fn refused_artifacts_leave_the_running_model_in_service() {
    let mut b = Bench::new();
    let v1 = b.lab.artifact(1, 2, 0, false);
    assert_eq!(b.install(&v1).unwrap(), Some(1));

    let v2 = b.lab.artifact(2, 2, 0, false);
    let mut cases: Vec<(&str, Vec<u8>, Expect)> = Vec::new();
    // Tampered body (a weight byte): the digest no longer matches.
    let mut tampered = v2.clone();
    tampered[v2.len() / 2] ^= 0x01;
    cases.push(("tampered body", tampered, |e| {
        matches!(e, UpdateError::DigestMismatch)
    }));
    // Tampered signature.
    let mut bad_sig = v2.clone();
    let last = bad_sig.len() - 1;
    bad_sig[last] ^= 0x80;
    cases.push(("bit-flipped signature", bad_sig, |e| {
        matches!(
            e,
            UpdateError::Signature(SignatureError::BadSignature { .. })
        )
    }));
    // Tampered version in the header, digest recomputed by the attacker (signature breaks).
    let mut spec = Spec::sized(3, SIZE);
    spec.counter = 2;
    spec.target = BOARD.into();
    let forged = {
        let signed = testkit::signed(&spec, &b.lab.keys[0]);
        let unsigned_v9 = {
            let mut s9 = spec.clone();
            s9.version = 9;
            testkit::build(&s9)
        };
        // v9's body with v3's signature.
        let body = u32::from_le_bytes(unsigned_v9[28..32].try_into().unwrap()) as usize;
        let mut out = unsigned_v9[..body].to_vec();
        let sig_at = signed.len() - 72;
        kiln_runtime::writer::append_signed_trailer(
            &mut out,
            &[(
                signed[sig_at..sig_at + 8].try_into().unwrap(),
                signed[sig_at + 8..].try_into().unwrap(),
            )],
        );
        out
    };
    cases.push(("version changed after signing", forged, |e| {
        matches!(
            e,
            UpdateError::Signature(SignatureError::BadSignature { .. })
        )
    }));
    // Unsigned.
    cases.push(("unsigned", testkit::build(&spec), |e| {
        matches!(e, UpdateError::Signature(SignatureError::Unsigned))
    }));
    // Signed by a key the device does not trust.
    cases.push(("wrong key", b.lab.artifact(3, 2, 1, false), |e| {
        matches!(
            e,
            UpdateError::Signature(SignatureError::UntrustedKey { .. })
        )
    }));
    // Downgrade and same version.
    cases.push(("older version", b.lab.artifact(0, 2, 0, false), |e| {
        matches!(e, UpdateError::Downgrade { .. })
    }));
    cases.push(("same version", b.lab.artifact(1, 2, 0, false), |e| {
        matches!(e, UpdateError::Downgrade { .. })
    }));
    // Security counter below the device's (2, from v1).
    cases.push((
        "lower security counter",
        b.lab.artifact(5, 1, 0, false),
        |e| matches!(e, UpdateError::CounterRollback { min: 2, offered: 1 }),
    ));
    // Another board.
    let mut other = Spec::sized(6, SIZE);
    other.counter = 2;
    other.target = "stm32h7-disco".into();
    cases.push((
        "wrong board",
        testkit::signed(&other, &b.lab.keys[0]),
        |e| matches!(e, UpdateError::WrongBoard),
    ));
    // Larger than a slot.
    let big = b.lab.artifact(7, 2, 0, false);
    let mut oversized = big.clone();
    oversized.resize(b.slot_len() as usize + 16, 0);
    cases.push(("oversized", oversized, |e| {
        matches!(e, UpdateError::TooLarge { .. })
    }));
    // Truncated: announced length shorter than the header's body.
    cases.push(("truncated", v2[..v2.len() - 100].to_vec(), |e| {
        matches!(e, UpdateError::Malformed(_))
    }));
    // Garbage.
    cases.push(("garbage", vec![0x5Au8; 4096], |e| {
        matches!(e, UpdateError::Malformed(_))
    }));

    for (what, bytes, expected) in cases {
        let err = b.update(&bytes).expect_err(what);
        assert!(expected(&err), "{what}: unexpected error {err:?}");
        assert!(!err.to_string().is_empty());
        assert_eq!(b.boot(), Some(1), "{what}: v1 must stay in service");
    }
    // And a good update still goes through afterwards.
    assert_eq!(b.install(&v2).unwrap(), Some(2));
}

#[test]
fn failing_self_test_is_reverted_and_the_counter_does_not_advance() {
    let mut b = Bench::new();
    assert_eq!(b.install(&b.lab.artifact(1, 0, 0, false)).unwrap(), Some(1));
    let bad = b.lab.artifact(2, 5, 0, true);
    assert_eq!(b.install(&bad).unwrap(), Some(1));
    let dev = b.device();
    let s = dev.state();
    assert!(
        matches!(s.last_event, Some(Event::Reverted { version: 2, reason }) if reason == UpdateError::SelfTestFailed { passed: 0, failed: 1 }.code())
    );
    assert_eq!(s.min_counter, 0, "the counter advances only on confirm");
    assert!(s.trial.is_none());
}

#[test]
fn watchdog_resets_during_every_trial_boot_revert_the_model() {
    let mut b = Bench::new();
    let v1 = b.lab.artifact(1, 0, 0, false);
    assert_eq!(b.install(&v1).unwrap(), Some(1));
    b.update(&b.lab.artifact(2, 0, 0, false)).unwrap();
    let max = b.config().max_boots;
    let slot_len = b.slot_len();
    for _ in 0..max {
        let cfg = b.lab.config();
        let mut dev = Device::mount(&mut b.flash, layout(slot_len), cfg).unwrap();
        dev.boot_reset_during_trial().unwrap();
    }
    assert_eq!(b.boot(), Some(1));
    let dev = b.device();
    assert!(matches!(
        dev.state().last_event,
        Some(Event::Reverted { version: 2, reason }) if reason == UpdateError::TooManyBoots.code()
    ));
}

#[test]
fn chunks_out_of_order_or_without_begin_are_refused() {
    let mut b = Bench::new();
    let v1 = b.lab.artifact(1, 0, 0, false);
    let mut dev = b.device();
    assert_eq!(
        dev.chunk(0, &v1[..CHUNK]),
        Err(UpdateError::NoUpdateInProgress)
    );
    assert_eq!(dev.commit(), Err(UpdateError::NoUpdateInProgress));
    let digest = *Container::parse(&v1).unwrap().digest;
    assert_eq!(dev.begin(v1.len() as u32, digest), Ok(0));
    assert_eq!(
        dev.chunk(CHUNK as u32, &v1[CHUNK..2 * CHUNK]),
        Err(UpdateError::OffsetMismatch { expected: 0 })
    );
    assert_eq!(dev.chunk(0, &v1[..CHUNK]), Ok(CHUNK as u32));
    // A repeated chunk is out of order too; nothing is rewritten.
    assert_eq!(
        dev.chunk(0, &v1[..CHUNK]),
        Err(UpdateError::OffsetMismatch {
            expected: CHUNK as u32
        })
    );
    assert_eq!(
        dev.commit(),
        Err(UpdateError::Incomplete {
            received: CHUNK as u32,
            total: v1.len() as u32
        })
    );
    // Odd chunk sizes (not multiples of the write unit) still assemble the same bytes.
    let mut at = CHUNK;
    let mut step = 1;
    while at < v1.len() {
        let end = (at + step).min(v1.len());
        assert_eq!(dev.chunk(at as u32, &v1[at..end]), Ok(end as u32));
        at = end;
        step = step % 37 + 13;
    }
    dev.commit().unwrap();
    drop(dev);
    assert_eq!(b.boot(), Some(1));
}

#[test]
fn an_interrupted_transfer_resumes_from_its_checkpoint() {
    let lab = Lab::new(40 * 1024);
    let mut flash = lab.flash();
    let layout = layout((40 * 1024 + 8192u32).next_multiple_of(4096));
    let mut arena = vec![0u8; 64 * 1024];
    let v1 = lab.artifact(1, 0, 0, false);
    let digest = *Container::parse(&v1).unwrap().digest;
    {
        let mut dev = Device::mount(&mut flash, layout, lab.config()).unwrap();
        dev.boot(&mut arena).unwrap();
        dev.begin(v1.len() as u32, digest).unwrap();
        let mut at = 0;
        while at < 30 * 1024 {
            at = dev.chunk(at as u32, &v1[at..at + CHUNK]).unwrap() as usize;
        }
    } // power lost
    let mut dev = Device::mount(&mut flash, layout, lab.config()).unwrap();
    dev.boot(&mut arena).unwrap();
    let from = dev.begin(v1.len() as u32, digest).unwrap() as usize;
    assert_eq!(from, 16 * 1024, "resumes at the last checkpoint");
    let mut at = from;
    while at < v1.len() {
        let end = (at + CHUNK).min(v1.len());
        at = dev.chunk(at as u32, &v1[at..end]).unwrap() as usize;
    }
    dev.commit().unwrap();
    let mut dev = Device::mount(&mut flash, layout, lab.config()).unwrap();
    assert_eq!(
        dev.boot(&mut arena).unwrap().running.map(|r| r.version),
        Some(1)
    );
}

#[test]
fn key_rotation_admits_a_key_only_through_a_trusted_record() {
    let mut b = Bench::new();
    assert_eq!(b.install(&b.lab.artifact(1, 0, 0, false)).unwrap(), Some(1));
    let by_new_key = b.lab.artifact(2, 0, 1, false);
    assert!(matches!(
        b.update(&by_new_key),
        Err(UpdateError::Signature(SignatureError::UntrustedKey { .. }))
    ));
    // A record signed by the untrusted key itself is refused.
    let self_signed = b.lab.admit(1, 1);
    let mut flipped = b.lab.admit(1, 0);
    flipped[20] ^= 1;
    let good = b.lab.admit(1, 0);
    let mut dev = b.device();
    assert!(matches!(
        dev.apply_key_record(&self_signed),
        Err(UpdateError::Key(
            kiln_device::keys::KeyError::UntrustedSigner { .. }
        ))
    ));
    assert!(matches!(
        dev.apply_key_record(&flipped),
        Err(UpdateError::Key(kiln_device::keys::KeyError::BadSignature))
    ));
    assert_eq!(dev.apply_key_record(&good), Ok(2));
    drop(dev);
    assert_eq!(b.install(&by_new_key).unwrap(), Some(2));
}

#[test]
fn inference_runs_the_active_model_and_checks_lengths() {
    let mut b = Bench::new();
    let v1 = b.lab.artifact(1, 0, 0, false);
    let mut dev = b.device();
    let mut out = vec![0u8; 4096];
    let mut arena = vec![0u8; 64 * 1024];
    assert_eq!(
        dev.infer(&mut arena, &[0u8; 256], &mut out),
        Err(UpdateError::NoModel)
    );
    send(&mut dev, &v1).unwrap();
    dev.commit().unwrap();
    drop(dev);
    b.boot();
    let dev = b.device();
    let input: Vec<u8> = (0..64)
        .flat_map(|i| (i as f32 / 64.0).to_le_bytes())
        .collect();
    let n = dev.infer(&mut arena, &input, &mut out).unwrap();
    // Reference: the same artifact on kiln-runtime directly.
    let aligned = testkit::aligned(&v1);
    let model = kiln_runtime::Model::load(aligned.as_slice()).unwrap();
    let mut reference = vec![0u8; model.arena_bytes() + 16];
    let off = reference.as_ptr().align_offset(16);
    let mut interp =
        kiln_runtime::Interpreter::new(model, &mut reference[off..off + model.arena_bytes()])
            .unwrap();
    interp.input_bytes_mut(0).unwrap().copy_from_slice(&input);
    interp.invoke().unwrap();
    assert_eq!(&out[..n], interp.output_bytes(0).unwrap());
    assert!(matches!(
        dev.infer(&mut arena, &input[..10], &mut out),
        Err(UpdateError::BadInputLength { expected: 256 })
    ));
    assert!(matches!(
        dev.infer(&mut arena, &input, &mut out[..3]),
        Err(UpdateError::OutputTooSmall { .. })
    ));
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 48, ..ProptestConfig::default() })]

    /// Random scenarios, random cut points and kinds, and a second cut during the recovery's
    /// first boot: the device always survives.
    #[test]
    fn random_power_cuts_are_survived(which in 0usize..9, at in 0u64..400, kind in 0usize..5, seed in any::<u64>()) {
        let mut lab = Lab::new(8 * 1024);
        let all = scenarios(&lab);
        let sc = &all[which % all.len()];
        let mut flash = lab.flash();
        lab.run_clean(&mut flash, &sc.setup).unwrap();
        flash.power_on();
        let kinds = kiln_device::powercut::CUT_KINDS;
        let r = lab.cut_and_check(&mut flash, sc, at, kinds[kind], seed);
        prop_assert!(r.is_ok(), "{}: cut at {} {:?}: {:?}", sc.name, at, kinds[kind], r);
        prop_assert_eq!(flash.violations, 0);
    }
}

#[test]
fn a_corrupted_active_slot_falls_back_to_the_previous_model_and_updates_never_touch_it() {
    let mut b = Bench::new();
    assert_eq!(b.install(&b.lab.artifact(1, 0, 0, false)).unwrap(), Some(1));
    assert_eq!(b.install(&b.lab.artifact(2, 0, 0, false)).unwrap(), Some(2));
    let active = b.device().state().active.unwrap() as usize;
    let region = layout(b.slot_len()).slots[active];
    // Bit rot in the active model's weights: it no longer verifies.
    b.flash.corrupt(region.offset as usize + 2000, 0x04);
    assert_eq!(b.boot(), Some(1), "the previous model runs");
    // A failing update goes into the broken slot (not the running one) and is reverted; the
    // reverted model never runs.
    assert_eq!(b.install(&b.lab.artifact(3, 0, 0, true)).unwrap(), Some(1));
    assert_eq!(b.boot(), Some(1));
    // A good update replaces the broken slot and becomes active.
    assert_eq!(b.install(&b.lab.artifact(4, 0, 0, false)).unwrap(), Some(4));
    let s = b.device().state().clone();
    assert_eq!(s.active, Some(active as u8));
    assert_eq!(s.slots[1 - active].unwrap().version, 1);
    assert_eq!(s.slots[1 - active].unwrap().status, SlotStatus::Previous);
}
