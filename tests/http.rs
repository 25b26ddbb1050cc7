//! The HTTP/JSON API (`--http-listen`), driven by a real client: curl
//! against a running 3-replica cluster, through the leader and a follower,
//! with grpcurl reading and writing the same keys to show that HTTP and
//! gRPC see one store.
//!
//! curl is found at `$PAXOSKV_CURL`, else on the PATH (scripts/test.sh
//! installs it with apt-get when it is missing). Without it these tests
//! fail; they do not skip.

mod common;

use std::process::Command;
use std::time::Duration;

use common::{Cluster, ClusterTls, curl, grpcurl};
use serde_json::{Value, json};

/// What one curl run got: the final response's status, headers and JSON
/// body, or curl's failure.
#[derive(Debug)]
struct Reply {
    status: u16,
    /// The response's header lines, lowercased.
    headers: Vec<String>,
    json: Value,
}

impl Reply {
    fn header(&self, name: &str) -> Option<&str> {
        let prefix = format!("{}:", name.to_ascii_lowercase());
        self.headers
            .iter()
            .find_map(|h| h.strip_prefix(&prefix).map(str::trim))
    }
}

/// Runs curl with `args` (and `-sS -i`, a time limit); `Err` with its
/// stderr if curl itself failed (no connection, TLS refused).
fn curl_run(args: &[&str]) -> Result<Reply, String> {
    let out = Command::new(curl())
        .args(["-sS", "-i", "--max-time", "20"])
        .args(args)
        .output()
        .expect("run curl");
    if !out.status.success() {
        return Err(String::from_utf8_lossy(&out.stderr).into_owned());
    }
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    // Skip interim responses (100 Continue) to the final one.
    let mut rest = text.as_str();
    loop {
        let (head, body) = rest
            .split_once("\r\n\r\n")
            .unwrap_or_else(|| panic!("no end of headers in {text:?}"));
        let status: u16 = head
            .split_whitespace()
            .nth(1)
            .and_then(|s| s.parse().ok())
            .unwrap_or_else(|| panic!("no status in {text:?}"));
        if status == 100 {
            rest = body;
            continue;
        }
        let headers = head
            .lines()
            .skip(1)
            .map(|l| l.to_ascii_lowercase())
            .collect();
        let json = serde_json::from_str(body)
            .unwrap_or_else(|e| panic!("not a JSON body ({e}): {text:?}"));
        return Ok(Reply {
            status,
            headers,
            json,
        });
    }
}

/// A request to `http://ADDR/PATH`, with a body if `body` is not empty.
fn call(method: &str, addr: &str, path: &str, body: &str) -> Reply {
    let url = format!("http://{addr}{path}");
    let mut args = vec!["-X", method, url.as_str()];
    if !body.is_empty() {
        args.extend(["-d", body]);
    }
    curl_run(&args).unwrap_or_else(|e| panic!("{method} {url}: curl failed: {e}"))
}

/// Asserts a success and its JSON.
fn ok(reply: &Reply, status: u16, json: Value) {
    assert_eq!(
        (reply.status, &reply.json),
        (status, &json),
        "full reply: {reply:?}"
    );
    assert_eq!(
        reply.header("content-type"),
        Some("application/json"),
        "{reply:?}"
    );
}

/// Asserts a failure: its status, gRPC code, and a message saying `says`.
fn failed(reply: &Reply, status: u16, code: &str, says: &str) {
    assert_eq!(reply.status, status, "{reply:?}");
    assert_eq!(reply.json["error"]["code"], code, "{reply:?}");
    let message = reply.json["error"]["message"].as_str().unwrap_or_default();
    assert!(message.contains(says), "{message:?} should say {says:?}");
}

/// grpcurl against a replica's client port, plaintext.
fn grpc(addr: &str, method: &str, body: &str) -> String {
    let out = Command::new(grpcurl())
        .args(["-plaintext", "-max-time", "10", "-d", body, addr])
        .arg(format!("paxoskv.v1.KvStore/{method}"))
        .output()
        .expect("run grpcurl");
    assert!(
        out.status.success(),
        "grpcurl {method} {body}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn curl_drives_every_verb_through_the_leader_and_a_follower_on_one_store() {
    let cluster = Cluster::start("http", 3);
    cluster.wait_ready(1, Duration::from_secs(15)).await;
    let leader = cluster.leader(Duration::from_secs(15)).await;
    let follower = if leader == 1 { 2 } else { 1 };
    let other = 6 - leader - follower;

    for entry in [leader, follower] {
        let addr = &cluster.http[&entry];
        let key = format!("/v1/kv/fruit-{entry}");
        failed(
            &call("GET", addr, &key, ""),
            404,
            "NOT_FOUND",
            &format!("key \"fruit-{entry}\" not found"),
        );
        ok(&call("POST", addr, &key, r#"{"value":5}"#), 201, json!({}));
        failed(
            &call("POST", addr, &key, r#"{"value":6}"#),
            409,
            "ALREADY_EXISTS",
            "already exists",
        );
        for reader in cluster.http.values() {
            ok(
                &call("GET", reader, &key, ""),
                200,
                json!({"key": format!("fruit-{entry}"), "value": 5}),
            );
        }
        ok(
            &call("PATCH", addr, &key, r#"{"value":-7}"#),
            200,
            json!({"previous": 5}),
        );
        ok(
            &call("PUT", addr, &key, r#"{"value":8}"#),
            200,
            json!({"inserted": false}),
        );
        ok(
            &call("PUT", addr, &format!("{key}-new"), r#"{"value":1}"#),
            200,
            json!({"inserted": true}),
        );
        // One store: gRPC reads what HTTP wrote, HTTP reads what gRPC wrote.
        let got = grpc(
            &cluster.addrs[&other],
            "Get",
            &format!(r#"{{"key":"fruit-{entry}"}}"#),
        );
        assert!(got.contains(r#""value": 8"#), "{got}");
        grpc(
            &cluster.addrs[&other],
            "Update",
            &format!(r#"{{"key":"fruit-{entry}","value":9}}"#),
        );
        ok(
            &call("GET", addr, &key, ""),
            200,
            json!({"key": format!("fruit-{entry}"), "value": 9}),
        );
        ok(&call("DELETE", addr, &key, ""), 200, json!({"previous": 9}));
        failed(
            &call("DELETE", addr, &key, ""),
            404,
            "NOT_FOUND",
            "not found",
        );
        failed(
            &call("PATCH", addr, &key, r#"{"value":1}"#),
            404,
            "NOT_FOUND",
            "not found",
        );
    }

    // Percent-encoded keys: '/', a space and UTF-8, decoded before the
    // store sees them; gRPC reads them by their decoded name.
    let addr = &cluster.http[&follower];
    ok(
        &call("PUT", addr, "/v1/kv/a%2Fb%20caf%C3%A9", r#"{"value":3}"#),
        200,
        json!({"inserted": true}),
    );
    let got = grpc(&cluster.addrs[&leader], "Get", r#"{"key":"a/b café"}"#);
    assert!(got.contains(r#""value": 3"#), "{got}");
    ok(
        &call(
            "GET",
            &cluster.http[&leader],
            "/v1/kv/a%2fb%20caf%c3%a9",
            "",
        ),
        200,
        json!({"key": "a/b café", "value": 3}),
    );
    failed(
        &call("GET", addr, "/v1/kv/a/b", ""),
        404,
        "UNIMPLEMENTED",
        "%2F",
    );
    failed(
        &call("GET", addr, "/v1/kv/%FF", ""),
        400,
        "INVALID_ARGUMENT",
        "UTF-8",
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_requests_get_the_status_users_expect_and_name_what_was_wrong() {
    let cluster = Cluster::start("http-bad", 3);
    cluster.wait_ready(1, Duration::from_secs(15)).await;
    let leader = cluster.leader(Duration::from_secs(15)).await;
    let follower = if leader == 3 { 2 } else { 3 };
    let addr = &cluster.http[&follower];

    // 400: the service's own checks, as gRPC says them.
    failed(
        &call("POST", addr, "/v1/kv/", r#"{"value":1}"#),
        400,
        "INVALID_ARGUMENT",
        "key must not be empty",
    );
    let long = format!("/v1/kv/{}", "k".repeat(1025));
    failed(
        &call("PUT", addr, &long, r#"{"value":1}"#),
        400,
        "INVALID_ARGUMENT",
        "1025 bytes",
    );
    failed(
        &call("POST", addr, "/v1/kv/novalue", ""),
        400,
        "INVALID_ARGUMENT",
        "value is required",
    );
    failed(
        &call(
            "PUT",
            addr,
            "/v1/kv/x",
            r#"{"value":1,"request_id":{"sequence":1}}"#,
        ),
        400,
        "INVALID_ARGUMENT",
        "request_id.client_id must not be 0",
    );
    // 400: HTTP's own parsing.
    failed(
        &call("PUT", addr, "/v1/kv/x", r#"{"value":2147483648}"#),
        400,
        "INVALID_ARGUMENT",
        "value must be an integer from -2147483648 to 2147483647",
    );
    failed(
        &call("PUT", addr, "/v1/kv/x", r#"{"value":1,"ttl":3}"#),
        400,
        "INVALID_ARGUMENT",
        "unknown field \"ttl\"",
    );
    failed(
        &call("PUT", addr, "/v1/kv/x", "value=1"),
        400,
        "INVALID_ARGUMENT",
        "not valid JSON",
    );
    let bad_timeout = curl_run(&[
        "-H",
        "X-Timeout-Ms: soon",
        &format!("http://{addr}/v1/kv/x"),
    ])
    .expect("curl");
    failed(&bad_timeout, 400, "INVALID_ARGUMENT", "x-timeout-ms");
    // 404 and 405 with Allow.
    failed(
        &call("GET", addr, "/v1/keys/x", ""),
        404,
        "UNIMPLEMENTED",
        "no such path",
    );
    let wrong = call("OPTIONS", addr, "/v1/kv/x", "");
    failed(&wrong, 405, "UNIMPLEMENTED", "does not take OPTIONS");
    assert_eq!(
        wrong.header("allow"),
        Some("get, post, put, patch, delete"),
        "{wrong:?}"
    );
    let wrong = call("GET", addr, "/v1/sessions", "");
    assert_eq!((wrong.status, wrong.header("allow")), (405, Some("post")));
    // 413: past 16 KiB, with or without curl's Expect: 100-continue.
    let big = format!(r#"{{"value":1}}{}"#, " ".repeat(20_000));
    failed(
        &call("PUT", addr, "/v1/kv/x", &big),
        413,
        "INVALID_ARGUMENT",
        "larger than 16384 bytes",
    );
    let no_expect = curl_run(&[
        "-X",
        "PUT",
        "-H",
        "Expect:",
        "-d",
        &big,
        &format!("http://{addr}/v1/kv/x"),
    ])
    .expect("curl");
    assert_eq!(no_expect.status, 413, "{no_expect:?}");
    // None of it reached the store.
    for key in ["novalue", "x"] {
        failed(
            &call("GET", addr, &format!("/v1/kv/{key}"), ""),
            404,
            "NOT_FOUND",
            "not found",
        );
    }

    // Sessions: a write retried with its request id is applied once and
    // answered with its first reply; an older sequence and a session the
    // store never issued are 412.
    let opened = call("POST", addr, "/v1/sessions", "");
    assert_eq!(opened.status, 201, "{opened:?}");
    let client_id = opened.json["client_id"]
        .as_u64()
        .unwrap_or_else(|| panic!("no client_id: {opened:?}"));
    let write = |sequence: u64, method: &str, value: i32| {
        call(
            method,
            addr,
            "/v1/kv/counter",
            &format!(
                r#"{{"value":{value},"request_id":{{"client_id":{client_id},"sequence":{sequence}}}}}"#
            ),
        )
    };
    for _ in 0..2 {
        ok(&write(1, "PUT", 3), 200, json!({"inserted": true}));
    }
    // Applied twice, the retry would say the previous value was 10.
    for _ in 0..2 {
        ok(&write(2, "PATCH", 10), 200, json!({"previous": 3}));
    }
    ok(
        &call("GET", &cluster.http[&leader], "/v1/kv/counter", ""),
        200,
        json!({"key": "counter", "value": 10}),
    );
    failed(
        &write(1, "PATCH", 11),
        412,
        "FAILED_PRECONDITION",
        "older than 2",
    );
    failed(
        &call(
            "PUT",
            addr,
            "/v1/kv/counter",
            r#"{"value":1,"request_id":{"client_id":"7","sequence":"1"}}"#,
        ),
        412,
        "FAILED_PRECONDITION",
        "open a new session",
    );

    // Every request above was counted, by method, route and status.
    let page = cluster.scrape(follower).expect("metrics");
    for labels in [
        &[
            r#"method="PUT""#,
            r#"route="/v1/kv/{key}""#,
            r#"status="413""#,
        ][..],
        &[r#"method="other""#, r#"status="405""#],
        &[
            r#"method="POST""#,
            r#"route="/v1/sessions""#,
            r#"status="201""#,
        ],
    ] {
        assert!(
            page.lines()
                .any(|l| l.starts_with("paxoskv_http_requests_total{")
                    && labels.iter().all(|label| l.contains(label))),
            "no paxoskv_http_requests_total with {labels:?} in:\n{}",
            page.lines()
                .filter(|l| l.contains("http_requests"))
                .collect::<Vec<_>>()
                .join("\n")
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_a_quorum_it_is_503_with_retry_after_and_the_writes_certainty() {
    let mut cluster = Cluster::start("http-503", 3);
    cluster.wait_ready(1, Duration::from_secs(15)).await;
    cluster.kill(2);
    cluster.kill(3);
    // Give replica 1 time to notice, if it led, that no majority answers.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let url = format!("http://{}/v1/kv/lonely", cluster.http[&1]);
    let write = curl_run(&[
        "-X",
        "PUT",
        "-H",
        "X-Timeout-Ms: 1500",
        "-d",
        r#"{"value":1}"#,
        &url,
    ])
    .expect("curl");
    failed(&write, 503, "UNAVAILABLE", "");
    assert_eq!(write.header("retry-after"), Some("1"), "{write:?}");
    let certainty = write.json["error"]["certainty"].as_str();
    assert!(
        matches!(certainty, Some("NOT_PROPOSED" | "OUTCOME_UNKNOWN")),
        "{write:?}"
    );
    assert!(write.json["error"]["reason"].is_string(), "{write:?}");
    let read = curl_run(&["-H", "X-Timeout-Ms: 1500", &url]).expect("curl");
    failed(&read, 503, "UNAVAILABLE", "");
    assert!(read.json["error"].get("certainty").is_none(), "{read:?}");

    // SIGTERM stops the HTTP port with the rest, and the replica exits 0.
    let status = cluster.terminate(1, Duration::from_secs(15));
    assert!(status.is_some_and(|s| s.success()), "{status:?}");
    assert!(
        curl_run(&[&url]).is_err(),
        "the HTTP port outlived its replica"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_tls_the_http_port_is_https_and_wants_the_client_certificate() {
    let certs = tempfile::tempdir().expect("temp dir");
    let made = paxoskv::tls::generate(certs.path(), &[1, 2, 3], &["127.0.0.1", "localhost"])
        .expect("certificates");
    let tls = ClusterTls {
        replicas: made.replicas.clone(),
        client: made.client.clone(),
    };
    let cluster = Cluster::start_tls("http-tls", 3, common::PeerForm::Plain, tls, &[]);
    cluster.wait_ready(1, Duration::from_secs(15)).await;
    let c = &made.client;
    let with_cert = |args: &[&str]| {
        let mut all = vec![
            "--cacert".to_string(),
            c.ca.display().to_string(),
            "--cert".to_string(),
            c.cert.display().to_string(),
            "--key".to_string(),
            c.key.display().to_string(),
        ];
        all.extend(args.iter().map(|a| a.to_string()));
        let all: Vec<&str> = all.iter().map(String::as_str).collect();
        curl_run(&all)
    };
    let url = |id: u32| format!("https://{}/v1/kv/secret", cluster.http[&id]);
    let put = with_cert(&["-X", "PUT", "-d", r#"{"value":42}"#, &url(2)]).expect("curl");
    ok(&put, 200, json!({"inserted": true}));
    for id in 1..=3 {
        let get = with_cert(&[&url(id)]).expect("curl");
        ok(&get, 200, json!({"key": "secret", "value": 42}));
    }
    // Without a client certificate, or in plaintext: no answer at all.
    let ca = c.ca.display().to_string();
    let anonymous = curl_run(&["--cacert", &ca, &url(1)]);
    assert!(
        anonymous.is_err(),
        "served without a client certificate: {anonymous:?}"
    );
    let plain = curl_run(&[&format!("http://{}/v1/kv/secret", cluster.http[&1])]);
    assert!(plain.is_err(), "served plaintext with TLS on: {plain:?}");
}
