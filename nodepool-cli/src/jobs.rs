//! `nodepool job-create`, `job-list` and `job-delete`: job hold rules
//! (seed 001). "When a job is randomly failing for an unknown cause",
//! `job-create JOB --hold N` keeps up to N nodes of its failed builds in
//! state `hold` instead of deleting them; `job-delete` ends that (nodes
//! already held stay until `nodepool delete` or max-hold-age).
//!
//! The rules live in the state store (`/nodepool/job-holds`, see
//! `nodepool_model::store::holds`); the Jenkins consumer runtime applies
//! them. `admin` dispatches here; each function returns what to print.

use anyhow::{Context, anyhow};
use nodepool_core::consumers::{JobHold, held_for};
use nodepool_core::model::epoch_now;
use nodepool_core::store::Store;

use crate::cli::{JobCreate, JobDelete};
use crate::listing::{Cell, Column, Listing};

/// `nodepool job-list` columns (Python Nodepool's `Name`, `Hold on
/// Failure`, plus how many nodes are held for the job now).
pub const JOB_COLUMNS: &[Column] = &[
    Column {
        key: "name",
        title: "Name",
    },
    Column {
        key: "hold_on_failure",
        title: "Hold on Failure",
    },
    Column {
        key: "held",
        title: "Held",
    },
];

/// Creates or replaces a rule; returns the line to print.
pub async fn create(store: &Store, args: &JobCreate) -> anyhow::Result<String> {
    if args.job.trim().is_empty() {
        return Err(anyhow!("the job name is empty"));
    }
    let replaced = store
        .get_job_hold(&args.job)
        .await
        .context("reading the job's rule")?;
    store
        .set_job_hold(&JobHold {
            job: args.job.clone(),
            hold_on_failure: args.hold,
            created_time: Some(epoch_now()),
        })
        .await
        .context("writing the job's rule")?;
    Ok(match replaced {
        Some(old) => format!(
            "job {}: holding up to {} failed nodes (was {})",
            args.job, args.hold, old.hold_on_failure
        ),
        None => format!("job {}: holding up to {} failed nodes", args.job, args.hold),
    })
}

/// Every rule, with the nodes held for it now.
pub async fn list(store: &Store) -> anyhow::Result<Listing> {
    let rules = store.list_job_holds().await.context("listing job rules")?;
    let nodes = store.list_nodes().await.context("listing nodes")?;
    let mut l = Listing::new(JOB_COLUMNS);
    for r in rules.records {
        let held = held_for(&r.job, nodes.records.iter().map(|n| &*n.node));
        l.rows.push(vec![
            Cell::Text(r.job),
            Cell::Int(i64::from(r.hold_on_failure)),
            Cell::Int(i64::try_from(held).unwrap_or(i64::MAX)),
        ]);
    }
    Ok(l)
}

/// Deletes a rule; returns the line to print. A missing rule is an error.
pub async fn delete(store: &Store, args: &JobDelete) -> anyhow::Result<String> {
    if store
        .delete_job_hold(&args.job)
        .await
        .context("deleting the job's rule")?
    {
        Ok(format!(
            "job {}: no longer holding failed nodes (held nodes stay)",
            args.job
        ))
    } else {
        Err(anyhow!("no hold rule for job {:?}", args.job))
    }
}
