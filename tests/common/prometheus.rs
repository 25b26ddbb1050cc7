//! Prometheus and promtool, for the observability tests: a real Prometheus
//! server scraping a test cluster, and `promtool` checks.
//!
//! Both come from the Debian package `prometheus`, which `scripts/test.sh`
//! installs; it passes their paths in `PAXOSKV_PROMETHEUS` and
//! `PAXOSKV_PROMTOOL` (otherwise they are looked up on `PATH`). Without them
//! the tests that need them fail: they do not skip.

use std::io::Write;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

use super::{free_ports, http_get};

/// The path of an external tool: `$env`, else `name` on `PATH`. Panics (the
/// test fails, it does not skip) when it is missing.
fn tool(env: &str, name: &str) -> PathBuf {
    if let Some(p) = std::env::var_os(env) {
        let p = PathBuf::from(p);
        assert!(
            p.is_file(),
            "{env}={} does not exist; run scripts/test.sh, which installs the Debian package \
             prometheus (prometheus and promtool) and sets {env}",
            p.display()
        );
        return p;
    }
    std::env::var_os("PATH")
        .and_then(|paths| {
            std::env::split_paths(&paths)
                .map(|d| d.join(name))
                .find(|p| p.is_file())
        })
        .unwrap_or_else(|| {
            panic!(
                "{name} not found (neither {env} nor PATH has it). Run scripts/test.sh: it \
                 installs the Debian package prometheus, which provides prometheus and promtool, \
                 and sets PAXOSKV_PROMETHEUS and PAXOSKV_PROMTOOL"
            )
        })
}

pub fn promtool() -> PathBuf {
    tool("PAXOSKV_PROMTOOL", "promtool")
}

pub fn prometheus() -> PathBuf {
    tool("PAXOSKV_PROMETHEUS", "prometheus")
}

/// Runs `promtool ARGS` with `stdin` as its input, up to 30 s. Returns
/// whether it succeeded, and everything it printed.
pub fn run_promtool(args: &[&str], stdin: &str) -> (bool, String) {
    let mut child = Command::new(promtool())
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start promtool");
    let mut input = child.stdin.take().expect("promtool stdin");
    let stdin = stdin.to_string();
    let writer = std::thread::spawn(move || {
        let _ = input.write_all(stdin.as_bytes());
    });
    let pid = child.id();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(child.wait_with_output());
    });
    let output = match rx.recv_timeout(Duration::from_secs(30)) {
        Ok(out) => out.expect("wait for promtool"),
        Err(_) => {
            // SAFETY: kill(2) on our own child's pid.
            unsafe {
                libc::kill(pid as libc::pid_t, libc::SIGKILL);
            }
            panic!("promtool {args:?} did not finish within 30 s");
        }
    };
    let _ = writer.join();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    (output.status.success(), text)
}

/// Percent-encodes a URL query component.
fn encode(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

/// A Prometheus server on 127.0.0.1 scraping the given targets every
/// second, its config and data in a temp dir. Killed on drop.
pub struct Prometheus {
    child: Child,
    addr: String,
    dir: tempfile::TempDir,
}

impl Prometheus {
    /// Starts Prometheus scraping `targets` (`host:port`, path `/metrics`)
    /// and waits up to 30 s until it is ready.
    pub fn start(targets: &[String]) -> Prometheus {
        let binary = prometheus();
        let dir = tempfile::Builder::new()
            .prefix("paxoskv-prometheus-")
            .tempdir()
            .expect("temp dir");
        let config = dir.path().join("prometheus.yml");
        let targets = targets
            .iter()
            .map(|t| format!("          - {t}\n"))
            .collect::<String>();
        std::fs::write(
            &config,
            format!(
                "global:\n  scrape_interval: 1s\n  scrape_timeout: 1s\n  evaluation_interval: 1s\n\
                 scrape_configs:\n  - job_name: paxoskv\n    static_configs:\n      - targets:\n{targets}"
            ),
        )
        .expect("write prometheus.yml");
        let addr = format!("127.0.0.1:{}", free_ports(1)[0]);
        let log = std::fs::File::create(dir.path().join("prometheus.log")).expect("log file");
        let child = Command::new(binary)
            .arg(format!("--config.file={}", config.display()))
            .arg(format!(
                "--storage.tsdb.path={}",
                dir.path().join("data").display()
            ))
            .arg(format!("--web.listen-address={addr}"))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("start prometheus");
        let mut prom = Prometheus { child, addr, dir };
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Ok(Some(status)) = prom.child.try_wait() {
                panic!("prometheus exited ({status}):\n{}", prom.log());
            }
            if http_get(&prom.addr, "/-/ready").is_ok() {
                return prom;
            }
            if Instant::now() > deadline {
                panic!("prometheus not ready after 30 s:\n{}", prom.log());
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Prometheus's log so far (for failure messages).
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("prometheus.log")).unwrap_or_default()
    }

    /// Each scrape target's URL, health and last error, for failure messages.
    pub fn targets(&self) -> String {
        let body = match http_get(&self.addr, "/api/v1/targets") {
            Ok(body) => body,
            Err(e) => return e,
        };
        let v: Value = serde_json::from_str(&body).unwrap_or_default();
        v["data"]["activeTargets"]
            .as_array()
            .into_iter()
            .flatten()
            .map(|t| {
                format!(
                    "{} {} {}\n",
                    t["scrapeUrl"].as_str().unwrap_or("?"),
                    t["health"].as_str().unwrap_or("?"),
                    t["lastError"].as_str().unwrap_or("")
                )
            })
            .collect()
    }

    /// An instant query: each series' labels and value, or the error.
    pub fn query(&self, expr: &str) -> Result<Vec<(String, f64)>, String> {
        let body = http_get(&self.addr, &format!("/api/v1/query?query={}", encode(expr)))?;
        let v: Value = serde_json::from_str(&body).map_err(|e| format!("{e}: {body}"))?;
        if v["status"] != "success" {
            return Err(format!("query failed: {body}"));
        }
        let value = |pair: &Value| -> f64 {
            pair[1]
                .as_str()
                .and_then(|s| s.parse().ok())
                .unwrap_or(f64::NAN)
        };
        match v["data"]["resultType"].as_str() {
            Some("vector") => Ok(v["data"]["result"]
                .as_array()
                .into_iter()
                .flatten()
                .map(|s| (s["metric"].to_string(), value(&s["value"])))
                .collect()),
            Some("scalar") => Ok(vec![(String::new(), value(&v["data"]["result"]))]),
            other => Err(format!("unexpected result type {other:?}: {body}")),
        }
    }
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
