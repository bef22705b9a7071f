//! Job hold rules: "hold up to N failed nodes of job J" (seed 001's
//! `job-create` / `job-list` / `job-delete`).
//!
//! A rule is a record `/nodepool/job-holds/<encoded job>` holding
//! `{"job": "<name>", "hold_on_failure": N, "created_time": <epoch s>}`.
//! Jenkins job names may contain `/` (folders), which a path segment
//! cannot, so the record name is the job name percent-encoded (every byte
//! outside `[A-Za-z0-9._-]`); the JSON keeps the name as given, and is
//! what is read back.
//!
//! The count is not stored: it is the number of nodes in state `hold`
//! whose `hold_job` is J (as Python Nodepool counted held nodes naming the
//! job), so deleting a held node frees its place under the rule and no
//! counter can drift from the nodes.

use serde::{Deserialize, Serialize};

use crate::model::{Node, NodeState};
use crate::store::{CreateMode, Listing, Malformed, Store, StoreError, paths};

/// A job hold rule.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct JobHold {
    /// The job's full name (`folder/job` for jobs in folders).
    pub job: String,
    /// How many failed nodes of the job to keep held at once.
    pub hold_on_failure: u32,
    /// When the rule was made (epoch seconds).
    #[serde(default)]
    pub created_time: Option<f64>,
}

/// The record name of a job: the job name with every byte outside
/// `[A-Za-z0-9._-]` percent-encoded, so `/` and `%` never reach the path.
/// An empty name encodes as `%` alone (no job is called that).
pub fn encode_job(job: &str) -> String {
    if job.is_empty() {
        return "%".into();
    }
    let mut out = String::with_capacity(job.len());
    for b in job.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-') {
            out.push(char::from(b));
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    // "." and ".." are not file-system-like here, but keep names readable
    // and unambiguous anyway: a leading dot is encoded too.
    if out.starts_with('.') {
        out.replace_range(..1, "%2E");
    }
    out
}

/// How many nodes are held for `job` (state `hold`, `hold_job` = `job`).
pub fn held_for<'a>(job: &str, nodes: impl IntoIterator<Item = &'a Node>) -> usize {
    nodes
        .into_iter()
        .filter(|n| n.state == NodeState::Hold && n.hold_job.as_deref() == Some(job))
        .count()
}

impl Store {
    /// Creates or replaces the hold rule of a job.
    pub async fn set_job_hold(&self, rule: &JobHold) -> Result<(), StoreError> {
        let path = paths::job_hold(&encode_job(&rule.job));
        let data = serde_json::to_vec(rule).map_err(|e| StoreError::Other(e.to_string()))?;
        match self
            .backend()
            .create(&path, &data, CreateMode::Persistent)
            .await
        {
            Ok(_) => Ok(()),
            Err(StoreError::Conflict { .. }) => {
                self.backend().set(&path, &data, None).await.map(|_| ())
            }
            Err(e) => Err(e),
        }
    }

    /// The hold rule of a job, if there is one.
    pub async fn get_job_hold(&self, job: &str) -> Result<Option<JobHold>, StoreError> {
        let path = paths::job_hold(&encode_job(job));
        match self.backend().get(&path).await? {
            None => Ok(None),
            Some((data, _)) => {
                serde_json::from_slice(&data)
                    .map(Some)
                    .map_err(|e| StoreError::Malformed {
                        path,
                        reason: e.to_string(),
                    })
            }
        }
    }

    /// Deletes the hold rule of a job; returns whether there was one.
    /// Nodes already held stay held.
    pub async fn delete_job_hold(&self, job: &str) -> Result<bool, StoreError> {
        match self
            .backend()
            .delete(&paths::job_hold(&encode_job(job)), None)
            .await
        {
            Ok(()) => Ok(true),
            Err(StoreError::NotFound { .. }) => Ok(false),
            Err(e) => Err(e),
        }
    }

    /// Every job hold rule, sorted by job name; undecodable records are
    /// skipped and reported.
    pub async fn list_job_holds(&self) -> Result<Listing<JobHold>, StoreError> {
        let mut out = Listing {
            records: Vec::new(),
            malformed: Vec::new(),
        };
        for e in self.backend().scan(paths::JOB_HOLDS).await? {
            let Some(name) = e.path.strip_prefix(paths::JOB_HOLDS) else {
                continue;
            };
            // Only direct children are rules.
            if name.len() < 2 || name[1..].contains('/') {
                continue;
            }
            match serde_json::from_slice::<JobHold>(&e.data) {
                Ok(rule) => out.records.push(rule),
                Err(err) => {
                    tracing::warn!(path = %e.path, error = %err, "skipping malformed job hold rule");
                    out.malformed.push(Malformed {
                        path: e.path.clone(),
                        reason: err.to_string(),
                    });
                }
            }
        }
        out.records.sort_by(|a, b| a.job.cmp(&b.job));
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn job_names_encode_to_one_path_segment() {
        assert_eq!(encode_job("tox-py311"), "tox-py311");
        assert_eq!(encode_job("folder/job"), "folder%2Fjob");
        assert_eq!(encode_job("a%b c"), "a%25b%20c");
        assert_eq!(encode_job(".hidden"), "%2Ehidden");
        assert_eq!(encode_job(""), "%");
        assert_eq!(encode_job("lock"), "lock");
        // Distinct names stay distinct.
        assert_ne!(encode_job("a/b"), encode_job("a%2Fb"));
    }

    #[test]
    fn held_nodes_are_counted_per_job() {
        let mut a = Node::new(NodeState::Hold, 0.0, "p", "main", vec!["l".into()]);
        a.hold_job = Some("j".into());
        let mut b = a.clone();
        b.hold_job = Some("other".into());
        let mut c = a.clone();
        c.state = NodeState::Used;
        assert_eq!(held_for("j", [&a, &b, &c]), 1);
    }
}

#[cfg(test)]
mod store_tests {
    use std::sync::Arc;

    use super::*;
    use crate::store::MemoryStore;

    #[tokio::test]
    async fn rules_round_trip_through_the_store() {
        let store = Store::new(Arc::new(MemoryStore::new().new_session()));
        assert!(
            store
                .list_job_holds()
                .await
                .expect("list")
                .records
                .is_empty()
        );
        let rule = JobHold {
            job: "folder/flaky".into(),
            hold_on_failure: 2,
            created_time: Some(1.5),
        };
        store.set_job_hold(&rule).await.expect("set");
        store
            .set_job_hold(&JobHold {
                job: "a".into(),
                hold_on_failure: 1,
                created_time: None,
            })
            .await
            .expect("set");
        let again = JobHold {
            hold_on_failure: 3,
            ..rule.clone()
        };
        store.set_job_hold(&again).await.expect("replace");
        assert_eq!(
            store.get_job_hold("folder/flaky").await.expect("get"),
            Some(again.clone())
        );
        let listed = store.list_job_holds().await.expect("list").records;
        assert_eq!(
            listed.iter().map(|r| r.job.as_str()).collect::<Vec<_>>(),
            ["a", "folder/flaky"]
        );
        assert!(store.delete_job_hold("folder/flaky").await.expect("delete"));
        assert!(!store.delete_job_hold("folder/flaky").await.expect("again"));
        assert_eq!(store.get_job_hold("folder/flaky").await.expect("get"), None);
        // A record someone wrote by hand that is not a rule is skipped.
        store
            .backend()
            .create(
                &paths::job_hold("junk"),
                b"not json",
                crate::store::CreateMode::Persistent,
            )
            .await
            .expect("create");
        let listing = store.list_job_holds().await.expect("list");
        assert_eq!(listing.records.len(), 1);
        assert_eq!(listing.malformed.len(), 1);
    }
}
