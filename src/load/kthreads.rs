//! How long the kernel's own threads ran during a measurement: the machine's part of a tail.
//!
//! Kernel threads (the children of `kthreadd`, PID 2: memory reclaim and monitoring such as
//! `kdamond`, RCU, workqueues, soft interrupts) take a core from whatever runs there, the
//! server under test and the load tool alike, and an idle machine does not show the work a
//! run makes for them. A constant-rate run reads their run time from `/proc/PID/schedstat`
//! before and after, so a tail can be told from the machine's. Linux only; where `/proc`
//! shows no kernel threads (another OS, a PID namespace of its own) there is no figure.

use serde::Serialize;

/// The kernel threads' run time over a measurement.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct KernelThreads {
    /// Kernel threads seen at both ends.
    pub threads: usize,
    /// Their run time in between, all together, in milliseconds.
    pub run_ms: f64,
    /// The one that ran longest (`-` if none ran).
    pub busiest: String,
    pub busiest_ms: f64,
}

/// The kernel threads' cumulative run time at one moment.
#[derive(Debug, Clone)]
pub struct Snapshot {
    /// (pid, name, run time in ns)
    threads: Vec<(u32, String, u64)>,
}

impl Snapshot {
    /// Reads every kernel thread's run time so far; `None` where the platform does not tell.
    pub fn take() -> Option<Snapshot> {
        let kthreadd = std::fs::read_to_string("/proc/2/stat").ok()?;
        if parse_stat(&kthreadd)?.0 != "kthreadd" {
            return None; // PID 2 is somebody else here: kernel threads are not visible
        }
        let mut threads = Vec::new();
        for entry in std::fs::read_dir("/proc").ok()?.flatten() {
            let Some(pid) = entry
                .file_name()
                .to_str()
                .and_then(|s| s.parse::<u32>().ok())
            else {
                continue;
            };
            // A thread that exits between the two reads is skipped.
            let Some(stat) = read(pid, "stat") else {
                continue;
            };
            let Some((name, 2)) = parse_stat(&stat) else {
                continue; // not a kernel thread
            };
            if let Some(ns) = read(pid, "schedstat").as_deref().and_then(parse_schedstat) {
                threads.push((pid, name.to_string(), ns));
            }
        }
        Some(Snapshot { threads })
    }

    /// What the threads of this snapshot ran since it was taken; `None` if it holds none.
    pub fn since(&self) -> Option<KernelThreads> {
        let now = self.threads.iter().filter_map(|(pid, name, before)| {
            let after = read(*pid, "schedstat")
                .as_deref()
                .and_then(parse_schedstat)?;
            Some((name.as_str(), after.saturating_sub(*before)))
        });
        summarize(now)
    }
}

impl KernelThreads {
    /// What the busiest thread is, when it is one an operator can do something about.
    pub fn note(&self) -> Option<&'static str> {
        // DAMON's monitor (`kdamond.N`), which some VMs run for proactive memory reclaim.
        self.busiest.starts_with("kdamond").then_some(
            "kdamond is the kernel's DAMON memory monitor (proactive reclaim on some VMs): it takes whole cores for milliseconds at a time; see deploy/README.md",
        )
    }
}

/// Totals `(name, ns)` pairs; `None` for none.
fn summarize<'a>(ran: impl Iterator<Item = (&'a str, u64)>) -> Option<KernelThreads> {
    let (mut threads, mut total, mut busiest) = (0usize, 0u64, ("-", 0u64));
    for (name, ns) in ran {
        threads += 1;
        total += ns;
        if ns > busiest.1 {
            busiest = (name, ns);
        }
    }
    (threads > 0).then(|| KernelThreads {
        threads,
        run_ms: total as f64 / 1e6,
        busiest: busiest.0.to_string(),
        busiest_ms: busiest.1 as f64 / 1e6,
    })
}

fn read(pid: u32, file: &str) -> Option<String> {
    std::fs::read_to_string(format!("/proc/{pid}/{file}")).ok()
}

/// `/proc/PID/stat` -> (name, parent pid). The name is between the first `(` and the last
/// `)`, and may hold spaces and parentheses itself.
fn parse_stat(s: &str) -> Option<(&str, u32)> {
    let open = s.find('(')?;
    let close = s.rfind(')')?;
    let name = s.get(open + 1..close)?;
    let mut rest = s.get(close + 1..)?.split_whitespace();
    let _state = rest.next()?;
    Some((name, rest.next()?.parse().ok()?))
}

/// `/proc/PID/schedstat` -> time spent running, in ns (its first field).
fn parse_schedstat(s: &str) -> Option<u64> {
    s.split_whitespace().next()?.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stat_lines_give_the_name_and_the_parent() {
        assert_eq!(
            parse_stat("77 (kdamond.0) S 2 0 0 0 -1 2129984 0 0"),
            Some(("kdamond.0", 2))
        );
        // Names may hold spaces and parentheses; the last `)` ends them.
        assert_eq!(
            parse_stat("913 (kworker/1:4-(events) x) I 2 0 0"),
            Some(("kworker/1:4-(events) x", 2))
        );
        assert_eq!(parse_stat("1 (init) S 0 1 1"), Some(("init", 0)));
        assert_eq!(parse_stat("garbage"), None);
        assert_eq!(parse_stat("5 (cut"), None);
        assert_eq!(parse_stat("5 (x) S"), None);
    }

    #[test]
    fn schedstat_gives_the_run_time() {
        assert_eq!(parse_schedstat("26612345 1234 56\n"), Some(26_612_345));
        assert_eq!(parse_schedstat(""), None);
        assert_eq!(parse_schedstat("x 1 2"), None);
    }

    #[test]
    fn the_summary_totals_and_names_the_busiest() {
        let k = summarize(
            [
                ("rcu_sched", 3_000_000),
                ("kdamond.0", 26_600_000),
                ("ksoftirqd/1", 0),
            ]
            .into_iter(),
        )
        .unwrap();
        assert_eq!(k.threads, 3);
        assert!((k.run_ms - 29.6).abs() < 1e-9, "{k:?}");
        assert_eq!((k.busiest.as_str(), k.busiest_ms), ("kdamond.0", 26.6));
        assert!(k.note().is_some_and(|n| n.contains("DAMON")), "{k:?}");
        let rcu = summarize([("rcu_preempt", 6_300_000)].into_iter()).unwrap();
        assert_eq!(rcu.note(), None, "nothing to say about RCU");
        let idle = summarize([("a", 0)].into_iter()).unwrap();
        assert_eq!((idle.busiest.as_str(), idle.run_ms), ("-", 0.0));
        assert_eq!(summarize(std::iter::empty()), None);
    }

    #[cfg(target_os = "linux")]
    #[test]
    fn a_snapshot_sees_the_kernel_threads_where_proc_shows_them() {
        let Some(s) = Snapshot::take() else {
            eprintln!("SKIP: /proc shows no kernel threads here (PID namespace?)");
            return;
        };
        // kthreadd always has children (workqueue workers at least), and only they count:
        // not this test's own process, nor kthreadd itself.
        assert!(!s.threads.is_empty());
        let me = std::process::id();
        assert!(s.threads.iter().all(|(pid, _, _)| *pid != me && *pid != 2));
        // Threads may exit in between, but not all of them.
        let k = s.since().expect("kernel threads outlive a test");
        assert!(k.threads > 0 && k.threads <= s.threads.len(), "{k:?}");
        assert!(k.run_ms >= 0.0 && k.busiest_ms <= k.run_ms + 1e-9, "{k:?}");
    }
}
