//! Fault-drill benchmark of issue 12: an operator's failure drills, each
//! on a burst of single-node requests (as Zuul submits them) to real
//! `nodepool-launcher` processes, the simulated cloud shared through its
//! state file (1 s boot), and a real store (a private ZooKeeper over TLS
//! that the drill stops and starts, or a SQLite file). For each drill it
//! reports requests fulfilled / stranded / failed, dead nodes served,
//! double allocations, servers left once the nodes were gone, and the
//! seconds from the last hand-back until the cloud held no server (the
//! launcher's leak sweep included: it deletes a server unknown at two
//! cloud listings 60 s apart), as a markdown table; then each drill's
//! details (timeline, stranded requests, launcher log counts).
//!
//! ```text
//! cargo build --release -p nodepool-cli -p nodepool-tests
//! target/release/drill [--requests 200] [--boot 1] [--max-servers 100]
//!     [--only zk-stop,sigstop,...] [--launcher target/release/nodepool-launcher]
//! ```
//!
//! Runs as root (the disk-full drill mounts a tmpfs). Needs Debian's
//! `zookeeper` package (`scripts/zookeeper.sh` installs it); the shared
//! test ZooKeeper is not used.
//!
//! A drill is one small function below. The cloud drills run two
//! providers serving one label, each its own simulated cloud; the first
//! one's API is made to fail mid-burst.

use std::future::Future;
use std::path::PathBuf;
use std::pin::Pin;
use std::time::Duration;

use anyhow::bail;
use nodepool_core::config::ApiFault;
use nodepool_tests::Backend;
use nodepool_tests::drill::{self, FinishLimits, Params, Report};
use nodepool_tests::faults::Ambiguity;

fn arg(name: &str) -> Option<String> {
    let args: Vec<String> = std::env::args().collect();
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1).cloned())
}

/// A drill: `None` when it cannot run yet.
type Scenario = fn(Params) -> Pin<Box<dyn Future<Output = Option<Report>> + Send>>;

/// Issue 12 (1): ZooKeeper stopped for 5 s mid-burst, one launcher,
/// `zookeeper-timeout: 10` (the session survives).
fn zk_stop(p: Params) -> Pin<Box<dyn Future<Output = Option<Report>> + Send>> {
    Box::pin(async move { Some(drill::zookeeper_blips(&p, 1, Duration::from_secs(5)).await) })
}

/// The same, three times in a row.
fn zk_stop_x3(p: Params) -> Pin<Box<dyn Future<Output = Option<Report>> + Send>> {
    Box::pin(async move { Some(drill::zookeeper_blips(&p, 3, Duration::from_secs(5)).await) })
}

/// ZooKeeper stopped for longer than the session timeout (3 s).
fn zk_stop_expired(p: Params) -> Pin<Box<dyn Future<Output = Option<Report>> + Send>> {
    Box::pin(async move {
        Some(drill::zookeeper_outage_past_session_timeout(&p, Duration::from_secs(8)).await)
    })
}

/// Issue 12 (3): SIGSTOP of one of two launchers past its session
/// timeout, then SIGCONT.
fn sigstop(p: Params) -> Pin<Box<dyn Future<Output = Option<Report>> + Send>> {
    Box::pin(async move { Some(drill::session_expiry_sigstop(&p, Backend::ZooKeeper).await) })
}

/// kill -9 of one of two launchers (works since issue 5: the baseline).
fn kill_9(p: Params) -> Pin<Box<dyn Future<Output = Option<Report>> + Send>> {
    Box::pin(async move { Some(drill::kill_9(&p, Backend::ZooKeeper).await) })
}

/// Issue 12 (3): the SQLite file's disk full for 6 s mid-burst.
fn disk_full(p: Params) -> Pin<Box<dyn Future<Output = Option<Report>> + Send>> {
    Box::pin(async move { Some(drill::sqlite_disk_full(&p, Duration::from_secs(6)).await) })
}

/// Issue 12 (2): 10% of node writes applied but reported failed
/// (in-process launcher: the release binary has no fault hook).
fn ambiguous(p: Params) -> Pin<Box<dyn Future<Output = Option<Report>> + Send>> {
    Box::pin(
        async move { Some(drill::ambiguous_writes(&p, Ambiguity::node_updates(12, 0.1)).await) },
    )
}

/// Issue 12 (4): one of two providers' API hangs for 60 s mid-burst
/// (calls time out after 10 s).
fn hung_cloud(p: Params) -> Pin<Box<dyn Future<Output = Option<Report>> + Send>> {
    Box::pin(
        async move { Some(drill::cloud_fault(&p, ApiFault::Hang, Duration::from_secs(60)).await) },
    )
}

/// Issue 12 (4): one of two providers answers 429 with `Retry-After: 5`
/// for 60 s mid-burst.
fn cloud_429(p: Params) -> Pin<Box<dyn Future<Output = Option<Report>> + Send>> {
    Box::pin(async move {
        let fault = ApiFault::RateLimit {
            retry_after: Some(Duration::from_secs(5)),
        };
        Some(drill::cloud_fault(&p, fault, Duration::from_secs(60)).await)
    })
}

/// Issue 16: three launchers on a three-server ensemble, the leader
/// killed (SIGKILL) mid-burst and started again.
fn ensemble_leader(p: Params) -> Pin<Box<dyn Future<Output = Option<Report>> + Send>> {
    Box::pin(async move { Some(drill::ensemble_leader_killed(&p).await) })
}

/// Every drill, by the name `--only` takes, in the order they run.
const SCENARIOS: [(&str, &str, Scenario); 10] = [
    ("zk-stop", "ZooKeeper stop 5 s", zk_stop),
    ("zk-stop-x3", "ZooKeeper stop 5 s x3", zk_stop_x3),
    (
        "zk-expired",
        "ZooKeeper stop 8 s (session expires)",
        zk_stop_expired,
    ),
    ("sigstop", "session expiry (SIGSTOP 1 of 2)", sigstop),
    ("kill-9", "kill -9 (1 of 2)", kill_9),
    ("disk-full", "SQLite disk full 6 s", disk_full),
    ("ambiguous", "ambiguous node writes (10%)", ambiguous),
    ("hung-cloud", "hung cloud (1 of 2 providers)", hung_cloud),
    ("429-cloud", "429 cloud (1 of 2 providers)", cloud_429),
    (
        "zk-leader",
        "ZooKeeper x3: leader killed (3 launchers)",
        ensemble_leader,
    ),
];

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> anyhow::Result<()> {
    let requests: usize = arg("--requests")
        .and_then(|v| v.parse().ok())
        .unwrap_or(200);
    let boot_delay: f64 = arg("--boot").and_then(|v| v.parse().ok()).unwrap_or(1.0);
    let max_servers: u32 = arg("--max-servers")
        .and_then(|v| v.parse().ok())
        .unwrap_or(100);
    let only: Option<Vec<String>> =
        arg("--only").map(|v| v.split(',').map(str::to_owned).collect());
    if let Some(names) = &only
        && let Some(bad) = names
            .iter()
            .find(|n| !SCENARIOS.iter().any(|(key, _, _)| key == n))
    {
        let keys: Vec<&str> = SCENARIOS.iter().map(|(k, _, _)| *k).collect();
        bail!("unknown drill {bad:?}; drills: {}", keys.join(", "));
    }
    let launcher_bin = arg("--launcher").map(PathBuf::from).unwrap_or_else(|| {
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../target/release/nodepool-launcher")
    });
    if !launcher_bin.exists() {
        bail!(
            "{} not found: cargo build --release -p nodepool-cli",
            launcher_bin.display()
        );
    }
    let params = Params {
        requests,
        boot_delay,
        max_servers,
        providers: 1,
        launcher_bin,
        settle: Duration::from_secs(120),
        limits: FinishLimits {
            nodes_gone: Duration::from_secs(60),
            servers_grace: Duration::from_secs(3),
            // Two cloud listings 60 s apart, and then some.
            zero_servers: Duration::from_secs(150),
        },
    };

    let mut rows = Vec::new();
    let mut details = Vec::new();
    for (key, title, run) in SCENARIOS {
        if only.as_ref().is_some_and(|o| !o.iter().any(|n| n == key)) {
            continue;
        }
        eprintln!("drill {key}: {title} ...");
        // Its own task, so a drill that panics (a server that would not
        // start, no root for the tmpfs) is reported and the others run.
        match tokio::spawn(run(params.clone())).await {
            Ok(Some(report)) => {
                eprintln!("{report}");
                rows.push(report.table_row());
                details.push(report.to_string());
            }
            Ok(None) => rows.push(format!("| {title} | | not yet | | | | | | | | |")),
            Err(e) => rows.push(format!("| {title} | | error: {e} | | | | | | | | |")),
        }
    }
    println!(
        "fault drills: bursts of {requests} single-node requests, boot {boot_delay} s, max-servers {max_servers}\n"
    );
    println!("{}", Report::table_header());
    for r in &rows {
        println!("{r}");
    }
    println!();
    for d in &details {
        println!("{d}");
    }
    Ok(())
}
