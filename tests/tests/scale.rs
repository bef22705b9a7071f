//! Issue 16's scale simulation, small: three `nodepool-launcher` processes
//! on the shared test ZooKeeper (a fresh chroot), two simulated providers
//! each, 30 ready spares kept by `min-ready`, and 50 Zuul-like requests
//! (submit, accept, in-use, used). It asserts what the benchmark's
//! figures rest on: every request fulfilled, no node handed to two
//! requests, the fleet back to its spares and nothing else; and that the
//! counters it reads are there and consistent (every launcher's client
//! counted traffic, writes at least one per request, the mirrors hold the
//! installation, the server saw the packets).
//!
//! ```text
//! cargo test -p nodepool-tests --test scale
//! ```

use std::time::Duration;

use nodepool_tests::scale::{self, Params};
use nodepool_tests::{workspace_binary, zk_hosts};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_small_fleet_serves_every_request_once_and_counts_its_traffic() {
    let launcher_bin =
        tokio::task::spawn_blocking(|| workspace_binary("nodepool-cli", "nodepool-launcher"))
            .await
            .expect("build nodepool-launcher");
    let params = Params {
        launchers: 3,
        providers: 6,
        labels: 3,
        ready: 30,
        requests: 50,
        in_flight: 16,
        boot_delay: 0.1,
        launcher_bin,
        zk_hosts: zk_hosts(),
        fill_limit: Duration::from_secs(60),
        workload_limit: Duration::from_secs(60),
    };
    let dir = tempfile::tempdir().expect("tempdir");
    let report = scale::run(&params, dir.path())
        .await
        .unwrap_or_else(|e| panic!("the simulation could not run: {e:#}"));
    eprintln!("{report}");
    assert_eq!(report.problems(), Vec::<String>::new(), "{report}");

    assert_eq!(report.per_launcher.len(), 3);
    for l in &report.per_launcher {
        assert_eq!(l.providers.len(), 2, "{report}");
        // Every launcher mirrors /nodepool and hears of every change.
        assert!(
            l.workload.watch_events > 0.0 && l.workload.reads > 0.0,
            "{}: no traffic counted\n{report}",
            l.name
        );
        assert!(
            l.workload.bytes_received > 0.0 && l.fill.bytes_received > 0.0,
            "{report}"
        );
        assert!(
            l.cached_records >= params.ready as f64,
            "{}: mirror of {} records, fewer than the {} nodes\n{report}",
            l.name,
            l.cached_records,
            params.ready
        );
        assert!(l.peak_rss_mib > 0.0 && l.total_cpu > 0.0, "{report}");
        // A mirror reads at most each changed record once, and fewer:
        // locks and the launcher's own writes are not read back.
        assert!(
            l.workload.reads < l.workload.watch_events,
            "{}: {} reads for {} watch events per request\n{report}",
            l.name,
            l.workload.reads,
            l.workload.watch_events
        );
    }
    let launchers = report.launchers_traffic();
    // Each request is served by a launcher writing the allocation and a
    // replacement spare at least, and Zuul writes its own part.
    assert!(
        launchers.writes >= params.requests as f64,
        "launcher writes {} < {} requests\n{report}",
        launchers.writes,
        params.requests
    );
    assert!(
        report.client.writes >= 4.0 * params.requests as f64,
        "client writes {} < 4 per request (submit, lock, delete request, in-use, used)\n{report}",
        report.client.writes
    );
    // Every write makes a watch event in each of the three mirrors (and
    // the client's).
    assert!(
        launchers.watch_events >= 3.0 * params.requests as f64,
        "{report}"
    );
    let received = report.server_after.get("zk_packets_received")
        - report.server_before.get("zk_packets_received");
    assert!(
        received >= launchers.writes + report.client.writes,
        "the server received {received} packets, fewer than the writes counted\n{report}"
    );
}
