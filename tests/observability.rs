//! Observability, end to end: the metrics every replica serves, a real
//! Prometheus scraping a real cluster, and the Grafana dashboard's queries.
//!
//! - `metrics_pass_promtool_check`: `promtool check metrics` accepts every
//!   replica's `/metrics` after some traffic, and every metric is there.
//! - `every_dashboard_query_returns_data`: a 3-replica cluster under load,
//!   scraped every second by Prometheus; every query of every panel of
//!   `grafana/dashboard.json` must return data.
//! - `metrics_follow_a_leader_kill`: after SIGKILLing the leader, leader
//!   changes rise, the new leader reports the dead peer unreachable, and
//!   `paxoskv status` names the new leader.
//! - `dashboard_imports_as_is` and `prometheus_config_is_valid`: static
//!   checks of the files under `grafana/`.
//!
//! Prometheus and promtool come from the Debian package `prometheus`, which
//! `scripts/test.sh` installs; it passes their paths in `PAXOSKV_PROMETHEUS`
//! and `PAXOSKV_PROMTOOL` (otherwise they are looked up on `PATH`). Without
//! them these tests fail: they do not skip. The harness that runs them is
//! `tests/common/prometheus.rs`; the load is `tests/common/load.rs`.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use common::load::{Load, Traffic};
use common::prometheus::{Prometheus, prometheus, promtool, run_promtool};
use common::{Cluster, binary, sample};
use paxoskv::metrics as m;
use paxoskv::pb;
use serde_json::Value;

/// Every metric paxoskv exports (src/metrics.rs).
const ALL_METRICS: &[&str] = &[
    m::REQUESTS,
    m::REQUEST_DURATION,
    m::FORWARDED,
    m::COMMANDS_COMMITTED,
    m::COMMIT_DURATION,
    m::BATCH_SIZE,
    m::IN_FLIGHT,
    m::SYNC_DURATION,
    m::WRITTEN_BYTES,
    m::COMMIT_INDEX,
    m::APPLIED_INDEX,
    m::BALLOT_ROUND,
    m::IS_LEADER,
    m::LEADER_CHANGES,
    m::ELECTIONS,
    m::HANDOFF_ELECTIONS,
    m::FOLLOWER_LAG,
    m::FOLLOWER_SILENCE,
    m::PEER_REACHABLE,
    m::PEER_MESSAGES_DROPPED,
    m::HTTP_REQUESTS,
    m::FORWARD_BATCH,
    m::LOG_BYTES,
    m::LOG_SEGMENTS,
    m::STORAGE_FAILED,
];

/// A plain HTTP/1.1 `GET path` to the HTTP/JSON port at `addr`: its
/// status code.
fn http_get(addr: &str, path: &str) -> u16 {
    use std::io::{Read, Write};
    let mut stream =
        std::net::TcpStream::connect(addr).unwrap_or_else(|e| panic!("connect {addr}: {e}"));
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .expect("read timeout");
    write!(
        stream,
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
    )
    .expect("send the request");
    let mut answer = String::new();
    stream.read_to_string(&mut answer).expect("read the answer");
    answer
        .split_whitespace()
        .nth(1)
        .and_then(|code| code.parse().ok())
        .unwrap_or_else(|| panic!("not an HTTP answer from {addr}: {answer:?}"))
}

/// A few HTTP/JSON calls to every replica (a key that is there and one
/// that is not), so that the HTTP metrics have samples.
fn http_traffic(http: &BTreeMap<u32, String>, key: &str) {
    for addr in http.values() {
        for path in [
            format!("/v1/kv/{key}"),
            "/v1/kv/obs-http-missing".to_string(),
        ] {
            let status = http_get(addr, &path);
            assert!(
                status == 200 || status == 404,
                "GET {path} on {addr}: {status}"
            );
        }
    }
}

/// What the dashboard's variables stand for when its queries are checked.
const RATE_INTERVAL: &str = "10s";

/// The tests here start whole clusters; on a 2-core machine they run one at
/// a time so that none starves another's replicas into spurious elections.
static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

fn repo_file(rel: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join(rel)
}

/// The dashboard, parsed.
fn dashboard() -> Value {
    let path = repo_file("grafana/dashboard.json");
    let text =
        std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("read {}: {e}", path.display()));
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("{} is not JSON: {e}", path.display()))
}

/// Every panel, rows' nested panels included.
fn panels(d: &Value) -> Vec<&Value> {
    let mut out = Vec::new();
    for p in d["panels"].as_array().expect("panels") {
        out.push(p);
        if let Some(inner) = p["panels"].as_array() {
            out.extend(inner);
        }
    }
    out
}

/// (panel title, refId, expr) of every target of every panel.
fn dashboard_queries(d: &Value) -> Vec<(String, String, String)> {
    let mut out = Vec::new();
    for p in panels(d) {
        for t in p["targets"].as_array().into_iter().flatten() {
            out.push((
                p["title"].as_str().unwrap_or("?").to_string(),
                t["refId"].as_str().unwrap_or("?").to_string(),
                t["expr"].as_str().unwrap_or_default().to_string(),
            ));
        }
    }
    out
}

/// A dashboard query as Grafana would send it with every instance selected.
fn substitute(expr: &str) -> String {
    let out = expr
        .replace("${instance}", ".*")
        .replace("$instance", ".*")
        .replace("$__rate_interval", RATE_INTERVAL)
        .replace("$__interval", "5s")
        .replace("$__range", "1m");
    assert!(!out.contains('$'), "unsubstituted variable in {expr}");
    out
}

/// The `paxoskv_*` selectors in `expr` that do not filter on
/// `instance=~"$instance"`.
fn unfiltered_selectors(expr: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut rest = expr;
    while let Some(pos) = rest.find("paxoskv_") {
        let after = &rest[pos..];
        let end = after
            .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
            .unwrap_or(after.len());
        let name = &after[..end];
        let tail = &after[end..];
        if let Some(labels) = tail.strip_prefix('{') {
            let close = labels.find('}').unwrap_or(labels.len());
            if !labels[..close].contains(r#"instance=~"$instance""#) {
                out.push(format!("{name}{{{}}}", &labels[..close]));
            }
            rest = &labels[close..];
        } else {
            out.push(name.to_string());
            rest = tail;
        }
    }
    out
}

#[test]
fn dashboard_imports_as_is() {
    let d = dashboard();
    // Panels follow the `datasource` variable; its default is the datasource
    // chosen for DS_PROMETHEUS at import.
    let ds = "${datasource}";
    let mut problems = Vec::new();

    let schema = d["schemaVersion"].as_u64().unwrap_or(0);
    if !(36..=41).contains(&schema) {
        problems.push(format!("schemaVersion {schema}, expected about 39"));
    }
    if !d["id"].is_null() {
        problems.push("id must be null for an importable dashboard".into());
    }
    let inputs = d["__inputs"].as_array().cloned().unwrap_or_default();
    if !inputs.iter().any(|i| {
        i["name"] == "DS_PROMETHEUS" && i["type"] == "datasource" && i["pluginId"] == "prometheus"
    }) {
        problems.push("__inputs lacks the DS_PROMETHEUS prometheus datasource input".into());
    }
    let vars = d["templating"]["list"]
        .as_array()
        .cloned()
        .unwrap_or_default();
    let var = |name: &str| vars.iter().find(|v| v["name"] == name).cloned();
    match var("datasource") {
        Some(v)
            if v["type"] == "datasource"
                && v["query"] == "prometheus"
                && v["current"]["value"] == "${DS_PROMETHEUS}" => {}
        other => problems.push(format!(
            "templating variable `datasource` must be a prometheus datasource variable \
             defaulting to ${{DS_PROMETHEUS}}: {other:?}"
        )),
    }
    match var("instance") {
        Some(v)
            if v["type"] == "query"
                && v["multi"] == true
                && v["includeAll"] == true
                && v["datasource"]["uid"] == ds
                && v.to_string()
                    .contains("label_values(paxoskv_is_leader, instance)") => {}
        other => problems.push(format!(
            "templating variable `instance` must be a multi, include-All query of \
             label_values(paxoskv_is_leader, instance): {other:?}"
        )),
    }

    let required: BTreeSet<String> = d["__requires"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|r| r["type"] == "panel")
        .filter_map(|r| r["id"].as_str().map(str::to_string))
        .collect();
    let mut ids = BTreeSet::new();
    let mut boxes: Vec<(String, [i64; 4])> = Vec::new();
    for p in panels(&d) {
        let title = p["title"].as_str().unwrap_or("?").to_string();
        let kind = p["type"].as_str().unwrap_or("?");
        if !ids.insert(p["id"].as_u64().unwrap_or(0)) || p["id"].as_u64().is_none() {
            problems.push(format!("panel {title:?}: missing or duplicate id"));
        }
        let g = &p["gridPos"];
        let rect = ["x", "y", "w", "h"].map(|k| g[k].as_i64().unwrap_or(-1));
        if rect.iter().any(|&v| v < 0) || rect[0] + rect[2] > 24 {
            problems.push(format!("panel {title:?}: bad gridPos {g}"));
        }
        for (other, r) in &boxes {
            let overlap = rect[0] < r[0] + r[2]
                && r[0] < rect[0] + rect[2]
                && rect[1] < r[1] + r[3]
                && r[1] < rect[1] + rect[3];
            if overlap {
                problems.push(format!("panels {title:?} and {other:?} overlap"));
            }
        }
        boxes.push((title.clone(), rect));
        if kind == "row" {
            continue;
        }
        if !required.contains(kind) {
            problems.push(format!(
                "panel {title:?}: type {kind} not listed in __requires"
            ));
        }
        if p["datasource"]["uid"] != ds || p["datasource"]["type"] != "prometheus" {
            problems.push(format!(
                "panel {title:?}: datasource {} is not {ds}",
                p["datasource"]
            ));
        }
        let targets = p["targets"].as_array().cloned().unwrap_or_default();
        if targets.is_empty() {
            problems.push(format!("panel {title:?}: no queries"));
        }
        let mut refs = BTreeSet::new();
        for t in &targets {
            let r = t["refId"].as_str().unwrap_or_default();
            if r.is_empty() || !refs.insert(r.to_string()) {
                problems.push(format!("panel {title:?}: missing or duplicate refId {r:?}"));
            }
            if t["datasource"]["uid"] != ds {
                problems.push(format!(
                    "panel {title:?} {r}: target datasource is not {ds}"
                ));
            }
            let expr = t["expr"].as_str().unwrap_or_default();
            if expr.is_empty() {
                problems.push(format!("panel {title:?} {r}: empty expr"));
            }
            for s in unfiltered_selectors(expr) {
                problems.push(format!(
                    "panel {title:?} {r}: selector {s} does not filter on instance=~\"$instance\""
                ));
            }
        }
    }

    let exprs: String = dashboard_queries(&d)
        .into_iter()
        .map(|(_, _, e)| e)
        .collect();
    for name in ALL_METRICS {
        if !exprs.contains(name) {
            problems.push(format!("no panel shows {name}"));
        }
    }
    assert!(
        problems.is_empty(),
        "grafana/dashboard.json:\n  {}",
        problems.join("\n  ")
    );
}

#[test]
fn prometheus_config_is_valid() {
    let path = repo_file("grafana/prometheus.yml");
    let (ok, out) = run_promtool(&["check", "config", &path.to_string_lossy()], "");
    assert!(ok, "promtool check config {}:\n{out}", path.display());
    let text = std::fs::read_to_string(&path).expect("read prometheus.yml");
    for port in 9091..=9093 {
        assert!(
            text.contains(&format!("127.0.0.1:{port}")),
            "grafana/prometheus.yml does not scrape 127.0.0.1:{port} (replica {} of `paxoskv cluster`)",
            port - 9090
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn metrics_pass_promtool_check() {
    let _serial = SERIAL.lock().await;
    promtool();
    let cluster = Cluster::start("obs-promtool", 3);
    for id in 1..=3 {
        cluster.wait_ready(id, Duration::from_secs(20)).await;
    }
    // A little of everything through every replica, errors included.
    for id in 1..=3 {
        let mut c = cluster.client(id).await;
        let key = format!("promtool-{id}");
        c.insert(pb::InsertRequest {
            key: key.clone(),
            value: Some(1),
            request_id: None,
        })
        .await
        .expect("insert");
        c.get(pb::GetRequest { key: key.clone() })
            .await
            .expect("get");
        let dup = c
            .insert(pb::InsertRequest {
                key: key.clone(),
                value: Some(2),
                request_id: None,
            })
            .await;
        assert_eq!(dup.unwrap_err().code(), tonic::Code::AlreadyExists);
        let missing = c
            .get(pb::GetRequest {
                key: "promtool-missing".into(),
            })
            .await;
        assert_eq!(missing.unwrap_err().code(), tonic::Code::NotFound);
        let bad = c.get(pb::GetRequest { key: String::new() }).await;
        assert_eq!(bad.unwrap_err().code(), tonic::Code::InvalidArgument);
        c.update(pb::UpdateRequest {
            key: key.clone(),
            value: Some(3),
            request_id: None,
        })
        .await
        .expect("update");
        c.upsert(pb::UpsertRequest {
            key: key.clone(),
            value: Some(4),
            request_id: None,
        })
        .await
        .expect("upsert");
        c.remove(pb::RemoveRequest {
            key,
            request_id: None,
        })
        .await
        .expect("remove");
    }
    http_traffic(&cluster.http, "promtool-1");
    // Gauges are refreshed every 100 ms.
    tokio::time::sleep(Duration::from_millis(500)).await;

    let mut failures = Vec::new();
    let mut families = BTreeSet::new();
    for id in 1..=3 {
        let page = cluster
            .scrape(id)
            .unwrap_or_else(|e| panic!("scrape replica {id}: {e}\n{}", cluster.log(id)));
        for line in page.lines() {
            if let Some(rest) = line.strip_prefix("# TYPE ")
                && let Some(name) = rest.split_whitespace().next()
            {
                families.insert(name.to_string());
            }
        }
        let (ok, out) = run_promtool(&["check", "metrics"], &page);
        println!("promtool check metrics, replica {id}: ok={ok} {out}");
        if !ok {
            failures.push(format!(
                "replica {id}: promtool check metrics failed:\n{out}\n--- /metrics ---\n{page}"
            ));
        }
    }
    let missing: Vec<&str> = ALL_METRICS
        .iter()
        .copied()
        .filter(|name| !families.contains(*name))
        .collect();
    if !missing.is_empty() {
        failures.push(format!(
            "metrics exported by no replica after traffic: {missing:?}"
        ));
    }
    assert!(failures.is_empty(), "{}", failures.join("\n\n"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn every_dashboard_query_returns_data() {
    let _serial = SERIAL.lock().await;
    let d = dashboard();
    let queries = dashboard_queries(&d);
    assert!(!queries.is_empty(), "the dashboard has no queries");
    prometheus();

    let cluster = Cluster::start("obs-dashboard", 3);
    for id in 1..=3 {
        cluster.wait_ready(id, Duration::from_secs(20)).await;
    }
    let targets: Vec<String> = cluster.metrics.values().cloned().collect();
    let prom = Prometheus::start(&targets);

    let load = Load::start(&cluster, Traffic::EveryMethod);
    let http = {
        let addrs = cluster.http.clone();
        tokio::task::spawn_blocking(move || {
            // Through the whole rate() window the HTTP panel looks at.
            let until = Instant::now() + Duration::from_secs(25);
            while Instant::now() < until {
                http_traffic(&addrs, "obs-1-0");
                std::thread::sleep(Duration::from_millis(500));
            }
        })
    };

    // Every replica scraped...
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let up = prom
            .query(r#"count(up{job="paxoskv"} == 1) == 3 and count(paxoskv_is_leader) == 3"#)
            .unwrap_or_default();
        if !up.is_empty() {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "prometheus has not scraped all 3 replicas within 20 s:\n{}{}",
            prom.targets(),
            prom.log()
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    // ...for several scrapes and a whole rate() window under load.
    tokio::time::sleep(Duration::from_secs(12)).await;

    // Every query must return at least one series with a number in it.
    // A query still empty is retried for a while (a scrape may be late).
    let mut pending: Vec<(String, String, String, String)> = queries
        .iter()
        .map(|(t, r, e)| (t.clone(), r.clone(), e.clone(), String::new()))
        .collect();
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        for q in pending.iter_mut() {
            let expr = substitute(&q.2);
            q.3 = match prom.query(&expr) {
                Err(e) => format!("error: {e}"),
                Ok(series) if series.is_empty() => "no series".into(),
                Ok(series) if series.iter().all(|(_, v)| v.is_nan()) => {
                    format!("only NaN: {series:?}")
                }
                Ok(_) => String::new(),
            };
        }
        pending.retain(|q| !q.3.is_empty());
        if pending.is_empty() || Instant::now() > deadline {
            break;
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }

    let answered = load.finish().await.answered;
    assert!(answered > 100, "the load got only {answered} answers");
    http.await.expect("the HTTP traffic");

    if !pending.is_empty() {
        let list: Vec<String> = pending
            .iter()
            .map(|(title, r, e, why)| format!("{title} [{r}]: {why}\n      {}", substitute(e)))
            .collect();
        panic!(
            "{} of {} dashboard queries return no data against a live cluster \
             ({answered} calls answered):\n  {}\n--- prometheus targets ---\n{}",
            pending.len(),
            queries.len(),
            list.join("\n  "),
            prom.targets(),
        );
    }
    println!(
        "all {} dashboard queries returned data ({answered} calls answered)",
        queries.len()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn metrics_follow_a_leader_kill() {
    let _serial = SERIAL.lock().await;
    let mut cluster = Cluster::start("obs-leader-kill", 3);
    for id in 1..=3 {
        cluster.wait_ready(id, Duration::from_secs(20)).await;
    }
    let mut c = cluster.client(1).await;
    for i in 0..10 {
        c.upsert(pb::UpsertRequest {
            key: format!("kill-{i}"),
            value: Some(i),
            request_id: None,
        })
        .await
        .expect("upsert");
    }
    let old = cluster.leader(Duration::from_secs(10)).await;
    let survivors: Vec<u32> = (1..=3).filter(|&id| id != old).collect();

    // Before: the metrics agree with Admin/Status.
    fn page(cluster: &Cluster, id: u32) -> String {
        cluster
            .scrape(id)
            .unwrap_or_else(|e| panic!("scrape replica {id}: {e}\n{}", cluster.log(id)))
    }
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let p = page(&cluster, old);
        let peers_up = survivors
            .iter()
            .all(|s| sample(&p, &format!("{}{{peer=\"{s}\"}}", m::PEER_REACHABLE)) == Some(1.0));
        if sample(&p, m::IS_LEADER) == Some(1.0) && peers_up {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "leader {old} does not report is_leader 1 and both peers reachable:\n{p}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let before: BTreeMap<u32, f64> = survivors
        .iter()
        .map(|&id| {
            let v = sample(&page(&cluster, id), m::LEADER_CHANGES)
                .unwrap_or_else(|| panic!("replica {id} exports no {}", m::LEADER_CHANGES));
            (id, v)
        })
        .collect();

    cluster.kill(old);
    let killed = Instant::now();
    let within = Duration::from_secs(10);
    let dead_peer = format!("{}{{peer=\"{old}\"}}", m::PEER_REACHABLE);
    let new = loop {
        let mut seen = Vec::new();
        let mut done = None;
        let mut changes_rose = false;
        for &id in &survivors {
            let p = page(&cluster, id);
            let changes = sample(&p, m::LEADER_CHANGES).unwrap_or(0.0);
            changes_rose |= changes > before[&id];
            let role = cluster.status(id).await.map(|s| s.role).unwrap_or_default();
            let reachable = sample(&p, &dead_peer);
            let is_leader = sample(&p, m::IS_LEADER);
            seen.push(format!(
                "replica {id}: role {role:?}, {} {changes} (was {}), is_leader {is_leader:?}, \
                 {dead_peer} {reachable:?}",
                m::LEADER_CHANGES,
                before[&id]
            ));
            if role == "leader" && is_leader == Some(1.0) && reachable == Some(0.0) {
                done = Some(id);
            }
        }
        let done = done.filter(|_| changes_rose);
        if let Some(id) = done {
            break id;
        }
        assert!(
            killed.elapsed() < within,
            "{within:?} after killing leader {old}, the survivors' metrics do not show a new \
             leader that sees {old} unreachable, with leader changes risen:\n  {}\n--- log {} ---\n{}\n--- log {} ---\n{}",
            seen.join("\n  "),
            survivors[0],
            cluster.log(survivors[0]),
            survivors[1],
            cluster.log(survivors[1]),
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    println!(
        "killed leader {old}; replica {new} leads and reports it unreachable after {:?}",
        killed.elapsed()
    );

    // `paxoskv status`, asked through the follower, names the new leader.
    let follower = survivors.iter().copied().find(|&id| id != new).unwrap();
    let run = tokio::process::Command::new(binary())
        .args([
            "status",
            "--endpoint",
            &cluster.addrs[&follower],
            "--timeout-ms",
            "2000",
        ])
        .stdin(Stdio::null())
        .kill_on_drop(true)
        .output();
    let out = tokio::time::timeout(Duration::from_secs(30), run)
        .await
        .expect("paxoskv status did not finish within 30 s")
        .expect("run paxoskv status");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    let names_new_leader = stdout.lines().any(|l| {
        let words: Vec<&str> = l.split_whitespace().collect();
        words.first() == Some(&new.to_string().as_str()) && words.contains(&"leader")
    });
    assert!(
        out.status.success() && names_new_leader,
        "paxoskv status --endpoint {} ({}) should succeed and show replica {new} as leader:\n\
         {stdout}{stderr}",
        cluster.addrs[&follower],
        out.status
    );
    println!("paxoskv status:\n{stdout}");
}
