//! Test hooks: what tests do to the cloud behind the API's back (leaked
//! servers, floating IPs and ports, quota, a server gone ERROR) and what
//! they read of it (usage, servers). They are not API calls, so they work
//! during an API fault. With a state file they read and write the file
//! like any operation, so another process sees what they do; they panic
//! when the file cannot be used. They are async like API calls: the file
//! lock is waited for on a blocking thread, so a hook called on a runtime
//! worker cannot deadlock with a task of the same runtime that holds it.

use nodepool_model::model::{Limits, Resources};
use nodepool_model::provider::Instance;

use crate::SimulatedProvider;

impl SimulatedProvider {
    /// Adds an ACTIVE server tagged for this provider (and its first pool)
    /// with `node_id`, as a launcher that died after its create would leave
    /// it. Returns its cloud id. It uses quota like any server.
    pub async fn inject_leaked_server(&self, node_id: &str) -> String {
        self.hook("inject_leaked_server", |st, now| {
            let server = self.inner.nova.leaked_server(node_id, now);
            self.inner.nova.insert_server(st, server)
        })
        .await
    }

    /// Adds an ACTIVE server tagged the way Nodepool tagged servers before
    /// the `nodepool_*` keys (seed 001's upgrade path): one `nodepool` key
    /// holding JSON with `provider_name`, `node_id` (a number, as Python
    /// wrote it) and `image_name`. Returns its cloud id.
    pub async fn inject_legacy_tagged_server(&self, node_id: &str) -> String {
        self.hook("inject_legacy_tagged_server", |st, now| {
            let mut server = self.inner.nova.leaked_server(node_id, now);
            let number: u64 = node_id.trim_start_matches('0').parse().unwrap_or(0);
            server.metadata = [(
                nodepool_model::provider::META_LEGACY_JSON.to_owned(),
                format!(
                    r#"{{"provider_name": "{}", "node_id": {number}, "image_name": "legacy-image"}}"#,
                    self.inner.nova.name
                ),
            )]
            .into_iter()
            .collect();
            self.inner.nova.insert_server(st, server)
        })
        .await
    }

    /// Adds a floating IP (attached to a port or not) and returns its id;
    /// for `clean-floating-ips` tests.
    pub async fn inject_floating_ip(&self, attached: bool) -> String {
        self.hook("inject_floating_ip", |st, _| st.add_floating_ip(attached))
            .await
    }

    /// Adds a DOWN port with this device owner (`""`, `compute:nova`, ...)
    /// and returns its id; for `port-cleanup-interval` tests.
    pub async fn inject_down_port(&self, device_owner: &str) -> String {
        self.hook("inject_down_port", |st, _| st.add_down_port(device_owner))
            .await
    }

    /// Replaces the cloud quota (missing names unlimited). Existing servers
    /// stay, even over the new quota, as in Nova. With a state file, a
    /// provider that opens the file later applies its configuration's
    /// quota again.
    pub async fn set_quota(&self, quota: Limits) {
        self.hook("set_quota", |st, _| st.quota = quota).await;
    }

    /// Quota used by every existing server (building, active, in error or
    /// being deleted).
    pub async fn usage(&self) -> Resources {
        self.hook("usage", |st, now| {
            st.settle(now);
            st.usage.clone()
        })
        .await
    }

    /// Every server that exists now (any status), read past any API
    /// fault: what the cloud really holds, for tests and drills that
    /// count servers while the API is made to fail.
    pub async fn instances(&self) -> Vec<Instance> {
        self.hook("instances", |st, now| {
            st.settle(now);
            st.servers.values().map(|s| s.instance(now)).collect()
        })
        .await
    }

    /// Servers that exist now (any status).
    pub async fn server_count(&self) -> usize {
        self.hook("server_count", |st, now| {
            st.settle(now);
            st.servers.len()
        })
        .await
    }

    /// The server tagged with `node_id` (the first, if several are).
    pub async fn server_for_node(&self, node_id: &str) -> Option<Instance> {
        self.hook("server_for_node", |st, now| {
            st.settle(now);
            st.servers
                .values()
                .find(|s| s.base.node_id().as_deref() == Some(node_id))
                .map(|s| s.instance(now))
        })
        .await
    }

    /// Makes a server go ERROR now with `fault` (a fault that reads like a
    /// quota error makes `wait_for_instance` return `QuotaExceeded`, as
    /// from Nova). False when there is no such server or it is being
    /// deleted.
    pub async fn fail_server(&self, external_id: &str, fault: &str) -> bool {
        self.hook("fail_server", |st, now| {
            st.settle(now);
            match st.servers.get_mut(external_id) {
                Some(s) if s.deleting.is_none() => {
                    s.error = Some(fault.to_owned());
                    s.changed.notify_waiters();
                    true
                }
                _ => false,
            }
        })
        .await
    }
}
