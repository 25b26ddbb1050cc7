//! HTTP/JSON for curl, scripts and probes: the client API of
//! `paxoskv.v1.KvStore` on a port of its own (`--http-listen`), as etcd
//! has its JSON gateway.
//!
//! | request | gRPC call | success |
//! |---|---|---|
//! | `GET /v1/kv/{key}` | `Get` | 200 `{"key": K, "value": V}` |
//! | `POST /v1/kv/{key}` `{"value": V}` | `Insert` | 201 `{}` |
//! | `PUT /v1/kv/{key}` `{"value": V}` | `Upsert` | 200 `{"inserted": B}` |
//! | `PATCH /v1/kv/{key}` `{"value": V}` | `Update` | 200 `{"previous": P}` |
//! | `DELETE /v1/kv/{key}` | `Remove` | 200 `{"previous": P}` |
//! | `POST /v1/sessions` | `OpenSession` | 201 `{"client_id": C}` |
//!
//! This layer implements none of the store's rules. Each handler builds
//! the gRPC request message and calls the same [`KvStore`] method the gRPC
//! server calls, on the same shared service, then maps its
//! `Result<Response, Status>` to HTTP ([`http_status`]). Validation (key
//! rules, a missing value, a zero request id), forwarding to the leader,
//! request-id deduplication, linearizable reads, deadlines and the
//! certainty of a failed write are therefore those of gRPC by
//! construction. What is HTTP's own is parsing: the path (the key is one
//! percent-decoded path segment), the JSON body (unknown fields, values
//! out of `int32` range), the timeout header, and the bounds on what comes
//! in (body size, header read time, connections).
//!
//! A failure is a JSON object that names what was wrong, with the gRPC
//! code it stands for and, on a failed write, whether it surely did not
//! happen ([`Certainty`]):
//! `{"error": {"code": "UNAVAILABLE", "message": "...", "certainty":
//! "NOT_PROPOSED", "reason": "no-leader"}}`.

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::header::{self, HeaderValue};
use http::{Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full, LengthLimitError, Limited};
use hyper::body::Body;
use hyper::server::conn::http1;
use hyper_util::rt::{TokioIo, TokioTimer};
use serde_json::{Map, Value, json};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::JoinSet;
use tokio_stream::StreamExt;
use tonic::{Code, Status};
use tracing::debug;

use crate::certainty::Certainty;
use crate::listener::{self, Limits};
use crate::metrics as m;
use crate::pb;
use crate::pb::kv_store_server::KvStore;
use crate::service::{self, Unavailable};

/// The largest request body read: the gRPC port's limit
/// ([`service::MAX_REQUEST_BYTES`]). A body is a value and a request id,
/// a few dozen bytes; a larger one is refused with 413 before it is read.
pub const MAX_BODY_BYTES: usize = service::MAX_REQUEST_BYTES;

/// The request header that sets a call's deadline, in milliseconds (the
/// gRPC port's `grpc-timeout`); without it, [`service::DEFAULT_DEADLINE`].
pub const TIMEOUT_HEADER: &str = "x-timeout-ms";

/// The longest deadline [`TIMEOUT_HEADER`] may ask for: an hour.
pub const MAX_TIMEOUT_MS: u64 = 3_600_000;

/// How long a connection may take to send a request's headers, once it
/// has started them (hyper's header read timeout): a client that trickles
/// headers cannot hold a connection open past it.
pub const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(10);

/// hyper's read buffer per connection, which bounds a request's headers.
const MAX_BUF_BYTES: usize = 64 * 1024;

/// The path of a key's calls, before the key.
const KV_PREFIX: &str = "/v1/kv/";
/// The path of `OpenSession`.
const SESSIONS: &str = "/v1/sessions";

/// The methods `/v1/kv/{key}` takes, for a 405's `Allow`.
const KV_ALLOW: &str = "GET, POST, PUT, PATCH, DELETE";
/// The methods `/v1/sessions` takes.
const SESSIONS_ALLOW: &str = "POST";

/// Serves HTTP/1.1 (HTTPS with `tls`) on `listener`, within `limits`,
/// calling `store` for every request, until `stop` turns true. Then it
/// accepts no more connections, lets each request in flight finish (an
/// idle keep-alive connection is closed at once) and returns once every
/// connection is closed; the caller bounds how long that may take.
pub async fn serve<S: KvStore>(
    listener: TcpListener,
    limits: Limits,
    store: Arc<S>,
    tls: Option<Arc<rustls::ServerConfig>>,
    mut stop: watch::Receiver<bool>,
) {
    let tls = tls.map(tokio_rustls::TlsAcceptor::from);
    let mut incoming = Box::pin(listener::incoming(listener, limits, "http"));
    let mut connections = JoinSet::new();
    // Each connection watches for the stop on its own receiver.
    let stopping = stop.clone();
    loop {
        tokio::select! {
            _ = stop.wait_for(|&s| s) => break,
            accepted = incoming.next() => {
                let Some(Ok(conn)) = accepted else {
                    // The accept loop ends only when its task is gone.
                    break;
                };
                let store = Arc::clone(&store);
                let tls = tls.clone();
                let stop = stopping.clone();
                connections.spawn(async move {
                    match tls {
                        None => serve_connection(conn, store, stop).await,
                        Some(acceptor) => {
                            match tokio::time::timeout(
                                crate::tls::HANDSHAKE_TIMEOUT,
                                acceptor.accept(conn),
                            )
                            .await
                            {
                                Ok(Ok(stream)) => serve_connection(stream, store, stop).await,
                                Ok(Err(e)) => debug!(error = %e, "http: TLS handshake failed"),
                                Err(_) => debug!("http: TLS handshake timed out"),
                            }
                        }
                    }
                });
            }
            // Reap finished connections, so the set holds only live ones.
            Some(_) = connections.join_next(), if !connections.is_empty() => {}
        }
    }
    drop(incoming);
    while connections.join_next().await.is_some() {}
}

/// One connection: HTTP/1.1 with keep-alive, headers within
/// [`HEADER_READ_TIMEOUT`]; on `stop`, the request in flight finishes and
/// the connection closes.
async fn serve_connection<IO, S>(io: IO, store: Arc<S>, mut stop: watch::Receiver<bool>)
where
    IO: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    S: KvStore,
{
    let service = hyper::service::service_fn(move |request| {
        let store = Arc::clone(&store);
        async move { Ok::<_, Infallible>(handle(&*store, request).await) }
    });
    let mut builder = http1::Builder::new();
    builder
        .timer(TokioTimer::new())
        .header_read_timeout(HEADER_READ_TIMEOUT)
        .max_buf_size(MAX_BUF_BYTES);
    let conn = builder.serve_connection(TokioIo::new(io), service);
    tokio::pin!(conn);
    tokio::select! {
        result = conn.as_mut() => {
            if let Err(e) = result {
                debug!(error = %e, "http: connection ended");
            }
            return;
        }
        _ = stop.wait_for(|&s| s) => conn.as_mut().graceful_shutdown(),
    }
    let _ = conn.await;
}

/// What a request asks for, once routed.
#[derive(Clone, Debug, PartialEq, Eq)]
enum Call {
    Get(String),
    Insert(String),
    Upsert(String),
    Update(String),
    Remove(String),
    OpenSession,
}

/// A failure answered by this layer or mapped from a gRPC status: the HTTP
/// status, the gRPC code it stands for, a message naming what was wrong,
/// and what a client needs to act on it.
#[derive(Clone, Debug, PartialEq, Eq)]
struct Failure {
    http: StatusCode,
    code: Code,
    message: String,
    certainty: Option<Certainty>,
    reason: Option<&'static str>,
    retry_after: Option<u32>,
    allow: Option<&'static str>,
}

impl Failure {
    fn new(http: StatusCode, code: Code, message: impl Into<String>) -> Failure {
        Failure {
            http,
            code,
            message: message.into(),
            certainty: None,
            reason: None,
            retry_after: None,
            allow: None,
        }
    }

    /// Bad input: 400, `INVALID_ARGUMENT`, as the gRPC port says it.
    fn invalid(message: impl Into<String>) -> Failure {
        Failure::new(StatusCode::BAD_REQUEST, Code::InvalidArgument, message)
    }

    /// What the service's `status` means over HTTP.
    fn of_status(status: &Status) -> Failure {
        let (http, retry_after) = http_status(status.code());
        Failure {
            http,
            code: status.code(),
            message: status.message().to_string(),
            certainty: Certainty::of(status),
            reason: Unavailable::of(status).map(Unavailable::as_str),
            retry_after,
            allow: None,
        }
    }

    fn into_response(self) -> Response<Full<Bytes>> {
        let mut error = Map::new();
        error.insert("code".into(), Value::from(code_name(self.code)));
        error.insert("message".into(), Value::from(self.message));
        if let Some(c) = self.certainty {
            error.insert("certainty".into(), Value::from(c.reason()));
        }
        if let Some(r) = self.reason {
            error.insert("reason".into(), Value::from(r));
        }
        let mut response = json_response(self.http, &json!({ "error": error }));
        let headers = response.headers_mut();
        if let Some(s) = self.retry_after {
            headers.insert(header::RETRY_AFTER, HeaderValue::from(s));
        }
        if let Some(allow) = self.allow {
            headers.insert(header::ALLOW, HeaderValue::from_static(allow));
        }
        response
    }
}

/// The HTTP status for a gRPC status code, and the `Retry-After` (seconds)
/// to send with it: the mapping users expect of a REST API, one row per
/// code the store gives.
pub fn http_status(code: Code) -> (StatusCode, Option<u32>) {
    match code {
        Code::Ok => (StatusCode::OK, None),
        Code::InvalidArgument => (StatusCode::BAD_REQUEST, None),
        Code::NotFound => (StatusCode::NOT_FOUND, None),
        Code::AlreadyExists => (StatusCode::CONFLICT, None),
        // An expired or unknown session, or a stale sequence.
        Code::FailedPrecondition => (StatusCode::PRECONDITION_FAILED, None),
        // The leader is full and said so before proposing anything.
        Code::ResourceExhausted => (StatusCode::TOO_MANY_REQUESTS, Some(1)),
        // No leader or no quorum in time, or the replica is stopping.
        Code::Unavailable => (StatusCode::SERVICE_UNAVAILABLE, Some(1)),
        Code::DeadlineExceeded => (StatusCode::GATEWAY_TIMEOUT, None),
        // `OpenSession` found no id left in its slot: a conflict that
        // clears on a retry (409, as Google's HTTP mapping has it).
        Code::Aborted => (StatusCode::CONFLICT, Some(1)),
        _ => (StatusCode::INTERNAL_SERVER_ERROR, None),
    }
}

/// A gRPC code as the gRPC specification spells it (`NOT_FOUND`), which
/// is how the README and grpcurl users know it.
pub fn code_name(code: Code) -> &'static str {
    match code {
        Code::Ok => "OK",
        Code::Cancelled => "CANCELLED",
        Code::Unknown => "UNKNOWN",
        Code::InvalidArgument => "INVALID_ARGUMENT",
        Code::DeadlineExceeded => "DEADLINE_EXCEEDED",
        Code::NotFound => "NOT_FOUND",
        Code::AlreadyExists => "ALREADY_EXISTS",
        Code::PermissionDenied => "PERMISSION_DENIED",
        Code::ResourceExhausted => "RESOURCE_EXHAUSTED",
        Code::FailedPrecondition => "FAILED_PRECONDITION",
        Code::Aborted => "ABORTED",
        Code::OutOfRange => "OUT_OF_RANGE",
        Code::Unimplemented => "UNIMPLEMENTED",
        Code::Internal => "INTERNAL",
        Code::Unavailable => "UNAVAILABLE",
        Code::DataLoss => "DATA_LOSS",
        Code::Unauthenticated => "UNAUTHENTICATED",
    }
}

fn json_response(status: StatusCode, body: &Value) -> Response<Full<Bytes>> {
    // A trailing newline, so that curl's output ends its line.
    let mut text = body.to_string();
    text.push('\n');
    let mut response = Response::new(Full::new(Bytes::from(text)));
    *response.status_mut() = status;
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    response
}

/// The route label of a path, for metrics: bounded, whatever the path.
fn route_label(path: &str) -> &'static str {
    if path == SESSIONS {
        SESSIONS
    } else if path.starts_with(KV_PREFIX) {
        "/v1/kv/{key}"
    } else {
        "other"
    }
}

/// The method label, for metrics: the methods the API knows, else `other`.
fn method_label(method: &Method) -> &'static str {
    match *method {
        Method::GET => "GET",
        Method::POST => "POST",
        Method::PUT => "PUT",
        Method::PATCH => "PATCH",
        Method::DELETE => "DELETE",
        _ => "other",
    }
}

/// Answers one request, and counts it by method, route and status.
pub async fn handle<S, B>(store: &S, request: Request<B>) -> Response<Full<Bytes>>
where
    S: KvStore,
    B: Body<Data = Bytes>,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let method = method_label(request.method());
    let route = route_label(request.uri().path());
    let response = match answer(store, request).await {
        Ok(response) => response,
        Err(failure) => failure.into_response(),
    };
    metrics::counter!(
        m::HTTP_REQUESTS,
        "method" => method,
        "route" => route,
        "status" => response.status().as_str().to_string()
    )
    .increment(1);
    response
}

async fn answer<S, B>(store: &S, request: Request<B>) -> Result<Response<Full<Bytes>>, Failure>
where
    S: KvStore,
    B: Body<Data = Bytes>,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let call = route(request.method(), request.uri())?;
    let timeout = timeout_of(request.headers())?;
    let content_length = request
        .headers()
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    let within = timeout.unwrap_or(service::DEFAULT_DEADLINE);
    let body = read_body(request.into_body(), content_length, within).await?;
    let fields = parse_body(&call, &body)?;
    let (status, json) = call_store(store, call, fields, timeout)
        .await
        .map_err(|status| Failure::of_status(&status))?;
    Ok(json_response(status, &json))
}

/// Which call a method and path ask for. The key is the one path segment
/// after `/v1/kv/`, percent-decoded ([`decode_key`]); the rules a key
/// must meet are the service's.
fn route(method: &Method, uri: &http::Uri) -> Result<Call, Failure> {
    let path = uri.path();
    if uri.query().is_some_and(|q| !q.is_empty()) {
        return Err(Failure::invalid(format!(
            "query parameters are not taken ({path}?{}): the key is the path, the rest is the JSON body",
            uri.query().unwrap_or_default()
        )));
    }
    let not_allowed = |allow: &'static str| {
        let mut f = Failure::new(
            StatusCode::METHOD_NOT_ALLOWED,
            Code::Unimplemented,
            format!("{path} does not take {method}: it takes {allow}"),
        );
        f.allow = Some(allow);
        f
    };
    if path == SESSIONS {
        return match *method {
            Method::POST => Ok(Call::OpenSession),
            _ => Err(not_allowed(SESSIONS_ALLOW)),
        };
    }
    let Some(raw_key) = path.strip_prefix(KV_PREFIX) else {
        return Err(no_route(path));
    };
    if raw_key.contains('/') {
        return Err(Failure::new(
            StatusCode::NOT_FOUND,
            Code::Unimplemented,
            format!(
                "no such path: {path}: the key is one path segment; percent-encode a '/' in a key as %2F"
            ),
        ));
    }
    let make: fn(String) -> Call = match *method {
        Method::GET => Call::Get,
        Method::POST => Call::Insert,
        Method::PUT => Call::Upsert,
        Method::PATCH => Call::Update,
        Method::DELETE => Call::Remove,
        _ => return Err(not_allowed(KV_ALLOW)),
    };
    let key = decode_key(raw_key).map_err(Failure::invalid)?;
    Ok(make(key))
}

/// The 404 of a path the API does not have.
fn no_route(path: &str) -> Failure {
    Failure::new(
        StatusCode::NOT_FOUND,
        Code::Unimplemented,
        format!("no such path: {path}: the API is /v1/kv/{{key}} and /v1/sessions"),
    )
}

/// A percent-encoded path segment as the key it spells: `%XX` is the byte
/// XX, anything else itself (`+` included: this is a path, not a form),
/// and the bytes must be UTF-8. The error names what was wrong.
pub fn decode_key(raw: &str) -> Result<String, String> {
    let bytes = raw.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            let hex = |b: Option<&u8>| b.and_then(|&b| char::from(b).to_digit(16));
            match (hex(bytes.get(i + 1)), hex(bytes.get(i + 2))) {
                (Some(hi), Some(lo)) => {
                    // Two hex digits: at most 0xff.
                    out.push((hi * 16 + lo) as u8);
                    i += 3;
                }
                _ => {
                    return Err(format!(
                        "key: the '%' at byte {i} of the path's key is not followed by two hex digits (write a '%' in a key as %25)"
                    ));
                }
            }
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8(out).map_err(|e| {
        format!(
            "key: not valid UTF-8 once percent-decoded (byte {} of the decoded key); keys are UTF-8 strings",
            e.utf8_error().valid_up_to()
        )
    })
}

/// The call's deadline from [`TIMEOUT_HEADER`], if given: whole
/// milliseconds from 1 to [`MAX_TIMEOUT_MS`].
fn timeout_of(headers: &http::HeaderMap) -> Result<Option<Duration>, Failure> {
    let Some(value) = headers.get(TIMEOUT_HEADER) else {
        return Ok(None);
    };
    let bad = || {
        Failure::invalid(format!(
            "{TIMEOUT_HEADER} must be whole milliseconds from 1 to {MAX_TIMEOUT_MS}, not {:?}",
            String::from_utf8_lossy(value.as_bytes())
        ))
    };
    let text = value.to_str().map_err(|_| bad())?.trim();
    if text.is_empty() || !text.bytes().all(|b| b.is_ascii_digit()) {
        return Err(bad());
    }
    match text.parse::<u64>() {
        Ok(ms) if (1..=MAX_TIMEOUT_MS).contains(&ms) => Ok(Some(Duration::from_millis(ms))),
        _ => Err(bad()),
    }
}

/// The request body, at most [`MAX_BODY_BYTES`] (413 past it, before
/// reading it if `Content-Length` says so), read within `within`.
async fn read_body<B>(
    body: B,
    content_length: Option<u64>,
    within: Duration,
) -> Result<Bytes, Failure>
where
    B: Body<Data = Bytes>,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let too_large = || {
        Failure::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            Code::InvalidArgument,
            format!("the body is larger than {MAX_BODY_BYTES} bytes, the most taken"),
        )
    };
    if content_length.is_some_and(|n| n > MAX_BODY_BYTES as u64) {
        return Err(too_large());
    }
    let collected = tokio::time::timeout(within, Limited::new(body, MAX_BODY_BYTES).collect());
    match collected.await {
        Ok(Ok(collected)) => Ok(collected.to_bytes()),
        Ok(Err(e)) if e.downcast_ref::<LengthLimitError>().is_some() => Err(too_large()),
        Ok(Err(e)) => Err(Failure::invalid(format!("cannot read the body: {e}"))),
        Err(_) => Err(Failure::new(
            StatusCode::REQUEST_TIMEOUT,
            Code::DeadlineExceeded,
            format!("the body did not arrive within the call's deadline ({within:?})"),
        )),
    }
}

/// What a body may carry.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
struct Fields {
    value: Option<i32>,
    request_id: Option<pb::RequestId>,
}

/// The body's fields, for `call`: a JSON object with only the fields the
/// call takes (a `GET` takes no body). An empty body is `{}`. A missing
/// value is left for the service to refuse, as it does on the gRPC port.
fn parse_body(call: &Call, body: &[u8]) -> Result<Fields, Failure> {
    let (what, allowed): (&str, &[&str]) = match call {
        Call::Get(_) => ("GET /v1/kv/{key}", &[]),
        Call::Insert(_) => ("POST /v1/kv/{key}", &["value", "request_id"]),
        Call::Upsert(_) => ("PUT /v1/kv/{key}", &["value", "request_id"]),
        Call::Update(_) => ("PATCH /v1/kv/{key}", &["value", "request_id"]),
        Call::Remove(_) => ("DELETE /v1/kv/{key}", &["request_id"]),
        Call::OpenSession => ("POST /v1/sessions", &[]),
    };
    let text = body.trim_ascii();
    if text.is_empty() {
        return Ok(Fields::default());
    }
    if matches!(call, Call::Get(_)) {
        return Err(Failure::invalid(
            "GET /v1/kv/{key} takes no body: the key is the path",
        ));
    }
    let parsed: Value = serde_json::from_slice(text)
        .map_err(|e| Failure::invalid(format!("the body is not valid JSON: {e}")))?;
    let Value::Object(object) = parsed else {
        return Err(Failure::invalid(format!(
            "the body must be a JSON object{}, not {}",
            example(allowed),
            kind(&parsed)
        )));
    };
    let mut fields = Fields::default();
    for (name, value) in &object {
        match name.as_str() {
            "value" if allowed.contains(&"value") => fields.value = int32(value)?,
            "request_id" if allowed.contains(&"request_id") => {
                fields.request_id = request_id(value)?;
            }
            "key" => {
                return Err(Failure::invalid(
                    "unknown field \"key\" in the body: the key is the path (/v1/kv/{key})",
                ));
            }
            other => {
                return Err(Failure::invalid(format!(
                    "unknown field {other:?} in the body: {what} takes {}",
                    takes(allowed)
                )));
            }
        }
    }
    Ok(fields)
}

/// How a body of these fields looks, for messages.
fn example(allowed: &[&str]) -> &'static str {
    if allowed.contains(&"value") {
        " like {\"value\": 5}"
    } else {
        ""
    }
}

/// The fields a call takes, for messages.
fn takes(allowed: &[&str]) -> String {
    match allowed {
        [] => "no fields (an empty body, or {})".into(),
        [one] => format!("only {one}"),
        many => many.join(" and "),
    }
}

/// What kind of JSON value `v` is, for messages.
fn kind(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

/// `value`: an integer in `int32`'s range; `null` is no value.
fn int32(v: &Value) -> Result<Option<i32>, Failure> {
    if v.is_null() {
        return Ok(None);
    }
    v.as_i64()
        .and_then(|n| i32::try_from(n).ok())
        .map(Some)
        .ok_or_else(|| {
            Failure::invalid(format!(
                "value must be an integer from {} to {} (int32), not {v}",
                i32::MIN,
                i32::MAX
            ))
        })
}

/// `request_id`: `{"client_id": C, "sequence": N}`, each a `uint64` as a
/// JSON number or a string of digits (as proto3's JSON writes 64-bit
/// integers); `null` is none. A missing field is 0, which the service
/// refuses by name.
fn request_id(v: &Value) -> Result<Option<pb::RequestId>, Failure> {
    let object = match v {
        Value::Null => return Ok(None),
        Value::Object(o) => o,
        other => {
            return Err(Failure::invalid(format!(
                "request_id must be an object {{\"client_id\": C, \"sequence\": N}}, not {}",
                kind(other)
            )));
        }
    };
    let mut id = pb::RequestId::default();
    for (name, value) in object {
        let field = match name.as_str() {
            "client_id" => &mut id.client_id,
            "sequence" => &mut id.sequence,
            other => {
                return Err(Failure::invalid(format!(
                    "unknown field {other:?} in request_id: it takes client_id and sequence"
                )));
            }
        };
        *field = uint64(value).ok_or_else(|| {
            Failure::invalid(format!(
                "request_id.{name} must be an integer from 0 to {}, not {value}",
                u64::MAX
            ))
        })?;
    }
    Ok(Some(id))
}

fn uint64(v: &Value) -> Option<u64> {
    match v {
        Value::Number(n) => n.as_u64(),
        Value::String(s) if !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit()) => {
            s.parse().ok()
        }
        _ => None,
    }
}

/// Makes `call` through the gRPC service's own method, and says what a
/// success looks like over HTTP.
async fn call_store<S: KvStore>(
    store: &S,
    call: Call,
    fields: Fields,
    timeout: Option<Duration>,
) -> Result<(StatusCode, Value), Status> {
    let Fields { value, request_id } = fields;
    Ok(match call {
        Call::Get(key) => {
            let r = store
                .get(grpc_request(pb::GetRequest { key: key.clone() }, timeout))
                .await?;
            (
                StatusCode::OK,
                json!({ "key": key, "value": r.into_inner().value }),
            )
        }
        Call::Insert(key) => {
            let message = pb::InsertRequest {
                key,
                value,
                request_id,
            };
            store.insert(grpc_request(message, timeout)).await?;
            (StatusCode::CREATED, json!({}))
        }
        Call::Upsert(key) => {
            let message = pb::UpsertRequest {
                key,
                value,
                request_id,
            };
            let r = store.upsert(grpc_request(message, timeout)).await?;
            (
                StatusCode::OK,
                json!({ "inserted": r.into_inner().inserted }),
            )
        }
        Call::Update(key) => {
            let message = pb::UpdateRequest {
                key,
                value,
                request_id,
            };
            let r = store.update(grpc_request(message, timeout)).await?;
            (
                StatusCode::OK,
                json!({ "previous": r.into_inner().previous }),
            )
        }
        Call::Remove(key) => {
            let message = pb::RemoveRequest { key, request_id };
            let r = store.remove(grpc_request(message, timeout)).await?;
            (
                StatusCode::OK,
                json!({ "previous": r.into_inner().previous }),
            )
        }
        Call::OpenSession => {
            let r = store
                .open_session(grpc_request(pb::OpenSessionRequest {}, timeout))
                .await?;
            (
                StatusCode::CREATED,
                json!({ "client_id": r.into_inner().client_id }),
            )
        }
    })
}

/// A gRPC request as the gRPC port would hand it to the service: the
/// timeout travels as its `grpc-timeout`, which the service reads.
fn grpc_request<T>(message: T, timeout: Option<Duration>) -> tonic::Request<T> {
    let mut request = tonic::Request::new(message);
    if let Some(t) = timeout {
        request.set_timeout(t);
    }
    request
}

/// Runs `future`, for tests that have no runtime of their own.
#[cfg(test)]
fn block_on<F: Future>(future: F) -> F::Output {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("a runtime")
        .block_on(future)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::fmt;
    use std::sync::Mutex;
    use tonic::Response as GrpcResponse;

    /// A store that records the gRPC request each call got, with its
    /// `grpc-timeout`, and answers what it is told.
    #[derive(Default)]
    struct Fake {
        calls: Mutex<Vec<(String, Option<String>)>>,
        fail: Mutex<Option<Status>>,
    }

    impl Fake {
        fn failing(status: Status) -> Fake {
            let fake = Fake::default();
            *fake.fail.lock().unwrap() = Some(status);
            fake
        }

        fn record<T: fmt::Debug>(&self, request: &tonic::Request<T>) -> Result<(), Status> {
            let timeout = request
                .metadata()
                .get("grpc-timeout")
                .and_then(|v| v.to_str().ok())
                .map(str::to_string);
            self.calls
                .lock()
                .unwrap()
                .push((format!("{:?}", request.get_ref()), timeout));
            match self.fail.lock().unwrap().clone() {
                Some(status) => Err(status),
                None => Ok(()),
            }
        }

        fn calls(&self) -> Vec<(String, Option<String>)> {
            self.calls.lock().unwrap().clone()
        }
    }

    #[tonic::async_trait]
    impl KvStore for Fake {
        async fn get(
            &self,
            r: tonic::Request<pb::GetRequest>,
        ) -> Result<GrpcResponse<pb::GetResponse>, Status> {
            self.record(&r)?;
            Ok(GrpcResponse::new(pb::GetResponse { value: 5 }))
        }
        async fn insert(
            &self,
            r: tonic::Request<pb::InsertRequest>,
        ) -> Result<GrpcResponse<pb::InsertResponse>, Status> {
            self.record(&r)?;
            Ok(GrpcResponse::new(pb::InsertResponse {}))
        }
        async fn remove(
            &self,
            r: tonic::Request<pb::RemoveRequest>,
        ) -> Result<GrpcResponse<pb::RemoveResponse>, Status> {
            self.record(&r)?;
            Ok(GrpcResponse::new(pb::RemoveResponse { previous: 3 }))
        }
        async fn update(
            &self,
            r: tonic::Request<pb::UpdateRequest>,
        ) -> Result<GrpcResponse<pb::UpdateResponse>, Status> {
            self.record(&r)?;
            Ok(GrpcResponse::new(pb::UpdateResponse { previous: 4 }))
        }
        async fn upsert(
            &self,
            r: tonic::Request<pb::UpsertRequest>,
        ) -> Result<GrpcResponse<pb::UpsertResponse>, Status> {
            self.record(&r)?;
            Ok(GrpcResponse::new(pb::UpsertResponse { inserted: true }))
        }
        async fn open_session(
            &self,
            r: tonic::Request<pb::OpenSessionRequest>,
        ) -> Result<GrpcResponse<pb::OpenSessionResponse>, Status> {
            self.record(&r)?;
            Ok(GrpcResponse::new(pb::OpenSessionResponse {
                client_id: 65_537,
            }))
        }
    }

    struct Answer {
        status: StatusCode,
        headers: http::HeaderMap,
        json: Value,
    }

    fn send(store: &Fake, method: &str, uri: &str, body: &str) -> Answer {
        send_with(store, method, uri, body, &[])
    }

    fn send_with(
        store: &Fake,
        method: &str,
        uri: &str,
        body: &str,
        headers: &[(&str, &str)],
    ) -> Answer {
        let mut builder = Request::builder().method(method).uri(uri);
        for (name, value) in headers {
            builder = builder.header(*name, *value);
        }
        let request = builder
            .body(Full::new(Bytes::from(body.to_string())))
            .expect("a request");
        let response = block_on(handle(store, request));
        let status = response.status();
        let headers = response.headers().clone();
        let bytes = block_on(response.into_body().collect())
            .expect("a body")
            .to_bytes();
        assert_eq!(
            headers.get(header::CONTENT_TYPE).unwrap(),
            "application/json"
        );
        let json = serde_json::from_slice(&bytes).expect("a JSON body");
        Answer {
            status,
            headers,
            json,
        }
    }

    /// Asserts a failure's status, code, and that its message says `says`.
    fn failed(a: &Answer, status: StatusCode, code: &str, says: &str) {
        assert_eq!(a.status, status, "{}", a.json);
        assert_eq!(a.json["error"]["code"], code, "{}", a.json);
        let message = a.json["error"]["message"].as_str().unwrap_or_default();
        assert!(message.contains(says), "{message:?} should say {says:?}");
    }

    #[test]
    fn every_verb_calls_its_grpc_method_with_the_request_it_names() {
        let store = Fake::default();
        let a = send(&store, "GET", "/v1/kv/apple", "");
        assert_eq!(a.status, StatusCode::OK);
        assert_eq!(a.json, json!({"key": "apple", "value": 5}));
        let a = send(&store, "POST", "/v1/kv/apple", r#"{"value": 1}"#);
        assert_eq!((a.status, a.json), (StatusCode::CREATED, json!({})));
        let a = send(
            &store,
            "PUT",
            "/v1/kv/apple",
            r#"{"value": -2147483648, "request_id": {"client_id": 65537, "sequence": "2"}}"#,
        );
        assert_eq!(
            (a.status, a.json),
            (StatusCode::OK, json!({"inserted": true}))
        );
        let a = send(&store, "PATCH", "/v1/kv/apple", r#"{"value": 2147483647}"#);
        assert_eq!((a.status, a.json), (StatusCode::OK, json!({"previous": 4})));
        let a = send(&store, "DELETE", "/v1/kv/apple", "");
        assert_eq!((a.status, a.json), (StatusCode::OK, json!({"previous": 3})));
        let a = send(&store, "POST", "/v1/sessions", "");
        assert_eq!(
            (a.status, a.json),
            (StatusCode::CREATED, json!({"client_id": 65537}))
        );
        let calls: Vec<String> = store.calls().into_iter().map(|(c, _)| c).collect();
        assert_eq!(
            calls,
            [
                r#"GetRequest { key: "apple" }"#,
                r#"InsertRequest { key: "apple", value: Some(1), request_id: None }"#,
                r#"UpsertRequest { key: "apple", value: Some(-2147483648), request_id: Some(RequestId { client_id: 65537, sequence: 2 }) }"#,
                r#"UpdateRequest { key: "apple", value: Some(2147483647), request_id: None }"#,
                r#"RemoveRequest { key: "apple", request_id: None }"#,
                "OpenSessionRequest",
            ]
        );
    }

    #[test]
    fn unknown_paths_are_404_and_wrong_methods_405_with_allow() {
        let store = Fake::default();
        for path in ["/", "/v1/kv", "/v1/keys/a", "/v1/sessions/1", "/v2/kv/a"] {
            let a = send(&store, "GET", path, "");
            failed(&a, StatusCode::NOT_FOUND, "UNIMPLEMENTED", "no such path");
        }
        // A raw '/' in a key is another path; the message says what to do.
        let a = send(&store, "GET", "/v1/kv/a/b", "");
        failed(&a, StatusCode::NOT_FOUND, "UNIMPLEMENTED", "%2F");
        for method in ["HEAD", "OPTIONS", "TRACE"] {
            let a = send_with(&store, method, "/v1/kv/a", "", &[]);
            assert_eq!(a.status, StatusCode::METHOD_NOT_ALLOWED);
            assert_eq!(a.headers.get(header::ALLOW).unwrap(), KV_ALLOW);
        }
        for method in ["GET", "PUT", "DELETE"] {
            let a = send(&store, method, "/v1/sessions", "");
            failed(
                &a,
                StatusCode::METHOD_NOT_ALLOWED,
                "UNIMPLEMENTED",
                "takes POST",
            );
            assert_eq!(a.headers.get(header::ALLOW).unwrap(), "POST");
        }
        let a = send(&store, "GET", "/v1/kv/a?consistent=false", "");
        failed(&a, StatusCode::BAD_REQUEST, "INVALID_ARGUMENT", "query");
        assert!(store.calls().is_empty(), "nothing reached the store");
    }

    #[test]
    fn keys_are_percent_decoded_and_must_be_utf8() {
        assert_eq!(decode_key("a%2Fb").as_deref(), Ok("a/b"));
        assert_eq!(decode_key("a%2fb").as_deref(), Ok("a/b"));
        assert_eq!(decode_key("caf%C3%A9").as_deref(), Ok("café"));
        assert_eq!(decode_key("a+b%20c").as_deref(), Ok("a+b c"));
        assert_eq!(decode_key("100%25").as_deref(), Ok("100%"));
        assert_eq!(decode_key("").as_deref(), Ok(""));
        for bad in ["%", "a%2", "%zz", "%+f", "%2 "] {
            let e = decode_key(bad).expect_err(bad);
            assert!(e.contains("two hex digits"), "{bad}: {e}");
        }
        let e = decode_key("ok%FF").expect_err("not UTF-8");
        assert!(e.contains("UTF-8") && e.contains("byte 2"), "{e}");

        let store = Fake::default();
        let a = send(&store, "GET", "/v1/kv/a%2Fb", "");
        assert_eq!(a.json["key"], "a/b");
        let a = send(&store, "GET", "/v1/kv/%C3%28", "");
        failed(&a, StatusCode::BAD_REQUEST, "INVALID_ARGUMENT", "UTF-8");
        assert_eq!(store.calls().len(), 1, "the bad key reached the store");
        // The empty key goes to the service, which refuses it as gRPC does.
        send(&store, "GET", "/v1/kv/", "");
        assert_eq!(store.calls()[1].0, r#"GetRequest { key: "" }"#);
    }

    #[test]
    fn bad_bodies_are_400_naming_the_field() {
        let store = Fake::default();
        for (method, body, says) in [
            ("POST", "value=1", "not valid JSON"),
            (
                "POST",
                "[1]",
                "must be a JSON object like {\"value\": 5}, not an array",
            ),
            (
                "PUT",
                r#"{"value": 2147483648}"#,
                "value must be an integer from -2147483648 to 2147483647",
            ),
            ("PUT", r#"{"value": -2147483649}"#, "int32"),
            ("PUT", r#"{"value": 1.5}"#, "value must be an integer"),
            ("PUT", r#"{"value": "5"}"#, "value must be an integer"),
            (
                "PATCH",
                r#"{"value": 1, "ttl": 5}"#,
                "unknown field \"ttl\"",
            ),
            ("POST", r#"{"key": "a", "value": 1}"#, "the key is the path"),
            ("DELETE", r#"{"value": 1}"#, "takes only request_id"),
            (
                "PUT",
                r#"{"value": 1, "request_id": 7}"#,
                "request_id must be an object",
            ),
            (
                "PUT",
                r#"{"value": 1, "request_id": {"client_id": -1, "sequence": 1}}"#,
                "request_id.client_id must be an integer",
            ),
            (
                "PUT",
                r#"{"value": 1, "request_id": {"client_id": 1, "seq": 1}}"#,
                "unknown field \"seq\" in request_id",
            ),
            ("GET", r#"{"value": 1}"#, "takes no body"),
        ] {
            let a = send(&store, method, "/v1/kv/k", body);
            failed(&a, StatusCode::BAD_REQUEST, "INVALID_ARGUMENT", says);
        }
        let a = send(&store, "POST", "/v1/sessions", r#"{"client_id": 1}"#);
        failed(
            &a,
            StatusCode::BAD_REQUEST,
            "INVALID_ARGUMENT",
            "takes no fields",
        );
        assert!(store.calls().is_empty(), "nothing reached the store");

        // What the service checks, it is left to check: a missing value
        // and a missing client id reach it (and it refuses them by name).
        send(&store, "POST", "/v1/kv/k", "");
        send(&store, "POST", "/v1/kv/k", r#"{"value": null}"#);
        send(
            &store,
            "PUT",
            "/v1/kv/k",
            r#"{"value": 1, "request_id": {"sequence": 1}}"#,
        );
        let calls: Vec<String> = store.calls().into_iter().map(|(c, _)| c).collect();
        assert_eq!(
            calls,
            [
                r#"InsertRequest { key: "k", value: None, request_id: None }"#,
                r#"InsertRequest { key: "k", value: None, request_id: None }"#,
                r#"UpsertRequest { key: "k", value: Some(1), request_id: Some(RequestId { client_id: 0, sequence: 1 }) }"#,
            ]
        );
    }

    #[test]
    fn a_body_past_the_limit_is_413() {
        let store = Fake::default();
        let padding = " ".repeat(MAX_BODY_BYTES);
        // Without a Content-Length (Full sends none), while reading.
        let a = send(
            &store,
            "PUT",
            "/v1/kv/k",
            &format!("{{\"value\": 1}}{padding}"),
        );
        failed(
            &a,
            StatusCode::PAYLOAD_TOO_LARGE,
            "INVALID_ARGUMENT",
            "16384 bytes",
        );
        // With one, before reading.
        let a = send_with(
            &store,
            "PUT",
            "/v1/kv/k",
            "{}",
            &[("content-length", "1000000")],
        );
        assert_eq!(a.status, StatusCode::PAYLOAD_TOO_LARGE);
        // Exactly the limit is read.
        let body = format!("{{\"value\": 1}}{}", " ".repeat(MAX_BODY_BYTES - 12));
        assert_eq!(body.len(), MAX_BODY_BYTES);
        let a = send(&store, "PUT", "/v1/kv/k", &body);
        assert_eq!(a.status, StatusCode::OK, "{}", a.json);
        assert_eq!(store.calls().len(), 1);
    }

    #[test]
    fn the_timeout_header_becomes_the_grpc_timeout_and_bad_ones_are_400() {
        let store = Fake::default();
        send_with(&store, "GET", "/v1/kv/k", "", &[("X-Timeout-Ms", "250")]);
        send(&store, "GET", "/v1/kv/k", "");
        let timeouts: Vec<Option<String>> = store.calls().into_iter().map(|(_, t)| t).collect();
        // tonic writes 250 ms in its own unit; the service parses any.
        let first = timeouts[0].clone().expect("a grpc-timeout");
        assert!(first == "250000u" || first == "250m", "{first}");
        assert_eq!(timeouts[1], None, "no header, the service's default");
        for bad in [
            "0",
            "-5",
            "1.5",
            "5s",
            "",
            "3600001",
            "99999999999999999999",
        ] {
            let a = send_with(&store, "GET", "/v1/kv/k", "", &[("x-timeout-ms", bad)]);
            failed(
                &a,
                StatusCode::BAD_REQUEST,
                "INVALID_ARGUMENT",
                TIMEOUT_HEADER,
            );
        }
        assert_eq!(store.calls().len(), 2);
    }

    #[test]
    fn status_codes_map_as_users_expect() {
        // One row per code: (gRPC code, HTTP status, Retry-After).
        let rows = [
            (Code::Ok, 200, None),
            (Code::InvalidArgument, 400, None),
            (Code::NotFound, 404, None),
            (Code::AlreadyExists, 409, None),
            (Code::FailedPrecondition, 412, None),
            (Code::ResourceExhausted, 429, Some(1)),
            (Code::Unavailable, 503, Some(1)),
            (Code::DeadlineExceeded, 504, None),
            (Code::Aborted, 409, Some(1)),
            (Code::Internal, 500, None),
            (Code::Unknown, 500, None),
            (Code::Unimplemented, 500, None),
        ];
        for (code, http, retry) in rows {
            let (status, retry_after) = http_status(code);
            assert_eq!((status.as_u16(), retry_after), (http, retry), "{code:?}");
        }
    }

    #[tokio::test]
    async fn on_stop_the_server_closes_idle_connections_and_returns() {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};

        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let (stop, stopped) = watch::channel(false);
        let server = tokio::spawn(serve(
            listener,
            Limits::HTTP,
            Arc::new(Fake::default()),
            None,
            stopped,
        ));
        let mut conn = tokio::net::TcpStream::connect(addr).await.expect("connect");
        conn.write_all(b"GET /v1/kv/k HTTP/1.1\r\nHost: test\r\n\r\n")
            .await
            .expect("send");
        let mut buf = vec![0u8; 4096];
        let n = conn.read(&mut buf).await.expect("a response");
        let response = String::from_utf8_lossy(&buf[..n]).to_string();
        assert!(
            response.starts_with("HTTP/1.1 200 OK")
                && response.contains(r#"{"key":"k","value":5}"#),
            "{response}"
        );
        // The connection is kept alive, idle, until the stop.
        let _ = stop.send(true);
        tokio::time::timeout(Duration::from_secs(10), server)
            .await
            .expect("the server returns once stopped")
            .expect("no panic");
        let closed = tokio::time::timeout(Duration::from_secs(10), conn.read(&mut buf))
            .await
            .expect("the idle connection is closed");
        assert!(matches!(closed, Ok(0) | Err(_)), "{closed:?}");
        assert!(
            tokio::net::TcpStream::connect(addr).await.is_err(),
            "still accepting after the stop"
        );
    }

    #[test]
    fn a_failed_call_says_its_code_message_certainty_and_reason() {
        let status = Certainty::NotProposed
            .mark(Unavailable::NoLeader.status("no leader: no quorum elected one"));
        let store = Fake::failing(status);
        let a = send(&store, "PUT", "/v1/kv/k", r#"{"value": 1}"#);
        assert_eq!(a.status, StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(a.headers.get(header::RETRY_AFTER).unwrap(), "1");
        assert_eq!(
            a.json,
            json!({"error": {
                "code": "UNAVAILABLE",
                "message": "no leader: no quorum elected one",
                "certainty": "NOT_PROPOSED",
                "reason": "no-leader",
            }})
        );

        let store = Fake::failing(Status::not_found("key \"x\" not found"));
        let a = send(&store, "GET", "/v1/kv/x", "");
        assert_eq!(a.status, StatusCode::NOT_FOUND);
        assert_eq!(
            a.json,
            json!({"error": {"code": "NOT_FOUND", "message": "key \"x\" not found"}})
        );
        assert!(a.headers.get(header::RETRY_AFTER).is_none());

        let busy = Certainty::NotProposed.mark(Status::resource_exhausted("overloaded"));
        let a = send(&Fake::failing(busy), "POST", "/v1/kv/k", r#"{"value":1}"#);
        assert_eq!(a.status, StatusCode::TOO_MANY_REQUESTS);
        assert_eq!(a.headers.get(header::RETRY_AFTER).unwrap(), "1");
        assert_eq!(a.json["error"]["certainty"], "NOT_PROPOSED");
    }
}
