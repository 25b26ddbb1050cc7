//! `paxoskv cluster`: a local cluster of real `paxoskv serve` processes on
//! 127.0.0.1, for trying paxoskv out.

use std::path::PathBuf;
use std::process::Stdio;
use std::time::Duration;

use tokio::process::{Child, Command};

/// How to run the local cluster.
#[derive(Clone, Debug)]
pub struct ClusterOptions {
    /// How many replicas.
    pub replicas: u32,
    /// Replica N listens on 127.0.0.1:(base_port + N - 1).
    pub base_port: u16,
    /// Replica N keeps its data in `data_dir/N`.
    pub data_dir: PathBuf,
    /// Replica N serves metrics on 127.0.0.1:(metrics_base_port + N); none if unset.
    pub metrics_base_port: Option<u16>,
}

type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// Starts the replicas, prints how to talk to them, and stops them all
/// cleanly (SIGTERM, then wait) once `shutdown` resolves (in `paxoskv
/// cluster`: Ctrl-C or SIGTERM). Fails if a replica exits on its own.
pub async fn run(
    opts: ClusterOptions,
    shutdown: impl Future<Output = ()> + Send,
) -> Result<(), BoxError> {
    if opts.replicas == 0 {
        return Err("--replicas must be at least 1".into());
    }
    let exe = std::env::current_exe()?;
    let addr = |id: u32| format!("127.0.0.1:{}", u32::from(opts.base_port) + id - 1);
    let peers = (1..=opts.replicas)
        .map(|id| format!("{id}={}", addr(id)))
        .collect::<Vec<_>>()
        .join(",");
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
                "--peers",
                &peers,
            ])
            .arg("--data-dir")
            .arg(&dir)
            .stdin(Stdio::null())
            .kill_on_drop(true);
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
        println!("  replica {id}: {}{metrics}", addr(id));
    }
    let a = addr(1);
    let b = addr(opts.replicas.min(2));
    let c = addr(opts.replicas);
    println!("\nTry (any replica answers any call):");
    println!("  grpcurl -plaintext {a} list");
    println!("  grpcurl -plaintext {a} describe paxoskv.v1.KvStore");
    println!(
        "  grpcurl -plaintext -d '{{\"key\":\"apple\",\"value\":1}}' {a} paxoskv.v1.KvStore/Insert"
    );
    println!("  grpcurl -plaintext -d '{{\"key\":\"apple\"}}' {b} paxoskv.v1.KvStore/Get");
    println!(
        "  grpcurl -plaintext -d '{{\"key\":\"apple\",\"value\":2}}' {c} paxoskv.v1.KvStore/Update"
    );
    println!(
        "  grpcurl -plaintext -d '{{\"key\":\"pear\",\"value\":7}}' {b} paxoskv.v1.KvStore/Upsert"
    );
    println!("  grpcurl -plaintext -d '{{\"key\":\"apple\"}}' {c} paxoskv.v1.KvStore/Remove");
    println!("  grpcurl -plaintext {a} grpc.health.v1.Health/Check");
    println!("\nOr with the CLI: paxoskv get apple --endpoint {b}");
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
