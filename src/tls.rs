//! Mutual TLS: certificates, who they name, and making a throwaway set.
//!
//! TLS is off unless a replica (or a client) is given all three of
//! `--tls-cert`, `--tls-key` and `--tls-ca`. With it on, both ports of a
//! replica serve TLS and require a client certificate signed by the CA
//! (etcd's `--client-cert-auth` and `--peer-client-cert-auth`), and the
//! replicas dial each other with TLS, presenting their own certificate and
//! verifying the other's against the CA.
//!
//! # Who a certificate names
//!
//! A **replica's** certificate names it in its Subject Common Name as
//! `paxoskv-replica-N` ([`replica_common_name`]): that is how the peer port
//! knows which replica is calling, whatever the metadata says. Any other
//! Common Name (`paxoskv-client`, say) is a **client** certificate: good
//! for the client port, refused on the peer port. A replica's certificate
//! serves as both a server and a client certificate (it dials as well as
//! listens), so it needs the `serverAuth` and `clientAuth` extended key
//! usages, or none, and a subject alternative name for every host name or
//! IP address that `--peers` and `--advertise-client` give for it.
//!
//! [`generate`] makes a throwaway CA and such certificates with rcgen, for
//! `paxoskv cluster --tls` and for tests.

use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use rustls::RootCertStore;
use rustls::server::WebPkiClientVerifier;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer, UnixTime};
use tonic::transport::{Certificate, ClientTlsConfig, Identity, ServerTlsConfig};

use crate::paxos::NodeId;

/// How a replica's certificate's Common Name begins; the replica id
/// follows, in decimal.
pub const REPLICA_CN_PREFIX: &str = "paxoskv-replica-";

/// The Common Name of the client certificate [`generate`] makes.
pub const CLIENT_CN: &str = "paxoskv-client";

/// How long a TLS handshake may take, on either side. The listener's own
/// first-byte timeout (10 s) still applies before it.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// The Common Name of replica `id`'s certificate.
pub fn replica_common_name(id: NodeId) -> String {
    format!("{REPLICA_CN_PREFIX}{id}")
}

/// The replica a Common Name names: `paxoskv-replica-N`, N a replica id in
/// plain decimal (no sign, no leading zero, no spaces), or `None`. Strict,
/// so that one replica has one name.
pub fn replica_of_common_name(cn: &str) -> Option<NodeId> {
    let digits = cn.strip_prefix(REPLICA_CN_PREFIX)?;
    if digits.is_empty()
        || !digits.bytes().all(|b| b.is_ascii_digit())
        || (digits.len() > 1 && digits.starts_with('0'))
    {
        return None;
    }
    digits.parse().ok()
}

/// Who a certificate says its holder is.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Holder {
    /// A replica: its Common Name is `paxoskv-replica-N`.
    Replica(NodeId),
    /// Anyone else: a client. The Common Name, if the certificate has one.
    Other(Option<String>),
}

impl fmt::Display for Holder {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Holder::Replica(id) => write!(f, "replica {id} (CN {})", replica_common_name(*id)),
            Holder::Other(Some(cn)) => write!(f, "CN {cn:?}"),
            Holder::Other(None) => write!(f, "no Common Name"),
        }
    }
}

/// The Common Name in a DER certificate's subject, if it has one; an error
/// if the certificate does not parse or its Common Name is not a string.
pub fn common_name(der: &[u8]) -> Result<Option<String>, String> {
    let (_, cert) = x509_parser::parse_x509_certificate(der)
        .map_err(|e| format!("the certificate does not parse: {e}"))?;
    let mut names = cert.subject().iter_common_name();
    let Some(first) = names.next() else {
        return Ok(None);
    };
    if names.next().is_some() {
        // Two CNs: which one names the holder would be anyone's guess.
        return Err("the certificate's subject has more than one Common Name".into());
    }
    first
        .as_str()
        .map(|cn| Some(cn.to_string()))
        .map_err(|e| format!("the certificate's Common Name is not a string: {e}"))
}

/// Who the end-entity certificate `der` names (see the module's "Who a
/// certificate names").
pub fn holder(der: &[u8]) -> Result<Holder, String> {
    Ok(match common_name(der)? {
        Some(cn) => match replica_of_common_name(&cn) {
            Some(id) => Holder::Replica(id),
            None => Holder::Other(Some(cn)),
        },
        None => Holder::Other(None),
    })
}

/// The three files TLS needs, as given (`--tls-cert`, `--tls-key`,
/// `--tls-ca`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TlsFiles {
    /// This process's certificate (PEM; a chain may follow it).
    pub cert: PathBuf,
    /// Its private key (PEM: PKCS#8, PKCS#1 or SEC1).
    pub key: PathBuf,
    /// The CA that signs every certificate of the cluster (PEM).
    pub ca: PathBuf,
}

impl TlsFiles {
    /// The files from three optional flags: all three, or none (`None`);
    /// anything else is refused, naming what is missing.
    pub fn from_flags(
        cert: Option<PathBuf>,
        key: Option<PathBuf>,
        ca: Option<PathBuf>,
    ) -> Result<Option<TlsFiles>, String> {
        match (cert, key, ca) {
            (None, None, None) => Ok(None),
            (Some(cert), Some(key), Some(ca)) => Ok(Some(TlsFiles { cert, key, ca })),
            (cert, key, ca) => {
                let missing: Vec<&str> = [
                    ("--tls-cert", cert.is_none()),
                    ("--tls-key", key.is_none()),
                    ("--tls-ca", ca.is_none()),
                ]
                .into_iter()
                .filter_map(|(flag, absent)| absent.then_some(flag))
                .collect();
                Err(format!(
                    "--tls-cert, --tls-key and --tls-ca go together (all three, or none for plaintext); missing: {}",
                    missing.join(", ")
                ))
            }
        }
    }
}

/// TLS material, loaded and checked: the certificate and key parse and
/// belong together, the CA parses, and the certificate is signed by the CA
/// for client use (as every replica dials too).
#[derive(Clone)]
pub struct TlsConfig {
    files: TlsFiles,
    cert_pem: Vec<u8>,
    key_pem: Vec<u8>,
    ca_pem: Vec<u8>,
    holder: Holder,
}

impl fmt::Debug for TlsConfig {
    // The key stays out of logs.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TlsConfig")
            .field("files", &self.files)
            .field("holder", &self.holder)
            .finish_non_exhaustive()
    }
}

impl TlsConfig {
    /// Reads and checks the three files. Every error names the file (and
    /// the flag) at fault.
    pub fn load(files: &TlsFiles) -> Result<TlsConfig, String> {
        let read = |flag: &str, path: &Path| {
            std::fs::read(path)
                .map_err(|e| format!("{flag} {}: cannot read it: {e}", path.display()))
        };
        let cert_pem = read("--tls-cert", &files.cert)?;
        let key_pem = read("--tls-key", &files.key)?;
        let ca_pem = read("--tls-ca", &files.ca)?;
        let certs = |flag: &str, path: &Path, pem: &[u8]| {
            let certs = CertificateDer::pem_slice_iter(pem)
                .collect::<Result<Vec<_>, _>>()
                .map_err(|e| format!("{flag} {}: not a PEM certificate: {e}", path.display()))?;
            if certs.is_empty() {
                return Err(format!(
                    "{flag} {}: holds no PEM certificate (-----BEGIN CERTIFICATE-----)",
                    path.display()
                ));
            }
            Ok(certs)
        };
        let chain = certs("--tls-cert", &files.cert, &cert_pem)?;
        let cas = certs("--tls-ca", &files.ca, &ca_pem)?;
        let key = PrivateKeyDer::from_pem_slice(&key_pem).map_err(|e| {
            format!(
                "--tls-key {}: not a PEM private key (PKCS#8, PKCS#1 or SEC1): {e}",
                files.key.display()
            )
        })?;
        let holder =
            holder(&chain[0]).map_err(|e| format!("--tls-cert {}: {e}", files.cert.display()))?;

        // The key must be the certificate's: rustls checks it when it
        // builds a configuration, which tonic does only when it first
        // serves or dials. Do it now, to fail at start.
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        rustls::ClientConfig::builder_with_provider(Arc::clone(&provider))
            .with_safe_default_protocol_versions()
            .map_err(|e| format!("TLS: {e}"))?
            .with_root_certificates(RootCertStore::empty())
            .with_client_auth_cert(chain.clone(), key)
            .map_err(|e| {
                format!(
                    "--tls-key {} does not go with --tls-cert {}: {e}",
                    files.key.display(),
                    files.cert.display()
                )
            })?;

        let mut roots = RootCertStore::empty();
        for (i, ca) in cas.into_iter().enumerate() {
            roots.add(ca).map_err(|e| {
                format!(
                    "--tls-ca {}: certificate {} is not a usable CA certificate: {e}",
                    files.ca.display(),
                    i + 1
                )
            })?;
        }
        let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider)
            .build()
            .map_err(|e| format!("--tls-ca {}: {e}", files.ca.display()))?;
        verifier
            .verify_client_cert(&chain[0], &chain[1..], UnixTime::now())
            .map_err(|e| {
                format!(
                    "--tls-cert {} is not a client certificate of --tls-ca {}: {e}",
                    files.cert.display(),
                    files.ca.display()
                )
            })?;

        Ok(TlsConfig {
            files: files.clone(),
            cert_pem,
            key_pem,
            ca_pem,
            holder,
        })
    }

    /// The files this was loaded from.
    pub fn files(&self) -> &TlsFiles {
        &self.files
    }

    /// Who this process's certificate names.
    pub fn holder(&self) -> &Holder {
        &self.holder
    }

    fn identity(&self) -> Identity {
        Identity::from_pem(&self.cert_pem, &self.key_pem)
    }

    /// For a server: this certificate, and a client certificate from the CA
    /// required of every connection.
    pub fn server(&self) -> ServerTlsConfig {
        ServerTlsConfig::new()
            .identity(self.identity())
            .client_ca_root(Certificate::from_pem(&self.ca_pem))
            .timeout(HANDSHAKE_TIMEOUT)
    }

    /// For the HTTPS port (`--http-listen`), which hyper serves rather
    /// than tonic: what [`TlsConfig::server`] gives tonic, as a rustls
    /// configuration: this certificate, and a client certificate from the
    /// CA required of every connection. It speaks HTTP/1.1 (ALPN).
    pub fn https_server(&self) -> Result<Arc<rustls::ServerConfig>, String> {
        let files = &self.files;
        let chain = CertificateDer::pem_slice_iter(&self.cert_pem)
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| format!("--tls-cert {}: {e}", files.cert.display()))?;
        let key = PrivateKeyDer::from_pem_slice(&self.key_pem)
            .map_err(|e| format!("--tls-key {}: {e}", files.key.display()))?;
        let mut roots = RootCertStore::empty();
        for ca in CertificateDer::pem_slice_iter(&self.ca_pem) {
            let ca = ca.map_err(|e| format!("--tls-ca {}: {e}", files.ca.display()))?;
            roots
                .add(ca)
                .map_err(|e| format!("--tls-ca {}: {e}", files.ca.display()))?;
        }
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let verifier =
            WebPkiClientVerifier::builder_with_provider(Arc::new(roots), Arc::clone(&provider))
                .build()
                .map_err(|e| format!("--tls-ca {}: {e}", files.ca.display()))?;
        let mut config = rustls::ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map_err(|e| format!("TLS: {e}"))?
            .with_client_cert_verifier(verifier)
            .with_single_cert(chain, key)
            .map_err(|e| format!("--tls-cert {}: {e}", files.cert.display()))?;
        config.alpn_protocols = vec![b"http/1.1".to_vec()];
        Ok(Arc::new(config))
    }

    /// For a client (a replica dialling a peer, or the CLI): present this
    /// certificate, and accept only a server certificate from the CA that
    /// names the host dialled.
    pub fn client(&self) -> ClientTlsConfig {
        ClientTlsConfig::new()
            .identity(self.identity())
            .ca_certificate(Certificate::from_pem(&self.ca_pem))
            .timeout(HANDSHAKE_TIMEOUT)
    }
}

/// What [`generate`] wrote, under its directory.
#[derive(Clone, Debug)]
pub struct Generated {
    /// The CA's certificate (`ca.pem`; its key is not kept).
    pub ca: PathBuf,
    /// Replica N's certificate and key (`replica-N.pem`,
    /// `replica-N-key.pem`), by id.
    pub replicas: std::collections::BTreeMap<NodeId, TlsFiles>,
    /// A client's certificate and key (`client.pem`, `client-key.pem`).
    pub client: TlsFiles,
}

/// Makes, under `dir` (created if needed), a throwaway CA and, signed by
/// it, a certificate for each replica in `replicas` (CN
/// `paxoskv-replica-N`, for server and client use) and one client
/// certificate (CN [`CLIENT_CN`]), each valid for the names in `hosts`
/// (e.g. `127.0.0.1`, `localhost`). The CA's key is not written: nothing
/// more can be signed with it. Keys are written readable by their owner
/// only.
pub fn generate(dir: &Path, replicas: &[NodeId], hosts: &[&str]) -> Result<Generated, String> {
    use rcgen::{
        BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer,
        KeyPair, KeyUsagePurpose,
    };

    std::fs::create_dir_all(dir).map_err(|e| format!("cannot create {}: {e}", dir.display()))?;
    let tls_error = |what: &str, e: rcgen::Error| format!("making the {what}: {e}");
    let write = |name: &str, contents: &str, secret: bool| -> Result<PathBuf, String> {
        let path = dir.join(name);
        write_file(&path, contents.as_bytes(), secret)
            .map_err(|e| format!("cannot write {}: {e}", path.display()))?;
        Ok(path)
    };

    let mut ca_params = CertificateParams::default();
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca_params
        .distinguished_name
        .push(DnType::CommonName, "paxoskv throwaway CA");
    ca_params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    let ca_key = KeyPair::generate().map_err(|e| tls_error("CA key", e))?;
    let ca_cert = ca_params
        .self_signed(&ca_key)
        .map_err(|e| tls_error("CA certificate", e))?;
    let ca = write("ca.pem", &ca_cert.pem(), false)?;
    let issuer = Issuer::new(ca_params, ca_key);

    let leaf = |cn: &str, usages: &[ExtendedKeyUsagePurpose], stem: &str| {
        let sans: Vec<String> = hosts.iter().map(|h| h.to_string()).collect();
        let mut params = CertificateParams::new(sans).map_err(|e| tls_error(cn, e))?;
        params.distinguished_name.push(DnType::CommonName, cn);
        params.key_usages = vec![
            KeyUsagePurpose::DigitalSignature,
            KeyUsagePurpose::KeyEncipherment,
        ];
        params.extended_key_usages = usages.to_vec();
        params.use_authority_key_identifier_extension = true;
        let key = KeyPair::generate().map_err(|e| tls_error(cn, e))?;
        let cert = params
            .signed_by(&key, &issuer)
            .map_err(|e| tls_error(cn, e))?;
        Ok::<_, String>(TlsFiles {
            cert: write(&format!("{stem}.pem"), &cert.pem(), false)?,
            key: write(&format!("{stem}-key.pem"), &key.serialize_pem(), true)?,
            ca: ca.clone(),
        })
    };
    let both = [
        ExtendedKeyUsagePurpose::ServerAuth,
        ExtendedKeyUsagePurpose::ClientAuth,
    ];
    let mut made = std::collections::BTreeMap::new();
    for &id in replicas {
        let files = leaf(&replica_common_name(id), &both, &format!("replica-{id}"))?;
        made.insert(id, files);
    }
    let client = leaf(CLIENT_CN, &[ExtendedKeyUsagePurpose::ClientAuth], "client")?;
    Ok(Generated {
        ca,
        replicas: made,
        client,
    })
}

/// Writes `contents` to `path`, replacing it; mode 0600 if `secret`.
fn write_file(path: &Path, contents: &[u8], secret: bool) -> std::io::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create(true).truncate(true);
    if secret {
        options.mode(0o600);
    }
    let mut file = options.open(path)?;
    file.write_all(contents)?;
    file.sync_all()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_replica_common_name_is_strict() {
        assert_eq!(replica_common_name(3), "paxoskv-replica-3");
        for (cn, want) in [
            ("paxoskv-replica-1", Some(1)),
            ("paxoskv-replica-42", Some(42)),
            ("paxoskv-replica-0", Some(0)),
            ("paxoskv-replica-4294967295", Some(u32::MAX)),
            ("paxoskv-replica-4294967296", None),
            ("paxoskv-replica-", None),
            ("paxoskv-replica-01", None),
            ("paxoskv-replica-+1", None),
            ("paxoskv-replica- 1", None),
            ("paxoskv-replica-1 ", None),
            ("paxoskv-replica-1a", None),
            ("Paxoskv-Replica-1", None),
            ("paxoskv-replica1", None),
            ("x-paxoskv-replica-1", None),
            ("paxoskv-client", None),
            ("", None),
        ] {
            assert_eq!(replica_of_common_name(cn), want, "{cn:?}");
        }
    }

    #[test]
    fn three_flags_or_none() {
        let p = |s: &str| Some(PathBuf::from(s));
        assert_eq!(TlsFiles::from_flags(None, None, None), Ok(None));
        assert!(matches!(
            TlsFiles::from_flags(p("c"), p("k"), p("a")),
            Ok(Some(_))
        ));
        let err = TlsFiles::from_flags(p("c"), None, None).expect_err("two missing");
        assert!(err.contains("missing: --tls-key, --tls-ca"), "{err}");
        let err = TlsFiles::from_flags(None, p("k"), p("a")).expect_err("one missing");
        assert!(
            err.contains("missing: --tls-cert") && !err.contains("--tls-key,"),
            "{err}"
        );
    }

    #[test]
    fn generated_certificates_load_and_name_their_holders() {
        let dir = tempfile::tempdir().expect("temp dir");
        let made = generate(dir.path(), &[1, 2, 3], &["127.0.0.1", "localhost"]).expect("made");
        for (&id, files) in &made.replicas {
            let config = TlsConfig::load(files).expect("a generated replica certificate loads");
            assert_eq!(config.holder(), &Holder::Replica(id));
            let mode = std::fs::metadata(&files.key).expect("key").permissions();
            assert_eq!(
                std::os::unix::fs::PermissionsExt::mode(&mode) & 0o077,
                0,
                "a key must be readable by its owner only"
            );
        }
        let client = TlsConfig::load(&made.client).expect("the client certificate loads");
        assert_eq!(client.holder(), &Holder::Other(Some(CLIENT_CN.to_string())));
        assert_eq!(
            client.holder().to_string(),
            "CN \"paxoskv-client\"",
            "how a refusal names it"
        );
    }

    #[test]
    fn files_that_do_not_load_are_named() {
        let dir = tempfile::tempdir().expect("temp dir");
        let made = generate(dir.path(), &[1, 2], &["127.0.0.1"]).expect("made");
        let other = tempfile::tempdir().expect("temp dir");
        let stranger = generate(other.path(), &[1], &["127.0.0.1"]).expect("made");
        let junk = dir.path().join("junk.pem");
        std::fs::write(&junk, "not a certificate\n").expect("write");
        let missing = dir.path().join("missing.pem");
        let good = made.replicas[&1].clone();

        let refused = |files: TlsFiles, wanted: &[&str]| {
            let err = TlsConfig::load(&files).expect_err("refused");
            for want in wanted {
                assert!(err.contains(want), "{err:?} should say {want:?}");
            }
        };
        let name = |p: &Path| p.display().to_string();
        refused(
            TlsFiles {
                cert: missing.clone(),
                ..good.clone()
            },
            &["--tls-cert", &name(&missing), "cannot read"],
        );
        refused(
            TlsFiles {
                ca: junk.clone(),
                ..good.clone()
            },
            &["--tls-ca", &name(&junk), "no PEM certificate"],
        );
        refused(
            TlsFiles {
                key: junk.clone(),
                ..good.clone()
            },
            &["--tls-key", &name(&junk), "not a PEM private key"],
        );
        // Replica 2's key with replica 1's certificate.
        refused(
            TlsFiles {
                key: made.replicas[&2].key.clone(),
                ..good.clone()
            },
            &["does not go with", &name(&good.cert)],
        );
        // A certificate of another CA.
        refused(
            TlsFiles {
                cert: stranger.replicas[&1].cert.clone(),
                key: stranger.replicas[&1].key.clone(),
                ca: good.ca.clone(),
            },
            &["is not a client certificate of --tls-ca", &name(&good.ca)],
        );
    }
}
