//! Image build and upload records under `/nodepool/images/<image>/builds/...`.

use serde::{Deserialize, Deserializer, Serialize, Serializer};

use super::json::{Extra, WireRecord, lenient};

/// The state of a diskimage build. The serialised strings are the wire strings.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum BuildState {
    /// diskimage-builder is running.
    Building,
    /// The image files exist and can be uploaded.
    Ready,
    /// Being deleted (uploads first, then files and record).
    Deleting,
    /// The build failed.
    Failed,
}

impl BuildState {
    /// The wire string.
    pub fn as_str(self) -> &'static str {
        match self {
            BuildState::Building => "building",
            BuildState::Ready => "ready",
            BuildState::Deleting => "deleting",
            BuildState::Failed => "failed",
        }
    }
}

impl std::fmt::Display for BuildState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The state of an image upload. The serialised strings are the wire strings.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum UploadState {
    /// The upload is in progress.
    Uploading,
    /// The image exists in the cloud.
    Ready,
    /// Being deleted (cloud image first, then record).
    Deleting,
    /// The upload failed.
    Failed,
}

impl UploadState {
    /// The wire string.
    pub fn as_str(self) -> &'static str {
        match self {
            UploadState::Uploading => "uploading",
            UploadState::Ready => "ready",
            UploadState::Deleting => "deleting",
            UploadState::Failed => "failed",
        }
    }
}

impl std::fmt::Display for UploadState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A diskimage build: `/nodepool/images/<image>/builds/<build-id>`.
///
/// Modern build ids are uuid4 hex; legacy ones are sequence numbers.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ImageBuild {
    /// Current state.
    pub state: BuildState,
    /// When `state` last changed (epoch seconds).
    #[serde(default, deserialize_with = "lenient::float")]
    pub state_time: f64,
    /// Host name of the builder (written only when set).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub builder: Option<String>,
    /// Builder id from `<images-dir>/builder_id.txt` (written only when set).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub builder_id: Option<String>,
    /// Output formats; on the wire a sorted comma-joined string, omitted when empty.
    #[serde(
        default,
        serialize_with = "formats_to_wire",
        deserialize_with = "formats_from_wire",
        skip_serializing_if = "Vec::is_empty"
    )]
    pub formats: Vec<String>,
    /// Login user of nodes booted from it.
    #[serde(default)]
    pub username: Option<String>,
    /// Python path on nodes booted from it.
    #[serde(default)]
    pub python_path: Option<String>,
    /// Shell type of nodes booted from it.
    #[serde(default)]
    pub shell_type: Option<String>,
    /// Keys other writers added.
    #[serde(flatten, skip_deserializing)]
    pub extra: Extra,
}

fn formats_to_wire<S: Serializer>(formats: &[String], s: S) -> Result<S::Ok, S::Error> {
    let mut sorted: Vec<&str> = formats.iter().map(String::as_str).collect();
    sorted.sort_unstable();
    sorted.dedup();
    s.serialize_str(&sorted.join(","))
}

fn formats_from_wire<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<String>, D::Error> {
    Ok(Option::<String>::deserialize(d)?
        .map(|s| {
            s.split(',')
                .map(str::trim)
                .filter(|f| !f.is_empty())
                .map(str::to_owned)
                .collect()
        })
        .unwrap_or_default())
}

impl ImageBuild {
    /// A new build in state `building`.
    pub fn new(now: f64, formats: Vec<String>) -> Self {
        ImageBuild {
            state: BuildState::Building,
            state_time: now,
            builder: None,
            builder_id: None,
            formats,
            username: None,
            python_path: None,
            shell_type: None,
            extra: Extra::new(),
        }
    }

    /// Sets the state and its timestamp.
    pub fn set_state(&mut self, state: BuildState, now: f64) {
        self.state = state;
        self.state_time = now;
    }

    /// Login user (`zuul` when unset).
    pub fn username_or_default(&self) -> &str {
        self.username.as_deref().unwrap_or("zuul")
    }
}

impl WireRecord for ImageBuild {
    const KNOWN_KEYS: &'static [&'static str] = &[
        "state",
        "state_time",
        "builder",
        "builder_id",
        "formats",
        "username",
        "python_path",
        "shell_type",
    ];

    fn extra_mut(&mut self) -> &mut Extra {
        &mut self.extra
    }
}

/// An upload of a build to one provider:
/// `.../builds/<build-id>/providers/<provider>/images/<seq10>`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ImageUpload {
    /// Current state.
    pub state: UploadState,
    /// When `state` last changed (epoch seconds).
    #[serde(default, deserialize_with = "lenient::float")]
    pub state_time: f64,
    /// Cloud image id.
    #[serde(default)]
    pub external_id: Option<String>,
    /// Cloud image name.
    #[serde(default)]
    pub external_name: Option<String>,
    /// Image format uploaded.
    #[serde(default)]
    pub format: Option<String>,
    /// Login user of nodes booted from it.
    #[serde(default)]
    pub username: Option<String>,
    /// Python path on nodes booted from it.
    #[serde(default)]
    pub python_path: Option<String>,
    /// Shell type of nodes booted from it.
    #[serde(default)]
    pub shell_type: Option<String>,
    /// Keys other writers added.
    #[serde(flatten, skip_deserializing)]
    pub extra: Extra,
}

impl ImageUpload {
    /// A new upload in state `uploading`.
    pub fn new(now: f64, format: Option<String>) -> Self {
        ImageUpload {
            state: UploadState::Uploading,
            state_time: now,
            external_id: None,
            external_name: None,
            format,
            username: None,
            python_path: None,
            shell_type: None,
            extra: Extra::new(),
        }
    }

    /// Sets the state and its timestamp.
    pub fn set_state(&mut self, state: UploadState, now: f64) {
        self.state = state;
        self.state_time = now;
    }
}

impl WireRecord for ImageUpload {
    const KNOWN_KEYS: &'static [&'static str] = &[
        "state",
        "state_time",
        "external_id",
        "external_name",
        "format",
        "username",
        "python_path",
        "shell_type",
    ];

    fn extra_mut(&mut self) -> &mut Extra {
        &mut self.extra
    }
}

/// Key of a failed build's log tail in its record (the error, then the
/// last lines of the build's output).
pub const BUILD_LOG_TAIL_KEY: &str = "log_tail";

/// Key of a running build's progress in its record ([`BuildProgressRecord`]).
/// Python Nodepool reads records with `dict.get` and ignores it.
pub const BUILD_PROGRESS_KEY: &str = "progress";

/// Key of an upload's progress in its record ([`UploadProgressRecord`]).
pub const UPLOAD_PROGRESS_KEY: &str = "progress";

/// Key of a failed upload's reason in its record (one line).
pub const UPLOAD_FAILURE_KEY: &str = "failure";

/// Where a running build is, as its builder last published it: the
/// diskimage-builder hook phase (`root`, `install`, ...) and the element
/// script running in it. Written at most every few seconds.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct BuildProgressRecord {
    /// The hook phase, without `.d`.
    pub phase: String,
    /// The element script running in it, when known (`10-debootstrap`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub step: Option<String>,
    /// When this was written (epoch seconds).
    #[serde(default)]
    pub time: f64,
}

/// How much of an upload's file its builder has sent, as last published.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct UploadProgressRecord {
    /// Bytes sent so far (0 from a provider that cannot tell).
    pub bytes_sent: u64,
    /// Size of the file.
    pub total_bytes: u64,
}

impl ImageBuild {
    /// A failed build's log tail, when its builder recorded one.
    pub fn log_tail(&self) -> Option<String> {
        self.extra.get(BUILD_LOG_TAIL_KEY)?.decode().ok()
    }

    /// The published progress, when the record has one (and it parses).
    pub fn progress(&self) -> Option<BuildProgressRecord> {
        self.extra.get(BUILD_PROGRESS_KEY)?.decode().ok()
    }

    /// Publishes progress into the record (written with it).
    pub fn set_progress(&mut self, progress: &BuildProgressRecord) {
        self.extra.insert(
            BUILD_PROGRESS_KEY.to_owned(),
            super::json::Json::encode(progress),
        );
    }
}

impl ImageUpload {
    /// The published progress, when the record has one (and it parses).
    pub fn progress(&self) -> Option<UploadProgressRecord> {
        self.extra.get(UPLOAD_PROGRESS_KEY)?.decode().ok()
    }

    /// Publishes progress into the record (written with it).
    pub fn set_progress(&mut self, progress: &UploadProgressRecord) {
        self.extra.insert(
            UPLOAD_PROGRESS_KEY.to_owned(),
            super::json::Json::encode(progress),
        );
    }

    /// Why the upload failed, when the builder recorded it.
    pub fn failure(&self) -> Option<String> {
        self.extra.get(UPLOAD_FAILURE_KEY)?.decode().ok()
    }

    /// Records why the upload failed.
    pub fn set_failure(&mut self, why: &str) {
        self.extra.insert(
            UPLOAD_FAILURE_KEY.to_owned(),
            super::json::Json::encode(why),
        );
    }
}
