//! The one way to dial a replica.
//!
//! Every channel to a replica — the transport's peer streams, a follower
//! forwarding a call to the leader, the CLI, the tests — is made from
//! [`endpoint`], so every address a user can write (`--peers`, `--endpoint`)
//! means the same thing everywhere, and `main.rs` refuses at start, with the
//! same function, what would fail later.
//!
//! Accepted forms:
//!
//! - `host:port`, e.g. `127.0.0.1:8081`, `paxoskv-0.paxoskv:8081`,
//!   `[::1]:8081`;
//! - `http://host:port`, with or without a trailing `/`.
//!
//! Refused, each with an error naming the address: `https://` (paxoskv
//! speaks plaintext gRPC only; it has no TLS yet, and accepting the scheme
//! would only fail later with a less clear error), any other scheme, a
//! missing or zero port, a path, query or user name, and anything else that
//! is not a valid URI authority.

use std::fmt;
use std::time::Duration;

use tonic::transport::Endpoint;

/// How long a TCP connect may take, unless the caller sets its own.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(1);

/// Why an address cannot be dialled. Every variant names the address as
/// given.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum DialError {
    /// The address is empty.
    Empty,
    /// `https://`: TLS is not supported yet.
    Https(String),
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
                "{a:?}: https is not supported (paxoskv has no TLS yet); use HOST:PORT or http://HOST:PORT"
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

/// The canonical URI for `addr` (one of the forms the module describes):
/// `http://host:port`.
pub fn normalize(addr: &str) -> Result<String, DialError> {
    let given = addr;
    let addr = addr.trim();
    if addr.is_empty() {
        return Err(DialError::Empty);
    }
    let authority = match addr.split_once("://") {
        None => addr,
        Some((scheme, rest)) if scheme.eq_ignore_ascii_case("http") => {
            rest.strip_suffix('/').unwrap_or(rest)
        }
        Some((scheme, _)) if scheme.eq_ignore_ascii_case("https") => {
            return Err(DialError::Https(given.to_string()));
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
    let uri = format!("http://{authority}");
    // What is left (stray characters in the host, say) the URI parser judges.
    uri.parse::<tonic::codegen::http::Uri>()
        .map_err(|e| DialError::Invalid(given.to_string(), e.to_string()))?;
    Ok(uri)
}

/// An endpoint for the replica at `addr` (see [`normalize`] for the forms
/// accepted), with the settings every caller shares: a connect timeout of
/// [`CONNECT_TIMEOUT`] and `TCP_NODELAY`. A caller may add its own settings
/// (keepalives, another connect timeout) to the endpoint it gets.
pub fn endpoint(addr: &str) -> Result<Endpoint, DialError> {
    let uri = normalize(addr)?;
    let endpoint = Endpoint::from_shared(uri)
        .map_err(|e| DialError::Invalid(addr.to_string(), e.to_string()))?;
    Ok(endpoint.connect_timeout(CONNECT_TIMEOUT).tcp_nodelay(true))
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
            ("https://127.0.0.1:8081", "https is not supported"),
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
}
