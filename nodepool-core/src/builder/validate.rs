//! Boot tests of new uploads (a provider diskimage's `validate`): after an
//! upload finishes and before its record becomes `ready`, the builder
//! boots one server from the new cloud image with the first pool label of
//! the provider that uses the image, waits for it to be ACTIVE and for its
//! SSH server (nodescan), runs the validation script on it as the
//! diskimage's `username` with its `private-key` (the launcher's ready
//! script runner), and deletes the server, whatever happened.
//!
//! The server is tagged with the provider's name and
//! [`META_VALIDATION`](crate::provider::META_VALIDATION) (no node id): a
//! launcher's leak cleanup leaves it alone while its upload is
//! `uploading` and deletes it once it is not (a builder that died during
//! the test).

use std::time::Duration;

use super::{ProviderEntry, Shared};
use crate::config::{Config, ImageSource, ReadyScript};
use crate::launcher::nodescan;
use crate::launcher::ready_script::{self, ReadyScriptRun};
use crate::planner::leaks::validation_tag;
use crate::planner::{LaunchImage, PoolKey};
use crate::provider::{META_NODE_ID, META_VALIDATION};

/// The upload being tested.
pub(crate) struct Candidate<'a> {
    /// Diskimage name.
    pub image: &'a str,
    /// Build id.
    pub build: &'a str,
    /// Upload id.
    pub upload: &'a str,
    /// The new cloud image.
    pub external_id: &'a str,
}

/// Boot-tests `candidate` with `script`; `Err` is why it failed. The test
/// server is deleted before this returns (a deletion that fails is a
/// failure too: the upload is not `ready` while its test server may live).
pub(crate) async fn validate(
    shared: &Shared,
    config: &Config,
    entry: &ProviderEntry,
    candidate: &Candidate<'_>,
    script: &ReadyScript,
) -> Result<(), String> {
    let pc = &entry.config;
    let p = &entry.provider;
    if p.skip_nodescan() {
        // No network to reach a server on (the simulated cloud without
        // `data-plane-host`): the script could never run.
        return Err(format!(
            "the servers of {} cannot be reached (it skips nodescan)",
            pc.name
        ));
    }
    let (pool, label) = pc
        .pools
        .iter()
        .find_map(|pool| {
            pool.labels
                .iter()
                .find(|l| matches!(&l.image, ImageSource::DiskImage(d) if d == candidate.image))
                .map(|l| (pool.name.clone(), l.name.clone()))
        })
        .ok_or_else(|| format!("no pool label of {} boots {}", pc.name, candidate.image))?;
    let di = config
        .diskimage(candidate.image)
        .ok_or_else(|| format!("diskimage {} is not configured", candidate.image))?;
    let private_key = di
        .private_key
        .clone()
        .ok_or_else(|| format!("diskimage {} has no private-key", candidate.image))?;
    let connection = pc.diskimage(candidate.image).map_or_else(
        || ("ssh".to_owned(), 22),
        |d| (d.connection_type.clone(), d.connection_port),
    );
    let target = PoolKey {
        provider: pc.name.clone(),
        pool,
    };
    let image = LaunchImage::Upload {
        image: candidate.image.to_owned(),
        build: candidate.build.to_owned(),
        upload: candidate.upload.to_owned(),
        external_id: candidate.external_id.to_owned(),
    };
    let name = format!("np-validate-{}-{}", candidate.image, candidate.upload);
    let (mut spec, _, _) = crate::launcher::tasks::instance_spec(
        config,
        &target,
        &label,
        &image,
        None,
        &name,
        ("", None),
    )
    .ok_or_else(|| format!("cannot describe a server of label {label}"))?;
    spec.name = name.clone();
    spec.metadata.shift_remove(META_NODE_ID);
    spec.metadata.insert(
        META_VALIDATION.to_owned(),
        validation_tag(candidate.image, candidate.build, candidate.upload),
    );
    let run = ReadyScriptRun {
        script: script.clone(),
        username: di.username.clone(),
        private_key,
    };
    tracing::info!(image = %candidate.image, provider = %pc.name, upload = %candidate.upload, label = %label, server = %name, "booting a server to validate the upload");
    let id = tokio::time::timeout(p.api_timeout(), p.create_instance(&spec))
        .await
        .map_err(|_| "creating the test server timed out".to_owned())?
        .map_err(|e| format!("cannot create the test server: {e}"))?;
    let tested = async {
        let server = tokio::time::timeout(pc.launch_timeout, p.wait_for_instance(&id, &spec))
            .await
            .map_err(|_| {
                format!(
                    "the test server was not active within {:?}",
                    pc.launch_timeout
                )
            })?
            .map_err(|e| format!("the test server failed: {e}"))?;
        let host = server
            .interface_ip
            .clone()
            .ok_or("the test server has no address")?;
        let port = p.connection_port(&server).unwrap_or(connection.1);
        let host_keys = nodescan::scan(&host, port, &connection.0, pc.boot_timeout)
            .await
            .map_err(|e| format!("nodescan of {host}:{port}: {e}"))?;
        ready_script::run(
            &run,
            ready_script::Target {
                node_id: &name,
                label: &label,
                host: &host,
                port,
                host_keys: &host_keys,
            },
        )
        .await
    };
    let outcome = tokio::select! {
        r = tested => r,
        _ = shared.work.cancelled() => Err("the builder is stopping".to_owned()),
    };
    let deleted = delete_server(shared, entry, &id).await;
    match (outcome, deleted) {
        (Ok(()), Ok(())) => Ok(()),
        (Err(why), Ok(())) | (Ok(()), Err(why)) => Err(why),
        (Err(why), Err(also)) => Err(format!("{why}; {also}")),
    }
}

/// Deletes the test server, bounded by the builder's delete timeout.
async fn delete_server(shared: &Shared, entry: &ProviderEntry, id: &str) -> Result<(), String> {
    let limit: Duration = shared.settings.delete_timeout;
    match tokio::time::timeout(limit, entry.provider.delete_instance(id)).await {
        Ok(Ok(())) => {
            tracing::info!(provider = %entry.config.name, server = %id, "deleted the test server");
            Ok(())
        }
        Ok(Err(e)) => Err(format!("cannot delete the test server {id}: {e}")),
        Err(_) => Err(format!(
            "deleting the test server {id} took longer than {limit:?}"
        )),
    }
}
