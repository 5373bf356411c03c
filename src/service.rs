//! Assembles a running router from a validated config: store, router core, background tasks
//! (the sweep; reservation sharing and health probes when configured), HTTP server.
//! `roomrouter serve`, `roomrouter demo` and the integration tests all start the service
//! through here, so they run the same code.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;

use crate::config::Config;
use crate::http::{server, App};
use crate::router::{Clock, Router};
use crate::store::{MemoryStore, PinStore};

/// How often idle pins, expired reservations and stale history are swept.
pub fn sweep_interval(cfg: &Config) -> Duration {
    (cfg.placement.room_idle_ttl / 4).clamp(Duration::from_millis(200), Duration::from_secs(5))
}

/// Builds the application around a store.
pub fn build<S: PinStore>(cfg: Config, store: S) -> Arc<App<S>> {
    let router = Router::new(&cfg, store, Clock::System);
    Arc::new(App::new(cfg, router))
}

/// Runs the periodic sweep until the app is dropped by everyone else.
pub fn spawn_sweeper<S: PinStore>(app: &Arc<App<S>>) -> tokio::task::JoinHandle<()> {
    let weak = Arc::downgrade(app);
    let every = sweep_interval(&app.cfg);
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(every);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            let Some(app) = weak.upgrade() else { break };
            match app.router.sweep().await {
                Ok(0) => {}
                Ok(n) => tracing::info!(released = n, "released idle rooms"),
                Err(e) => tracing::warn!(error = %e, "sweep failed"),
            }
        }
    })
}

/// Tells the router it is awake every [`Router::WATCH_EVERY`], so that it can tell its own
/// pause from its nodes' silence ([`Router::watch`]).
pub fn spawn_watch<S: PinStore>(app: &Arc<App<S>>) -> tokio::task::JoinHandle<()> {
    let weak = Arc::downgrade(app);
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(Router::<S>::WATCH_EVERY);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            let Some(app) = weak.upgrade() else { break };
            app.router.watch(app.router.now());
        }
    })
}

/// How often a router tells the others what it reserved where, when that changed
/// (`placement.share_reservations`). A few milliseconds: the simulator finds the school-day
/// gain the same at 0, 5 and 10 ms and smaller at 50 ms.
pub const SHARE_RESERVATIONS_EVERY: Duration = Duration::from_millis(5);

/// How often it repeats every reservation it holds, so that routers that missed a message or
/// started later have it, and none forgets it (they forget a router not heard from over a
/// full `store.resync_interval`).
pub fn share_reservations_again(cfg: &Config) -> Duration {
    (cfg.store.resync_interval / 2).clamp(SHARE_RESERVATIONS_EVERY, Duration::from_secs(1))
}

/// With `placement.share_reservations`: tells the other routers this router's reservations
/// until the app is dropped by everyone else.
pub fn spawn_reservation_sharer<S: PinStore>(
    app: &Arc<App<S>>,
) -> Option<tokio::task::JoinHandle<()>> {
    if !app.cfg.shares_reservations() {
        return None;
    }
    let weak = Arc::downgrade(app);
    let again_every = share_reservations_again(&app.cfg);
    Some(tokio::spawn(async move {
        let mut tick = tokio::time::interval(SHARE_RESERVATIONS_EVERY);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut last_again = tokio::time::Instant::now();
        loop {
            tick.tick().await;
            let Some(app) = weak.upgrade() else { break };
            let again = last_again.elapsed() >= again_every;
            if again {
                last_again = tokio::time::Instant::now();
            }
            app.router.share_reservations(again);
        }
    }))
}

/// Serves `app` on `listener` with its sweeper until `shutdown` resolves.
pub async fn run<S: PinStore>(
    app: Arc<App<S>>,
    listener: TcpListener,
    shutdown: impl Future<Output = ()>,
) -> std::io::Result<()> {
    serve_app(app, listener, shutdown, survive_hangup()).await
}

/// [`run`], SIGHUP already taken from its default action (`hangup`: see [`survive_hangup`]).
async fn serve_app<S: PinStore>(
    app: Arc<App<S>>,
    listener: TcpListener,
    shutdown: impl Future<Output = ()>,
    hangup: Option<tokio::task::JoinHandle<()>>,
) -> std::io::Result<()> {
    // Room sizes learned by earlier runs (Redis): before the first placement, so that a
    // restart does not cost a week of weekly classes placed at the default size.
    match app.router.restore_history().await {
        Ok(0) => {}
        Ok(n) => tracing::info!(rooms = n, "learned room sizes restored"),
        Err(e) => tracing::warn!(error = %e, "learned room sizes not restored; learning anew"),
    }
    let sweeper = spawn_sweeper(&app);
    let watch = spawn_watch(&app);
    let sharer = spawn_reservation_sharer(&app);
    let prober = crate::probe::spawn_prober(&app);
    let stopped = Arc::downgrade(&app);
    // Plain HTTP, or HTTPS plus the redirect and mTLS node listeners, as the config says.
    let r = server::serve_configured(app, listener, shutdown).await;
    if let Some(h) = hangup {
        h.abort();
    }
    sweeper.abort();
    watch.abort();
    if let Some(s) = sharer {
        s.abort();
    }
    if let Some(p) = prober {
        p.abort();
    }
    // What must outlive the process is written now: a connection task the shutdown let go
    // may still hold the app (and its store) when `main` returns, and then nothing drops it.
    if let Some(app) = stopped.upgrade() {
        app.router.store().flush_learned();
    }
    r
}

/// Runs with the embedded memory store.
pub async fn run_memory(
    cfg: Config,
    listener: TcpListener,
    shutdown: impl Future<Output = ()>,
) -> std::io::Result<()> {
    run(build(cfg, MemoryStore::new()), listener, shutdown).await
}

/// Runs with the store `[store]` names (memory, or Redis shared with other routers).
///
/// Opening the store can take seconds (an unreachable Redis: twice `store.connect_timeout`,
/// more through Sentinel), and signals do not wait for it: SIGHUP (logrotate) is taken from
/// its default action first, and `shutdown` (SIGTERM: [`shutdown_signal`] installs its
/// handler when first polled) is listened to from the start, so that a SIGTERM meanwhile
/// ends the process as one while serving does, with exit code 0, rather than by the
/// signal's default action.
pub async fn run_configured(
    cfg: Config,
    listener: TcpListener,
    shutdown: impl Future<Output = ()>,
) -> anyhow::Result<()> {
    let hangup = survive_hangup();
    tokio::pin!(shutdown);
    let opened = tokio::select! {
        biased;
        () = &mut shutdown => {
            tracing::info!("stopped before the store was open");
            Ok(None)
        }
        store = crate::store::open(&cfg) => store.map(Some),
    };
    let store = match opened {
        Ok(Some(store)) => store,
        ended => {
            if let Some(h) = hangup {
                h.abort();
            }
            return ended.map(|_| ());
        }
    };
    tracing::info!(
        store = ?cfg.store.kind,
        share_reservations = cfg.shares_reservations(),
        "store opened"
    );
    serve_app(build(cfg, store), listener, shutdown, hangup).await?;
    Ok(())
}

/// Takes SIGHUP (`kill -HUP`, `systemctl reload`-style habits, a closed terminal) from its
/// default action, which ends the process without a drain, and which systemd's
/// `Restart=on-failure` counts as a clean stop. With TLS on, the certificate watcher
/// reloads on it as well; nothing else is read again.
fn survive_hangup() -> Option<tokio::task::JoinHandle<()>> {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        match signal(SignalKind::hangup()) {
            Ok(mut hup) => Some(tokio::spawn(async move {
                while hup.recv().await.is_some() {
                    tracing::info!(
                        "SIGHUP: TLS certificates reload (when TLS is on); the configuration is read at start only"
                    );
                }
            })),
            Err(e) => {
                tracing::warn!(error = %e, "no SIGHUP handler: SIGHUP will end the process");
                None
            }
        }
    }
    #[cfg(not(unix))]
    None
}

/// Resolves on Ctrl-C or SIGTERM. Takes them from their default action (ending the process)
/// when first polled, not before.
pub async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        _ = ctrl_c => {},
        _ = term => {},
    }
    tracing::info!("shutdown signal received");
}
