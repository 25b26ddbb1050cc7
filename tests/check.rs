//! `paxoskv check` on real processes: VALID on the real thing under every
//! fault, and NOT LINEARIZABLE on each deliberately broken build
//! (`--break`, the hidden `serve --unsafe-test-bug`).
//!
//! Each test runs the `paxoskv` binary, which starts and stops its own
//! cluster. They take the machine in turn (a lock), so that one's load does
//! not slow another's replicas into timeouts.

use std::process::{Command, Output};
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// One check at a time.
static MACHINE: Mutex<()> = Mutex::new(());

/// Runs `paxoskv check ARGS`; returns its exit code, its report (stdout)
/// and how long it took. Its progress (stderr) is printed, for CI logs.
fn check(args: &[&str]) -> (i32, String, Duration) {
    let _turn = MACHINE.lock().unwrap_or_else(|e| e.into_inner());
    let started = Instant::now();
    let Output {
        status,
        stdout,
        stderr,
    } = Command::new(env!("CARGO_BIN_EXE_paxoskv"))
        .arg("check")
        .args(args)
        .output()
        .expect("run paxoskv check");
    let took = started.elapsed();
    eprintln!("{}", String::from_utf8_lossy(&stderr));
    let report = String::from_utf8_lossy(&stdout).to_string();
    println!("paxoskv check {} ({took:?}):\n{report}", args.join(" "));
    (status.code().unwrap_or(-1), report, took)
}

#[test]
fn a_correct_cluster_under_kills_pauses_and_partitions_is_linearizable() {
    let (code, report, took) = check(&["--seconds", "60", "--faults", "kill,pause,partition"]);
    assert_eq!(code, 0, "not VALID:\n{report}");
    assert!(
        report.contains("VALID: the history is linearizable"),
        "{report}"
    );
    // Every kind of fault happened, and was healed.
    for fault in [
        "kill replica",
        "restart replica",
        "pause replica",
        "resume replica",
        "partition: replicas",
        "heal partition",
        "rolling crash",
    ] {
        assert!(
            report.contains(fault),
            "no {fault:?} in the schedule:\n{report}"
        );
    }
    assert!(
        took < Duration::from_secs(100),
        "took {took:?}, expected about 70 s"
    );
}

/// Runs a broken build; it must be found NOT LINEARIZABLE.
fn catches(bug: &str, seconds: &str, faults: &str) {
    let (code, report, _) = check(&["--seconds", seconds, "--faults", faults, "--break", bug]);
    assert!(
        report.contains("NOT LINEARIZABLE"),
        "--break {bug} not caught:\n{report}"
    );
    assert_eq!(code, 3, "the violation's exit code");
    assert!(
        report.contains(&format!("DELIBERATE BUG {bug}")),
        "{report}"
    );
}

#[test]
fn a_leader_that_answers_writes_before_they_are_chosen_is_caught() {
    catches("ack-early", "10", "kill,pause,partition");
}

#[test]
fn replicas_that_serve_reads_on_their_own_are_caught() {
    catches("local-reads", "10", "kill,pause,partition");
}

#[test]
fn acceptors_that_forget_their_votes_on_a_crash_are_caught() {
    catches("forget-votes", "20", "kill,partition");
}

#[test]
fn bad_options_are_refused_before_anything_starts() {
    for (args, says) in [
        (&["--faults", "kill,flood"][..], "flood"),
        (&["--break", "everything"][..], "forget-votes"),
    ] {
        let out = Command::new(env!("CARGO_BIN_EXE_paxoskv"))
            .arg("check")
            .args(args)
            .output()
            .expect("run paxoskv check");
        assert_eq!(out.status.code(), Some(2), "{args:?}");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains(says), "{args:?}: {err}");
    }
    // A data directory with something in it is not a new cluster's.
    let dir = std::env::temp_dir().join(format!("paxoskv-check-used-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("make a dir");
    std::fs::write(dir.join("keep-me"), b"x").expect("write a file");
    let out = Command::new(env!("CARGO_BIN_EXE_paxoskv"))
        .args(["check", "--seconds", "1", "--data-dir"])
        .arg(&dir)
        .output()
        .expect("run paxoskv check");
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("is not empty"));
    assert!(
        dir.join("keep-me").exists(),
        "touched a directory it refused"
    );
    let _ = std::fs::remove_dir_all(&dir);
}
