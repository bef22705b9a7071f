//! A stand-in launcher for the kill -9 test: opens the qemu provider of a
//! configuration file, starts one VM tagged for node `argv[2]` booting
//! image `argv[3]`, prints its id and waits to be killed.

use std::io::Write;

use indexmap::IndexMap;
use nodepool_model::config::Config;
use nodepool_model::provider::{
    ImageRef, InstanceSpec, META_NODE_ID, META_POOL, META_PROVIDER, Provider,
};

#[tokio::main(flavor = "current_thread")]
async fn main() -> Result<(), String> {
    let args: Vec<String> = std::env::args().collect();
    let [_, config, node, image] = args.as_slice() else {
        return Err("usage: nodepool-qemu-test-helper CONFIG NODE_ID IMAGE_ID".into());
    };
    let config = Config::load(std::path::Path::new(config), None).map_err(|e| e.to_string())?;
    let pc = &config.providers[0];
    let provider = nodepool_qemu::QemuProvider::new(pc).map_err(|e| e.to_string())?;
    let label = pc.pools[0].labels[0].clone();
    let mut metadata = IndexMap::new();
    metadata.insert(META_NODE_ID.to_owned(), node.clone());
    metadata.insert(META_POOL.to_owned(), pc.pools[0].name.clone());
    metadata.insert(META_PROVIDER.to_owned(), pc.name.clone());
    let spec = InstanceSpec {
        name: format!("np{node}"),
        node_id: node.clone(),
        provider: pc.name.clone(),
        pool: pc.pools[0].name.clone(),
        label,
        image: ImageRef::Uploaded {
            external_id: image.clone(),
        },
        availability_zone: None,
        security_groups: Vec::new(),
        config_drive: Some(true),
        auto_floating_ip: false,
        metadata,
    };
    let id = provider
        .create_instance(&spec)
        .await
        .map_err(|e| e.to_string())?;
    let mut out = std::io::stdout();
    writeln!(out, "{id}").map_err(|e| e.to_string())?;
    out.flush().map_err(|e| e.to_string())?;
    std::future::pending::<()>().await;
    Ok(())
}
