//! roomrouter: a front door for clusters of video-meeting servers.
//!
//! `config` and heartbeats fill the `cluster` registry; the `store` keeps room pins;
//! `placement` (pure: no I/O, no clock, no locks) decides where a room lives;
//! `router` ties the three together, and `http` exposes it (front door, API, ops);
//! `sim` replays workloads through placement policies in virtual time to compare them;
//! `load` drives real routers over HTTP and checks that no room is split.

pub mod auth;
pub mod capped;
pub mod cluster;
pub mod config;
pub mod demo;
pub mod http;
pub mod load;
pub mod metrics;
pub mod placement;
pub mod probe;
pub mod room;
pub mod router;
pub mod service;
pub mod sim;
pub mod store;
pub mod telemetry;
