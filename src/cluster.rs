//! `paxoskv cluster`: a local cluster of real `paxoskv serve` processes on
//! 127.0.0.1, for trying paxoskv out.
//!
//! Replica N serves clients on `base_port + N - 1`, the other replicas on
//! `base_port + 100 + N - 1`, and HTTP/JSON on `base_port + 200 + N - 1`
//! (8081-8083, 8181-8183 and 8281-8283 by default), so there are at most
//! [`MAX_REPLICAS`].
//!
//! With `--tls`, it first makes a throwaway CA and certificates under
//! `DATA_DIR/tls/` ([`crate::tls::generate`]): one per replica, and one for
//! clients, which the grpcurl and curl lines it prints use.

use std::path::PathBuf;
use std::process::Stdio;
use std::time::Duration;

use tokio::process::{Child, Command};

/// How to run the local cluster.
#[derive(Clone, Debug)]
pub struct ClusterOptions {
    /// How many replicas.
    pub replicas: u32,
    /// Replica N serves clients on 127.0.0.1:(base_port + N - 1) and its
    /// peers on 127.0.0.1:(base_port + [`PEER_PORT_OFFSET`] + N - 1).
    pub base_port: u16,
    /// Replica N keeps its data in `data_dir/N`.
    pub data_dir: PathBuf,
    /// Replica N serves metrics on 127.0.0.1:(metrics_base_port + N); none if unset.
    pub metrics_base_port: Option<u16>,
    /// Mutual TLS, with certificates made under `data_dir/tls`.
    pub tls: bool,
}

type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// How far above its client port a replica's peer port is.
pub const PEER_PORT_OFFSET: u32 = 100;

/// How far above its client port a replica's HTTP/JSON port is.
pub const HTTP_PORT_OFFSET: u32 = 2 * PEER_PORT_OFFSET;

/// The most replicas a local cluster has: more would put client ports
/// among the peer ports (and peer ports among the HTTP ports).
pub const MAX_REPLICAS: u32 = PEER_PORT_OFFSET;

/// Replica `id`'s client and peer addresses in a local cluster whose
/// client ports start at `base_port`; an error if a port would pass 65535.
pub fn addresses(base_port: u16, id: u32) -> Result<(String, String), String> {
    let client = u32::from(base_port) + id - 1;
    let peer = client + PEER_PORT_OFFSET;
    if peer > u32::from(u16::MAX) {
        return Err(format!(
            "--base-port {base_port}: replica {id}'s peer port would be {peer}, above 65535"
        ));
    }
    Ok((format!("127.0.0.1:{client}"), format!("127.0.0.1:{peer}")))
}

/// Replica `id`'s HTTP/JSON address in a local cluster whose client ports
/// start at `base_port`; an error if the port would pass 65535.
pub fn http_address(base_port: u16, id: u32) -> Result<String, String> {
    let port = u32::from(base_port) + id - 1 + HTTP_PORT_OFFSET;
    if port > u32::from(u16::MAX) {
        return Err(format!(
            "--base-port {base_port}: replica {id}'s HTTP port would be {port}, above 65535"
        ));
    }
    Ok(format!("127.0.0.1:{port}"))
}

/// Starts the replicas, prints how to talk to them, and stops them all
/// cleanly (SIGTERM, then wait) once `shutdown` resolves (in `paxoskv
/// cluster`: Ctrl-C or SIGTERM). Fails if a replica exits on its own.
pub async fn run(
    opts: ClusterOptions,
    shutdown: impl Future<Output = ()> + Send,
) -> Result<(), BoxError> {
    if opts.replicas == 0 || opts.replicas > MAX_REPLICAS {
        return Err(format!(
            "--replicas must be from 1 to {MAX_REPLICAS} (peer ports are {PEER_PORT_OFFSET} above the client ports)"
        )
        .into());
    }
    let exe = std::env::current_exe()?;
    let addresses = (1..=opts.replicas)
        .map(|id| addresses(opts.base_port, id))
        .collect::<Result<Vec<_>, _>>()?;
    let http_addresses = (1..=opts.replicas)
        .map(|id| http_address(opts.base_port, id))
        .collect::<Result<Vec<_>, _>>()?;
    let addr = |id: u32| addresses[id as usize - 1].0.clone();
    let http_addr = |id: u32| http_addresses[id as usize - 1].clone();
    let peer_addr = |id: u32| addresses[id as usize - 1].1.clone();
    let peers = (1..=opts.replicas)
        .map(|id| format!("{id}={}", peer_addr(id)))
        .collect::<Vec<_>>()
        .join(",");
    let ids: Vec<u32> = (1..=opts.replicas).collect();
    let certificates = if opts.tls {
        let dir = opts.data_dir.join("tls");
        Some(crate::tls::generate(
            &dir,
            &ids,
            &["127.0.0.1", "localhost"],
        )?)
    } else {
        None
    };
    let mut children: Vec<(u32, Child)> = Vec::new();
    for id in 1..=opts.replicas {
        let dir = opts.data_dir.join(id.to_string());
        std::fs::create_dir_all(&dir)
            .map_err(|e| format!("cannot create {}: {e}", dir.display()))?;
        let mut cmd = Command::new(&exe);
        cmd.arg("serve")
            .args([
                "--id",
                &id.to_string(),
                "--listen",
                &addr(id),
                "--peer-listen",
                &peer_addr(id),
                "--peers",
                &peers,
                "--http-listen",
                &http_addr(id),
            ])
            .arg("--data-dir")
            .arg(&dir)
            .stdin(Stdio::null())
            .kill_on_drop(true);
        if let Some(files) = certificates.as_ref().and_then(|c| c.replicas.get(&id)) {
            cmd.arg("--tls-cert")
                .arg(&files.cert)
                .arg("--tls-key")
                .arg(&files.key)
                .arg("--tls-ca")
                .arg(&files.ca);
        }
        if let Some(base) = opts.metrics_base_port {
            cmd.args([
                "--metrics-listen",
                &format!("127.0.0.1:{}", u32::from(base) + id),
            ]);
        }
        let child = cmd
            .spawn()
            .map_err(|e| format!("cannot start replica {id}: {e}"))?;
        children.push((id, child));
    }

    println!(
        "paxoskv: {} replicas running (data under {})",
        opts.replicas,
        opts.data_dir.display()
    );
    for id in 1..=opts.replicas {
        let metrics = opts
            .metrics_base_port
            .map(|b| format!(", metrics http://127.0.0.1:{}/metrics", u32::from(b) + id))
            .unwrap_or_default();
        println!(
            "  replica {id}: clients {}, peers {}, HTTP/JSON {}{metrics}",
            addr(id),
            peer_addr(id),
            http_addr(id)
        );
    }
    let a = addr(1);
    let b = addr(opts.replicas.min(2));
    let c = addr(opts.replicas);
    println!(
        "\nClients use the first addresses; the peer ports carry only the replicas' own protocol."
    );
    let (ha, hb, hc) = (
        http_addr(1),
        http_addr(opts.replicas.min(2)),
        http_addr(opts.replicas),
    );
    // How grpcurl, curl and the CLI reach a replica: plaintext, or with
    // the client certificate.
    let (grpcurl, curl, scheme, cli) = match &certificates {
        Some(made) => {
            let c = &made.client;
            println!(
                "\nMutual TLS: CA {}, client certificate {} (key {}); replica N's certificate is replica-N.pem beside them.",
                made.ca.display(),
                c.cert.display(),
                c.key.display()
            );
            (
                format!(
                    "grpcurl -cacert {} -cert {} -key {}",
                    c.ca.display(),
                    c.cert.display(),
                    c.key.display()
                ),
                format!(
                    "curl -sS --cacert {} --cert {} --key {}",
                    c.ca.display(),
                    c.cert.display(),
                    c.key.display()
                ),
                "https",
                format!(
                    " --tls-cert {} --tls-key {} --tls-ca {}",
                    c.cert.display(),
                    c.key.display(),
                    c.ca.display()
                ),
            )
        }
        None => (
            "grpcurl -plaintext".to_string(),
            "curl -sS".to_string(),
            "http",
            String::new(),
        ),
    };
    println!("\nTry (any replica answers any call):");
    println!("  {grpcurl} {a} list");
    println!("  {grpcurl} {a} describe paxoskv.v1.KvStore");
    println!("  {grpcurl} -d '{{\"key\":\"apple\",\"value\":1}}' {a} paxoskv.v1.KvStore/Insert");
    println!("  {grpcurl} -d '{{\"key\":\"apple\"}}' {b} paxoskv.v1.KvStore/Get");
    println!("  {grpcurl} -d '{{\"key\":\"apple\",\"value\":2}}' {c} paxoskv.v1.KvStore/Update");
    println!("  {grpcurl} -d '{{\"key\":\"pear\",\"value\":7}}' {b} paxoskv.v1.KvStore/Upsert");
    println!("  {grpcurl} -d '{{\"key\":\"apple\"}}' {c} paxoskv.v1.KvStore/Remove");
    println!("  {grpcurl} -d '{{}}' {a} paxoskv.v1.KvStore/OpenSession");
    println!("  {grpcurl} {a} grpc.health.v1.Health/Check");
    println!("\nOr over HTTP/JSON, the same calls (README: curl):");
    println!("  {curl} -X POST {scheme}://{ha}/v1/kv/apple -d '{{\"value\":1}}'");
    println!("  {curl} {scheme}://{hb}/v1/kv/apple");
    println!("  {curl} -X PATCH {scheme}://{hc}/v1/kv/apple -d '{{\"value\":2}}'");
    println!("  {curl} -X PUT {scheme}://{hb}/v1/kv/pear -d '{{\"value\":7}}'");
    println!("  {curl} -X DELETE {scheme}://{hc}/v1/kv/apple");
    println!("  {curl} -X POST {scheme}://{ha}/v1/sessions");
    println!(
        "\nA write retried with the clientId OpenSession issued, in \
         \"request_id\": {{\"client_id\": ID, \"sequence\": N}}, is applied once (README: Safe retries)."
    );
    println!("Or with the CLI: paxoskv get apple --endpoint {b}{cli}");
    println!("Ctrl-C stops the cluster.\n");

    let outcome = tokio::select! {
        () = shutdown => Ok(()),
        failure = first_exit(&mut children) => Err(failure),
    };
    stop_all(&mut children).await;
    outcome
}

/// Resolves, with the reason, once a replica has exited (or can no longer
/// be waited on); never otherwise.
async fn first_exit(children: &mut [(u32, Child)]) -> BoxError {
    loop {
        tokio::time::sleep(Duration::from_millis(200)).await;
        for (id, child) in children.iter_mut() {
            match child.try_wait() {
                Ok(None) => {}
                Ok(Some(status)) => {
                    return format!("replica {id} exited on its own ({status}); see its log above")
                        .into();
                }
                Err(e) => return format!("replica {id}: {e}").into(),
            }
        }
    }
}

/// SIGTERM to every replica, then up to 10 s for them to exit; SIGKILL after.
async fn stop_all(children: &mut [(u32, Child)]) {
    for (_, child) in children.iter() {
        if let Some(pid) = child.id() {
            // SAFETY: kill(2) on a child's pid with a valid signal number.
            unsafe {
                libc::kill(pid as libc::pid_t, libc::SIGTERM);
            }
        }
    }
    for (id, child) in children.iter_mut() {
        match tokio::time::timeout(Duration::from_secs(10), child.wait()).await {
            Ok(Ok(status)) if status.success() => {}
            Ok(Ok(status)) => eprintln!("replica {id} exited with {status}"),
            Ok(Err(e)) => eprintln!("replica {id}: {e}"),
            Err(_) => {
                eprintln!("replica {id} did not stop within 10 s; killing it");
                let _ = child.kill().await;
            }
        }
    }
    println!("paxoskv: cluster stopped");
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn peer_ports_are_a_hundred_above_the_client_ports() {
        assert_eq!(
            addresses(8081, 1),
            Ok(("127.0.0.1:8081".into(), "127.0.0.1:8181".into()))
        );
        assert_eq!(
            addresses(8081, 3),
            Ok(("127.0.0.1:8083".into(), "127.0.0.1:8183".into()))
        );
        // The last replica allowed still has its client port below the
        // first peer port.
        let (last_client, _) = addresses(8081, MAX_REPLICAS).expect("in range");
        assert_eq!(last_client, "127.0.0.1:8180");
        let err = addresses(65_500, 1).expect_err("peer port above 65535");
        assert!(
            err.contains("--base-port 65500") && err.contains("65600"),
            "{err}"
        );
        assert_eq!(http_address(8081, 3).as_deref(), Ok("127.0.0.1:8283"));
        // The last replica's peer port is still below the first HTTP port.
        let (_, last_peer) = addresses(8081, MAX_REPLICAS).expect("in range");
        assert_eq!(last_peer, "127.0.0.1:8280");
        let err = http_address(65_400, 1).expect_err("HTTP port above 65535");
        assert!(err.contains("65600"), "{err}");
    }

    #[tokio::test]
    async fn too_many_replicas_are_refused() {
        for replicas in [0, MAX_REPLICAS + 1] {
            let opts = ClusterOptions {
                replicas,
                base_port: 8081,
                data_dir: PathBuf::from("unused"),
                metrics_base_port: None,
                tls: false,
            };
            let err = run(opts, std::future::pending())
                .await
                .expect_err("refused before anything starts");
            assert!(
                err.to_string().contains("--replicas must be from 1 to 100"),
                "{err}"
            );
        }
    }
}
