//! The domain model: records exactly as they appear on the wire.
//!
//! Every record type round-trips the JSON that Python Nodepool and Zuul write
//! (see `tests/golden.rs` and the samples in `tests/fixtures/zk-samples`).
//! Start with [`Node`] and [`NodeRequest`]; [`WireRecord`] is the codec.

mod component;
mod image;
mod json;
mod node;
mod request;
mod resources;

pub use component::{Component, ComponentKind, ComponentState, MODEL_API, ProviderUnavailable};
pub use image::{
    BUILD_LOG_TAIL_KEY, BUILD_PROGRESS_KEY, BuildProgressRecord, BuildState, ImageBuild,
    ImageUpload, UPLOAD_FAILURE_KEY, UPLOAD_PROGRESS_KEY, UploadProgressRecord, UploadState,
};
pub use json::{DecodeError, Extra, Json, WireRecord};
pub use node::{Node, NodeState, Port};
pub use request::{
    MIN_READY_PRIORITY, MIN_READY_REQUESTOR, NodeRequest, PRIORITY_HIGH, PRIORITY_LOW,
    PRIORITY_NORMAL, RequestState, parse_request_id,
};
pub use resources::{CORES, INSTANCES, Limits, RAM, Resources, VOLUME_GB, VOLUMES};

/// A node id: the 10-digit sequence znode name, e.g. `0000000042`.
pub type NodeId = String;
/// A request id: `<prio>-<seq10>`, e.g. `200-0000000042`.
pub type RequestId = String;
/// A build id: uuid4 hex (modern) or a sequence number (legacy).
pub type BuildId = String;
/// An upload id: a 10-digit sequence number, unique per build and provider.
pub type UploadId = String;

/// Seconds since the Unix epoch, as the wire's `state_time` uses.
///
/// Only the runtime reads the clock; the planner gets `now` as an argument.
pub fn epoch_now() -> f64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs_f64())
        .unwrap_or(0.0)
}

/// Formats an age in seconds as Nodepool's `DD:HH:MM:SS`.
pub fn format_age(seconds: f64) -> String {
    let s = if seconds.is_finite() && seconds > 0.0 {
        seconds as u64
    } else {
        0
    };
    format!(
        "{:02}:{:02}:{:02}:{:02}",
        s / 86_400,
        (s % 86_400) / 3600,
        (s % 3600) / 60,
        s % 60
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ages_format_like_nodepool() {
        assert_eq!(format_age(0.0), "00:00:00:00");
        assert_eq!(
            format_age(2.0 * 86400.0 + 57.0 * 60.0 + 33.0),
            "02:00:57:33"
        );
        assert_eq!(format_age(-5.0), "00:00:00:00");
    }
}
