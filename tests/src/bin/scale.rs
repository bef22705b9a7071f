//! Scale simulation of issue 16: a fleet of real `nodepool-launcher`
//! processes on the shared test ZooKeeper (a fresh chroot), simulated
//! clouds split among them, the installation brought to `--ready` spare
//! nodes, then a Zuul-like workload; per fulfilled request it reports
//! ZooKeeper writes, reads, watch events and bytes (each launcher's own
//! counters and the server's `mntr`), each launcher's CPU and peak RSS.
//! See `nodepool_tests::scale` for what is measured and how.
//!
//! ```text
//! cargo build --release -p nodepool-cli -p nodepool-tests --bins
//! eval "$(scripts/zookeeper.sh env)"
//! target/release/scale [--launchers 1,2,5,10] [--providers 20] [--labels 20]
//!     [--ready 10000] [--requests 1000] [--in-flight 64] [--boot 0.1]
//!     [--fill-limit 1800] [--launcher target/release/nodepool-launcher]
//! ```
//!
//! One run per launcher count, in order; a markdown table at the end.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, bail};
use nodepool_tests::scale::{self, Params, Report};

fn arg(name: &str) -> Option<String> {
    let args: Vec<String> = std::env::args().collect();
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1).cloned())
}

/// A numeric argument, or its default; a value that does not parse is an
/// error naming the argument.
fn num<T: std::str::FromStr>(name: &str, default: T) -> anyhow::Result<T> {
    match arg(name) {
        None => Ok(default),
        Some(v) => v
            .parse()
            .map_err(|_| anyhow::anyhow!("{name}: not a number: {v:?}")),
    }
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> anyhow::Result<()> {
    let counts: Vec<usize> = arg("--launchers")
        .unwrap_or_else(|| "1,2,5,10".into())
        .split(',')
        .map(|v| {
            v.parse()
                .map_err(|_| anyhow::anyhow!("--launchers: not a number: {v:?}"))
        })
        .collect::<anyhow::Result<_>>()?;
    let launcher_bin = arg("--launcher").map(PathBuf::from).unwrap_or_else(|| {
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../target/release/nodepool-launcher")
    });
    if !launcher_bin.exists() {
        bail!(
            "{} not found: cargo build --release -p nodepool-cli",
            launcher_bin.display()
        );
    }
    let zk_hosts = std::env::var("NODEPOOL_TEST_ZK_HOSTS")
        .context("NODEPOOL_TEST_ZK_HOSTS: start ZooKeeper with scripts/zookeeper.sh")?;
    let base = Params {
        launchers: 1,
        providers: num("--providers", 20)?,
        labels: num("--labels", 20)?,
        ready: num("--ready", 10_000)?,
        requests: num("--requests", 1000)?,
        in_flight: num("--in-flight", 64)?,
        boot_delay: num("--boot", 0.1)?,
        launcher_bin,
        zk_hosts,
        fill_limit: Duration::from_secs(num("--fill-limit", 1800)?),
        workload_limit: Duration::from_secs(600),
    };
    let mut rows = Vec::new();
    for n in counts {
        let params = Params {
            launchers: n,
            ..base.clone()
        };
        eprintln!(
            "scale: {n} launchers, {} providers, {} ready, {} requests ...",
            params.providers, params.ready, params.requests
        );
        let dir = tempfile::Builder::new()
            .prefix("nodepool-rs-scale-")
            .tempdir()?;
        match scale::run(&params, dir.path()).await {
            Ok(report) => {
                println!("{report}");
                rows.push(report.table_row());
            }
            Err(e) => {
                eprintln!("{n} launchers: {e:#}");
                rows.push(format!("| {n} | error: {e} |"));
            }
        }
    }
    println!("{}", Report::table_header());
    for r in &rows {
        println!("{r}");
    }
    Ok(())
}
