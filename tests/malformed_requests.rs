//! Bytes that are not a valid request, sent to a real replica: each method
//! answers `INVALID_ARGUMENT` naming the message it expected (not
//! `INTERNAL`), and the replica goes on serving.

mod common;

use std::time::Duration;

use bytes::{Buf, BufMut};
use common::{Cluster, channel};
use paxoskv::pb;
use tonic::codec::{Codec, DecodeBuf, Decoder, EncodeBuf, Encoder};
use tonic::{Code, Status};

/// Sends and receives message bodies as they are.
#[derive(Clone, Default)]
struct RawCodec;

impl Codec for RawCodec {
    type Encode = Vec<u8>;
    type Decode = Vec<u8>;
    type Encoder = RawCodec;
    type Decoder = RawCodec;

    fn encoder(&mut self) -> RawCodec {
        RawCodec
    }

    fn decoder(&mut self) -> RawCodec {
        RawCodec
    }
}

impl Encoder for RawCodec {
    type Item = Vec<u8>;
    type Error = Status;

    fn encode(&mut self, item: Vec<u8>, dst: &mut EncodeBuf<'_>) -> Result<(), Status> {
        dst.put_slice(&item);
        Ok(())
    }
}

impl Decoder for RawCodec {
    type Item = Vec<u8>;
    type Error = Status;

    fn decode(&mut self, src: &mut DecodeBuf<'_>) -> Result<Option<Vec<u8>>, Status> {
        let bytes = src.copy_to_bytes(src.remaining());
        Ok(Some(bytes.to_vec()))
    }
}

async fn call_raw(addr: &str, path: &'static str, body: Vec<u8>) -> Result<Vec<u8>, Status> {
    let mut grpc = tonic::client::Grpc::new(channel(addr));
    grpc.ready()
        .await
        .map_err(|e| Status::unavailable(e.to_string()))?;
    let mut request = tonic::Request::new(body);
    request.set_timeout(Duration::from_secs(5));
    grpc.unary(
        request,
        tonic::codegen::http::uri::PathAndQuery::from_static(path),
        RawCodec,
    )
    .await
    .map(tonic::Response::into_inner)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn garbage_bytes_get_invalid_argument_naming_the_message() {
    let cluster = Cluster::start("malformed", 1);
    cluster.wait_ready(1, Duration::from_secs(20)).await;
    let addr = &cluster.addrs[&1];
    // A field tag with wire type 7 (no such type), then noise.
    let garbage = vec![0x0f, 0xff, 0xff, 0xff, 0xff, 0xff, 0x01, 0x02];
    for (path, message) in [
        ("/paxoskv.v1.KvStore/Get", "GetRequest"),
        ("/paxoskv.v1.KvStore/Insert", "InsertRequest"),
        ("/paxoskv.v1.KvStore/Update", "UpdateRequest"),
        ("/paxoskv.v1.KvStore/Upsert", "UpsertRequest"),
        ("/paxoskv.v1.KvStore/Remove", "RemoveRequest"),
        ("/paxoskv.v1.Admin/Status", "StatusRequest"),
    ] {
        let status = call_raw(addr, path, garbage.clone())
            .await
            .expect_err("garbage must be refused");
        assert_eq!(status.code(), Code::InvalidArgument, "{path}: {status:?}");
        assert!(status.message().contains(message), "{path}: {status:?}");
    }
    // Still serving, and nothing reached the log.
    let mut client = cluster.client(1).await;
    client
        .upsert(pb::UpsertRequest {
            key: "after".into(),
            value: Some(1),
            ..Default::default()
        })
        .await
        .expect("still serving");
    let status = cluster.status(1).await.expect("status");
    assert_eq!(status.applied, status.committed);
}
