//! `driver: external` from the `nodepool` CLI, run as a real process: the
//! example provider program keeps its cloud in a state file, so the CLI's
//! own program sees servers made by another, and `alien-list` names the
//! ones the store does not know.

mod common;

use common::{Backend, Fixture, row};
use indexmap::IndexMap;
use nodepool_core::provider::{
    ImageRef, InstanceSpec, META_NODE_ID, META_POOL, META_PROVIDER, Provider,
};
use nodepool_external::ExternalProvider;

fn body(state: &std::path::Path) -> String {
    let program = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../examples/external_provider/example_cloud.py")
        .canonicalize()
        .expect("the example program exists");
    format!(
        "labels: [{{name: small}}]
providers:
  - name: ext
    driver: external
    command: [{:?}, {:?}]
    cloud-images: [{{name: base, image-name: base-image}}]
    pools:
      - name: main
        labels: [{{name: small, cloud-image: base, flavor-name: small}}]
",
        program.display().to_string(),
        state.display().to_string()
    )
}

/// A server of the cloud tagged for node `node` of provider `ext`.
async fn tagged_server(cloud: &ExternalProvider, f: &Fixture, node: &str) -> String {
    let mut metadata = IndexMap::new();
    metadata.insert(META_NODE_ID.to_owned(), node.to_owned());
    metadata.insert(META_PROVIDER.to_owned(), "ext".to_owned());
    metadata.insert(META_POOL.to_owned(), "main".to_owned());
    let label = f.config.providers[0].pools[0]
        .label("small")
        .expect("label")
        .clone();
    cloud
        .create_instance(&InstanceSpec {
            name: format!("np{node}"),
            node_id: node.to_owned(),
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
        .expect("create")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn alien_list_names_servers_of_the_program_the_store_does_not_know() {
    let state_dir = tempfile::tempdir().expect("tempdir");
    let state = state_dir.path().join("cloud.json");
    let f = Fixture::with_body(Backend::Sqlite, &body(&state)).await;
    let cloud = ExternalProvider::new(&f.config.providers[0]).expect("provider");
    let alien = tagged_server(&cloud, &f, "0000000777").await;
    let out = f.run(&["alien-list"]).await;
    let t = out.ok();
    assert_eq!(common::row_count(t), 1, "{t}");
    let cells = row(t, &alien);
    assert_eq!(cells[..3], ["ext", "np0000000777", alien.as_str()]);
    cloud.delete_instance(&alien).await.expect("delete");
    let out = f.run(&["alien-list"]).await;
    assert_eq!(common::row_count(out.ok()), 0, "{}", out.stdout);
}
