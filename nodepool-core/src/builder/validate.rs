//! Servers the builder boots to run a script on: the boot test of a new
//! upload (a provider diskimage's or snapshot image's `validate`), and the
//! setup server of a snapshot image (its `setup`). Either way the server
//! is booted with the first pool label of the provider that uses the
//! image, waited for until ACTIVE and for its SSH server (nodescan), the
//! script runs on it as the image's `username` with its `private-key` (the
//! launcher's ready script runner), and the server is deleted, whatever
//! happened.
//!
//! The server is tagged with the provider's name and
//! [`META_VALIDATION`](crate::provider::META_VALIDATION) naming the upload
//! it works for (no node id): a launcher's leak cleanup leaves it alone
//! while that upload is `uploading` and deletes it once it is not (a
//! builder that died meanwhile).

use std::time::Duration;

use super::{ProviderEntry, Shared};
use crate::config::{Config, ImageSource, ProviderConfig, ReadyScript};
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
    let job = Job {
        purpose: "test",
        image: candidate.image,
        name: format!("np-validate-{}-{}", candidate.image, candidate.upload),
        boot: LaunchImage::Upload {
            image: candidate.image.to_owned(),
            build: candidate.build.to_owned(),
            upload: candidate.upload.to_owned(),
            external_id: candidate.external_id.to_owned(),
        },
        tag: validation_tag(candidate.image, candidate.build, candidate.upload),
        script,
        size: None,
    };
    boot_and_run(shared, config, entry, &job, async |_: &str| Ok(())).await
}

/// A server to boot for `image` and the script to run on it.
pub(crate) struct Job<'a> {
    /// What the server is, in messages: "test", "setup".
    pub purpose: &'static str,
    /// The image the server is for: its pool label, login and connection
    /// are used.
    pub image: &'a str,
    /// Server name.
    pub name: String,
    /// What the server boots.
    pub boot: LaunchImage,
    /// Its [`META_VALIDATION`] tag ([`validation_tag`] of the upload).
    pub tag: String,
    /// The script run on it.
    pub script: &'a ReadyScript,
    /// `(flavor-name, min-ram)` instead of the pool label's.
    pub size: Option<(Option<String>, Option<i64>)>,
}

/// The login of `image`: a diskimage's or a snapshot image's.
fn login(
    config: &Config,
    pc: &ProviderConfig,
    image: &str,
) -> Result<(String, std::path::PathBuf), String> {
    if let Some(di) = config.diskimage(image) {
        let key = di
            .private_key
            .clone()
            .ok_or_else(|| format!("diskimage {image} has no private-key"))?;
        return Ok((di.username.clone(), key));
    }
    let si = pc
        .snapshot_image(image)
        .ok_or_else(|| format!("image {image} is not configured"))?;
    Ok((si.username.clone(), si.private_key.clone()))
}

/// Boots `job`'s server, runs its script, then `then` with the server id
/// (the script succeeded), and deletes the server whatever happened; `Err`
/// is why it failed (a deletion that fails is a failure too: the result
/// must not be used while the server may live).
pub(crate) async fn boot_and_run<T>(
    shared: &Shared,
    config: &Config,
    entry: &ProviderEntry,
    job: &Job<'_>,
    then: impl AsyncFnOnce(&str) -> Result<T, String>,
) -> Result<T, String> {
    let pc = &entry.config;
    let p = &entry.provider;
    let purpose = job.purpose;
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
                .find(|l| matches!(&l.image, ImageSource::DiskImage(d) if d == job.image))
                .map(|l| (pool.name.clone(), l.name.clone()))
        })
        .ok_or_else(|| format!("no pool label of {} boots {}", pc.name, job.image))?;
    let (username, private_key) = login(config, pc, job.image)?;
    let connection = pc
        .connection_of(job.image)
        .map_or(("ssh".to_owned(), 22), |(t, port)| (t.to_owned(), port));
    let target = PoolKey {
        provider: pc.name.clone(),
        pool,
    };
    let name = job.name.clone();
    let (mut spec, _, _) = crate::launcher::tasks::instance_spec(
        config,
        &target,
        &label,
        &job.boot,
        None,
        &name,
        ("", None),
    )
    .ok_or_else(|| format!("cannot describe a server of label {label}"))?;
    spec.name = name.clone();
    spec.metadata.shift_remove(META_NODE_ID);
    spec.metadata
        .insert(META_VALIDATION.to_owned(), job.tag.clone());
    if let Some((flavor_name, min_ram)) = &job.size {
        spec.label.flavor_name = flavor_name.clone();
        spec.label.min_ram = *min_ram;
    }
    let run = ReadyScriptRun {
        script: job.script.clone(),
        username,
        private_key,
    };
    tracing::info!(image = %job.image, provider = %pc.name, label = %label, server = %name, "booting a {purpose} server");
    let id = tokio::time::timeout(p.api_timeout(), p.create_instance(&spec))
        .await
        .map_err(|_| format!("creating the {purpose} server timed out"))?
        .map_err(|e| format!("cannot create the {purpose} server: {e}"))?;
    let worked = async {
        let server = tokio::time::timeout(pc.launch_timeout, p.wait_for_instance(&id, &spec))
            .await
            .map_err(|_| {
                format!(
                    "the {purpose} server was not active within {:?}",
                    pc.launch_timeout
                )
            })?
            .map_err(|e| format!("the {purpose} server failed: {e}"))?;
        let host = server
            .interface_ip
            .clone()
            .ok_or(format!("the {purpose} server has no address"))?;
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
        .await?;
        then(&id).await
    };
    let outcome = tokio::select! {
        r = worked => r,
        _ = shared.work.cancelled() => Err("the builder is stopping".to_owned()),
    };
    let deleted = delete_server(shared, entry, purpose, &id).await;
    match (outcome, deleted) {
        (Ok(t), Ok(())) => Ok(t),
        (Err(why), Ok(())) | (Ok(_), Err(why)) => Err(why),
        (Err(why), Err(also)) => Err(format!("{why}; {also}")),
    }
}

/// Deletes a server of ours, bounded by the builder's delete timeout.
async fn delete_server(
    shared: &Shared,
    entry: &ProviderEntry,
    purpose: &str,
    id: &str,
) -> Result<(), String> {
    let limit: Duration = shared.settings.delete_timeout;
    match tokio::time::timeout(limit, entry.provider.delete_instance(id)).await {
        Ok(Ok(())) => {
            tracing::info!(provider = %entry.config.name, server = %id, "deleted the {purpose} server");
            Ok(())
        }
        Ok(Err(e)) => Err(format!("cannot delete the {purpose} server {id}: {e}")),
        Err(_) => Err(format!(
            "deleting the {purpose} server {id} took longer than {limit:?}"
        )),
    }
}
