//! The demo: `roomrouter demo` runs a router and three demo nodes of different capacities on
//! loopback in one process, with generated secrets, and prints what to try.
//! `roomrouter demo-node` runs one [`node::DemoNode`] as its own process.

pub mod node;

use std::net::SocketAddr;
use std::time::Duration;

use rand::distr::{Alphanumeric, SampleString};

use crate::config::Config;
use node::{DemoNode, DemoNodeConfig};

/// A random secret of `n` alphanumeric characters.
pub fn secret(n: usize) -> String {
    Alphanumeric.sample_string(&mut rand::rng(), n)
}

/// The demo's router configuration: defaults plus generated credentials.
pub fn demo_config(listen: SocketAddr) -> Config {
    let mut cfg = Config::default();
    cfg.server.listen = listen;
    cfg.auth.admin_tokens = vec![format!("admin-{}", secret(24))];
    cfg.auth.node_token = format!("node-{}", secret(24));
    cfg.tickets.secret = secret(48);
    // The demo starts its nodes itself, after the router: no room is live anywhere yet.
    cfg.placement.startup_hold = Some(std::time::Duration::ZERO);
    cfg
}

/// Runs the demo until Ctrl-C (or SIGTERM). The nodes then leave the router, as nodes shut
/// down by their operator do, and the router stops last: stopped the other way round, each
/// node's leave would find no router to tell.
pub async fn run(listen: SocketAddr, nodes: usize) -> anyhow::Result<()> {
    let cfg = demo_config(listen);
    cfg.validate()?;
    let listener = tokio::net::TcpListener::bind(listen)
        .await
        .map_err(|e| anyhow::anyhow!("cannot listen on {listen} (demo --listen): {e}"))?;
    let addr = listener.local_addr()?;
    let router_url = format!("http://{addr}");
    let admin = cfg.auth.admin_tokens[0].clone();
    let node_token = cfg.auth.node_token.clone();
    let (ticket_secret, ticket_leeway) = (cfg.tickets.secret.clone(), cfg.tickets.leeway);
    // The nodes name rooms as this router does: its tickets name them so.
    let rooms = cfg.rooms.normalization;
    let (stop_router, router_stopped) = tokio::sync::oneshot::channel::<()>();
    let mut server = tokio::spawn(crate::service::run_memory(cfg, listener, async {
        let _ = router_stopped.await;
    }));
    let mut demo_nodes = Vec::new();
    for i in 0..nodes {
        let capacity = [50.0, 100.0, 200.0][i % 3] * (1 + i / 3) as f64;
        demo_nodes.push(
            DemoNode::start_with_normalization(
                DemoNodeConfig {
                    id: format!("media-{}", i + 1),
                    routers: vec![router_url.clone()],
                    listen: "127.0.0.1:0".parse()?,
                    public_url: None,
                    capacity,
                    region: None,
                    tags: vec![],
                    node_token: node_token.clone(),
                    ticket_secret: ticket_secret.clone(),
                    ticket_leeway,
                    heartbeat_interval: Duration::from_secs(2),
                },
                rooms,
            )
            .await?,
        );
    }
    println!(
        "roomrouter demo: router on {router_url} with {} demo nodes",
        demo_nodes.len()
    );
    for n in &demo_nodes {
        println!("  node {:<8} {}", n.id, n.url);
    }
    println!(
        r#"
Try:
  export ADMIN={admin}
  curl -si {router_url}/rooms/standup                # 307 to the room's node, with a ticket
  curl -sL {router_url}/rooms/standup                # follow it: the node counts you in
  curl -s  {router_url}/v1/placement/standup         # placement lookup (JSON)
  curl -s  -X POST {router_url}/v1/login -H 'content-type: application/json' -d '{{"room":"standup","user":"ann"}}'
  curl -s  -H "authorization: Bearer $ADMIN" {router_url}/v1/nodes
  curl -s  -H "authorization: Bearer $ADMIN" {router_url}/v1/placement/standup/explain
  curl -s  -X POST -H "authorization: Bearer $ADMIN" {router_url}/v1/nodes/media-1/drain
  open     {router_url}/dashboard   (user: admin, password: {admin})
  curl -s  {router_url}/metrics

Ctrl-C stops everything."#
    );
    tokio::select! {
        _ = crate::service::shutdown_signal() => {}
        // The router ended on its own (it failed): the nodes go with it.
        ended = &mut server => return Ok(ended??),
    }
    for n in demo_nodes {
        n.stop().await;
    }
    let _ = stop_router.send(());
    server.await??;
    Ok(())
}
