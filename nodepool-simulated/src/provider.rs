//! [`SimulatedProvider`] and its [`Provider`] impl: each trait method is
//! one or more API calls ([`SimulatedProvider::api`], behind the API
//! fault), each a closure on the cloud's [`State`] applying
//! [`Nova`]'s rules under the cloud's lock. Waits (a booting server, a
//! delete) never hold the lock: they look, then pause on the cloud's
//! clock until the time the look named or a change wakes them.

use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::AtomicBool;
use std::time::Duration;

use async_trait::async_trait;
use tokio::sync::futures::OwnedNotified;
use tracing::debug;

use nodepool_model::cloud::{fit_metadata, is_quota_message};
use nodepool_model::config::PoolLabel;
use nodepool_model::model::{Limits, Resources};
use nodepool_model::provider::{
    CloudImageInfo, CloudResource, ImageUploadSpec, Instance, InstanceSpec, InstanceStatus,
    Provider, ProviderError, ResourceKind, SnapshotSpec,
};

use crate::dice::{CREATE_FAULT, DELETE_FAULT};
use crate::glance::{CancelOnDrop, digest_file};
use crate::nova::{Deletion, NewServer, Nova, State};
use crate::storage::{Stamp, Storage};

/// The simulated cloud of one provider. Cheap to clone (clones share the
/// cloud); use it as `Arc<dyn Provider>` or keep a clone for the hooks.
///
/// With `state-file` the cloud lives in that file rather than in this
/// value: every provider (in any process) opened on the file shares it.
#[derive(Clone)]
pub struct SimulatedProvider {
    pub(crate) inner: Arc<Inner>,
}

/// What a provider is made of (see [`crate::knobs`]).
pub(crate) struct Inner {
    /// The cloud's description and rules.
    pub(crate) nova: Nova,
    /// Its state and clock.
    pub(crate) storage: Storage,
    pub(crate) skip_nodescan: bool,
    /// Each API call's timeout (a hung call ends after it).
    pub(crate) api_timeout: Duration,
}

impl std::fmt::Debug for SimulatedProvider {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let mut d = f.debug_struct("SimulatedProvider");
        d.field("name", &self.inner.nova.name);
        // No file I/O (and no way to fail) in a Debug impl.
        match (self.inner.storage.servers_in_memory(), self.state_file()) {
            (Some(n), _) => d.field("servers", &n),
            (None, file) => d.field("state_file", &file),
        };
        d.finish_non_exhaustive()
    }
}

/// What one look at a booting server found.
enum BootStep {
    /// Boxed: the instance is large and this is the rare outcome.
    Done(Box<Result<Instance, ProviderError>>),
    /// Still building: look again at this time, or when this fires.
    Wait(Stamp, OwnedNotified),
}

impl BootStep {
    fn done(r: Result<Instance, ProviderError>) -> Self {
        BootStep::Done(Box::new(r))
    }
}

impl SimulatedProvider {
    /// The state file, when the cloud lives in one.
    pub fn state_file(&self) -> Option<&Path> {
        self.inner.storage.state_file()
    }

    /// Runs `f` on the state under the cloud's lock.
    pub(crate) async fn with_state<R, F>(&self, f: F) -> Result<R, ProviderError>
    where
        F: FnOnce(&mut State, Stamp) -> R + Send,
    {
        self.inner.storage.with_state(&self.inner.nova, f).await
    }

    /// [`with_state`](Self::with_state) for synchronous callers.
    pub(crate) fn with_state_blocking<R>(
        &self,
        f: impl FnOnce(&mut State, Stamp) -> R,
    ) -> Result<R, ProviderError> {
        self.inner.storage.with_state_blocking(&self.inner.nova, f)
    }

    /// A test hook's operation: a state file that cannot be used fails the
    /// calling test loudly (the hooks have no error to return). Async, as
    /// API calls are: with a state file the file lock is waited for on a
    /// blocking thread, never on the caller's runtime worker, whose peers
    /// may be needed by whoever holds the lock.
    pub(crate) async fn hook<R>(
        &self,
        what: &str,
        f: impl FnOnce(&mut State, Stamp) -> R + Send,
    ) -> R {
        match self.with_state(f).await {
            Ok(r) => r,
            Err(e) => panic!("simulated cloud {}: {what}: {e}", self.inner.nova.name),
        }
    }
}

#[async_trait]
impl Provider for SimulatedProvider {
    fn name(&self) -> &str {
        &self.inner.nova.name
    }

    async fn quota_limits(&self) -> Result<Limits, ProviderError> {
        self.api("quota limits", |st, _| st.quota.clone()).await
    }

    async fn label_resources(&self, label: &PoolLabel) -> Result<Resources, ProviderError> {
        // The flavor list is an API call in a real cloud.
        self.api("flavor list", |_, _| ()).await?;
        self.inner.nova.resources_for(label)
    }

    async fn create_instance(&self, spec: &InstanceSpec) -> Result<String, ProviderError> {
        let nova = &self.inner.nova;
        let resources = nova.resources_for(&spec.label)?;
        nova.check_az(spec.availability_zone.as_ref())?;
        let metadata = fit_metadata(&spec.name, &spec.metadata);
        let (id, fails) = self
            .api("server create", |st, now| {
                st.settle(now);
                nova.image_exists(st, &spec.image)?;
                nova.check_quota(st, &resources)?;
                let rate = st.rates.create;
                let fails = st.create_dice.roll(rate);
                let id = nova.insert_server(
                    st,
                    NewServer {
                        name: spec.name.clone(),
                        metadata,
                        resources,
                        az: spec.availability_zone.clone(),
                        ready_at: now + nova.boot_delay,
                        boot_fault: fails.then(|| CREATE_FAULT.to_owned()),
                    },
                );
                Ok((id, fails))
            })
            .await??;
        debug!(provider = %self.inner.nova.name, server = %spec.name, id = %id, fails, "server create accepted");
        Ok(id)
    }

    async fn wait_for_instance(
        &self,
        external_id: &str,
        _spec: &InstanceSpec,
    ) -> Result<Instance, ProviderError> {
        loop {
            let step = self
                .api("server status", |st, now| {
                    st.settle(now);
                    let Some(s) = st.servers.get(external_id) else {
                        return BootStep::done(Err(ProviderError::ServerFailed(format!(
                            "provider {}: server {external_id} disappeared while booting",
                            self.inner.nova.name
                        ))));
                    };
                    match s.status(now) {
                        InstanceStatus::Active => BootStep::done(Ok(s.instance(now))),
                        InstanceStatus::Error(fault) => {
                            let msg = format!(
                                "provider {}: server {external_id} went ERROR: {fault}",
                                self.inner.nova.name
                            );
                            BootStep::done(Err(if is_quota_message(&fault) {
                                ProviderError::QuotaExceeded(msg)
                            } else {
                                ProviderError::ServerFailed(msg)
                            }))
                        }
                        InstanceStatus::Deleting => {
                            BootStep::done(Err(ProviderError::ServerFailed(format!(
                                "provider {}: server {external_id} was deleted while booting",
                                self.inner.nova.name
                            ))))
                        }
                        InstanceStatus::Building | InstanceStatus::Other(_) => {
                            // Registered before the lock is released, so a
                            // change made right after is not missed.
                            BootStep::Wait(s.ready_at, s.changed.clone().notified_owned())
                        }
                    }
                })
                .await?;
            match step {
                BootStep::Done(r) => return *r,
                BootStep::Wait(ready_at, changed) => {
                    self.inner
                        .storage
                        .clock
                        .pause(ready_at, Some(changed))
                        .await;
                }
            }
        }
    }

    async fn get_instance(&self, external_id: &str) -> Result<Option<Instance>, ProviderError> {
        self.api("server lookup", |st, now| {
            st.settle(now);
            st.servers.get(external_id).map(|s| s.instance(now))
        })
        .await
    }

    async fn list_instances(&self) -> Result<Vec<Instance>, ProviderError> {
        self.api("server list", |st, now| {
            st.settle(now);
            st.servers.values().map(|s| s.instance(now)).collect()
        })
        .await
    }

    async fn delete_instance(&self, external_id: &str) -> Result<(), ProviderError> {
        let accepted = self
            .api("server delete", |st, now| {
                st.settle(now);
                let existing = st.servers.get(external_id).map(|s| s.deleting)?;
                Some(match existing {
                    // Already being deleted: this call ends with that delete.
                    Some(d) => d,
                    None => {
                        let rate = st.rates.delete;
                        let fails = st.delete_dice.roll(rate);
                        let d = Deletion {
                            at: now + self.inner.nova.delete_delay,
                            fails,
                            seq: st.next_seq(),
                        };
                        if let Some(s) = st.servers.get_mut(external_id) {
                            s.deleting = Some(d);
                            s.error = None;
                            s.changed.notify_waiters();
                        }
                        st.pending_deletes
                            .insert((d.at, d.seq), external_id.to_owned());
                        st.settle(now);
                        debug!(provider = %self.inner.nova.name, id = external_id, fails, "server delete accepted");
                        d
                    }
                })
            })
            .await?;
        let Some(deletion) = accepted else {
            return Ok(());
        };
        // Nothing can change an accepted delete, so this only waits for its
        // time (a killed process's delete is completed by whoever looks).
        while deletion.at > self.inner.storage.clock.now() {
            self.inner.storage.clock.pause(deletion.at, None).await;
        }
        self.api("server delete", |st, now| st.settle(now)).await?;
        if deletion.fails {
            Err(ProviderError::ServerFailed(format!(
                "provider {}: server {external_id} went ERROR while being deleted: {DELETE_FAULT}",
                self.inner.nova.name
            )))
        } else {
            Ok(())
        }
    }

    async fn console_log(&self, external_id: &str) -> Result<String, ProviderError> {
        self.api("console log", |st, now| {
            st.settle(now);
            match st.servers.get(external_id) {
                Some(s) => Ok(format!(
                    "[    0.000000] Linux version 6.1.0-simulated\n\
                     [    0.412000] simulated cloud {}: server {} ({})\n\
                     {} login:\n",
                    self.inner.nova.name, s.base.name, external_id, s.base.name
                )),
                None => Err(ProviderError::NotFound(format!(
                    "provider {}: server {external_id}",
                    self.inner.nova.name
                ))),
            }
        })
        .await?
    }

    async fn upload_image(&self, spec: &ImageUploadSpec) -> Result<String, ProviderError> {
        // Rolled first so the n-th upload's fate does not depend on how
        // the file reads.
        let fails = self
            .api("image upload", |st, _| {
                let rate = st.rates.upload;
                st.upload_dice.roll(rate)
            })
            .await?;
        let cancel = CancelOnDrop(Arc::new(AtomicBool::new(false)));
        let (path, stop) = (spec.path.clone(), cancel.0.clone());
        let (want_md5, want_sha256) = (spec.md5.is_some(), spec.sha256.is_some());
        let sent = spec.sent.clone();
        // Hashing gigabytes is blocking work: keep it off the async workers.
        let job = tokio::task::spawn_blocking(move || {
            digest_file(&path, want_md5, want_sha256, &stop, &sent)
        });
        let digests = match tokio::time::timeout(spec.timeout, job).await {
            Err(_) => {
                return Err(ProviderError::Timeout(format!(
                    "provider {}: image {}: not active within image-upload-timeout {} s",
                    self.inner.nova.name,
                    spec.name,
                    spec.timeout.as_secs()
                )));
            }
            Ok(Err(e)) => {
                return Err(ProviderError::Other(format!(
                    "provider {}: image {}: upload task failed: {e}",
                    self.inner.nova.name, spec.name
                )));
            }
            Ok(Ok(Err(e))) => {
                return Err(ProviderError::Other(format!(
                    "provider {}: cannot read {}: {e}",
                    self.inner.nova.name,
                    spec.path.display()
                )));
            }
            Ok(Ok(Ok(d))) => d,
        };
        for (what, want, got) in [
            ("md5", &spec.md5, &digests.md5),
            ("sha256", &spec.sha256, &digests.sha256),
        ] {
            if let (Some(want), Some(got)) = (want, got)
                && !want.eq_ignore_ascii_case(got)
            {
                return Err(ProviderError::Other(format!(
                    "provider {}: image {} ({}): {what} checksum mismatch: expected {want}, got {got}",
                    self.inner.nova.name,
                    spec.name,
                    spec.path.display()
                )));
            }
        }
        if fails {
            return Err(ProviderError::Other(format!(
                "provider {}: image {}: simulated upload failure: the image went killed during the upload",
                self.inner.nova.name, spec.name
            )));
        }
        let mut properties = spec.properties.clone();
        // What openstacksdk records (and the OpenStack backend mirrors).
        if let Some(md5) = &spec.md5 {
            properties.insert("owner_specified.openstack.md5".into(), md5.clone());
        }
        if let Some(sha) = &spec.sha256 {
            properties.insert("owner_specified.openstack.sha256".into(), sha.clone());
        }
        let id = self
            .api("image upload", |st, _| {
                let id = st.ids.uuid();
                st.images.insert(
                    id.clone(),
                    CloudImageInfo {
                        id: id.clone(),
                        name: spec.name.clone(),
                        status: "active".into(),
                        properties,
                    },
                );
                id
            })
            .await?;
        debug!(provider = %self.inner.nova.name, image = %spec.name, id = %id, bytes = digests.len, "image active");
        Ok(id)
    }

    async fn list_images(&self) -> Result<Vec<CloudImageInfo>, ProviderError> {
        self.api("image list", |st, _| st.images.values().cloned().collect())
            .await
    }

    async fn delete_image(&self, external_id: &str) -> Result<(), ProviderError> {
        self.api("image delete", |st, _| {
            st.images.shift_remove(external_id);
        })
        .await
    }

    async fn snapshot_instance(
        &self,
        external_id: &str,
        spec: &SnapshotSpec,
    ) -> Result<String, ProviderError> {
        let nova = &self.inner.nova;
        // Nova's `createImage`: the server must exist and not be going away;
        // the image is made at once (the simulated disk has no bytes to
        // copy). It fails as an upload does (`upload-failure-rate`): both
        // are Glance making an image, and a failure leaves none.
        let made = self
            .api("server createImage", |st, now| {
                st.settle(now);
                match st.servers.get(external_id) {
                    None => {
                        return Err(ProviderError::NotFound(format!(
                            "provider {}: server {external_id}",
                            nova.name
                        )));
                    }
                    Some(s) if s.deleting.is_some() => {
                        return Err(ProviderError::InvalidRequest(format!(
                            "provider {}: server {external_id} is being deleted: it cannot be snapshotted",
                            nova.name
                        )));
                    }
                    Some(_) => {}
                }
                let rate = st.rates.upload;
                if st.upload_dice.roll(rate) {
                    return Ok(None);
                }
                let id = st.ids.uuid();
                st.images.insert(
                    id.clone(),
                    CloudImageInfo {
                        id: id.clone(),
                        name: spec.name.clone(),
                        status: "active".into(),
                        properties: spec.properties.clone(),
                    },
                );
                Ok(Some(id))
            })
            .await??;
        match made {
            Some(id) => {
                debug!(provider = %nova.name, server = external_id, image = %spec.name, id = %id, "snapshot active");
                Ok(id)
            }
            None => Err(ProviderError::Other(format!(
                "provider {}: snapshot {} of server {external_id}: simulated failure: the image went killed",
                nova.name, spec.name
            ))),
        }
    }

    async fn list_resources(
        &self,
        kind: ResourceKind,
    ) -> Result<Vec<CloudResource>, ProviderError> {
        self.api("resource list", |st, _| {
            let map = match kind {
                ResourceKind::FloatingIp => &st.floating_ips,
                ResourceKind::Port => &st.ports,
            };
            map.values().cloned().collect()
        })
        .await
    }

    async fn delete_resource(&self, kind: ResourceKind, id: &str) -> Result<(), ProviderError> {
        self.api("resource delete", |st, _| {
            match kind {
                ResourceKind::FloatingIp => st.floating_ips.shift_remove(id),
                ResourceKind::Port => st.ports.shift_remove(id),
            };
        })
        .await
    }

    fn skip_nodescan(&self) -> bool {
        self.inner.skip_nodescan
    }

    fn api_timeout(&self) -> Duration {
        self.inner.api_timeout
    }
}

// ----- the state file's format -----
