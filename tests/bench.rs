//! `paxoskv bench`, the real binary, against a real 3-replica cluster: a
//! 3-second write run whose one JSON report counts successful writes that
//! the cluster really holds, and a read run of a fixed number of calls.

mod common;

use std::process::Command;
use std::time::Duration;

use common::Cluster;
use paxoskv::pb;
use serde_json::Value;

/// Runs `paxoskv bench --json` with `args` against `cluster`; its report.
fn bench(cluster: &Cluster, args: &[&str]) -> Value {
    let endpoints = cluster
        .addrs
        .values()
        .cloned()
        .collect::<Vec<_>>()
        .join(",");
    let out = Command::new(common::binary())
        .args(["bench", "--json", "--endpoints", &endpoints])
        .args(args)
        .output()
        .expect("run paxoskv bench");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "paxoskv bench {args:?} failed: {}\n{stdout}",
        String::from_utf8_lossy(&out.stderr)
    );
    // One JSON object, on one line, and nothing else.
    assert_eq!(stdout.trim().lines().count(), 1, "{stdout}");
    serde_json::from_str(stdout.trim()).unwrap_or_else(|e| panic!("not JSON ({e}): {stdout}"))
}

fn count(report: &Value, field: &str) -> u64 {
    report[field]
        .as_u64()
        .unwrap_or_else(|| panic!("no {field} in {report}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bench_writes_and_reads_against_a_cluster_and_reports_json() {
    let cluster = Cluster::start("bench", 3);
    for id in 1..=3 {
        cluster.wait_ready(id, Duration::from_secs(20)).await;
    }

    // Writes, closed loop, 3 s, over the three replicas.
    let writes = bench(
        &cluster,
        &["--clients", "4", "--seconds", "3", "--key-space", "50"],
    );
    println!("writes: {writes}");
    let ok = count(&writes, "ok");
    assert!(ok > 0, "no write succeeded: {writes}");
    assert_eq!(writes["op"], "write");
    assert_eq!(writes["target"], "paxoskv");
    assert!(writes["ops_per_s"].as_f64().is_some_and(|r| r > 0.0));
    let latency = &writes["latency_us"];
    let (p50, p99, max) = (
        latency["p50"].as_u64().unwrap_or(0),
        latency["p99"].as_u64().unwrap_or(0),
        latency["max"].as_u64().unwrap_or(0),
    );
    assert!(0 < p50 && p50 <= p99 && p99 <= max, "{latency}");
    // Errors by code add up to the errors.
    let by_code: u64 = writes["errors_by_code"]
        .as_object()
        .expect("errors_by_code is an object")
        .values()
        .filter_map(Value::as_u64)
        .sum();
    assert_eq!(by_code, count(&writes, "errors"), "{writes}");

    // The writes are in the store: 4 clients walk the 50 keys from 0, 12,
    // 25 and 37 on, so key bench-0 was written at least once.
    let mut client = cluster.client(1).await;
    let got = client
        .get(pb::GetRequest {
            key: "bench-0".into(),
        })
        .await
        .expect("bench-0 was written");
    assert!(got.into_inner().value >= 1);

    // Reads: exactly --total calls, each a success (the keys are written
    // first), on 2 connections shared by 8 clients.
    let reads = bench(
        &cluster,
        &[
            "--op",
            "read",
            "--clients",
            "8",
            "--connections",
            "2",
            "--total",
            "300",
            "--key-space",
            "20",
        ],
    );
    println!("reads: {reads}");
    assert_eq!(count(&reads, "ok"), 300, "{reads}");
    assert_eq!(count(&reads, "errors"), 0, "{reads}");
    assert_eq!(count(&reads, "connections"), 2, "{reads}");
}
