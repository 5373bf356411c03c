//! Signals while `roomrouter serve` starts: opening its store can take seconds (a Redis that
//! does not answer), and meanwhile a SIGHUP (logrotate sends one) must not stop the router,
//! and a SIGTERM stops it as it does once it serves: with exit code 0, not by the signal's
//! default action.

mod common;

use std::path::PathBuf;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use common::{ADMIN, NODE_TOKEN, SECRET};
use tokio::net::TcpListener;
use tokio::sync::mpsc;

const BIN: &str = env!("CARGO_BIN_EXE_roomrouter");

/// The router's process, killed if the test ends first, and its config's directory.
struct Router {
    child: Child,
    dir: PathBuf,
}

impl Drop for Router {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// A Redis that takes connections and never answers: its URL, and word of each connection.
async fn silent_redis() -> (String, mpsc::UnboundedReceiver<()>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("redis://{}", listener.local_addr().unwrap());
    let (tx, rx) = mpsc::unbounded_channel();
    tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((conn, _)) = listener.accept().await {
            held.push(conn);
            let _ = tx.send(());
        }
    });
    (url, rx)
}

/// `roomrouter serve` with its store on `redis_url`, which it waits for far longer than a
/// test lasts; returns once the router is opening its store (it has connected).
async fn opening_its_store(redis_url: &str, connected: &mut mpsc::UnboundedReceiver<()>) -> Router {
    let port = redis_url.rsplit(':').next().unwrap();
    let dir = std::env::temp_dir().join(format!("rr-startup-{}-{port}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let config = dir.join("router.toml");
    std::fs::write(
        &config,
        format!(
            "[store]\nkind = \"redis\"\nurl = \"{redis_url}\"\n\
             connect_timeout = \"60s\"\ncommand_timeout = \"60s\"\n\
             [logging]\nlevel = \"warn\"\n"
        ),
    )
    .unwrap();
    let child = Command::new(BIN)
        .args(["serve", "--config"])
        .arg(&config)
        .args(["--listen", "127.0.0.1:0"])
        .env("ROOMROUTER_ADMIN_TOKEN", ADMIN)
        .env("ROOMROUTER_NODE_TOKEN", NODE_TOKEN)
        .env("ROOMROUTER_TICKET_SECRET", SECRET)
        .env("RUST_LOG", "warn")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let router = Router { child, dir };
    tokio::time::timeout(Duration::from_secs(20), connected.recv())
        .await
        .expect("the router connects to its store");
    router
}

fn signal(child: &Child, name: &str) {
    let sent = Command::new("kill")
        .args([&format!("-{name}"), &child.id().to_string()])
        .status()
        .unwrap();
    assert!(sent.success());
}

/// How the process ended; it must within `within`.
async fn exited(child: &mut Child, within: Duration) -> ExitStatus {
    let deadline = Instant::now() + within;
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            return status;
        }
        assert!(Instant::now() < deadline, "the router did not exit");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test]
async fn a_hangup_while_the_store_opens_does_not_stop_the_router() {
    let (url, mut connected) = silent_redis().await;
    let mut router = opening_its_store(&url, &mut connected).await;
    signal(&router.child, "HUP");
    tokio::time::sleep(Duration::from_millis(300)).await;
    let status = router.child.try_wait().unwrap();
    assert!(status.is_none(), "SIGHUP ended the router: {status:?}");
    signal(&router.child, "TERM");
    let status = exited(&mut router.child, Duration::from_secs(10)).await;
    assert!(status.success(), "{status:?}");
}

#[tokio::test]
async fn a_sigterm_while_the_store_opens_is_a_clean_exit() {
    let (url, mut connected) = silent_redis().await;
    let mut router = opening_its_store(&url, &mut connected).await;
    signal(&router.child, "TERM");
    let status = exited(&mut router.child, Duration::from_secs(10)).await;
    assert_eq!(status.code(), Some(0), "{status:?}");
}
