//! Event loops (`server.runtime = "per_thread"`): the front door's connections served by
//! several threads, each running a single-threaded Tokio runtime that serves the
//! connections it was given start to end.
//!
//! Why: a multi-threaded Tokio runtime has one I/O driver. The worker holding it hands the
//! tasks it wakes to the others through their queues and a futex wake-up, and a
//! connection's task moves between workers. Under proxy load on two cores that left about a
//! twentieth of the machine idle while HAProxy kept it busy (BENCHMARKS.md section 1). A
//! loop that owns its connections and its upstream connections (the proxy's pools keep a
//! shard per loop) wakes nothing on another thread. The shared state (pins, nodes,
//! placement) is the same for every loop: it was built for concurrent use already.
//!
//! Loop 0 runs on the caller's runtime (which also runs the router's background tasks) and
//! accepts every connection; it serves each itself or hands it, as a plain socket, to the
//! loop with the fewest open connections, as HAProxy's threads share a listener. (Letting
//! every loop accept from its own duplicate of the socket balances badly: a client that
//! opens its connections in a burst found them all taken by whichever loop woke first, and
//! they stay there for their lifetime.) Loops 1.. are threads started here. All stop when
//! `shutdown` resolves, each draining its own connections, and [`run`] returns once every
//! loop has ended. A loop that fails stops the others. A loop's runtime ends with [`end`]:
//! blocking work still running on it then (a name lookup a DNS outage holds) does not hold
//! the loop, nor the process's exit.

use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{mpsc, oneshot, watch, OwnedSemaphorePermit};

/// Resolves when the loops are told to stop.
pub struct Stop(watch::Receiver<bool>);

impl Stop {
    pub async fn wait(mut self) {
        // An error means the sender is gone, which also means stop.
        let _ = self.0.wait_for(|stop| *stop).await;
    }

    /// A stop and how to give it: for tests of one loop's side.
    #[cfg(test)]
    pub(crate) fn by_hand() -> (watch::Sender<bool>, Stop) {
        let (tx, rx) = watch::channel(false);
        (tx, Stop(rx))
    }
}

/// A connection loop 0 accepted for another loop: the socket (not registered with any
/// runtime), its peer, its slot under `server.max_connections`, and its place in the
/// loops' connection counts.
pub struct Handed {
    pub stream: std::net::TcpStream,
    pub peer: SocketAddr,
    pub permit: OwnedSemaphorePermit,
    pub open: Open,
}

/// What loop `i` receives from loop 0. Unbounded, but every connection in it holds a slot,
/// so `server.max_connections` bounds it.
pub type Inbox = mpsc::UnboundedReceiver<Handed>;

/// Loop 0's way to the others, and how many connections each loop has open.
pub struct Handoff {
    /// Loop `i`'s inbox at `i - 1`.
    inboxes: Vec<mpsc::UnboundedSender<Handed>>,
    open: Arc<[AtomicUsize]>,
    /// Where the search for the least busy loop starts next: ties go round.
    next: AtomicUsize,
}

impl Handoff {
    pub(crate) fn new(loops: usize) -> (Handoff, Vec<Inbox>) {
        let (inboxes, receivers) = (1..loops).map(|_| mpsc::unbounded_channel()).unzip();
        let open = (0..loops).map(|_| AtomicUsize::new(0)).collect();
        let handoff = Handoff {
            inboxes,
            open,
            next: AtomicUsize::new(0),
        };
        (handoff, receivers)
    }

    /// The loop the next connection goes to: the one with the fewest open connections;
    /// among equals, the one after the last chosen.
    pub fn pick(&self) -> usize {
        let n = self.open.len();
        let start = self.next.load(Ordering::Relaxed) % n;
        let best = (0..n)
            .map(|k| (start + k) % n)
            .min_by_key(|&i| self.open[i].load(Ordering::Relaxed))
            .unwrap_or(0);
        self.next.store(best + 1, Ordering::Relaxed);
        best
    }

    /// Counts a connection as loop `i`'s until the returned guard is dropped.
    pub fn opened(&self, i: usize) -> Open {
        self.open[i].fetch_add(1, Ordering::Relaxed);
        Open {
            counts: self.open.clone(),
            i,
        }
    }

    /// Hands `h` to loop `to` (1..); gives it back if that loop has ended or is stopping
    /// (it takes nothing new once stopped: see `serve_handed` in `server`).
    pub fn send(&self, to: usize, h: Handed) -> Result<(), Handed> {
        self.inboxes[to - 1].send(h).map_err(|e| e.0)
    }
}

/// One open connection of one loop, counted until dropped.
pub struct Open {
    counts: Arc<[AtomicUsize]>,
    i: usize,
}

impl Drop for Open {
    fn drop(&mut self) {
        self.counts[self.i].fetch_sub(1, Ordering::Relaxed);
    }
}

/// Runs `loops` event loops: `accept(handoff, stop)` on the caller's runtime as loop 0,
/// and `serve(inbox, i, stop)` for loop `i` in 1.. on a thread of its own. Returns, after
/// all have ended, the first error any loop ended with.
pub async fn run<A, AF, S, SF>(
    loops: usize,
    shutdown: impl Future<Output = ()>,
    accept: A,
    serve: S,
) -> io::Result<()>
where
    A: FnOnce(Handoff, Stop) -> AF,
    AF: Future<Output = io::Result<()>>,
    S: Fn(Inbox, usize, Stop) -> SF + Send + Sync + 'static,
    SF: Future<Output = io::Result<()>> + 'static,
{
    let (stop_tx, stop_rx) = watch::channel(false);
    let stop_tx = Arc::new(stop_tx);
    let serve = Arc::new(serve);
    let (handoff, inboxes) = Handoff::new(loops.max(1));
    let mut ended = Vec::with_capacity(inboxes.len());
    let mut result = Ok(());
    for (k, inbox) in inboxes.into_iter().enumerate() {
        match spawn(k + 1, inbox, serve.clone(), &stop_tx) {
            Ok(done) => ended.push(done),
            Err(e) => {
                result = Err(e);
                break;
            }
        }
    }
    if result.is_ok() {
        let own = accept(handoff, Stop(stop_rx));
        tokio::pin!(own);
        result = tokio::select! {
            // Loop 0 ended by itself: it failed, or another loop did and stopped it.
            r = &mut own => r,
            () = shutdown => {
                stop_tx.send_replace(true);
                own.await
            }
        };
    }
    stop_tx.send_replace(true);
    for done in ended {
        let r = done
            .await
            .unwrap_or_else(|_| Err(io::Error::other("an event loop thread panicked")));
        result = result.and(r);
    }
    result
}

/// The runtime an event loop runs on: single-threaded, with I/O and timers. Loop 0's too
/// (`roomrouter serve` starts on it).
pub fn runtime() -> io::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
}

/// How long a runtime's [`end`] waits for the blocking work still running on it.
pub const BLOCKING_AT_EXIT: Duration = Duration::from_secs(1);

/// Ends `rt`, whose work has drained: its tasks are dropped, and its blocking threads
/// waited for up to [`BLOCKING_AT_EXIT`], then left running to the process's exit. Dropping
/// a runtime waits for them without limit, and a `getaddrinfo` (`resolve`) held by a DNS
/// outage takes 10-30 s: past the shutdown grace, and past systemd's patience, whose
/// SIGKILL loses the log lines not yet written.
pub fn end(rt: tokio::runtime::Runtime) {
    rt.shutdown_timeout(BLOCKING_AT_EXIT);
}

/// Starts loop `index` on a thread of its own; the receiver gets how it ended.
fn spawn<S, SF>(
    index: usize,
    inbox: Inbox,
    serve: Arc<S>,
    stop_tx: &Arc<watch::Sender<bool>>,
) -> io::Result<oneshot::Receiver<io::Result<()>>>
where
    S: Fn(Inbox, usize, Stop) -> SF + Send + Sync + 'static,
    SF: Future<Output = io::Result<()>> + 'static,
{
    let (stop_tx, stop) = (stop_tx.clone(), Stop(stop_tx.subscribe()));
    let (done_tx, done_rx) = oneshot::channel();
    std::thread::Builder::new()
        .name(format!("roomrouter-loop-{index}"))
        .spawn(move || {
            let ended = runtime().and_then(|rt| {
                let ended = rt.block_on(serve(inbox, index, stop));
                end(rt);
                ended
            });
            if ended.is_err() {
                stop_tx.send_replace(true);
            }
            let _ = done_tx.send(ended);
        })?;
    Ok(done_rx)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::http::resolve::{Lookup, Resolver};
    use std::time::Instant;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::{TcpListener, TcpStream};
    use tokio::sync::Semaphore;

    #[test]
    fn a_connection_goes_to_the_loop_with_the_fewest_open_and_ties_go_round() {
        let (h, _inboxes) = Handoff::new(3);
        let first: Vec<Open> = (0..3).map(|_| h.opened(h.pick())).collect();
        assert_eq!(
            first.iter().map(|o| o.i).collect::<Vec<_>>(),
            [0, 1, 2],
            "equal loops take turns"
        );
        let extra = h.opened(h.pick());
        assert_eq!(extra.i, 0);
        // Loop 2's connection closes: it is now the least busy.
        let [a, b, c] = <[Open; 3]>::try_from(first).ok().unwrap();
        drop(c);
        assert_eq!(h.pick(), 2);
        drop((a, b, extra));
        assert!(h.open.iter().all(|n| n.load(Ordering::Relaxed) == 0));
    }

    /// Writes `who` to the connection and keeps it open until the client closes it.
    async fn answer(mut s: TcpStream, who: String) {
        s.write_all(who.as_bytes()).await.unwrap();
        let _ = s.read(&mut [0u8; 1]).await;
    }

    fn thread() -> String {
        std::thread::current().name().unwrap_or("?").to_string()
    }

    /// Loop 0: accepts, answers its own share and hands the rest over.
    async fn accept(listener: TcpListener, h: Handoff, stop: Stop) -> io::Result<()> {
        let slots = Arc::new(Semaphore::new(100));
        let stop = stop.wait();
        tokio::pin!(stop);
        loop {
            let (stream, peer) = tokio::select! {
                r = listener.accept() => r?,
                () = &mut stop => return Ok(()),
            };
            let (to, permit) = (h.pick(), slots.clone().try_acquire_owned().unwrap());
            let open = h.opened(to);
            if to == 0 {
                tokio::spawn(async move {
                    let _open = open;
                    answer(stream, "0 main".into()).await
                });
            } else {
                let stream = stream.into_std()?;
                let handed = Handed {
                    stream,
                    peer,
                    permit,
                    open,
                };
                assert!(h.send(to, handed).is_ok(), "loop {to} is running");
            }
        }
    }

    /// Loops 1..: answer what they are handed with their index and thread name.
    async fn serve(mut inbox: Inbox, index: usize, stop: Stop) -> io::Result<()> {
        let stop = stop.wait();
        tokio::pin!(stop);
        loop {
            tokio::select! {
                h = inbox.recv() => {
                    let Some(h) = h else { return Ok(()) };
                    let stream = TcpStream::from_std(h.stream)?;
                    tokio::spawn(async move {
                        let _open = h.open;
                        answer(stream, format!("{index} {}", thread())).await
                    });
                }
                () = &mut stop => return Ok(()),
            }
        }
    }

    #[tokio::test]
    async fn loop_0_spreads_connections_over_loops_on_threads_of_their_own_and_all_stop() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (stop_tx, stop_rx) = oneshot::channel::<()>();
        let served = tokio::spawn(run(
            3,
            async { stop_rx.await.unwrap() },
            move |h, stop| accept(listener, h, stop),
            serve,
        ));
        // Six connections held open at once: two per loop.
        let mut held = Vec::new();
        let mut who = Vec::new();
        for _ in 0..6 {
            let mut s = TcpStream::connect(addr).await.unwrap();
            let mut buf = [0u8; 64];
            let n = tokio::time::timeout(Duration::from_secs(5), s.read(&mut buf))
                .await
                .unwrap()
                .unwrap();
            who.push(String::from_utf8_lossy(&buf[..n]).into_owned());
            held.push(s);
        }
        who.sort();
        assert_eq!(
            who,
            [
                "0 main",
                "0 main",
                "1 roomrouter-loop-1",
                "1 roomrouter-loop-1",
                "2 roomrouter-loop-2",
                "2 roomrouter-loop-2"
            ]
        );
        drop(held);
        stop_tx.send(()).unwrap();
        tokio::time::timeout(Duration::from_secs(5), served)
            .await
            .expect("every loop stops")
            .unwrap()
            .unwrap();
    }

    #[tokio::test]
    async fn a_loop_that_fails_stops_the_others_and_its_error_is_returned() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let failing = |inbox: Inbox, index: usize, stop: Stop| async move {
            if index == 2 {
                return Err(io::Error::other("loop 2 broke"));
            }
            serve(inbox, index, stop).await
        };
        let r = tokio::time::timeout(
            Duration::from_secs(5),
            run(
                3,
                std::future::pending(),
                move |h, stop| accept(listener, h, stop),
                failing,
            ),
        )
        .await
        .expect("a failed loop ends the run");
        assert_eq!(r.unwrap_err().to_string(), "loop 2 broke");
    }

    /// What a DNS outage does to `getaddrinfo`: the lookup tells `started` it runs, then
    /// holds its blocking thread for `hold` and fails.
    fn stuck_resolver(hold: Duration, started: Arc<tokio::sync::Notify>) -> Resolver {
        let lookup: Lookup = Arc::new(move |_name| {
            started.notify_one();
            std::thread::sleep(hold);
            Err(io::Error::other("SERVFAIL"))
        });
        Resolver::with_lookup(lookup, Duration::from_secs(5), Duration::from_secs(300))
    }

    /// Well past [`BLOCKING_AT_EXIT`], yet far short of the stuck lookup's 10 s.
    const EXIT_WITHIN: Duration = Duration::from_secs(4);

    /// `roomrouter serve`'s own runtime (loop 0's, or the shared one) ends with [`end`].
    #[test]
    fn a_runtime_ends_without_waiting_for_a_lookup_a_dns_outage_holds() {
        let rt = runtime().unwrap();
        let started = Arc::new(tokio::sync::Notify::new());
        let resolver = stuck_resolver(Duration::from_secs(10), started.clone());
        rt.block_on(async {
            tokio::spawn(async move { resolver.resolve("media-1.example").await });
            started.notified().await;
        });
        let t = Instant::now();
        end(rt);
        assert!(t.elapsed() < EXIT_WITHIN, "{:?}", t.elapsed());
    }

    /// Loops 1.. end their runtimes with [`end`] too: the run returns without waiting for a
    /// lookup one of them started.
    #[tokio::test]
    async fn a_loop_ends_without_waiting_for_a_lookup_a_dns_outage_holds() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let started = Arc::new(tokio::sync::Notify::new());
        let resolver = stuck_resolver(Duration::from_secs(10), started.clone());
        // Loop 1 looks a node up on its runtime, as its proxied requests do.
        let looking = move |inbox: Inbox, index: usize, stop: Stop| {
            let resolver = resolver.clone();
            async move {
                tokio::spawn(async move { resolver.resolve("media-1.example").await });
                serve(inbox, index, stop).await
            }
        };
        // Told to stop once the lookup runs.
        let t = Instant::now();
        let ran = tokio::time::timeout(
            Duration::from_secs(30),
            run(
                2,
                async move { started.notified().await },
                move |h, stop| accept(listener, h, stop),
                looking,
            ),
        )
        .await
        .expect("the run ends");
        ran.unwrap();
        assert!(t.elapsed() < EXIT_WITHIN, "{:?}", t.elapsed());
    }
}
