//! What Prometheus sees of the router: the `/metrics` exposition is valid OpenMetrics by the
//! reference parser (Prometheus drops a whole scrape it cannot parse), the alerting rules
//! in `deploy/prometheus/` load, pass their unit tests (`promtool`) and name only metrics a
//! real router exposes, so renaming a metric without the rules fails here rather than in an
//! operator's silent alert; and a real Prometheus scraping a real router evaluates those
//! rules, fires the split-room alert when a room is split, and answers every query of the
//! Grafana dashboard in `deploy/grafana/` with data (an empty panel is a broken panel).
//!
//! The tools: `promtool` and `prometheus` from `PROMTOOL` / `PROMETHEUS` or `PATH` (Debian's
//! `prometheus` package ships both), and `python3` with the `prometheus_client` package (its
//! OpenMetrics parser); `.ci/run` installs them. A test without its tool prints a loud
//! `SKIPPED:` line and passes, unless `ROOMROUTER_REQUIRE_PROMETHEUS_TOOLS` is set (CI),
//! which makes that a failure.

mod common;
mod upstream;

use std::collections::BTreeSet;
use std::io::Write;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use common::{eventually, heartbeat, proxy_config, TestRouter};
use serde_json::Value;
use upstream::Upstream;

const RULES_DIR: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/deploy/prometheus");
const RULES: &str = "roomrouter-alerts.yml";
const RULE_TESTS: &str = "roomrouter-alerts.test.yml";
const DASHBOARD: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/deploy/grafana/roomrouter-dashboard.json"
);

/// A test cannot run without its tool: a loud `SKIPPED:` line, or a failure in CI.
fn skip(test: &str, why: &str) {
    if std::env::var_os("ROOMROUTER_REQUIRE_PROMETHEUS_TOOLS").is_some() {
        panic!("{test}: ROOMROUTER_REQUIRE_PROMETHEUS_TOOLS is set but {why}");
    }
    eprintln!("SKIPPED: {test}: {why}");
}

/// The program `env` names, else `name` on `PATH`, if it runs.
fn tool(env: &str, name: &str) -> Option<PathBuf> {
    let candidate = std::env::var_os(env).map_or_else(|| name.into(), PathBuf::from);
    let found = Command::new(&candidate)
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success());
    found.then_some(candidate)
}

fn promtool() -> Option<PathBuf> {
    tool("PROMTOOL", "promtool")
}

fn run(promtool: &Path, args: &[&str]) {
    let out = Command::new(promtool)
        .args(args)
        .current_dir(RULES_DIR)
        .output()
        .expect("promtool runs");
    assert!(
        out.status.success(),
        "promtool {args:?} failed:\n{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn the_alerting_rules_load_and_pass_their_unit_tests() {
    let Some(promtool) = promtool() else {
        return skip(
            "the_alerting_rules_load_and_pass_their_unit_tests",
            "no promtool on PATH (set PROMTOOL, or install Debian's prometheus)",
        );
    };
    run(&promtool, &["check", "rules", RULES]);
    run(&promtool, &["test", "rules", RULE_TESTS]);
}

/// Adds every `roomrouter_*` name in `expr` to `names` (with its sample suffix, as
/// Prometheus stores it: `_total`, `_bucket`).
fn add_names(expr: &str, names: &mut BTreeSet<String>) {
    let mut rest = expr;
    while let Some(at) = rest.find("roomrouter_") {
        let tail = &rest[at..];
        let end = tail
            .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
            .unwrap_or(tail.len());
        names.insert(tail[..end].to_string());
        rest = &tail[end..];
    }
}

/// Every metric name in the rules' expressions.
fn names_in_rules() -> BTreeSet<String> {
    let text = std::fs::read_to_string(Path::new(RULES_DIR).join(RULES)).unwrap();
    let mut names = BTreeSet::new();
    // Expressions, one line or several; alert names are `Roomrouter...`, and summaries and
    // comments are prose.
    for line in text.lines().map(str::trim) {
        if !(line.starts_with("summary:") || line.starts_with('#')) {
            add_names(line, &mut names);
        }
    }
    names
}

/// The Grafana dashboard's panel queries (`(panel title, expr)`, rows' nested panels
/// included) and its variables' `label_values(metric, label)` queries.
struct Dashboard {
    queries: Vec<(String, String)>,
    variables: Vec<(String, String)>,
}

impl Dashboard {
    fn load() -> Dashboard {
        let d: Value = serde_json::from_str(&std::fs::read_to_string(DASHBOARD).unwrap())
            .expect("the dashboard is JSON");
        let mut queries = Vec::new();
        let mut ids = BTreeSet::new();
        let mut stack: Vec<&Value> = d["panels"].as_array().expect("panels").iter().collect();
        while let Some(p) = stack.pop() {
            let title = p["title"].as_str().expect("every panel has a title");
            assert!(
                ids.insert(p["id"].as_u64().expect("panel id")),
                "{title}: id reused"
            );
            if p["type"] == "row" {
                stack.extend(p["panels"].as_array().into_iter().flatten());
                continue;
            }
            assert_eq!(
                p["datasource"]["uid"], "${datasource}",
                "{title}: data source"
            );
            let targets = p["targets"].as_array().expect("targets");
            assert!(!targets.is_empty(), "{title}: no query");
            let refs: BTreeSet<&str> = targets.iter().filter_map(|t| t["refId"].as_str()).collect();
            assert_eq!(
                refs.len(),
                targets.len(),
                "{title}: refIds missing or reused"
            );
            for t in targets {
                let expr = t["expr"].as_str().expect("expr").to_string();
                queries.push((title.to_string(), expr));
            }
        }
        let mut variables = Vec::new();
        for v in d["templating"]["list"].as_array().expect("templating") {
            if v["type"] != "query" {
                continue;
            }
            let q = v["query"]["query"].as_str().expect("variable query");
            let inner = q
                .strip_prefix("label_values(")
                .and_then(|q| q.strip_suffix(')'))
                .expect("label_values(metric, label)");
            let (metric, label) = inner.rsplit_once(", ").expect("metric, label");
            variables.push((metric.to_string(), label.to_string()));
        }
        Dashboard { queries, variables }
    }

    fn names(&self) -> BTreeSet<String> {
        let mut names = BTreeSet::new();
        for (_, e) in &self.queries {
            add_names(e, &mut names);
        }
        names
    }
}

/// A dashboard query as Prometheus gets it from Grafana with the defaults: job `roomrouter`,
/// every router, and a rate window of a minute (Grafana's `$__rate_interval`).
fn as_grafana_sends(expr: &str) -> String {
    let e = expr
        .replace("$__rate_interval", "1m")
        .replace("$job", "roomrouter")
        .replace("$instance", ".*");
    assert!(
        !e.contains('$'),
        "a variable the test does not know in {expr}"
    );
    e
}

/// A router in proxy mode with a series in every family: it placed two rooms on its node
/// (`n1`, returned) and proxied a request there, released one pin (an admin's) and answered
/// an error (the labelled families have a series once something happened to them).
async fn router_with_every_series() -> (TestRouter, Upstream) {
    let r = TestRouter::start(proxy_config()).await;
    let n1 = Upstream::start("n1").await;
    assert_eq!(heartbeat(&r, "n1", n1.heartbeat()).await.status(), 200);
    assert_eq!(r.get("/rooms/lesson").send().await.unwrap().status(), 200);
    assert_eq!(r.get("/rooms/recess").send().await.unwrap().status(), 200);
    let released = r.admin(reqwest::Method::DELETE, "/v1/rooms/recess");
    assert!(released.send().await.unwrap().status().is_success());
    assert_eq!(r.get("/no/such/path").send().await.unwrap().status(), 404);
    (r, n1)
}

async fn exposition_with_every_metric() -> String {
    let (r, _n1) = router_with_every_series().await;
    let exposed = r.metrics().await;
    r.stop().await;
    exposed
}

/// Parses an OpenMetrics exposition with `prometheus_client`'s parser (strict: a histogram
/// needs its `+Inf` bucket, buckets in order and non-decreasing, ...) and prints each family
/// as `name type samples`.
const PARSE: &str = r#"
import sys
from prometheus_client.openmetrics.parser import text_string_to_metric_families
for f in text_string_to_metric_families(sys.stdin.read()):
    print(f.name, f.type, len(f.samples))
"#;

#[tokio::test]
async fn the_exposition_is_valid_openmetrics_by_the_reference_parser() {
    let has_parser = Command::new("python3")
        .args(["-c", "import prometheus_client.openmetrics.parser"])
        .output()
        .is_ok_and(|o| o.status.success());
    if !has_parser {
        return skip(
            "the_exposition_is_valid_openmetrics_by_the_reference_parser",
            "no python3 with prometheus_client (pip install prometheus-client)",
        );
    }
    let exposed = exposition_with_every_metric().await;
    let mut child = Command::new("python3")
        .args(["-c", PARSE])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(exposed.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "the parser refused the exposition: {}\n{exposed}",
        String::from_utf8_lossy(&out.stderr)
    );
    let families = String::from_utf8(out.stdout).unwrap();
    // Each histogram: 16 bounds + `+Inf` buckets, `_count` and `_sum` (per node for the
    // upstream one: one node answered).
    for name in [
        "roomrouter_decision_slow_path_seconds",
        "roomrouter_heartbeat_seconds",
        "roomrouter_proxy_upstream_response_seconds",
    ] {
        let line = format!("{name} histogram 19");
        assert!(families.lines().any(|l| l == line), "{line} in\n{families}");
    }
}

#[tokio::test]
async fn every_metric_the_rules_and_the_dashboard_name_is_exposed_by_a_real_router() {
    let mut names = names_in_rules();
    assert!(names.len() >= 9, "{names:?}");
    let on_dashboard = Dashboard::load().names();
    assert!(on_dashboard.len() >= 15, "{on_dashboard:?}");
    names.extend(on_dashboard);
    let exposed = exposition_with_every_metric().await;
    let missing: Vec<&String> = names
        .iter()
        .filter(|n| {
            !exposed.lines().any(|l| {
                l.strip_prefix(n.as_str())
                    .is_some_and(|rest| rest.starts_with(['{', ' ']))
            })
        })
        .collect();
    assert!(
        missing.is_empty(),
        "the rules or the dashboard name metrics the router does not expose: {missing:?}\n{exposed}"
    );
}

/// A Prometheus server scraping one router every second with the alerting rules loaded;
/// killed, and its data removed, when dropped.
struct Prometheus {
    child: Child,
    dir: PathBuf,
    url: String,
}

impl Prometheus {
    fn start(bin: &Path, router: SocketAddr) -> Prometheus {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let dir = std::env::temp_dir().join(format!("rr-prometheus-{}-{port}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let config = format!(
            "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\n\
             rule_files:\n  - {RULES_DIR}/{RULES}\n\
             scrape_configs:\n  - job_name: roomrouter\n    static_configs:\n      - targets: [\"{router}\"]\n"
        );
        std::fs::write(dir.join("prometheus.yml"), config).unwrap();
        let log = std::fs::File::create(dir.join("log")).unwrap();
        let child = Command::new(bin)
            .arg(format!(
                "--config.file={}",
                dir.join("prometheus.yml").display()
            ))
            .arg(format!(
                "--storage.tsdb.path={}",
                dir.join("data").display()
            ))
            .arg(format!("--web.listen-address=127.0.0.1:{port}"))
            .arg("--log.level=warn")
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .expect("prometheus starts");
        Prometheus {
            child,
            dir,
            url: format!("http://127.0.0.1:{port}"),
        }
    }

    /// `GET /api/v1/{path}` with `params`: the `data` of a successful answer, else why not
    /// (not up yet, or Prometheus's error).
    async fn api(&self, path: &str, params: &[(&str, &str)]) -> Result<Value, String> {
        let resp = common::client()
            .get(format!("{}/api/v1/{path}", self.url))
            .query(params)
            .timeout(Duration::from_secs(5))
            .send()
            .await
            .map_err(|e| e.to_string())?;
        let body: Value = resp.json().await.map_err(|e| e.to_string())?;
        if body["status"] == "success" {
            Ok(body["data"].clone())
        } else {
            Err(format!("{}: {}", body["errorType"], body["error"]))
        }
    }

    /// An instant query's result vector.
    async fn query(&self, expr: &str) -> Result<Vec<Value>, String> {
        let data = self.api("query", &[("query", expr)]).await?;
        Ok(data["result"].as_array().cloned().unwrap_or_default())
    }

    /// Waits (at most a minute) until the router was scraped `n` times; fails with
    /// Prometheus's log if it exits or never gets there.
    async fn wait_for_scrapes(&mut self, n: u32) {
        let query = "count_over_time(roomrouter_nodes{job=\"roomrouter\"}[1m])";
        let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
        loop {
            let scraped = self
                .query(query)
                .await
                .ok()
                .and_then(|v| v.first().map(value));
            if scraped.is_some_and(|s| s >= f64::from(n)) {
                return;
            }
            if let Ok(Some(status)) = self.child.try_wait() {
                panic!("prometheus exited ({status}):\n{}", self.log());
            }
            if tokio::time::Instant::now() > deadline {
                panic!(
                    "prometheus did not scrape the router {n} times in a minute:\n{}",
                    self.log()
                );
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("log")).unwrap_or_default()
    }
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// A sample's value (`[time, "value"]`) as a number.
fn value(sample: &Value) -> f64 {
    sample["value"][1].as_str().unwrap().parse().unwrap()
}

#[tokio::test]
async fn a_real_prometheus_evaluates_the_rules_fires_on_a_split_room_and_fills_every_panel() {
    let Some(bin) = tool("PROMETHEUS", "prometheus") else {
        return skip(
            "a_real_prometheus_evaluates_the_rules_fires_on_a_split_room_and_fills_every_panel",
            "no prometheus on PATH (set PROMETHEUS, or install Debian's prometheus)",
        );
    };
    let dashboard = Dashboard::load();
    let (r, _n1) = router_with_every_series().await;
    let n2 = Upstream::start("n2").await;
    let mut p = Prometheus::start(&bin, r.addr);

    // Rates need two samples in their window.
    p.wait_for_scrapes(3).await;
    let targets = p.api("targets", &[]).await.unwrap();
    let target = &targets["activeTargets"][0];
    assert_eq!(target["health"], "up", "{target}");

    // Every rule loaded and evaluated without error.
    let in_file = std::fs::read_to_string(Path::new(RULES_DIR).join(RULES)).unwrap();
    let alerts = in_file
        .lines()
        .filter(|l| l.trim_start().starts_with("- alert:"))
        .count();
    eventually("every rule evaluated", Duration::from_secs(30), || async {
        let Ok(rules) = p.api("rules", &[]).await else {
            return false;
        };
        let rules: Vec<&Value> = rules["groups"]
            .as_array()
            .unwrap()
            .iter()
            .flat_map(|g| g["rules"].as_array().unwrap())
            .collect();
        assert_eq!(rules.len(), alerts, "{rules:?}");
        for r in &rules {
            assert_ne!(
                r["health"], "err",
                "rule {} failed: {}",
                r["name"], r["lastError"]
            );
        }
        rules.iter().all(|r| r["health"] == "ok")
    })
    .await;

    // Every dashboard query answers with at least one series: a panel with none shows
    // "No data", which is what a renamed metric or label does to a dashboard.
    for (title, expr) in &dashboard.queries {
        let sent = as_grafana_sends(expr);
        let result = match p.query(&sent).await {
            Ok(result) => result,
            Err(e) => panic!("{title}: Prometheus refused {sent}: {e}\n{}", p.log()),
        };
        assert!(!result.is_empty(), "{title}: no data for {sent}");
    }
    for (metric, label) in &dashboard.variables {
        let matcher = as_grafana_sends(metric);
        let values = p
            .api(&format!("label/{label}/values"), &[("match[]", &matcher)])
            .await
            .unwrap();
        assert!(
            !values.as_array().unwrap().is_empty(),
            "no {label} for {matcher}"
        );
    }
    let splits = dashboard
        .queries
        .iter()
        .find(|(t, _)| t.starts_with("Split rooms"))
        .map(|(_, e)| as_grafana_sends(e))
        .expect("the split-room panel");
    assert_eq!(value(&p.query(&splits).await.unwrap()[0]), 0.0);

    // Split the room: another node reports it while it is pinned to n1. The alert fires
    // and the panel counts it.
    let mut hb = n2.heartbeat();
    hb["rooms"] = serde_json::json!([{"room": "lesson", "participants": 2}]);
    let reply: Value = heartbeat(&r, "n2", hb).await.json().await.unwrap();
    assert_eq!(reply["evict"], serde_json::json!(["lesson"]));
    eventually(
        "RoomrouterSplitRoom firing",
        Duration::from_secs(30),
        || async {
            p.api("alerts", &[]).await.is_ok_and(|a| {
                a["alerts"].as_array().unwrap().iter().any(|a| {
                    a["labels"]["alertname"] == "RoomrouterSplitRoom" && a["state"] == "firing"
                })
            })
        },
    )
    .await;
    let counted = value(&p.query(&splits).await.unwrap()[0]);
    assert!(counted >= 1.0, "the split-room panel shows {counted}");
    drop(p);
    r.stop().await;
}
