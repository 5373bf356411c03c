//! The fast path's upstream connections: plain byte streams (TCP, or TLS for `https://`
//! nodes) kept per node in the same kind of idle pool as the lanes (`upstream::Idle`).
//!
//! A connection is either idle in the pool or owned by the one request using it; it goes
//! back only after a response that ended exactly where its framing said, with no byte left
//! over, on a connection neither side asked to close. Anything else closes it.

use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, Waker};
use std::time::Duration;

use bytes::BytesMut;
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncRead, ReadBuf};

use crate::http::upstream::{self, Connector, Idle, LaneError, Pooled};

/// One connection to a node, with the buffer its responses are read into.
pub struct Conn {
    pub io: TokioIo<upstream::Io>,
    /// Response bytes read but not yet relayed.
    pub buf: BytesMut,
    key: Arc<str>,
    /// The event loop that opened it (its pool shard).
    shard: usize,
    reused: bool,
}

impl Conn {
    /// Whether this connection came out of the pool rather than being opened for this request.
    pub fn reused(&self) -> bool {
        self.reused
    }
}

impl Pooled for Conn {
    fn key(&self) -> &Arc<str> {
        &self.key
    }

    fn shard(&self) -> usize {
        self.shard
    }

    /// Open and quiet: a read finds nothing waiting. A node that closed the connection (or
    /// sent something nobody asked for) shows up here, before a request is written to it.
    fn reusable(&mut self) -> bool {
        if !self.buf.is_empty() {
            return false;
        }
        let mut cx = Context::from_waker(Waker::noop());
        let mut byte = [0u8; 1];
        let mut rb = ReadBuf::new(&mut byte);
        matches!(
            Pin::new(&mut self.io).poll_read(&mut cx, &mut rb),
            Poll::Pending
        )
    }

    fn mark_reused(&mut self) {
        self.reused = true;
    }
}

/// The pool: idle connections per event loop and node, and how to open new ones.
pub struct Conns {
    connector: Connector,
    connect_timeout: Duration,
    idle: Arc<Idle<Conn>>,
}

impl Conns {
    pub fn new(
        connector: Connector,
        connect_timeout: Duration,
        loops: usize,
        max_idle_per_node: usize,
        idle_timeout: Duration,
    ) -> Conns {
        Conns {
            connector,
            connect_timeout,
            idle: Idle::new(loops, max_idle_per_node, idle_timeout),
        }
    }

    /// An idle connection of event loop `shard` to `upstream`, or a new one.
    pub async fn get(&self, shard: usize, upstream: &str) -> Result<Box<Conn>, LaneError> {
        match self.idle.take(shard, upstream) {
            Some(c) => Ok(c),
            None => self.connect(shard, upstream).await,
        }
    }

    /// Opens a new connection to `upstream` on event loop `shard` (the caller's) within
    /// `proxy.connect_timeout`.
    pub async fn connect(&self, shard: usize, upstream: &str) -> Result<Box<Conn>, LaneError> {
        let io = tokio::time::timeout(
            self.connect_timeout,
            upstream::open(&self.connector, upstream),
        )
        .await
        .map_err(|_| LaneError::Connect("connect timed out".into()))??;
        Ok(Box::new(Conn {
            io: TokioIo::new(io),
            buf: BytesMut::with_capacity(8 * 1024),
            key: Arc::from(upstream),
            shard,
            reused: false,
        }))
    }

    /// Gives a connection whose last response ended cleanly back to the pool.
    pub fn put(&self, conn: Box<Conn>) {
        self.idle.put(conn);
    }

    /// Idle connections in the pool (for tests).
    pub fn idle_count(&self) -> usize {
        self.idle.len()
    }
}
