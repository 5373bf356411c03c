//! What Prometheus sees of the router: the `/metrics` exposition is valid OpenMetrics by the
//! reference parser (Prometheus drops a whole scrape it cannot parse), and the alerting rules
//! in `deploy/prometheus/` load, pass their unit tests (`promtool`) and name only metrics a
//! real router exposes, so renaming a metric without the rules fails here rather than in an
//! operator's silent alert.
//!
//! The tools: `promtool` from `PROMTOOL` or `PATH` (Debian's `prometheus` package ships it),
//! and `python3` with the `prometheus_client` package (its OpenMetrics parser); `.ci/run`
//! installs both. A test without its tool prints a loud `SKIPPED:` line and passes, unless
//! `ROOMROUTER_REQUIRE_PROMETHEUS_TOOLS` is set (CI), which makes that a failure.

mod common;
mod upstream;

use std::collections::BTreeSet;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use common::{heartbeat, proxy_config, TestRouter};
use upstream::Upstream;

const RULES_DIR: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/deploy/prometheus");
const RULES: &str = "roomrouter-alerts.yml";
const RULE_TESTS: &str = "roomrouter-alerts.test.yml";

/// A test cannot run without its tool: a loud `SKIPPED:` line, or a failure in CI.
fn skip(test: &str, why: &str) {
    if std::env::var_os("ROOMROUTER_REQUIRE_PROMETHEUS_TOOLS").is_some() {
        panic!("{test}: ROOMROUTER_REQUIRE_PROMETHEUS_TOOLS is set but {why}");
    }
    eprintln!("SKIPPED: {test}: {why}");
}

fn promtool() -> Option<PathBuf> {
    let candidate = std::env::var_os("PROMTOOL").map_or_else(|| "promtool".into(), PathBuf::from);
    let found = Command::new(&candidate)
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success());
    found.then_some(candidate)
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

/// Every `roomrouter_*` name in the rules' expressions (with its sample suffix, as Prometheus
/// stores it: `_total`, `_bucket`).
fn names_in_rules() -> BTreeSet<String> {
    let text = std::fs::read_to_string(Path::new(RULES_DIR).join(RULES)).unwrap();
    let mut names = BTreeSet::new();
    // Expressions, one line or several; alert names are `Roomrouter...`, and summaries and
    // comments are prose.
    for line in text.lines().map(str::trim) {
        if line.starts_with("summary:") || line.starts_with('#') {
            continue;
        }
        let mut rest = line;
        while let Some(at) = rest.find("roomrouter_") {
            let tail = &rest[at..];
            let end = tail
                .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
                .unwrap_or(tail.len());
            names.insert(tail[..end].to_string());
            rest = &tail[end..];
        }
    }
    names
}

/// The exposition of a router in proxy mode that has placed a room and proxied a request
/// to a node, so that the per-node histograms have samples too.
async fn exposition_with_every_metric() -> String {
    let r = TestRouter::start(proxy_config()).await;
    let up = Upstream::start("n1").await;
    assert_eq!(heartbeat(&r, "n1", up.heartbeat()).await.status(), 200);
    assert_eq!(r.get("/rooms/alerts").send().await.unwrap().status(), 200);
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
async fn every_metric_the_rules_name_is_exposed_by_a_real_router() {
    let names = names_in_rules();
    assert!(names.len() >= 9, "{names:?}");
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
        "the rules name metrics the router does not expose: {missing:?}\n{exposed}"
    );
}
