//! `image-build --wait`, `image-update --wait` (a snapshot is recorded as a
//! build) and `image-upload --wait`: following the record the
//! builder (another process) makes for a request until it is ready or
//! failed, showing its progress as the builder publishes it in the record
//! (see [`nodepool_core::model::BuildProgressRecord`] and
//! [`nodepool_core::model::UploadProgressRecord`]).
//!
//! On a terminal the progress is one line redrawn in place (a bar with
//! bytes, rate and time left for uploads); otherwise plain lines: one per
//! build phase, one every [`LINE_EVERY`] with bytes and percentage for
//! uploads, so a CI log stays short.

use std::collections::BTreeSet;
use std::io::Write;
use std::time::Duration;

use anyhow::anyhow;
use nodepool_core::model::{BuildState, UploadState};
use nodepool_core::store::{ImageState, Store};
use tokio::time::Instant;

/// How often the record is read.
const POLL: Duration = Duration::from_millis(500);
/// Least time between two plain progress lines of an upload.
pub const LINE_EVERY: Duration = Duration::from_secs(5);
/// Added to the builder's own time limit for the default `--timeout`: the
/// request waits for the builder's next pass first.
const QUEUE_MARGIN: Duration = Duration::from_secs(300);
/// Width of the bar, in characters.
const BAR_WIDTH: usize = 30;

/// The default `--timeout` for a job the builder gives up after `limit`.
pub fn default_timeout(limit: Duration) -> Duration {
    limit + QUEUE_MARGIN
}

/// Draws progress on stderr: a line redrawn in place on a terminal, plain
/// lines otherwise.
pub struct Progress<'a> {
    err: &'a mut dyn Write,
    terminal: bool,
    /// The last plain line, not repeated.
    last: String,
    last_at: Option<Instant>,
    /// Whether a redrawn line is on screen (ended by a newline when done).
    drawn: bool,
    /// The first byte count seen and when, for the rate.
    first: Option<(u64, Instant)>,
}

impl<'a> Progress<'a> {
    /// Progress on `err`, drawn in place when it is a terminal.
    pub fn new(err: &'a mut dyn Write, terminal: bool) -> Self {
        Progress {
            err,
            terminal,
            last: String::new(),
            last_at: None,
            drawn: false,
            first: None,
        }
    }

    /// Shows a state line (a build phase, waiting for the builder): on a
    /// terminal in place, otherwise once per change.
    pub fn status(&mut self, text: &str) {
        if self.terminal {
            let _ = write!(self.err, "\r\x1b[2K{text}");
            self.drawn = true;
        } else if text != self.last {
            let _ = writeln!(self.err, "{text}");
            self.last = text.to_owned();
        }
        let _ = self.err.flush();
    }

    /// Shows bytes sent of `total`: a bar with rate and time left on a
    /// terminal, otherwise a line at most every [`LINE_EVERY`] (and the
    /// first time).
    pub fn bytes(&mut self, what: &str, sent: u64, total: u64, now: Instant) {
        let (first_sent, first_at) = *self.first.get_or_insert((sent, now));
        let secs = now.duration_since(first_at).as_secs_f64();
        let rate = (secs > 0.0 && sent > first_sent).then(|| (sent - first_sent) as f64 / secs);
        // An empty file is all sent.
        let pct = (sent.min(total) * 100).checked_div(total).unwrap_or(100) as usize;
        let mut text = format!(
            "{what}: {} of {} ({pct}%)",
            human_bytes(sent),
            human_bytes(total)
        );
        if let Some(r) = rate {
            text += &format!(", {}/s", human_bytes(r as u64));
            if sent < total {
                let left = Duration::from_secs_f64((total - sent) as f64 / r);
                text += &format!(", ETA {}", human_duration(left));
            }
        }
        if self.terminal {
            let done = pct * BAR_WIDTH / 100;
            let bar = format!("{}{}", "#".repeat(done), "-".repeat(BAR_WIDTH - done));
            let _ = write!(self.err, "\r\x1b[2K[{bar}] {text}");
            self.drawn = true;
        } else if self
            .last_at
            .is_none_or(|t| now.duration_since(t) >= LINE_EVERY)
        {
            let _ = writeln!(self.err, "{text}");
            self.last_at = Some(now);
        }
        let _ = self.err.flush();
    }

    /// Ends a line drawn in place, so what follows starts on its own line.
    pub fn finish(&mut self) {
        if self.drawn {
            let _ = writeln!(self.err);
            let _ = self.err.flush();
            self.drawn = false;
        }
    }
}

/// `1.5 MiB`: binary units, one decimal from KiB up.
pub fn human_bytes(n: u64) -> String {
    const UNITS: [&str; 5] = ["KiB", "MiB", "GiB", "TiB", "PiB"];
    if n < 1024 {
        return format!("{n} B");
    }
    let mut v = n as f64 / 1024.0;
    let mut unit = 0;
    while v >= 1024.0 && unit < UNITS.len() - 1 {
        v /= 1024.0;
        unit += 1;
    }
    format!("{v:.1} {}", UNITS[unit])
}

/// `1h02m`, `3m05s`, `42s`.
pub fn human_duration(d: Duration) -> String {
    let s = d.as_secs();
    if s >= 3600 {
        format!("{}h{:02}m", s / 3600, s % 3600 / 60)
    } else if s >= 60 {
        format!("{}m{:02}s", s / 60, s % 60)
    } else {
        format!("{s}s")
    }
}

async fn image_state(store: &Store) -> anyhow::Result<ImageState> {
    store
        .image_state()
        .await
        .map_err(|e| anyhow!("cannot read the image records: {e}"))
}

/// The ids of an image's builds now: a build not among them is the one a
/// request made after this starts.
pub async fn build_ids(store: &Store, image: &str) -> anyhow::Result<BTreeSet<String>> {
    Ok(image_state(store)
        .await?
        .builds
        .into_iter()
        .filter(|b| b.image == image)
        .map(|b| b.id)
        .collect())
}

/// The (build, upload) ids of an image's uploads to a provider now.
pub async fn upload_ids(
    store: &Store,
    image: &str,
    provider: &str,
) -> anyhow::Result<BTreeSet<(String, String)>> {
    Ok(image_state(store)
        .await?
        .uploads
        .into_iter()
        .filter(|u| u.image == image && u.provider == provider)
        .map(|u| (u.build_id, u.id))
        .collect())
}

/// The ready upload of a build to a provider: its id and cloud image id.
pub async fn ready_upload(
    store: &Store,
    image: &str,
    build: &str,
    provider: &str,
) -> anyhow::Result<Option<(String, String)>> {
    Ok(image_state(store).await?.uploads.into_iter().find_map(|u| {
        let mine = u.image == image && u.build_id == build && u.provider == provider;
        match (mine, u.upload.state, u.upload.external_id) {
            (true, UploadState::Ready, Some(ext)) => Some((u.id, ext)),
            _ => None,
        }
    }))
}

fn gave_up(what: &str, limit: Duration, then: &str) -> anyhow::Error {
    anyhow!(
        "gave up waiting for {what} after {} s (--timeout); {then}",
        limit.as_secs()
    )
}

/// Follows the first build of `image` not in `known` until it is ready
/// (returns its id) or failed (an error with the reason).
pub async fn follow_build(
    store: &Store,
    image: &str,
    known: &BTreeSet<String>,
    limit: Duration,
    progress: &mut Progress<'_>,
) -> anyhow::Result<String> {
    let deadline = Instant::now() + limit;
    let mut ours: Option<String> = None;
    let mut last_phase = None;
    loop {
        let st = image_state(store).await?;
        let found = match &ours {
            Some(id) => st.builds.iter().find(|b| b.image == image && &b.id == id),
            None => st
                .builds
                .iter()
                .filter(|b| b.image == image && !known.contains(&b.id))
                .min_by(|a, b| a.build.state_time.total_cmp(&b.build.state_time)),
        };
        match (found, &ours) {
            (None, None) => progress.status(&format!("waiting for a builder to start {image}")),
            (None, Some(id)) => {
                progress.finish();
                return Err(anyhow!(
                    "build {id} of {image} was deleted before it was ready{}",
                    phase_note(last_phase.as_ref())
                ));
            }
            (Some(b), _) => {
                let id = b.id.clone();
                ours = Some(id.clone());
                match b.build.state {
                    BuildState::Building => {
                        let text = match b.build.progress() {
                            Some(p) => {
                                let line = format!(
                                    "build {id} of {image}: phase {}{}",
                                    p.phase,
                                    p.step
                                        .as_deref()
                                        .map(|s| format!(" ({s})"))
                                        .unwrap_or_default()
                                );
                                last_phase = Some(p);
                                line
                            }
                            None => format!("build {id} of {image}: started"),
                        };
                        progress.status(&text);
                    }
                    BuildState::Ready => {
                        progress.finish();
                        return Ok(id);
                    }
                    BuildState::Failed => {
                        progress.finish();
                        let why = b.build.log_tail().unwrap_or_default();
                        let first = why.lines().next().unwrap_or("no reason recorded");
                        let last = why
                            .lines()
                            .rev()
                            .find(|l| !l.trim().is_empty() && *l != first)
                            .map(|l| format!(" (last output: {})", l.trim()))
                            .unwrap_or_default();
                        return Err(anyhow!(
                            "build {id} of {image} failed{}: {first}{last}; the builder's log has the rest",
                            phase_note(b.build.progress().as_ref().or(last_phase.as_ref()))
                        ));
                    }
                    BuildState::Deleting => {
                        progress.finish();
                        return Err(anyhow!(
                            "build {id} of {image} is being deleted (its builder is gone, or an operator deleted it){}",
                            phase_note(last_phase.as_ref())
                        ));
                    }
                }
            }
        }
        if Instant::now() >= deadline {
            progress.finish();
            return Err(gave_up(
                &format!("the build of {image}"),
                limit,
                "the build goes on: see dib-image-list",
            ));
        }
        tokio::time::sleep(POLL).await;
    }
}

fn phase_note(p: Option<&nodepool_core::model::BuildProgressRecord>) -> String {
    match p {
        Some(p) => format!(" in phase {}", p.phase),
        None => String::new(),
    }
}

/// What a followed upload ended as.
pub struct UploadDone {
    /// Its build.
    pub build: String,
    /// Its id.
    pub upload: String,
    /// The cloud image id.
    pub external_id: String,
    /// Bytes of the file.
    pub bytes: Option<u64>,
}

/// Follows the first upload of `image` to `provider` not in `known` until
/// it is ready or failed (an error with the reason).
pub async fn follow_upload(
    store: &Store,
    image: &str,
    provider: &str,
    known: &BTreeSet<(String, String)>,
    limit: Duration,
    progress: &mut Progress<'_>,
) -> anyhow::Result<UploadDone> {
    let deadline = Instant::now() + limit;
    let mut ours: Option<(String, String)> = None;
    loop {
        let st = image_state(store).await?;
        let mine =
            |u: &&nodepool_core::store::UploadRecord| u.image == image && u.provider == provider;
        let found = match &ours {
            Some((b, id)) => st
                .uploads
                .iter()
                .filter(mine)
                .find(|u| &u.build_id == b && &u.id == id),
            None => st
                .uploads
                .iter()
                .filter(mine)
                .filter(|u| !known.contains(&(u.build_id.clone(), u.id.clone())))
                .min_by(|a, b| a.upload.state_time.total_cmp(&b.upload.state_time)),
        };
        match (found, &ours) {
            (None, None) => progress.status(&format!(
                "waiting for a builder to start uploading {image} to {provider}"
            )),
            (None, Some((b, id))) => {
                progress.finish();
                return Err(anyhow!(
                    "upload {id} of {image} build {b} to {provider} was deleted before it was ready"
                ));
            }
            (Some(u), _) => {
                let (build, id) = (u.build_id.clone(), u.id.clone());
                ours = Some((build.clone(), id.clone()));
                let what = format!("upload {id} of {image} to {provider}");
                let p = u.upload.progress();
                match u.upload.state {
                    UploadState::Uploading => match p {
                        Some(p) => {
                            progress.bytes(&what, p.bytes_sent, p.total_bytes, Instant::now())
                        }
                        None => progress.status(&format!("{what}: started")),
                    },
                    UploadState::Ready => {
                        progress.finish();
                        return Ok(UploadDone {
                            build,
                            upload: id,
                            external_id: u.upload.external_id.clone().unwrap_or_default(),
                            bytes: p.map(|p| p.total_bytes),
                        });
                    }
                    UploadState::Failed => {
                        progress.finish();
                        let why = u
                            .upload
                            .failure()
                            .unwrap_or_else(|| "no reason recorded".to_owned());
                        return Err(anyhow!("{what} failed: {why}"));
                    }
                    UploadState::Deleting => {
                        progress.finish();
                        return Err(anyhow!("{what} is being deleted"));
                    }
                }
            }
        }
        if Instant::now() >= deadline {
            progress.finish();
            return Err(gave_up(
                &format!("the upload of {image} to {provider}"),
                limit,
                "the upload goes on: see image-list",
            ));
        }
        tokio::time::sleep(POLL).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_and_durations_read_well() {
        assert_eq!(human_bytes(512), "512 B");
        assert_eq!(human_bytes(65_536), "64.0 KiB");
        assert_eq!(human_bytes(3 << 30), "3.0 GiB");
        assert_eq!(human_duration(Duration::from_secs(42)), "42s");
        assert_eq!(human_duration(Duration::from_secs(185)), "3m05s");
        assert_eq!(human_duration(Duration::from_secs(3720)), "1h02m");
    }

    #[test]
    fn plain_lines_come_per_change_and_at_most_every_few_seconds() {
        let mut out = Vec::new();
        let t0 = Instant::now();
        {
            let mut p = Progress::new(&mut out, false);
            p.status("build 1 of deb: phase root");
            p.status("build 1 of deb: phase root");
            p.status("build 1 of deb: phase install");
            p.bytes("upload 1", 0, 1 << 20, t0);
            p.bytes("upload 1", 1 << 18, 1 << 20, t0 + Duration::from_secs(1));
            p.bytes("upload 1", 1 << 19, 1 << 20, t0 + LINE_EVERY);
            p.finish();
        }
        let text = String::from_utf8(out).expect("utf-8");
        assert_eq!(
            text,
            "build 1 of deb: phase root\n\
             build 1 of deb: phase install\n\
             upload 1: 0 B of 1.0 MiB (0%)\n\
             upload 1: 512.0 KiB of 1.0 MiB (50%), 102.4 KiB/s, ETA 5s\n"
        );
    }

    #[test]
    fn a_terminal_gets_one_line_redrawn_with_a_bar() {
        let mut out = Vec::new();
        let t0 = Instant::now();
        {
            let mut p = Progress::new(&mut out, true);
            p.bytes("upload 1", 0, 1000, t0);
            p.bytes("upload 1", 500, 1000, t0 + Duration::from_secs(1));
            p.finish();
        }
        let text = String::from_utf8(out).expect("utf-8");
        assert_eq!(text.matches('\n').count(), 1, "{text:?}");
        assert!(
            text.ends_with(&format!(
                "\r\x1b[2K[{}{}] upload 1: 500 B of 1000 B (50%), 500 B/s, ETA 1s\n",
                "#".repeat(15),
                "-".repeat(15)
            )),
            "{text:?}"
        );
    }
}
