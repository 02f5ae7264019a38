//! Walks every power-cut point of the update scenarios on the NOR flash simulator.
//!
//! `cargo run --release -p kiln-device --example power_cut [-- --size BYTES]`
//!
//! For each scenario (first install, upgrade, counter raise, failed self-test and revert, an
//! interrupted revert, an interrupted and resumed update, key rotation) it cuts power before every
//! flash operation and in the middle of it (torn page programs and torn sector erases), powers
//! on, and checks that the device runs a verified model of an allowed version and takes the next
//! update. Exits non-zero if any cut point was not survived.

use kiln_device::powercut::{scenarios, Lab};
use std::io::Write;
use std::time::Instant;

fn main() {
    let mut size = 64 * 1024;
    let args: Vec<String> = std::env::args().collect();
    if let Some(i) = args.iter().position(|a| a == "--size") {
        match args.get(i + 1).and_then(|s| s.parse().ok()) {
            Some(s) => size = s,
            None => {
                eprintln!("error: --size needs a number of bytes, e.g. --size 49152");
                std::process::exit(2);
            }
        }
    }
    let t0 = Instant::now();
    let mut lab = Lab::new(size);
    let all = scenarios(&lab);
    println!(
        "power-cut walk: {} scenarios, artifacts of about {} bytes, 8-byte program unit, 4 KiB sectors, 256-byte pages",
        all.len(),
        size
    );
    let (mut cuts, mut survived, mut torn) = (0u64, 0u64, 0u64);
    let mut failed = false;
    for sc in &all {
        let t = Instant::now();
        let r = lab.walk(sc, |done, total| {
            if done % 500 == 0 || done == total {
                eprint!("\r  {:<52} {done}/{total}", sc.name);
                let _ = std::io::stderr().flush();
            }
        });
        eprintln!();
        println!(
            "{:<52} {:>5} ops  {:>6} cuts  {:>6} survived  {:>5} torn  {:>6.1} s",
            r.name,
            r.ops,
            r.cuts,
            r.survived,
            r.torn,
            t.elapsed().as_secs_f64()
        );
        for f in &r.failures {
            println!("  FAILED {f}");
        }
        failed |= !r.failures.is_empty() || r.cuts == 0;
        cuts += r.cuts;
        survived += r.survived;
        torn += r.torn;
    }
    println!("walk took {:.1} s", t0.elapsed().as_secs_f64());
    println!("survived {survived} of {cuts} power cuts ({torn} torn writes)");
    if failed || survived != cuts {
        std::process::exit(1);
    }
    // The walk must stay thorough: the update design promises at least 10 000 cut points,
    // torn writes among them. A smaller walk (fewer scenarios, a coarser flash) is a regression.
    if cuts < MIN_CUT_POINTS || torn == 0 {
        eprintln!(
            "error: the walk covered {cuts} cut points ({torn} torn); at least {MIN_CUT_POINTS} with torn writes are required"
        );
        std::process::exit(1);
    }
}

/// Fewest cut points a complete walk may have (issue 4's acceptance figure).
const MIN_CUT_POINTS: u64 = 10_000;
