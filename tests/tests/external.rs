//! `driver: external` as a whole system: a launcher on the real ZooKeeper,
//! with its provider built as the daemon builds it, serves requests with
//! servers of the example provider program, deletes them after use, and
//! its leak cleanup deletes a server the program's cloud has but the
//! store does not know.

use std::path::PathBuf;
use std::time::Duration;

use indexmap::IndexMap;
use nodepool_core::launcher::{LauncherSettings, ObserverIntervals, ProviderFactory};
use nodepool_core::provider::{
    ImageRef, InstanceSpec, META_NODE_ID, META_POOL, META_PROVIDER, Provider,
};
use nodepool_external::ExternalProvider;
use nodepool_requestor::{NewRequest, Outcome, Requestor};
use nodepool_tests::{Backend, RunningLauncher, TestEnv, eventually};

const WAIT: Duration = Duration::from_secs(60);

fn example_program() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../examples/external_provider/example_cloud.py")
        .canonicalize()
        .expect("the example program exists")
}

fn body(state: &std::path::Path) -> String {
    format!(
        r#"
labels:
  - name: small
providers:
  - name: ext
    driver: external
    command: [{program:?}]
    timeout: 30
    environment: {{EXAMPLE_CLOUD_STATE: {state:?}}}
    cloud-images: [{{name: base, image-name: base-image}}]
    pools:
      - name: main
        max-servers: 5
        labels:
          - {{name: small, cloud-image: base, flavor-name: small}}
"#,
        program = example_program().display().to_string(),
        state = state.display().to_string(),
    )
}

/// The servers of the example cloud tagged for provider `ext`, seen
/// through a program of the test's own.
async fn ext_servers(cloud: &ExternalProvider) -> Vec<String> {
    cloud
        .list_instances()
        .await
        .expect("list servers")
        .into_iter()
        .filter(|i| i.provider_name().as_deref() == Some("ext"))
        .map(|i| i.external_id)
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_are_served_by_the_example_program_and_leaks_cleaned() {
    let env = TestEnv::new(Backend::ZooKeeper);
    let state = env.dir.path().join("cloud.json");
    let cfg = env.config(&body(&state));
    let factory: ProviderFactory = std::sync::Arc::new(nodepool_cli::daemon::make_provider);
    let l = RunningLauncher::start_on(
        env.store(&cfg).await,
        &cfg,
        LauncherSettings {
            hostname: "ext-l1".into(),
            observer: ObserverIntervals {
                instances: Duration::from_secs(1),
                ..ObserverIntervals::default()
            },
            shutdown_grace: Duration::from_secs(10),
            ..LauncherSettings::default()
        },
        factory,
    );
    let cloud = ExternalProvider::new(&cfg.providers[0]).expect("the test's own view");

    // A request is served with a server of the program's cloud.
    let zuul = Requestor::new(env.store(&cfg).await, "zuul-ext");
    let id = zuul
        .submit(&NewRequest::new(vec!["small".into(), "small".into()]))
        .await
        .expect("submit");
    let Outcome::Fulfilled(req) = zuul.wait(&id, WAIT).await.expect("wait") else {
        panic!("request {id} failed")
    };
    let mut set = zuul.accept(&id, &req.value).await.expect("accept");
    assert_eq!(set.nodes.len(), 2);
    let servers = ext_servers(&cloud).await;
    for n in &set.nodes {
        let external = n.node.external_id.clone().expect("the node has a server");
        assert!(
            servers.contains(&external),
            "node {} is server {external} of the program's cloud: {servers:?}",
            n.id
        );
    }
    zuul.use_nodes(&mut set, "org/project")
        .await
        .expect("in-use");
    zuul.return_nodes(set).await.expect("used");
    let store = zuul.store().clone();
    eventually("used nodes and their servers deleted", WAIT, || async {
        store.list_nodes().await.expect("list").records.is_empty()
            && ext_servers(&cloud).await.is_empty()
    })
    .await;

    // A server tagged for `ext` whose node the store does not have.
    let label = cfg.providers[0].pools[0]
        .label("small")
        .expect("label")
        .clone();
    let mut metadata = IndexMap::new();
    metadata.insert(META_NODE_ID.to_owned(), "0000777777".to_owned());
    metadata.insert(META_PROVIDER.to_owned(), "ext".to_owned());
    metadata.insert(META_POOL.to_owned(), "main".to_owned());
    let leaked = cloud
        .create_instance(&InstanceSpec {
            name: "np0000777777".into(),
            node_id: "0000777777".into(),
            provider: "ext".into(),
            pool: "main".into(),
            label,
            image: ImageRef::Cloud {
                id: None,
                name: "base-image".into(),
            },
            availability_zone: None,
            security_groups: Vec::new(),
            config_drive: None,
            auto_floating_ip: false,
            metadata,
        })
        .await
        .expect("create the leaked server");
    assert_eq!(ext_servers(&cloud).await, vec![leaked.clone()]);
    eventually(
        "the leaked server deleted by the launcher",
        WAIT,
        || async { ext_servers(&cloud).await.is_empty() },
    )
    .await;
    l.stop().await;
}
