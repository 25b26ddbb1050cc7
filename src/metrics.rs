//! Every metric paxoskv exports, named in one place, and the Prometheus
//! exporter that serves them at `/metrics`.
//!
//! Names follow Prometheus conventions: a `paxoskv_` prefix, base units
//! (seconds, bytes), `_total` on counters. Histograms that dashboards take
//! quantiles of have explicit buckets (without them the exporter would
//! render summaries).

use std::net::SocketAddr;

use metrics::{Unit, describe_counter, describe_gauge, describe_histogram};
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder};

/// Client calls answered, by `method` and gRPC `code` (e.g. `OK`, `NotFound`).
pub const REQUESTS: &str = "paxoskv_requests_total";
/// Requests to the HTTP/JSON port (`--http-listen`), by HTTP `method`
/// (`GET`, ..., or `other`), `route` (`/v1/kv/{key}`, `/v1/sessions`, or
/// `other`) and HTTP `status` (`200`, `404`, ...). The gRPC calls they make
/// count in [`REQUESTS`] too.
pub const HTTP_REQUESTS: &str = "paxoskv_http_requests_total";
/// Client call latency, by `method`.
pub const REQUEST_DURATION: &str = "paxoskv_request_duration_seconds";
/// Calls this replica could not serve itself, by `leader_known`: forwarded
/// to the leader (`true`), or waited for a leader (`false`).
pub const FORWARDED: &str = "paxoskv_forwarded_requests_total";
/// Client calls per batch a follower sends the leader on its forwarding
/// stream.
pub const FORWARD_BATCH: &str = "paxoskv_forward_batch_calls";
/// Forwarding streams to the leader that broke, by `lost`: calls still
/// waiting when it broke that had been sent (`in_flight`), and that had not
/// (`unsent`), each counted.
pub const FORWARD_LOST: &str = "paxoskv_forward_lost_calls_total";
/// Calls refused at once because the replica was full, by `what` was full
/// (`writes waiting`, `reads waiting`, `calls queued for the replica's loop`).
pub const REFUSED_BUSY: &str = "paxoskv_refused_busy_total";
/// Client commands in slots applied here.
pub const COMMANDS_COMMITTED: &str = "paxoskv_commands_committed_total";
/// Time from proposing a command to applying it, on the replica that proposed it.
pub const COMMIT_DURATION: &str = "paxoskv_commit_duration_seconds";
/// Client commands per applied slot.
pub const BATCH_SIZE: &str = "paxoskv_batch_size_commands";
/// As leader: slots proposed and not yet committed.
pub const IN_FLIGHT: &str = "paxoskv_pipeline_slots_in_flight";
/// Time to make a batch of acceptor state durable: one log append and fdatasync.
pub const SYNC_DURATION: &str = "paxoskv_storage_sync_duration_seconds";
/// Bytes of acceptor state written to disk.
pub const WRITTEN_BYTES: &str = "paxoskv_storage_written_bytes_total";
/// Bytes the Paxos log's segment files take on disk (preallocated).
pub const LOG_BYTES: &str = "paxoskv_log_bytes";
/// Segment files of the Paxos log.
pub const LOG_SEGMENTS: &str = "paxoskv_log_segments";
/// The slot of the last snapshot (checkpoint or install) here.
pub const SNAPSHOT_INDEX: &str = "paxoskv_snapshot_index";
/// Entries (keys and dedup sessions) in the last snapshot.
pub const SNAPSHOT_ENTRIES: &str = "paxoskv_snapshot_entries";
/// Checkpoints made: state machine made durable, log compacted.
pub const SNAPSHOTS: &str = "paxoskv_snapshots_total";
/// Time one checkpoint took.
pub const SNAPSHOT_DURATION: &str = "paxoskv_snapshot_duration_seconds";
/// Snapshots fetched from a peer and installed.
pub const SNAPSHOTS_INSTALLED: &str = "paxoskv_snapshots_installed_total";
/// Time from asking a peer for a snapshot to having it installed.
pub const SNAPSHOT_INSTALL_DURATION: &str = "paxoskv_snapshot_install_duration_seconds";
/// Every slot up to this one is known chosen here.
pub const COMMIT_INDEX: &str = "paxoskv_commit_index";
/// Every slot up to this one is applied to the state machine here.
pub const APPLIED_INDEX: &str = "paxoskv_applied_index";
/// Round of the highest ballot promised here.
pub const BALLOT_ROUND: &str = "paxoskv_ballot_round";
/// 1 while this replica leads, else 0.
pub const IS_LEADER: &str = "paxoskv_is_leader";
/// Times the leader this replica knows of changed.
pub const LEADER_CHANGES: &str = "paxoskv_leader_changes_total";
/// Elections this replica started.
pub const ELECTIONS: &str = "paxoskv_elections_started_total";
/// Leadership hand-offs this replica, stopping while it led, tried, by
/// `result`: `completed` (another leader was seen within the wait),
/// `timed_out`, `no_target` (no follower heard lately).
pub const LEADER_HANDOFFS: &str = "paxoskv_leader_handoffs_total";
/// Elections this replica started because the leader handed off to it
/// (`TimeoutNow`).
pub const HANDOFF_ELECTIONS: &str = "paxoskv_handoff_elections_total";
/// As leader: how many slots each follower (`peer`) is behind the commit index.
pub const FOLLOWER_LAG: &str = "paxoskv_follower_lag_slots";
/// As leader: seconds since each follower (`peer`) last answered.
pub const FOLLOWER_SILENCE: &str = "paxoskv_follower_silence_seconds";
/// 1 if the stream to `peer` is up (its HTTP/2 keepalive pings are answered), else 0.
pub const PEER_REACHABLE: &str = "paxoskv_peer_reachable";
/// Messages to peers dropped (queue full, or peer down); Paxos re-sends.
pub const PEER_MESSAGES_DROPPED: &str = "paxoskv_peer_messages_dropped_total";
/// 1 once a write or sync to this replica's disk failed: it answers nothing
/// until restarted.
pub const STORAGE_FAILED: &str = "paxoskv_storage_failed";

const LATENCY_BUCKETS: &[f64] = &[
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
    5.0, 10.0,
];
const BATCH_BUCKETS: &[f64] = &[
    1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0, 512.0, 1024.0,
];

/// Installs the global recorder and serves `/metrics` on `addr`.
pub fn install(addr: SocketAddr) -> Result<(), String> {
    PrometheusBuilder::new()
        .with_http_listener(addr)
        .set_buckets_for_metric(Matcher::Suffix("_seconds".into()), LATENCY_BUCKETS)
        .and_then(|b| b.set_buckets_for_metric(Matcher::Full(BATCH_SIZE.into()), BATCH_BUCKETS))
        .and_then(|b| b.set_buckets_for_metric(Matcher::Full(FORWARD_BATCH.into()), BATCH_BUCKETS))
        .and_then(|b| b.install())
        .map_err(|e| format!("cannot serve metrics on {addr}: {e}"))?;
    describe();
    Ok(())
}

fn describe() {
    describe_counter!(REQUESTS, "Client calls answered, by method and gRPC code.");
    describe_counter!(
        HTTP_REQUESTS,
        "Requests to the HTTP/JSON port, by HTTP method, route and status."
    );
    describe_histogram!(
        REQUEST_DURATION,
        Unit::Seconds,
        "Client call latency, by method."
    );
    describe_counter!(
        FORWARDED,
        "Calls forwarded to the leader (leader_known=true) or that waited for one (false)."
    );
    describe_histogram!(
        FORWARD_BATCH,
        Unit::Count,
        "Client calls per batch sent to the leader on a forwarding stream."
    );
    describe_counter!(
        FORWARD_LOST,
        "Forwarded calls whose stream to the leader broke, by whether they had been sent (lost=in_flight) or not (unsent)."
    );
    describe_counter!(
        REFUSED_BUSY,
        "Calls refused with RESOURCE_EXHAUSTED because the replica was full, by what was full."
    );
    describe_counter!(COMMANDS_COMMITTED, "Client commands in slots applied here.");
    describe_histogram!(
        COMMIT_DURATION,
        Unit::Seconds,
        "Propose-to-apply latency of commands proposed here."
    );
    describe_histogram!(BATCH_SIZE, Unit::Count, "Client commands per applied slot.");
    describe_gauge!(
        IN_FLIGHT,
        "As leader: slots proposed and not yet committed."
    );
    describe_histogram!(
        SYNC_DURATION,
        Unit::Seconds,
        "One group commit of acceptor state to the log: write and fdatasync."
    );
    describe_counter!(
        WRITTEN_BYTES,
        Unit::Bytes,
        "Bytes of acceptor state written."
    );
    describe_gauge!(
        LOG_BYTES,
        Unit::Bytes,
        "Bytes the Paxos log's segments take on disk."
    );
    describe_gauge!(LOG_SEGMENTS, "Segment files of the Paxos log.");
    describe_gauge!(
        SNAPSHOT_INDEX,
        "Slot of the last snapshot made or installed here."
    );
    describe_gauge!(
        SNAPSHOT_ENTRIES,
        "Keys and dedup sessions in the last snapshot."
    );
    describe_counter!(
        SNAPSHOTS,
        "Checkpoints: state machine made durable, log compacted."
    );
    describe_histogram!(
        SNAPSHOT_DURATION,
        Unit::Seconds,
        "Time one checkpoint took."
    );
    describe_counter!(
        SNAPSHOTS_INSTALLED,
        "Snapshots fetched from a peer and installed."
    );
    describe_histogram!(
        SNAPSHOT_INSTALL_DURATION,
        Unit::Seconds,
        "From asking a peer for a snapshot to having it installed."
    );
    describe_gauge!(
        COMMIT_INDEX,
        "Every slot up to this one is known chosen here."
    );
    describe_gauge!(APPLIED_INDEX, "Every slot up to this one is applied here.");
    describe_gauge!(BALLOT_ROUND, "Round of the highest ballot promised here.");
    describe_gauge!(IS_LEADER, "1 while this replica leads.");
    describe_counter!(LEADER_CHANGES, "Times the known leader changed.");
    describe_counter!(ELECTIONS, "Elections started by this replica.");
    describe_counter!(
        LEADER_HANDOFFS,
        "Leadership hand-offs tried on stopping while leading, by result."
    );
    describe_counter!(
        HANDOFF_ELECTIONS,
        "Elections started because the leader handed off to this replica."
    );
    describe_gauge!(
        FOLLOWER_LAG,
        "As leader: slots each follower is behind the commit index."
    );
    describe_gauge!(
        FOLLOWER_SILENCE,
        Unit::Seconds,
        "As leader: seconds since each follower last answered."
    );
    describe_gauge!(PEER_REACHABLE, "1 if the stream to the peer is up.");
    describe_counter!(
        PEER_MESSAGES_DROPPED,
        "Messages to peers dropped; the protocol re-sends."
    );
    describe_gauge!(
        STORAGE_FAILED,
        "1 once a disk write or sync failed here: the replica answers nothing until restarted."
    );
    metrics::gauge!(STORAGE_FAILED).set(0.0);
}
