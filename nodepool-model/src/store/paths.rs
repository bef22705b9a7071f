//! The record layout of reference §1.2, shared by every store.

/// Root of everything Nodepool stores.
pub const ROOT: &str = "/nodepool";
/// Node records.
pub const NODES: &str = "/nodepool/nodes";
/// Node requests.
pub const REQUESTS: &str = "/nodepool/requests";
/// Request lock directories.
pub const REQUESTS_LOCK: &str = "/nodepool/requests-lock";
/// Images, builds and uploads.
pub const IMAGES: &str = "/nodepool/images";
/// Component registrations.
pub const COMPONENTS: &str = "/nodepool/components";
/// The stats leader election.
pub const STATS_ELECTION: &str = "/nodepool/elections/stats";
/// Our own extension: Jenkins job hold rules (not read by Python Nodepool).
pub const JOB_HOLDS: &str = "/nodepool/job-holds";
/// Our own extension: one lock per consumer target, so that one consumer
/// runtime at a time serves a target when several launchers run.
pub const CONSUMER_ELECTIONS: &str = "/nodepool/elections/consumers";
/// The name of a lock directory under a record.
pub const LOCK: &str = "lock";

/// `/nodepool/nodes/<id>`.
pub fn node(id: &str) -> String {
    format!("{NODES}/{id}")
}

/// `/nodepool/nodes/<id>/lock`.
pub fn node_lock(id: &str) -> String {
    format!("{NODES}/{id}/{LOCK}")
}

/// `/nodepool/requests/<id>`.
pub fn request(id: &str) -> String {
    format!("{REQUESTS}/{id}")
}

/// `/nodepool/requests/<priority>-` (a sequential prefix).
pub fn request_prefix(priority: &str) -> String {
    format!("{REQUESTS}/{priority}-")
}

/// `/nodepool/requests-lock/<id>`.
pub fn request_lock(id: &str) -> String {
    format!("{REQUESTS_LOCK}/{id}")
}

/// `/nodepool/images/<image>`.
pub fn image(image: &str) -> String {
    format!("{IMAGES}/{image}")
}

/// `/nodepool/images/<image>/pause`.
pub fn image_pause(image: &str) -> String {
    format!("{IMAGES}/{image}/pause")
}

/// `/nodepool/images/<image>/request-build`.
pub fn image_build_request(image: &str) -> String {
    format!("{IMAGES}/{image}/request-build")
}

/// `/nodepool/images/<image>/upload-requests`: our own extension (not read
/// by Python Nodepool), the "upload now" requests of
/// `nodepool image-upload PROVIDER IMAGE`.
pub fn image_upload_requests(image: &str) -> String {
    format!("{IMAGES}/{image}/upload-requests")
}

/// `/nodepool/images/<image>/upload-requests/<provider>`: an empty record
/// asking the builder to upload the newest ready build of `image` to
/// `provider` now, even when that provider already has a ready upload of
/// it (a fresh upload, as Python's old `image-upload` did). Its creation
/// time is the request time. The builder deletes it once a ready upload of
/// the newest ready build exists that is newer than the request, or at once
/// when the provider does not (or no longer) take this image.
pub fn image_upload_request(image: &str, provider: &str) -> String {
    format!("{IMAGES}/{image}/upload-requests/{provider}")
}

/// `/nodepool/images/<image>/builds`.
pub fn builds(image: &str) -> String {
    format!("{IMAGES}/{image}/builds")
}

/// `/nodepool/images/<image>/builds/lock`: the per-image build lock.
pub fn builds_lock(image: &str) -> String {
    format!("{IMAGES}/{image}/builds/{LOCK}")
}

/// `/nodepool/images/<image>/builds/<build>`.
pub fn build(image: &str, build: &str) -> String {
    format!("{IMAGES}/{image}/builds/{build}")
}

/// `/nodepool/images/<image>/builds/<build>/lock`.
pub fn build_lock(image: &str, build: &str) -> String {
    format!("{IMAGES}/{image}/builds/{build}/{LOCK}")
}

/// `.../builds/<build>/providers/<provider>/images`.
pub fn uploads(image: &str, build: &str, provider: &str) -> String {
    format!("{IMAGES}/{image}/builds/{build}/providers/{provider}/images")
}

/// `.../builds/<build>/providers/<provider>/images/lock`: the upload lock.
pub fn uploads_lock(image: &str, build: &str, provider: &str) -> String {
    format!("{}/{LOCK}", uploads(image, build, provider))
}

/// `.../providers/<provider>/images/<upload>`.
pub fn upload(image: &str, build: &str, provider: &str, upload: &str) -> String {
    format!("{}/{upload}", uploads(image, build, provider))
}

/// `.../providers/<provider>/images/<upload>/lock`.
pub fn upload_lock(image: &str, build: &str, provider: &str, upload: &str) -> String {
    format!("{}/{LOCK}", self::upload(image, build, provider, upload))
}

/// `/nodepool/job-holds/<encoded job name>` (see
/// [`super::holds`] for the encoding).
pub fn job_hold(encoded_job: &str) -> String {
    format!("{JOB_HOLDS}/{encoded_job}")
}

/// `/nodepool/elections/consumers/<target>`: the lock of a consumer target.
pub fn consumer_election(target: &str) -> String {
    format!("{CONSUMER_ELECTIONS}/{target}")
}

/// `/nodepool/components/<kind>`.
pub fn components(kind: &str) -> String {
    format!("{COMPONENTS}/{kind}")
}

/// A path under `/nodepool/images`, classified.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ImagePath<'a> {
    /// `/nodepool/images/<image>`.
    Image(&'a str),
    /// `/nodepool/images/<image>/pause`.
    Pause(&'a str),
    /// `/nodepool/images/<image>/request-build`.
    BuildRequest(&'a str),
    /// `/nodepool/images/<image>/upload-requests/<provider>`.
    UploadRequest(&'a str, &'a str),
    /// `/nodepool/images/<image>/builds/<build>`.
    Build(&'a str, &'a str),
    /// `.../builds/<build>/providers/<provider>/images/<upload>`.
    Upload(&'a str, &'a str, &'a str, &'a str),
    /// Anything else (lock dirs, contenders, intermediate nodes).
    Other,
}

/// Classifies a path under `/nodepool/images`.
pub fn classify_image_path(path: &str) -> ImagePath<'_> {
    let Some(rest) = path.strip_prefix("/nodepool/images/") else {
        return ImagePath::Other;
    };
    let parts: Vec<&str> = rest.split('/').collect();
    match parts.as_slice() {
        [image] => ImagePath::Image(image),
        [image, "pause"] => ImagePath::Pause(image),
        [image, "request-build"] => ImagePath::BuildRequest(image),
        [image, "upload-requests", provider] => ImagePath::UploadRequest(image, provider),
        [_, "builds", LOCK] => ImagePath::Other,
        [image, "builds", build] => ImagePath::Build(image, build),
        [_, "builds", _, "providers", _, "images", LOCK] => ImagePath::Other,
        [
            image,
            "builds",
            build,
            "providers",
            provider,
            "images",
            upload,
        ] => ImagePath::Upload(image, build, provider, upload),
        _ => ImagePath::Other,
    }
}

/// Whether a child name is a kazoo lock contender (`...__lock__<10 digits>`)
/// and its sequence number.
pub fn lock_contender_sequence(name: &str) -> Option<i64> {
    let idx = name.rfind("__lock__")?;
    let seq = &name[idx + "__lock__".len()..];
    let digits = seq.strip_prefix('-').unwrap_or(seq);
    if digits.len() == 10 && digits.bytes().all(|b| b.is_ascii_digit()) {
        seq.parse().ok()
    } else {
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn image_paths_classify() {
        assert_eq!(
            classify_image_path(
                "/nodepool/images/ubuntu/builds/abc/providers/p1/images/0000000007"
            ),
            ImagePath::Upload("ubuntu", "abc", "p1", "0000000007")
        );
        assert_eq!(
            classify_image_path("/nodepool/images/ubuntu/builds/lock"),
            ImagePath::Other
        );
        assert_eq!(
            classify_image_path("/nodepool/images/ubuntu/pause"),
            ImagePath::Pause("ubuntu")
        );
        assert_eq!(
            classify_image_path("/nodepool/images/ubuntu/upload-requests/p1"),
            ImagePath::UploadRequest("ubuntu", "p1")
        );
    }

    #[test]
    fn lock_contenders_are_recognised_like_kazoo() {
        assert_eq!(
            lock_contender_sequence("612ec7a9b6a64a238aff2d759d0563a9__lock__0000000001"),
            Some(1)
        );
        assert_eq!(lock_contender_sequence("_c_abc-lock-0000000001"), None);
        assert_eq!(lock_contender_sequence("x__lock__123"), None);
    }
}
