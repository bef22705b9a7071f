//! The example provider program passes the Provider conformance suite
//! through the protocol, with the capabilities its handshake declares.

use nodepool_model::provider::Provider;

mod support;

use support::{EXAMPLE_CAPABILITIES, Example};

mod conformance {
    use super::Example;
    nodepool_model::provider_conformance_tests!(Example::new());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn handshake_capabilities_match_the_harness() {
    let cloud = Example::new();
    let p = cloud.provider();
    let caps = p.capabilities().await.expect("handshake");
    let flag = |k: &str| caps.get(k).and_then(|v| v.as_bool());
    assert_eq!(
        flag("floating_ips"),
        Some(EXAMPLE_CAPABILITIES.floating_ips)
    );
    assert_eq!(flag("ports"), Some(EXAMPLE_CAPABILITIES.ports));
    assert_eq!(flag("console_log"), Some(EXAMPLE_CAPABILITIES.console_log));
    assert_eq!(flag("skip_nodescan"), Some(true));
    assert!(p.skip_nodescan(), "the handshake's skip_nodescan is kept");
}

/// A program started again (or a second launcher's) sees the same cloud:
/// it lives in the state file.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_program_sees_the_same_cloud() {
    use nodepool_model::conformance::provider::{Harness, random_node_id, spec_for};
    let cloud = Example::new();
    let first = cloud.provider();
    let second = cloud.provider();
    let spec = spec_for(&cloud, &first, &random_node_id(), cloud.label());
    let id = first.create_instance(&spec).await.expect("create");
    let seen = second
        .get_instance(&id)
        .await
        .expect("get")
        .expect("the second program sees the server");
    assert_eq!(seen.node_id(), Some(spec.node_id.clone()));
    assert_ne!(first.program_pid().await, second.program_pid().await);
    second.delete_instance(&id).await.expect("delete");
    assert_eq!(first.get_instance(&id).await.expect("get"), None);
    let state = std::fs::read_to_string(&cloud.state).expect("state file");
    assert!(!state.contains(&id), "deleted from the state file: {state}");
}
