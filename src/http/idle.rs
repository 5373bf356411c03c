//! Closing idle HTTP/2 connections. hyper bounds an HTTP/1.1 connection's idle time
//! (`server.header_read_timeout` covers the wait for the next request) but has no idle timeout
//! for HTTP/2, whose keep-alive pings keep a silent connection, and its connection slot, for
//! good. [`Streams`] counts a connection's open streams (a request from its arrival until its
//! response body is dropped) and [`Streams::idle`] resolves once none has been open for
//! `server.h2_idle_timeout`; the server then shuts the connection down gracefully (GOAWAY,
//! open streams finish).
//!
//! A client that stops reading an HTTP/2 response does not block the socket: it stops
//! granting flow-control window, hyper waits for capacity and never asks the body for more,
//! nothing is written, so the write timeout that bounds HTTP/1.1 (`server.send_timeout`)
//! never fires, and the stream stays open for good (one request of a few bytes per
//! connection would hold every connection slot). [`Streams::stalled`] resolves once some
//! stream's body has handed hyper a frame and not been asked for the next one for
//! `server.send_timeout`; the server then drops the connection.

use std::pin::Pin;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::BodyExt;
use hyper::body::{Frame, SizeHint};
use tokio::time::Instant;

use super::{Body, BoxError};

/// One connection's open streams and when the last one closed.
#[derive(Debug)]
pub struct Streams {
    /// When the connection started; `last_change` counts from it.
    start: Instant,
    open: AtomicUsize,
    /// Milliseconds from `start` to the last time a stream opened or closed.
    last_change: AtomicU64,
    /// Each held response body's wait for hyper to ask for its next frame: milliseconds
    /// from `start`, plus one, since it handed over a frame; 0 while it is asked.
    waits: Mutex<Vec<Weak<AtomicU64>>>,
}

impl Streams {
    pub fn new() -> Arc<Streams> {
        Arc::new(Streams {
            start: Instant::now(),
            open: AtomicUsize::new(0),
            last_change: AtomicU64::new(0),
            waits: Mutex::new(Vec::new()),
        })
    }

    fn now_ms(&self) -> u64 {
        self.start.elapsed().as_millis().min(u64::MAX as u128 - 1) as u64
    }

    /// Counts a stream as open until the returned guard drops.
    pub fn open(self: &Arc<Self>) -> StreamGuard {
        self.open.fetch_add(1, Ordering::AcqRel);
        self.touch();
        StreamGuard(self.clone())
    }

    /// How many streams are open.
    pub fn open_now(&self) -> usize {
        self.open.load(Ordering::Acquire)
    }

    fn touch(&self) {
        self.last_change.fetch_max(self.now_ms(), Ordering::AcqRel);
    }

    /// Resolves once a held body has waited `limit` for hyper to ask for its next frame:
    /// its client has taken nothing for that long. Looks every quarter of `limit`.
    pub async fn stalled(&self, limit: Duration) {
        let step = (limit / 4).max(Duration::from_millis(10));
        let limit_ms = limit.as_millis().min(u64::MAX as u128) as u64;
        loop {
            tokio::time::sleep(step).await;
            let now = self.now_ms();
            let mut waits = self.waits.lock().unwrap_or_else(|p| p.into_inner());
            waits.retain(|w| w.strong_count() > 0);
            let stalled = waits.iter().filter_map(Weak::upgrade).any(|w| {
                let since = w.load(Ordering::Acquire);
                since > 0 && now.saturating_sub(since - 1) >= limit_ms
            });
            if stalled {
                return;
            }
        }
    }

    /// Resolves once no stream has been open for `limit`: one timer at a time, re-armed for
    /// what is left whenever a stream opened or closed in between.
    pub async fn idle(&self, limit: Duration) {
        let mut deadline = self.start + limit;
        loop {
            tokio::time::sleep_until(deadline).await;
            let last = self.start + Duration::from_millis(self.last_change.load(Ordering::Acquire));
            if self.open_now() > 0 {
                // Busy: look again a whole `limit` later (a close re-stamps `last_change`).
                deadline = Instant::now() + limit;
            } else if last + limit > Instant::now() {
                deadline = last + limit;
            } else {
                return;
            }
        }
    }

    /// `body`, counting its stream as open until hyper drops it (the response was sent or
    /// the stream reset).
    pub fn hold(guard: StreamGuard, body: Body) -> Body {
        let wait = Arc::new(AtomicU64::new(0));
        if let Ok(mut waits) = guard.0.waits.lock() {
            waits.push(Arc::downgrade(&wait));
        }
        Held { body, guard, wait }.boxed()
    }
}

/// An open stream of a connection's [`Streams`]; dropping it closes the stream.
#[derive(Debug)]
pub struct StreamGuard(Arc<Streams>);

impl Drop for StreamGuard {
    fn drop(&mut self) {
        self.0.open.fetch_sub(1, Ordering::AcqRel);
        self.0.touch();
    }
}

/// A response body that keeps its stream counted as open, and says how long it has waited
/// to be asked for its next frame.
struct Held {
    body: Body,
    guard: StreamGuard,
    wait: Arc<AtomicU64>,
}

impl hyper::body::Body for Held {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = &mut *self;
        this.wait.store(0, Ordering::Release);
        let r = Pin::new(&mut this.body).poll_frame(cx);
        if matches!(&r, Poll::Ready(Some(Ok(_)))) {
            let since = this.guard.0.now_ms() + 1;
            this.wait.store(since, Ordering::Release);
        }
        r
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.body.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn idle_waits_the_limit_after_the_last_stream_closed() {
        let s = Streams::new();
        let limit = Duration::from_secs(60);
        let guard = s.open();
        tokio::time::sleep(Duration::from_secs(100)).await;
        // Open for 100 s: not idle. It closes now, so idle at 160 s.
        drop(guard);
        let closed_at = Instant::now();
        s.idle(limit).await;
        assert_eq!(Instant::now() - closed_at, limit);
    }

    #[tokio::test(start_paused = true)]
    async fn a_connection_that_never_opened_a_stream_is_idle_after_the_limit() {
        let s = Streams::new();
        let t0 = Instant::now();
        s.idle(Duration::from_secs(5)).await;
        assert_eq!(Instant::now() - t0, Duration::from_secs(5));
    }

    #[tokio::test(start_paused = true)]
    async fn a_stream_held_by_its_body_keeps_the_connection_busy() {
        let s = Streams::new();
        let body = Streams::hold(s.open(), super::super::full("x"));
        assert_eq!(s.open_now(), 1);
        let idle = tokio::time::timeout(Duration::from_secs(30), s.idle(Duration::from_secs(5)));
        assert!(idle.await.is_err(), "idle while a body was still held");
        let bytes = body.collect().await.unwrap().to_bytes();
        assert_eq!(&bytes[..], b"x");
        assert_eq!(
            s.open_now(),
            0,
            "the stream closes when its body is dropped"
        );
    }
}
