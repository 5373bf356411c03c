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
//! rather than late. [`Pacing::Wheel`] (`--pacing wheel`, Linux) is for measuring
//! sub-millisecond latency: a wheel of [`TICK`]-wide slots turned by one kernel timer (a
//! periodic timerfd the runtime's reactor watches like a socket); a send waits in the slot
//! of its planned instant and is woken at that slot's tick, at most one tick late. One timer
//! for all connections keeps the cost per send a waker (a timer per send costs two system
//! calls and a reactor wake-up each: at 76 000/s on one core that made the load tool its own
//! bottleneck). The wheel's price is its ticks: 10 000 timer wake-ups a second, about a
//! third of a core on a VM whose timer interrupts are dear (BENCHMARKS.md), so it is not the
//! default. Where the timerfd cannot be made it falls back to Tokio's timer; a run's report
//! says which one paced it ([`Pacer::kind`]).

use std::time::Duration;

use tokio::time::Instant;

/// How early the Tokio fallback returns for a planned instant, so the millisecond rounding
/// makes sends early (latency then counts from the actual send) rather than late.
pub const TOKIO_SLACK: Duration = Duration::from_millis(1);

/// The wheel's slot width: how late past its instant a wheel-paced send may be woken.
pub const TICK: Duration = Duration::from_micros(100);

/// What paces the sends (`roomrouter load --pacing`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum Pacing {
    /// Tokio's 1 ms timer: cheap; sends up to 1 ms early, in 1 ms batches.
    #[default]
    Tokio,
    /// A 100 µs timer wheel (Linux): sends at most about 100 µs late, evenly spread; costs
    /// the load tool 10 000 timer wake-ups a second.
    Wheel,
}

/// Waits until planned instants, as precisely as the platform allows. Cheap to clone: every
/// clone shares the one wheel (and its timer), which stops when the last clone is dropped.
#[derive(Clone)]
pub struct Pacer {
    #[cfg(target_os = "linux")]
    wheel: Option<std::sync::Arc<wheel::Wheel>>,
}

impl Pacer {
    /// A pacer of the kind asked for. Must be called inside a Tokio runtime (the wheel's
    /// timer runs as a task in it).
    pub fn new(pacing: Pacing) -> Pacer {
        match pacing {
            Pacing::Tokio => Pacer::tokio(),
            Pacing::Wheel => Pacer::wheel(),
        }
    }

    /// A wheel turned by a timerfd where the platform has one; Tokio's timer otherwise.
    pub fn wheel() -> Pacer {
        Pacer {
            #[cfg(target_os = "linux")]
            wheel: wheel::Wheel::start(TICK).ok(),
        }
    }

    /// A pacer on Tokio's timer only.
    pub fn tokio() -> Pacer {
        Pacer {
            #[cfg(target_os = "linux")]
            wheel: None,
        }
    }

    /// `"wheel"` or `"tokio"`: what paces the sends now (a wheel whose timer failed has
    /// fallen back to Tokio's).
    pub fn kind(&self) -> &'static str {
        if self.on_wheel() {
            "wheel"
        } else {
            "tokio"
        }
    }

    /// How early [`Pacer::until`] may return before the instant it was given.
    pub fn slack(&self) -> Duration {
        if self.on_wheel() {
            Duration::ZERO
        } else {
            TOKIO_SLACK
        }
    }

    fn on_wheel(&self) -> bool {
        #[cfg(target_os = "linux")]
        if let Some(w) = &self.wheel {
            return !w.failed();
        }
        false
    }

    /// Returns once `at` has passed (at once if it has), or up to [`Pacer::slack`] before.
    pub async fn until(&self, at: Instant) {
        #[cfg(target_os = "linux")]
        if let Some(w) = &self.wheel {
            if w.until(at).await {
                return;
            }
        }
        tokio::time::sleep_until(at.checked_sub(TOKIO_SLACK).unwrap_or(at)).await;
    }
}

#[cfg(target_os = "linux")]
mod wheel {
    use std::collections::BTreeMap;
    use std::future::poll_fn;
    use std::io;
    use std::os::fd::OwnedFd;
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::{Arc, Mutex, Weak};
    use std::task::{Poll, Waker};
    use std::time::Duration;

    use rustix::time::{
        timerfd_create, timerfd_settime, Itimerspec, TimerfdClockId, TimerfdFlags,
        TimerfdTimerFlags, Timespec,
    };
    use tokio::io::unix::AsyncFd;
    use tokio::io::Interest;
    use tokio::time::Instant;

    /// Wakers by slot: slot `k` holds the sends planned in `(origin + (k-1) tick, origin +
    /// k tick]`, woken by the first timer expiry at or after its end.
    pub struct Wheel {
        origin: Instant,
        tick: Duration,
        slots: Mutex<BTreeMap<u64, Vec<Waker>>>,
        /// The timer failed: waiting sends are woken and fall back to Tokio's timer.
        failed: AtomicBool,
    }

    impl Wheel {
        /// Starts the wheel's timer task: a periodic timerfd `tick` apart.
        pub fn start(tick: Duration) -> io::Result<Arc<Wheel>> {
            let timer = periodic(tick)?;
            let wheel = Arc::new(Wheel {
                origin: Instant::now(),
                tick,
                slots: Mutex::new(BTreeMap::new()),
                failed: AtomicBool::new(false),
            });
            tokio::spawn(turn(Arc::downgrade(&wheel), timer));
            Ok(wheel)
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
                let later = slots.split_off(&(done + 1));
                std::mem::replace(&mut *slots, later)
            };
            due.into_values().flatten().for_each(Waker::wake);
        }

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

    /// The timer task: turns the wheel at every expiry until the last pacer is dropped.
    async fn turn(wheel: Weak<Wheel>, timer: AsyncFd<OwnedFd>) {
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
    fn periodic(tick: Duration) -> io::Result<AsyncFd<OwnedFd>> {
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
        // AsyncFd's whole life. An `OwnedFd` is exactly that: it owns the descriptor, closes
        // it only when dropped (with the AsyncFd, which deregisters it first), and always
        // returns the same raw value.
        unsafe { AsyncFd::register_with_interest(fd, Interest::READABLE) }
            .map_err(|e| e.into_parts().1)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_pacer_returns_at_its_instant_never_more_than_its_slack_early() {
        for p in [Pacer::wheel(), Pacer::tokio()] {
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
        let p = Pacer::wheel();
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
            assert!(on_time, "a send planned {:?} in returned early", at - t0);
        }
    }

    #[tokio::test]
    async fn an_instant_in_the_past_returns_at_once() {
        let p = Pacer::wheel();
        let past = Instant::now() - Duration::from_millis(5);
        tokio::time::timeout(Duration::from_secs(5), p.until(past))
            .await
            .expect("a past instant does not wait");
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
