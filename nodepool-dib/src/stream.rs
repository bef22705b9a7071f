//! Streaming a build's output to its log file, to tracing and into a
//! bounded tail kept for the error report.
//!
//! The log file gets the bytes exactly as the build wrote them, so a
//! 25 kB line (diskimage-builder prints one) is kept whole and memory does
//! not depend on line length. Tracing and the tail get lines, each capped,
//! so a pathological line without a newline cannot grow memory either.

use std::collections::VecDeque;

use nodepool_model::image_builder::{BuildPhase, BuildProgress};
use tokio::io::{AsyncReadExt, AsyncWriteExt, BufWriter};
use tokio::net::unix::pipe::Receiver;
use tokio_util::sync::CancellationToken;

/// Longest line handed to tracing; longer ones are cut with a marker.
pub const TRACE_LINE_MAX: usize = 64 * 1024;
/// Lines kept for a failed build's report.
pub const TAIL_LINES: usize = 50;
/// Longest line kept in the tail; longer ones are cut with a marker.
pub const TAIL_LINE_MAX: usize = 1024;

/// Splits a byte stream into lines, keeping at most `max` bytes of each and
/// counting the rest.
#[derive(Debug)]
pub struct LineSplitter {
    buf: Vec<u8>,
    dropped: usize,
    max: usize,
}

impl LineSplitter {
    /// A splitter keeping at most `max` bytes of a line.
    pub fn new(max: usize) -> Self {
        LineSplitter {
            buf: Vec::new(),
            dropped: 0,
            max,
        }
    }

    /// Feeds bytes; calls `line(kept, dropped)` for each completed line
    /// (without its newline).
    pub fn push(&mut self, mut data: &[u8], mut line: impl FnMut(&[u8], usize)) {
        while !data.is_empty() {
            let (seg, rest, ended) = match data.iter().position(|&b| b == b'\n') {
                Some(i) => (&data[..i], &data[i + 1..], true),
                None => (data, &data[data.len()..], false),
            };
            let room = self.max.saturating_sub(self.buf.len());
            let keep = seg.len().min(room);
            self.buf.extend_from_slice(&seg[..keep]);
            self.dropped += seg.len() - keep;
            if ended {
                line(&self.buf, self.dropped);
                self.buf.clear();
                self.dropped = 0;
            }
            data = rest;
        }
    }

    /// Emits a last line that had no newline, if any.
    pub fn finish(&mut self, mut line: impl FnMut(&[u8], usize)) {
        if !self.buf.is_empty() || self.dropped > 0 {
            line(&self.buf, self.dropped);
            self.buf.clear();
            self.dropped = 0;
        }
    }
}

/// A line as text, cut at `max` bytes (on a character boundary) with a
/// note of how much was cut.
pub fn line_text(kept: &[u8], dropped: usize, max: usize) -> String {
    let text = String::from_utf8_lossy(kept);
    let mut cut = dropped;
    let mut s: &str = &text;
    if s.len() > max {
        let mut end = max;
        while !s.is_char_boundary(end) {
            end -= 1;
        }
        cut += s.len() - end;
        s = &s[..end];
    }
    if cut > 0 {
        format!("{s}… [{cut} more bytes]")
    } else {
        s.to_owned()
    }
}

/// The last [`TAIL_LINES`] lines, each at most [`TAIL_LINE_MAX`] bytes.
#[derive(Debug, Default, Clone)]
pub struct Tail {
    lines: VecDeque<String>,
}

impl Tail {
    /// Adds a line, forgetting the oldest beyond [`TAIL_LINES`].
    pub fn push(&mut self, kept: &[u8], dropped: usize) {
        if self.lines.len() == TAIL_LINES {
            self.lines.pop_front();
        }
        self.lines
            .push_back(line_text(kept, dropped, TAIL_LINE_MAX));
    }

    /// The lines, newline-joined.
    pub fn text(&self) -> String {
        self.lines
            .iter()
            .map(String::as_str)
            .collect::<Vec<_>>()
            .join("\n")
    }
}

/// What the pump saw, handed back when it ends.
#[derive(Debug)]
pub struct PumpEnd {
    /// The log file, still open, for the `Exit code` line.
    pub log: BufWriter<tokio::fs::File>,
    /// The last lines.
    pub tail: Tail,
    /// Whether the output's last byte was a newline (or there was none).
    pub ended_with_newline: bool,
    /// Bytes read.
    pub bytes: u64,
    /// Whether the pipe reached end of file (all writers gone) rather than
    /// being abandoned through `stop`.
    pub eof: bool,
}

/// Copies the pipe to the log and to tracing until end of file or `stop`,
/// setting `progress` from diskimage-builder's phase lines.
///
/// Write errors on the log are reported once through tracing and the pipe
/// is still drained: a full disk must not block the build on a full pipe.
pub async fn pump(
    mut rx: Receiver,
    log: tokio::fs::File,
    label: String,
    progress: Option<BuildProgress>,
    stop: CancellationToken,
) -> PumpEnd {
    let mut log = BufWriter::with_capacity(64 * 1024, log);
    let mut buf = vec![0u8; 64 * 1024];
    let mut trace = LineSplitter::new(TRACE_LINE_MAX);
    let mut tail_split = LineSplitter::new(TAIL_LINE_MAX + 4);
    let mut tail = Tail::default();
    let mut ended_with_newline = true;
    let mut bytes = 0u64;
    let mut write_failed = false;
    let mut eof = false;
    loop {
        let n = tokio::select! {
            biased;
            r = rx.read(&mut buf) => match r {
                Ok(0) => { eof = true; break; }
                Ok(n) => n,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    tracing::warn!(build = %label, error = %e, "reading build output failed");
                    break;
                }
            },
            _ = stop.cancelled() => break,
        };
        let data = &buf[..n];
        bytes += n as u64;
        ended_with_newline = data.last() == Some(&b'\n');
        if !write_failed {
            // Flushed per read, so the log can be followed while it builds.
            let r = match log.write_all(data).await {
                Ok(()) => log.flush().await,
                Err(e) => Err(e),
            };
            if let Err(e) = r {
                write_failed = true;
                tracing::warn!(build = %label, error = %e, "writing the build log failed; output still drained");
            }
        }
        trace.push(data, |kept, dropped| {
            let line = line_text(kept, dropped, TRACE_LINE_MAX);
            if let Some(p) = &progress
                && let Some(phase) = BuildPhase::from_dib_line(&line)
            {
                p.set(phase);
            }
            tracing::debug!(target: "nodepool_dib::output", build = %label, "{line}");
        });
        tail_split.push(data, |kept, dropped| tail.push(kept, dropped));
    }
    trace.finish(|kept, dropped| {
        tracing::debug!(target: "nodepool_dib::output", build = %label, "{}", line_text(kept, dropped, TRACE_LINE_MAX));
    });
    tail_split.finish(|kept, dropped| tail.push(kept, dropped));
    PumpEnd {
        log,
        tail,
        ended_with_newline,
        bytes,
        eof,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn split_all(chunks: &[&[u8]], max: usize) -> Vec<(Vec<u8>, usize)> {
        let mut out = Vec::new();
        let mut s = LineSplitter::new(max);
        for c in chunks {
            s.push(c, |k, d| out.push((k.to_vec(), d)));
        }
        s.finish(|k, d| out.push((k.to_vec(), d)));
        out
    }

    #[test]
    fn lines_across_chunks_and_a_last_line_without_newline() {
        let out = split_all(&[b"ab", b"c\nde", b"f\n\ngh"], 100);
        let lines: Vec<_> = out.iter().map(|(k, _)| k.as_slice()).collect();
        assert_eq!(lines, [&b"abc"[..], b"def", b"", b"gh"]);
        assert!(out.iter().all(|(_, d)| *d == 0));
    }

    #[test]
    fn long_lines_are_capped_and_counted_not_buffered() {
        let long = vec![b'x'; 10_000];
        let mut out = Vec::new();
        let mut s = LineSplitter::new(100);
        for c in long.chunks(333) {
            s.push(c, |k, d| out.push((k.len(), d)));
            assert!(s.buf.len() <= 100);
        }
        s.push(b"\nok\n", |k, d| out.push((k.len(), d)));
        assert_eq!(out, [(100, 9_900), (2, 0)]);
    }

    #[test]
    fn line_text_cuts_on_a_character_boundary() {
        assert_eq!(line_text("héllo".as_bytes(), 0, 100), "héllo");
        assert_eq!(line_text("héllo".as_bytes(), 0, 2), "h… [5 more bytes]");
        assert_eq!(line_text(b"abc", 7, 100), "abc… [7 more bytes]");
        assert_eq!(line_text(&[0xff, b'a'], 0, 100), "\u{fffd}a");
    }

    #[test]
    fn tail_keeps_the_last_lines_bounded() {
        let mut t = Tail::default();
        for i in 0..200 {
            t.push(format!("line {i}").as_bytes(), 0);
        }
        t.push(&[b'y'; 5000], 0);
        let text = t.text();
        let lines: Vec<_> = text.lines().collect();
        assert_eq!(lines.len(), TAIL_LINES);
        assert_eq!(lines[0], "line 151");
        assert!(lines[TAIL_LINES - 1].ends_with("… [3976 more bytes]"));
        assert!(text.len() < TAIL_LINES * (TAIL_LINE_MAX + 32));
    }
}
