//! Telling HTTP/1 from HTTP/2 within a time limit. hyper-util's `auto` builder reads a
//! connection's first bytes to choose, with no timer of its own: a client that sends part of
//! the HTTP/2 preface, or nothing, would hold its connection (and its slot) for good. Every
//! server in the crate (the router's listeners, the demo nodes, the benchmark ceiling) reads
//! them here first, under its header timeout, and hands hyper a [`Rewind`] that replays them.

use std::time::Duration;

use bytes::Bytes;
use tokio::io::AsyncRead;

use super::h1::{BoxIo, Rewind};

/// The HTTP/2 client preface: hyper-util's `auto` builder reads up to this many bytes to
/// tell HTTP/2 from HTTP/1, with no timer of its own.
pub const H2_PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

/// Whether `bytes` already tell the protocol: they differ from the HTTP/2 preface, or hold
/// all of it.
pub fn protocol_known(bytes: &[u8]) -> bool {
    let n = bytes.len().min(H2_PREFACE.len());
    n == H2_PREFACE.len() || bytes[..n] != H2_PREFACE[..n]
}

/// Reads, within `limit`, as much of the connection's first bytes as it takes to tell the
/// protocol, after the `prefix` already read, and returns them all for hyper to read again.
/// `None`: the client closed, failed, or stalled that long (its connection slot is freed).
pub async fn protocol_bytes<I: AsyncRead + Unpin>(
    io: &mut I,
    prefix: Bytes,
    limit: Duration,
) -> Option<Bytes> {
    if protocol_known(&prefix) {
        return Some(prefix);
    }
    let mut buf = bytes::BytesMut::from(&prefix[..]);
    let read = async {
        while !protocol_known(&buf) {
            if tokio::io::AsyncReadExt::read_buf(io, &mut buf).await.ok()? == 0 {
                return None;
            }
        }
        Some(())
    };
    tokio::time::timeout(limit, read).await.ok()??;
    Some(buf.freeze())
}

/// Whether the first bytes `prefix` (all of them [`protocol_bytes`] read) open HTTP/2.
pub fn is_h2(prefix: &[u8]) -> bool {
    prefix.starts_with(H2_PREFACE)
}

/// `io` ready for hyper's `auto` builder: its first bytes read within `limit` and replayed.
/// `None`: the client closed, failed, or stalled that long.
pub async fn sniffed(mut io: BoxIo, limit: Duration) -> Option<Rewind> {
    let prefix = protocol_bytes(&mut io, Bytes::new(), limit).await?;
    Some(Rewind::new(io, prefix))
}
