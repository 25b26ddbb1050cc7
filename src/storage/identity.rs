//! Whose data a directory holds: the cluster's name and the replica's id,
//! recorded at first start and checked at every start.
//!
//! A replica started on another replica's directory (a wrong `--data-dir`,
//! a volume attached to the wrong pod) would otherwise vote with someone
//! else's promises and serve someone else's state; one started on another
//! cluster's directory would mix two histories. Both are refused at start,
//! by name, before anything in the directory is read or changed.
//!
//! The file is `identity` in the data directory, two lines of text so that
//! an operator can read it (`cat data/1/identity`):
//!
//! ```text
//! cluster=paxoskv
//! replica=1
//! ```
//!
//! A directory without one (new, or written before identities existed) gets
//! one: written to `identity.tmp`, synced, renamed, the directory synced.

use std::io::{self, Write};
use std::path::Path;

use super::{StorageError, create_data_dir, io_error, rename, sync_what};
use crate::paxos::NodeId;

const FILE: &str = "identity";
const TMP: &str = "identity.tmp";

/// Longest cluster name accepted.
pub const MAX_CLUSTER_NAME: usize = 64;

/// Who a data directory belongs to.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Identity {
    /// The cluster's name (`--cluster-name`).
    pub cluster: String,
    /// The replica's id (`--id`).
    pub replica: NodeId,
}

/// What [`check_or_record`] found.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Found {
    /// The directory's identity is the one expected.
    Matches,
    /// The directory had none; it now has the one expected.
    Recorded,
}

/// Checks a cluster name: 1 to [`MAX_CLUSTER_NAME`] ASCII letters, digits,
/// `.`, `_` or `-`.
pub fn check_cluster_name(name: &str) -> Result<(), String> {
    if name.is_empty() || name.len() > MAX_CLUSTER_NAME {
        return Err(format!(
            "cluster name {name:?} must be 1 to {MAX_CLUSTER_NAME} characters"
        ));
    }
    if let Some(c) = name
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-')))
    {
        return Err(format!(
            "cluster name {name:?} has {c:?}; use letters, digits, '.', '_' and '-'"
        ));
    }
    Ok(())
}

/// Checks that `dir` belongs to `expected`, recording `expected` there if
/// the directory has no identity yet (creating `dir` if needed). Fails,
/// naming the file, if it belongs to another replica or cluster, or if its
/// identity file does not parse.
pub fn check_or_record(dir: &Path, expected: &Identity) -> Result<Found, StorageError> {
    let path = dir.join(FILE);
    match std::fs::read(&path) {
        Ok(bytes) => {
            let found = parse(&bytes).map_err(|why| {
                StorageError::Identity(format!(
                    "{}: {why}; if this directory is this replica's, restore the file as `cluster=NAME` and `replica=ID` lines",
                    path.display()
                ))
            })?;
            if found == *expected {
                return Ok(Found::Matches);
            }
            Err(StorageError::Identity(format!(
                "{} says this directory belongs to replica {} of cluster {:?}, but this replica was started as replica {} of cluster {:?}: point --data-dir at this replica's own directory (or, to make it a new member, at an empty one)",
                path.display(),
                found.replica,
                found.cluster,
                expected.replica,
                expected.cluster
            )))
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            create_data_dir(dir)?;
            record(dir, expected)?;
            Ok(Found::Recorded)
        }
        Err(e) => Err(io_error(format!("reading {}", path.display()), e)),
    }
}

fn record(dir: &Path, identity: &Identity) -> Result<(), StorageError> {
    let tmp = dir.join(TMP);
    let text = format!(
        "cluster={}\nreplica={}\n",
        identity.cluster, identity.replica
    );
    let mut file = std::fs::File::create(&tmp)
        .map_err(|e| io_error(format!("creating {}", tmp.display()), e))?;
    file.write_all(text.as_bytes())
        .map_err(|e| io_error(format!("writing {}", tmp.display()), e))?;
    file.sync_all().map_err(|e| io_error(sync_what(&tmp), e))?;
    rename(dir, TMP, FILE)
}

fn parse(bytes: &[u8]) -> Result<Identity, String> {
    let text = std::str::from_utf8(bytes).map_err(|_| "not UTF-8 text".to_string())?;
    let (mut cluster, mut replica) = (None, None);
    for line in text.lines().map(str::trim).filter(|l| !l.is_empty()) {
        match line.split_once('=') {
            Some(("cluster", name)) if cluster.is_none() => {
                check_cluster_name(name)?;
                cluster = Some(name.to_string());
            }
            Some(("replica", id)) if replica.is_none() => {
                replica = Some(
                    id.parse::<NodeId>()
                        .map_err(|_| format!("replica {id:?} is not a replica id"))?,
                );
            }
            _ => return Err(format!("unexpected line {line:?}")),
        }
    }
    match (cluster, replica) {
        (Some(cluster), Some(replica)) => Ok(Identity { cluster, replica }),
        (None, _) => Err("no `cluster=` line".into()),
        (_, None) => Err("no `replica=` line".into()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::storage::tests::TempDir;

    fn id(cluster: &str, replica: NodeId) -> Identity {
        Identity {
            cluster: cluster.into(),
            replica,
        }
    }

    #[test]
    fn a_new_directory_records_its_identity_and_then_matches_it() {
        let tmp = TempDir::new("identity");
        let dir = tmp.0.join("data");
        assert_eq!(
            check_or_record(&dir, &id("prod", 2)).unwrap(),
            Found::Recorded
        );
        assert_eq!(
            std::fs::read_to_string(dir.join(FILE)).unwrap(),
            "cluster=prod\nreplica=2\n"
        );
        assert!(!dir.join(TMP).exists());
        assert_eq!(
            check_or_record(&dir, &id("prod", 2)).unwrap(),
            Found::Matches
        );
    }

    #[test]
    fn another_replicas_or_another_clusters_directory_is_refused_by_name() {
        let tmp = TempDir::new("identity");
        let dir = tmp.0.join("data");
        check_or_record(&dir, &id("prod", 2)).unwrap();
        for other in [id("prod", 3), id("staging", 2)] {
            let e = check_or_record(&dir, &other).unwrap_err().to_string();
            assert!(e.contains("identity"), "{e}");
            assert!(
                e.contains("belongs to replica 2 of cluster \"prod\""),
                "{e}"
            );
            assert!(
                e.contains(&format!(
                    "started as replica {} of cluster {:?}",
                    other.replica, other.cluster
                )),
                "{e}"
            );
        }
        // Refusing changed nothing.
        assert_eq!(
            check_or_record(&dir, &id("prod", 2)).unwrap(),
            Found::Matches
        );
    }

    #[test]
    fn a_damaged_identity_file_is_refused_naming_it() {
        let tmp = TempDir::new("identity");
        for bad in [
            &b"cluster=prod\n"[..],
            b"replica=1\n",
            b"cluster=prod\nreplica=x\n",
            b"cluster=pr od\nreplica=1\n",
            b"cluster=prod\nreplica=1\nreplica=2\n",
            b"\xff\xfe",
            b"",
        ] {
            let dir = tmp.0.join("d");
            std::fs::create_dir_all(&dir).unwrap();
            std::fs::write(dir.join(FILE), bad).unwrap();
            let e = check_or_record(&dir, &id("prod", 1))
                .unwrap_err()
                .to_string();
            assert!(e.contains(&dir.join(FILE).display().to_string()), "{e}");
        }
    }

    #[test]
    fn cluster_names_are_short_plain_words() {
        assert!(check_cluster_name("paxoskv").is_ok());
        assert!(check_cluster_name("prod-eu.1_a").is_ok());
        assert!(check_cluster_name("").is_err());
        assert!(check_cluster_name("a b").is_err());
        assert!(check_cluster_name("a=b").is_err());
        assert!(check_cluster_name(&"x".repeat(MAX_CLUSTER_NAME + 1)).is_err());
    }
}
