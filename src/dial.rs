//! The one way to dial a replica.
//!
//! Every channel to a replica — the transport's peer streams, a follower
//! forwarding a call to the leader, a snapshot fetch, the CLI, the tests —
//! is made by a [`Dialer`], so every address a user can write (`--peers`,
//! `--endpoint`) means the same thing everywhere, and `main.rs` refuses at
//! start, with the same function, what would fail later.
//!
//! A dialer is plaintext ([`Dialer::plain`]) or TLS ([`Dialer::tls`]), as
//! the process was started with or without `--tls-cert/--tls-key/--tls-ca`.
//! Accepted forms:
//!
//! - `host:port`, e.g. `127.0.0.1:8081`, `paxoskv-0.paxoskv:8081`,
//!   `[::1]:8081`: plaintext or TLS, as the dialer is;
//! - `http://host:port` (plaintext only) or `https://host:port` (TLS
//!   only), with or without a trailing `/`.
//!
//! Refused, each with an error naming the address: a scheme that does not
//! match the dialer (`https://` without TLS, `http://` with it: either
//! would only fail later with a less clear error), any other scheme, a
//! missing or zero port, a path, query or user name, and anything else that
//! is not a valid URI authority.

use std::fmt;
use std::time::Duration;

use tonic::transport::{ClientTlsConfig, Endpoint};

/// How long a TCP connect may take, unless the caller sets its own.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(1);

/// Why an address cannot be dialled. Every variant names the address as
/// given.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum DialError {
    /// The address is empty.
    Empty,
    /// `https://` from a plaintext dialer (no `--tls-*` flags).
    Https(String),
    /// `http://` from a TLS dialer.
    PlainHttp(String),
    /// A scheme other than `http://`.
    Scheme(String),
    /// No port, or port 0.
    Port(String),
    /// A path, query or fragment after `host:port`.
    Path(String),
    /// Anything else that is not `host:port`: the address and why.
    Invalid(String, String),
}

impl fmt::Display for DialError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            DialError::Empty => write!(f, "empty address; expected HOST:PORT"),
            DialError::Https(a) => write!(
                f,
                "{a:?}: https needs TLS: give --tls-cert, --tls-key and --tls-ca, or use HOST:PORT or http://HOST:PORT"
            ),
            DialError::PlainHttp(a) => write!(
                f,
                "{a:?}: http:// is plaintext, but TLS is on (--tls-cert, --tls-key, --tls-ca): use HOST:PORT or https://HOST:PORT"
            ),
            DialError::Scheme(a) => write!(
                f,
                "{a:?}: unsupported scheme; use HOST:PORT or http://HOST:PORT"
            ),
            DialError::Port(a) => write!(f, "{a:?}: a port from 1 to 65535 is required"),
            DialError::Path(a) => write!(
                f,
                "{a:?}: only HOST:PORT is allowed after http://, no path or query"
            ),
            DialError::Invalid(a, why) => write!(f, "{a:?} is not HOST:PORT: {why}"),
        }
    }
}

impl std::error::Error for DialError {}

/// The canonical URI for `addr` (one of the forms the module describes) to
/// a plaintext replica: `http://host:port`.
pub fn normalize(addr: &str) -> Result<String, DialError> {
    normalize_as(addr, false)
}

/// Whether `addr` is one of the forms the module describes, for either
/// kind of dialer: for flags parsed before it is known whether TLS is on.
pub fn check_form(addr: &str) -> Result<(), DialError> {
    match normalize_as(addr, false) {
        Err(DialError::Https(_)) => normalize_as(addr, true).map(drop),
        other => other.map(drop),
    }
}

/// The canonical URI for `addr`: `https://host:port` if `tls`, else
/// `http://host:port`.
pub fn normalize_as(addr: &str, tls: bool) -> Result<String, DialError> {
    let given = addr;
    let addr = addr.trim();
    if addr.is_empty() {
        return Err(DialError::Empty);
    }
    let authority = match addr.split_once("://") {
        None => addr,
        Some((scheme, rest)) if scheme.eq_ignore_ascii_case(if tls { "https" } else { "http" }) => {
            rest.strip_suffix('/').unwrap_or(rest)
        }
        Some((scheme, _)) if !tls && scheme.eq_ignore_ascii_case("https") => {
            return Err(DialError::Https(given.to_string()));
        }
        Some((scheme, _)) if tls && scheme.eq_ignore_ascii_case("http") => {
            return Err(DialError::PlainHttp(given.to_string()));
        }
        Some(_) => return Err(DialError::Scheme(given.to_string())),
    };
    if authority.contains(['/', '?', '#']) {
        return Err(DialError::Path(given.to_string()));
    }
    if authority.contains('@') {
        return Err(DialError::Invalid(
            given.to_string(),
            "a user name is not allowed".into(),
        ));
    }
    // An IPv6 host must be bracketed, or its colons would be taken for the
    // port's.
    let (host, port) = match authority.strip_prefix('[') {
        Some(rest) => match rest.split_once(']') {
            Some((host, after)) => (host, after.strip_prefix(':')),
            None => {
                return Err(DialError::Invalid(
                    given.to_string(),
                    "unclosed [ in an IPv6 address".into(),
                ));
            }
        },
        None => match authority.rsplit_once(':') {
            Some((host, _)) if host.contains(':') => {
                return Err(DialError::Invalid(
                    given.to_string(),
                    "write an IPv6 address in brackets: [ADDR]:PORT".into(),
                ));
            }
            Some((host, port)) => (host, Some(port)),
            None => (authority, None),
        },
    };
    if host.is_empty() {
        return Err(DialError::Invalid(given.to_string(), "no host".into()));
    }
    match port.map(str::parse::<u16>) {
        Some(Ok(p)) if p != 0 => {}
        _ => return Err(DialError::Port(given.to_string())),
    }
    let uri = format!("{}://{authority}", if tls { "https" } else { "http" });
    // What is left (stray characters in the host, say) the URI parser judges.
    uri.parse::<tonic::codegen::http::Uri>()
        .map_err(|e| DialError::Invalid(given.to_string(), e.to_string()))?;
    Ok(uri)
}

/// A plaintext endpoint for the replica at `addr`: [`Dialer::endpoint`] of
/// [`Dialer::plain`].
pub fn endpoint(addr: &str) -> Result<Endpoint, DialError> {
    Dialer::plain().endpoint(addr)
}

/// Makes channels to replicas: plaintext, or TLS with this process's
/// certificate (see [`crate::tls`]).
#[derive(Clone, Debug, Default)]
pub struct Dialer {
    tls: Option<ClientTlsConfig>,
}

impl Dialer {
    /// A plaintext dialer.
    pub fn plain() -> Dialer {
        Dialer { tls: None }
    }

    /// A TLS dialer: presents the certificate in `config` and accepts only
    /// a server certificate signed by its CA that names the host dialled.
    pub fn tls(config: &crate::tls::TlsConfig) -> Dialer {
        Dialer {
            tls: Some(config.client()),
        }
    }

    /// A dialer for `config`: TLS if there is one, else plaintext.
    pub fn for_config(config: Option<&crate::tls::TlsConfig>) -> Dialer {
        config.map_or_else(Dialer::plain, Dialer::tls)
    }

    /// Whether this dialer speaks TLS.
    pub fn is_tls(&self) -> bool {
        self.tls.is_some()
    }

    /// The canonical URI for `addr`, for this dialer (see
    /// [`normalize_as`]).
    pub fn normalize(&self, addr: &str) -> Result<String, DialError> {
        normalize_as(addr, self.is_tls())
    }

    /// An endpoint for the replica at `addr` (see the module for the forms
    /// accepted), with the settings every caller shares: TLS if this dialer
    /// has it, a connect timeout of [`CONNECT_TIMEOUT`] and `TCP_NODELAY`.
    /// A caller may add its own settings (keepalives, another connect
    /// timeout) to the endpoint it gets.
    pub fn endpoint(&self, addr: &str) -> Result<Endpoint, DialError> {
        let uri = self.normalize(addr)?;
        let mut endpoint = Endpoint::from_shared(uri)
            .map_err(|e| DialError::Invalid(addr.to_string(), e.to_string()))?;
        if let Some(tls) = &self.tls {
            endpoint = endpoint
                .tls_config(tls.clone())
                .map_err(|e| DialError::Invalid(addr.to_string(), format!("TLS: {e}")))?;
        }
        Ok(endpoint.connect_timeout(CONNECT_TIMEOUT).tcp_nodelay(true))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_accepted_form_becomes_one_uri() {
        for (given, want) in [
            ("127.0.0.1:8081", "http://127.0.0.1:8081"),
            ("http://127.0.0.1:8081", "http://127.0.0.1:8081"),
            ("http://127.0.0.1:8081/", "http://127.0.0.1:8081"),
            ("HTTP://127.0.0.1:8081", "http://127.0.0.1:8081"),
            (" 127.0.0.1:8081 ", "http://127.0.0.1:8081"),
            ("localhost:1", "http://localhost:1"),
            (
                "paxoskv-0.paxoskv.default.svc:8081",
                "http://paxoskv-0.paxoskv.default.svc:8081",
            ),
            ("[::1]:8081", "http://[::1]:8081"),
            ("http://[::1]:65535", "http://[::1]:65535"),
        ] {
            assert_eq!(normalize(given).as_deref(), Ok(want), "{given:?}");
            let endpoint = endpoint(given).unwrap_or_else(|e| panic!("{given:?}: {e}"));
            assert_eq!(endpoint.uri().to_string(), format!("{want}/"), "{given:?}");
        }
    }

    #[test]
    fn a_scheme_is_never_doubled() {
        // The bug this module fixed: forwarding dialled http://http://...
        let once = normalize("http://127.0.0.1:8081").expect("valid");
        assert_eq!(normalize(&once).as_deref(), Ok(once.as_str()));
        assert!(matches!(
            normalize("http://http://127.0.0.1:8081"),
            Err(DialError::Path(_))
        ));
    }

    #[test]
    fn bad_forms_are_refused_naming_the_address() {
        for (given, want) in [
            ("https://127.0.0.1:8081", "https needs TLS"),
            ("ftp://127.0.0.1:8081", "unsupported scheme"),
            ("127.0.0.1", "port"),
            ("127.0.0.1:", "port"),
            ("127.0.0.1:0", "port"),
            ("127.0.0.1:65536", "port"),
            ("127.0.0.1:http", "port"),
            ("http://127.0.0.1:8081/kv", "no path"),
            ("127.0.0.1:8081?x=1", "no path"),
            ("user@127.0.0.1:8081", "user name"),
            ("::1:8081", "brackets"),
            ("[::1:8081", "unclosed"),
            (":8081", "no host"),
            ("exa mple:8081", "not HOST:PORT"),
        ] {
            let err = normalize(given).expect_err(given);
            let text = err.to_string();
            assert!(
                text.contains(given.trim()) && text.contains(want),
                "{given:?}: {text:?} should name it and say {want:?}"
            );
            assert_eq!(endpoint(given).err(), Some(err));
        }
        assert_eq!(normalize("  "), Err(DialError::Empty));
    }

    #[test]
    fn with_tls_every_address_is_https_and_http_is_refused() {
        for (given, want) in [
            ("127.0.0.1:8081", "https://127.0.0.1:8081"),
            ("https://127.0.0.1:8081/", "https://127.0.0.1:8081"),
            ("HTTPS://[::1]:8081", "https://[::1]:8081"),
            ("paxoskv-0.paxoskv:8181", "https://paxoskv-0.paxoskv:8181"),
        ] {
            assert_eq!(normalize_as(given, true).as_deref(), Ok(want), "{given:?}");
            assert_eq!(check_form(given), Ok(()), "{given:?}");
        }
        let err = normalize_as("http://127.0.0.1:8081", true).expect_err("http with TLS");
        assert!(
            matches!(err, DialError::PlainHttp(_)) && err.to_string().contains("TLS is on"),
            "{err}"
        );
        // Either scheme is a valid form; the dialer decides.
        assert_eq!(check_form("http://127.0.0.1:8081"), Ok(()));
        assert!(matches!(
            check_form("ftp://127.0.0.1:8081"),
            Err(DialError::Scheme(_))
        ));
        assert!(matches!(
            check_form("https://127.0.0.1:8081/kv"),
            Err(DialError::Path(_))
        ));
    }
}
