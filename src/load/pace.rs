//! Waiting for planned send times, for the load harness ([`super::engine`]) and the
//! constant-rate mode ([`super::rate`]).
//!
//! Tokio's timer has a resolution of one millisecond: a deadline is rounded up to the next
//! tick, and a parked worker wakes for it up to a millisecond later still. A load tool that
//! paces its sends with it sends them up to a millisecond off their plan, and since latency
//! counts from the planned time, that error lands in every percentile (against a router
//! whose own p99 was 0.4 ms, a Tokio-paced run at 10 000/s reported 1.2 ms). It also sends
//! a millisecond's worth of requests at once, a burst the server then queues.
//!
//! [`Pacing::Tokio`] (the default) lives with that, and returns up to [`TOKIO_SLACK`] early
//! rather than late. The two others keep a wheel of slots: a send waits in the slot of its
//! planned instant and is woken when the wheel is turned past that slot's end, so one clock
//! serves all connections and the cost per send is a waker (a timer per send costs two
//! system calls and a reactor wake-up each: at 76 000/s on one core that made the load tool
//! its own bottleneck). They differ in what turns the wheel:
//!
//! - [`Pacing::Wheel`] (`--pacing wheel`, Linux): [`TICK`]-wide slots turned by one kernel
//!   timer (a periodic timerfd the runtime's reactor watches like a socket): at most one
//!   tick late. Its price is 10 000 timer wake-ups a second, about a third of a core on a VM
//!   whose timer interrupts are dear, and the load tool still sleeps between them: on a VM
//!   an idle virtual CPU takes tens to hundreds of microseconds to wake, for a tick or for
//!   an answer, and that lands in the figures too.
//! - [`Pacing::Spin`] (`--pacing spin`): [`SPIN_TICK`]-wide slots turned by a task that
//!   never sleeps. It checks the clock, wakes what is due and yields; Tokio polls its
//!   sockets with a zero timeout before it runs a yielded task again, so the worker thread
//!   never parks and answers are read as they arrive. It costs the load tool a whole core,
//!   so it is for a load tool with a core of its own (`benches/compare/run.sh` with `PIN=1`).
//!
//! Where the timerfd cannot be made, `wheel` falls back to Tokio's timer; a run's report
//! says which one paced it ([`Pacer::kind`]).

use std::time::Duration;

use tokio::time::Instant;

/// How early the Tokio fallback returns for a planned instant, so the millisecond rounding
/// makes sends early (latency then counts from the actual send) rather than late.
pub const TOKIO_SLACK: Duration = Duration::from_millis(1);

/// The wheel's slot width: how late past its instant a wheel-paced send may be woken.
pub const TICK: Duration = Duration::from_micros(100);

/// The spinning wheel's slot width.
pub const SPIN_TICK: Duration = Duration::from_micros(10);

/// What paces the sends (`roomrouter load --pacing`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum Pacing {
    /// Tokio's 1 ms timer: cheap; sends up to 1 ms early, in 1 ms batches.
    #[default]
    Tokio,
    /// A 100 µs timer wheel (Linux): sends at most about 100 µs late, evenly spread; costs
    /// the load tool 10 000 timer wake-ups a second.
    Wheel,
    /// A 10 µs wheel turned by a task that never sleeps: sends at most about 10 µs late, and
    /// the runtime polls its sockets between turns instead of sleeping; costs the load tool
    /// a whole core for the run. For a load tool on a core of its own.
    Spin,
}

/// Waits until planned instants, as precisely as the platform allows. Cheap to clone: every
/// clone shares the one wheel (and what turns it), which stops when the last clone is
/// dropped.
#[derive(Clone)]
pub struct Pacer {
    wheel: Option<std::sync::Arc<wheel::Wheel>>,
}

impl Pacer {
    /// A pacer of the kind asked for. Must be called inside a Tokio runtime (a wheel is
    /// turned by a task in it).
    pub fn new(pacing: Pacing) -> Pacer {
        match pacing {
            Pacing::Tokio => Pacer::tokio(),
            Pacing::Wheel => Pacer::wheel(),
            Pacing::Spin => Pacer::spin(),
        }
    }

    /// A wheel turned by a timerfd where the platform has one; Tokio's timer otherwise.
    pub fn wheel() -> Pacer {
        Pacer {
            wheel: wheel::Wheel::timed(TICK).ok(),
        }
    }

    /// A wheel turned by a task that never sleeps (any platform).
    pub fn spin() -> Pacer {
        Pacer {
            wheel: Some(wheel::Wheel::spinning(SPIN_TICK)),
        }
    }

    /// A pacer on Tokio's timer only.
    pub fn tokio() -> Pacer {
        Pacer { wheel: None }
    }

    /// `"spin"`, `"wheel"` or `"tokio"`: what paces the sends now (a wheel whose timer
    /// failed has fallen back to Tokio's).
    pub fn kind(&self) -> &'static str {
        match &self.wheel {
            Some(w) if !w.failed() => w.kind(),
            _ => "tokio",
        }
    }

    /// How early [`Pacer::until`] may return before the instant it was given.
    pub fn slack(&self) -> Duration {
        match &self.wheel {
            Some(w) if !w.failed() => Duration::ZERO,
            _ => TOKIO_SLACK,
        }
    }

    /// Returns once `at` has passed (at once if it has), or up to [`Pacer::slack`] before.
    pub async fn until(&self, at: Instant) {
        if let Some(w) = &self.wheel {
            if w.until(at).await {
                return;
            }
        }
        tokio::time::sleep_until(at.checked_sub(TOKIO_SLACK).unwrap_or(at)).await;
    }
}

mod wheel {
    use std::collections::BTreeMap;
    use std::future::poll_fn;
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::{Arc, Mutex, Weak};
    use std::task::{Poll, Waker};
    use std::time::Duration;

    use tokio::time::Instant;

    /// Wakers by slot: slot `k` holds the sends planned in `(origin + (k-1) tick, origin +
    /// k tick]`, woken by the first turn at or after its end.
    pub struct Wheel {
        origin: Instant,
        tick: Duration,
        slots: Mutex<BTreeMap<u64, Vec<Waker>>>,
        /// Turned by a spinning task rather than a timer.
        spins: bool,
        /// The timer failed: waiting sends are woken and fall back to Tokio's timer.
        failed: AtomicBool,
    }

    impl Wheel {
        fn new(tick: Duration, spins: bool) -> Arc<Wheel> {
            Arc::new(Wheel {
                origin: Instant::now(),
                tick,
                slots: Mutex::new(BTreeMap::new()),
                spins,
                failed: AtomicBool::new(false),
            })
        }

        /// A wheel turned by a periodic timerfd `tick` apart (Linux).
        #[cfg(target_os = "linux")]
        pub fn timed(tick: Duration) -> std::io::Result<Arc<Wheel>> {
            let timer = timer::periodic(tick)?;
            let wheel = Wheel::new(tick, false);
            tokio::spawn(timer::turn(Arc::downgrade(&wheel), timer));
            Ok(wheel)
        }

        /// Without a timerfd there is no timed wheel: the pacer uses Tokio's timer.
        #[cfg(not(target_os = "linux"))]
        pub fn timed(_tick: Duration) -> std::io::Result<Arc<Wheel>> {
            Err(std::io::ErrorKind::Unsupported.into())
        }

        /// A wheel turned by a task that checks the clock, wakes what is due and yields, in a
        /// loop: Tokio polls its sockets (without sleeping) before it runs a yielded task
        /// again, so answers are read as they arrive and the thread never parks.
        pub fn spinning(tick: Duration) -> Arc<Wheel> {
            let wheel = Wheel::new(tick, true);
            tokio::spawn(spin(Arc::downgrade(&wheel)));
            wheel
        }

        pub fn kind(&self) -> &'static str {
            if self.spins {
                "spin"
            } else {
                "wheel"
            }
        }

        /// Waits until `at` has passed; false if the timer failed (the caller falls back).
        pub async fn until(&self, at: Instant) -> bool {
            let slot = self.slot_of(at);
            poll_fn(|cx| {
                if self.failed() {
                    return Poll::Ready(false);
                }
                if Instant::now() >= at {
                    return Poll::Ready(true);
                }
                self.lock()
                    .entry(slot)
                    .or_default()
                    .push(cx.waker().clone());
                Poll::Pending
            })
            .await
        }

        /// The timer failed; every wait falls back to Tokio's timer.
        pub fn failed(&self) -> bool {
            self.failed.load(Ordering::Relaxed)
        }

        /// The slot whose end is the first tick at or after `at`.
        fn slot_of(&self, at: Instant) -> u64 {
            let since = at.saturating_duration_since(self.origin).as_nanos();
            since.div_ceil(self.tick.as_nanos()) as u64
        }

        /// Wakes every send whose slot has ended by `now`.
        fn wake_due(&self, now: Instant) {
            let done = (now.saturating_duration_since(self.origin).as_nanos()
                / self.tick.as_nanos()) as u64;
            let due = {
                let mut slots = self.lock();
                // Most spinning turns find nothing due: no split, no allocation.
                match slots.first_key_value() {
                    Some((&first, _)) if first <= done => {}
                    _ => return,
                }
                let later = slots.split_off(&(done + 1));
                std::mem::replace(&mut *slots, later)
            };
            due.into_values().flatten().for_each(Waker::wake);
        }

        #[cfg(target_os = "linux")]
        fn fail(&self) {
            self.failed.store(true, Ordering::Relaxed);
            let all = std::mem::take(&mut *self.lock());
            all.into_values().flatten().for_each(Waker::wake);
        }

        fn lock(&self) -> std::sync::MutexGuard<'_, BTreeMap<u64, Vec<Waker>>> {
            // A panic while holding the lock leaves only wakers behind: still usable.
            self.slots.lock().unwrap_or_else(|p| p.into_inner())
        }
    }

    /// The spinning task: turns the wheel and yields until the last pacer is dropped.
    async fn spin(wheel: Weak<Wheel>) {
        loop {
            match wheel.upgrade() {
                Some(w) => w.wake_due(Instant::now()),
                None => return,
            }
            tokio::task::yield_now().await;
        }
    }

    #[cfg(target_os = "linux")]
    mod timer {
        use std::io;
        use std::os::fd::OwnedFd;
        use std::sync::Weak;
        use std::time::Duration;

        use rustix::time::{
            timerfd_create, timerfd_settime, Itimerspec, TimerfdClockId, TimerfdFlags,
            TimerfdTimerFlags, Timespec,
        };
        use tokio::io::unix::AsyncFd;
        use tokio::io::Interest;
        use tokio::time::Instant;

        use super::Wheel;

        /// The timer task: turns the wheel at every expiry until the last pacer is dropped.
        pub async fn turn(wheel: Weak<Wheel>, timer: AsyncFd<OwnedFd>) {
            loop {
                let expired = expiry(&timer).await;
                let Some(w) = wheel.upgrade() else { return };
                match expired {
                    Ok(()) => w.wake_due(Instant::now()),
                    Err(e) => {
                        tracing::warn!(error = %e, "the load pacer's timer failed; pacing falls back to Tokio's 1 ms timer");
                        w.fail();
                        return;
                    }
                }
            }
        }

        /// Waits for the timer's next expiry (reading it re-arms readiness).
        async fn expiry(timer: &AsyncFd<OwnedFd>) -> io::Result<()> {
            loop {
                let mut ready = timer.readable().await?;
                let mut count = [0u8; 8];
                match rustix::io::read(timer.get_ref(), &mut count) {
                    Ok(_) => return Ok(()),
                    Err(rustix::io::Errno::AGAIN) => ready.clear_ready(),
                    Err(e) => return Err(e.into()),
                }
            }
        }

        /// A monotonic timerfd expiring every `tick`, registered with the runtime's reactor.
        pub fn periodic(tick: Duration) -> io::Result<AsyncFd<OwnedFd>> {
            let fd = timerfd_create(
                TimerfdClockId::Monotonic,
                TimerfdFlags::NONBLOCK | TimerfdFlags::CLOEXEC,
            )?;
            let every = Timespec::try_from(tick)
                .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "tick too long"))?;
            timerfd_settime(
                &fd,
                TimerfdTimerFlags::empty(),
                &Itimerspec {
                    it_interval: every,
                    it_value: every,
                },
            )?;
            // SAFETY: `register` needs the descriptor to stay open and the same for the
            // AsyncFd's whole life. An `OwnedFd` is exactly that: it owns the descriptor,
            // closes it only when dropped (with the AsyncFd, which deregisters it first), and
            // always returns the same raw value.
            unsafe { AsyncFd::register_with_interest(fd, Interest::READABLE) }
                .map_err(|e| e.into_parts().1)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_pacer_returns_at_its_instant_never_more_than_its_slack_early() {
        for p in [Pacer::spin(), Pacer::wheel(), Pacer::tokio()] {
            for wait_us in [0u64, 30, 300, 2_500] {
                let at = Instant::now() + Duration::from_micros(wait_us);
                p.until(at).await;
                let now = Instant::now();
                assert!(
                    now + p.slack() >= at,
                    "{}: returned {:?} before its instant",
                    p.kind(),
                    at - now
                );
            }
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn many_sends_waiting_at_once_each_return_after_their_own_instant() {
        for p in [Pacer::wheel(), Pacer::spin()] {
            many_sends_each_return_after_their_own_instant(p).await;
        }
    }

    async fn many_sends_each_return_after_their_own_instant(p: Pacer) {
        let t0 = Instant::now();
        let mut tasks = tokio::task::JoinSet::new();
        for i in 0..200u64 {
            let p = p.clone();
            // Spread over 20 ms, several per slot, in no particular order.
            let at = t0 + Duration::from_micros((i * 7_919) % 20_000);
            tasks.spawn(async move {
                p.until(at).await;
                (Instant::now() + p.slack() >= at, at)
            });
        }
        let done = tokio::time::timeout(Duration::from_secs(10), tasks.join_all())
            .await
            .expect("every send is woken");
        assert_eq!(done.len(), 200);
        for (on_time, at) in done {
            assert!(
                on_time,
                "{}: a send planned {:?} in returned early",
                p.kind(),
                at - t0
            );
        }
    }

    #[tokio::test]
    async fn an_instant_in_the_past_returns_at_once() {
        for p in [Pacer::wheel(), Pacer::spin()] {
            let past = Instant::now() - Duration::from_millis(5);
            tokio::time::timeout(Duration::from_secs(5), p.until(past))
                .await
                .expect("a past instant does not wait");
        }
    }

    /// The spinning task keeps the runtime busy only while a pacer exists: once the last
    /// clone is gone it ends, and a single-threaded runtime sleeps again (a timer fires).
    #[tokio::test]
    async fn the_spinning_task_ends_with_the_last_pacer() {
        let p = Pacer::new(Pacing::Spin);
        assert_eq!(p.kind(), "spin");
        assert_eq!(p.slack(), Duration::ZERO);
        let q = p.clone();
        q.until(Instant::now() + Duration::from_micros(200)).await;
        drop((p, q));
        // Let the spinner see that its wheel is gone.
        tokio::task::yield_now().await;
        let metrics = tokio::runtime::Handle::current().metrics();
        tokio::time::timeout(Duration::from_secs(5), async {
            while metrics.num_alive_tasks() > 0 {
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
        })
        .await
        .expect("the spinning task ends once no pacer is left");
    }

    #[cfg(target_os = "linux")]
    #[tokio::test]
    async fn on_linux_the_wheel_is_a_timerfd_with_no_slack() {
        let p = Pacer::new(Pacing::Wheel);
        assert_eq!(p.kind(), "wheel");
        assert_eq!(p.slack(), Duration::ZERO);
        let t = Pacer::new(Pacing::default());
        assert_eq!(t.kind(), "tokio");
        assert_eq!(t.slack(), TOKIO_SLACK);
    }
}
