//! The Prometheus alerting rules in `deploy/prometheus/`: they load, their unit tests pass
//! (`promtool`), and every metric they name is one a real router exposes, so renaming a metric
//! without the rules fails here rather than in an operator's silent alert.
//!
//! `promtool` comes from `PROMTOOL` or `PATH` (Debian's `prometheus` package ships it; `.ci/run`
//! installs it). Without it the promtool test prints a loud `SKIPPED:` line and passes, unless
//! `ROOMROUTER_REQUIRE_PROMTOOL` is set (CI), which makes that a failure.

mod common;
mod upstream;

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::Command;

use common::{heartbeat, proxy_config, TestRouter};
use upstream::Upstream;

const RULES_DIR: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/deploy/prometheus");
const RULES: &str = "roomrouter-alerts.yml";
const RULE_TESTS: &str = "roomrouter-alerts.test.yml";

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
        let test = "the_alerting_rules_load_and_pass_their_unit_tests";
        if std::env::var_os("ROOMROUTER_REQUIRE_PROMTOOL").is_some() {
            panic!("{test}: ROOMROUTER_REQUIRE_PROMTOOL is set but promtool is not on PATH");
        }
        eprintln!("SKIPPED: {test}: no promtool on PATH (set PROMTOOL, or install prometheus)");
        return;
    };
    run(&promtool, &["check", "rules", RULES]);
    run(&promtool, &["test", "rules", RULE_TESTS]);
}

/// Every `roomrouter_*` name in the rules' expressions (with its sample suffix, as Prometheus
/// stores it: `_total`, `_bucket`).
fn names_in_rules() -> BTreeSet<String> {
    let text = std::fs::read_to_string(Path::new(RULES_DIR).join(RULES)).unwrap();
    let mut names = BTreeSet::new();
    for line in text.lines().map(str::trim) {
        let expr = line.strip_prefix("expr:").unwrap_or(line);
        if line.starts_with("summary:") || line.starts_with('#') {
            continue;
        }
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
    names
}

#[tokio::test]
async fn every_metric_the_rules_name_is_exposed_by_a_real_router() {
    let names = names_in_rules();
    assert!(names.len() >= 9, "{names:?}");
    // A router in proxy mode that has placed a room and proxied a request to a node, so
    // that the per-node histograms have samples too.
    let r = TestRouter::start(proxy_config()).await;
    let up = Upstream::start("n1").await;
    assert_eq!(heartbeat(&r, "n1", up.heartbeat()).await.status(), 200);
    assert_eq!(r.get("/rooms/alerts").send().await.unwrap().status(), 200);
    let exposed = r.metrics().await;
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
    r.stop().await;
}
