//! `nodepool job-create`, `job-list`, `job-delete` as real processes, on a
//! SQLite file and a ZooKeeper chroot.

mod common;

use common::{Backend, Fixture, header, row, row_count};
use nodepool_core::model::{Node, NodeState, epoch_now};

async fn job_rules_are_created_listed_and_deleted(backend: Backend) {
    let f = Fixture::new(backend).await;
    let out = f.run(&["job-create", "folder/flaky", "--hold", "2"]).await;
    assert_eq!(out.ok(), "job folder/flaky: holding up to 2 failed nodes\n");
    let rule = f
        .store
        .get_job_hold("folder/flaky")
        .await
        .expect("get")
        .expect("stored");
    assert_eq!(rule.hold_on_failure, 2);

    // A node held for the job counts; one held for another job does not.
    for job in ["folder/flaky", "other"] {
        let mut n = Node::new(
            NodeState::Hold,
            epoch_now(),
            "sim",
            "main",
            vec!["small".into()],
        );
        n.hold_job = Some(job.into());
        f.store.create_node(&n).await.expect("node");
    }
    let t = f.run(&["job-list"]).await.ok().to_owned();
    assert_eq!(header(&t), ["Name", "Hold on Failure", "Held"]);
    assert_eq!(row(&t, "folder/flaky"), ["folder/flaky", "2", "1"]);
    assert_eq!(row_count(&t), 1);
    let j: serde_json::Value =
        serde_json::from_str(f.run(&["--json", "job-list"]).await.ok()).expect("json");
    assert_eq!(
        j,
        serde_json::json!([{"name": "folder/flaky", "hold_on_failure": 2, "held": 1}])
    );

    // Python Nodepool's option name works too, and replaces the rule.
    let out = f
        .run(&["job-create", "folder/flaky", "--hold-on-failure", "3"])
        .await;
    assert_eq!(
        out.ok(),
        "job folder/flaky: holding up to 3 failed nodes (was 2)\n"
    );
    f.run(&["job-create", "x"]).await.fails_with_usage("--hold");

    let out = f.run(&["job-delete", "folder/flaky"]).await;
    assert_eq!(
        out.ok(),
        "job folder/flaky: no longer holding failed nodes (held nodes stay)\n"
    );
    f.run(&["job-delete", "folder/flaky"])
        .await
        .fails_with("no hold rule for job \"folder/flaky\"");
    let t = f.run(&["job-list"]).await.ok().to_owned();
    assert_eq!(row_count(&t), 0);
}
both_stores!(job_rules_are_created_listed_and_deleted);

trait Usage {
    fn fails_with_usage(&self, needle: &str);
}

impl Usage for common::Out {
    /// clap's usage errors: exit 1 (as Nodepool's CLI), the option named.
    fn fails_with_usage(&self, needle: &str) {
        assert_eq!(self.code, Some(1), "{}", self.stderr);
        assert!(self.stderr.contains(needle), "{}", self.stderr);
    }
}
