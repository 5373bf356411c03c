//! Telling HTTP/1 from HTTP/2 within a time limit. hyper-util's `auto` builder reads a
//! connection's first bytes to choose, with no timer of its own: a client that sends part of
//! the HTTP/2 preface, or nothing, would hold its connection (and its slot) for good. Every
//! server in the crate reads them here first, under its header timeout: the router's
//! listeners take them ([`protocol_bytes`]) and hand hyper a `Rewind` that replays them; the
//! demo nodes and the benchmark ceiling only peek at them ([`peek_protocol`]), in the bounded
//! accept loop they share ([`accept_sniffed`]).

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use tokio::io::AsyncRead;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;

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

/// Waits, within `limit`, until the bytes waiting on `stream` tell the protocol, without
/// taking them ([`TcpStream::peek`]): hyper then reads the socket itself, with no layer in
/// between (the demo nodes and the benchmark ceiling, which have no fast path to hand over
/// from). False: the client closed, failed, or stalled that long.
pub async fn peek_protocol(stream: &TcpStream, limit: Duration) -> bool {
    let mut buf = [0u8; H2_PREFACE.len()];
    let known = async {
        loop {
            // Waits for bytes; returns what is there without consuming it.
            let n = stream.peek(&mut buf).await.ok()?;
            if n == 0 {
                return None;
            }
            if protocol_known(&buf[..n]) {
                return Some(());
            }
            // Part of the HTTP/2 preface (a rare split, or a stall): the bytes stay readable,
            // so look again a little later rather than spin.
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    };
    matches!(tokio::time::timeout(limit, known).await, Ok(Some(())))
}

/// Accepts on `listener` until `stop` resolves, serving at most `max` connections at once
/// (more wait in the accept queue): each one whose first bytes tell the protocol within
/// `first_bytes` ([`peek_protocol`]) goes to `serve` on a task of its own, which holds its
/// connection slot until it ends. The accept loop of the servers without a fast path (the
/// demo nodes, the benchmark ceiling).
pub async fn accept_sniffed<F, Fut>(
    listener: TcpListener,
    max: usize,
    first_bytes: Duration,
    stop: impl Future<Output = ()>,
    serve: F,
) where
    F: Fn(TcpStream) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = ()> + Send + 'static,
{
    let serve = Arc::new(serve);
    let slots = Arc::new(Semaphore::new(max));
    let mut stop = std::pin::pin!(stop);
    loop {
        let permit = tokio::select! {
            p = slots.clone().acquire_owned() => match p { Ok(p) => p, Err(_) => break },
            _ = &mut stop => break,
        };
        let stream = tokio::select! {
            r = listener.accept() => match r {
                Ok((s, _)) => s,
                Err(_) => {
                    // Out of file descriptors, say: let some connections end first.
                    tokio::time::sleep(Duration::from_millis(20)).await;
                    continue;
                }
            },
            _ = &mut stop => break,
        };
        let serve = serve.clone();
        tokio::spawn(async move {
            let _permit = permit;
            if peek_protocol(&stream, first_bytes).await {
                serve(stream).await;
            }
        });
    }
}
