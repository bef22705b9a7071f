//! Build output reaches tracing at debug, line by line, long lines whole.
//! A test binary of its own: it installs the global subscriber.

// Helpers outside #[test] fns panic on purpose, like the tests themselves.
#![allow(clippy::unwrap_used)]

mod common;

use std::sync::{Arc, Mutex};

use nodepool_dib::DibBuilder;
use nodepool_model::image_builder::ImageBuilder;
use tokio_util::sync::CancellationToken;

const FAKE: &str = env!("CARGO_BIN_EXE_fake-disk-image-create");

#[derive(Clone)]
struct Writer(Arc<Mutex<Vec<u8>>>);

impl std::io::Write for Writer {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

#[tokio::test]
async fn build_output_is_traced_at_debug() {
    let captured = Arc::new(Mutex::new(Vec::<u8>::new()));
    let sink = captured.clone();
    tracing_subscriber::fmt()
        .with_max_level(tracing::Level::DEBUG)
        .with_ansi(false)
        .with_writer(move || Writer(sink.clone()))
        .init();

    let dir = tempfile::tempdir().unwrap();
    let yaml = format!(
        "images-dir: {d}/images\nbuild-log-dir: {d}/logs\ndiskimages:\n  - name: deb\n    dib-cmd: {FAKE}\n    elements: [debian-minimal]\n    formats: [raw]\n    env-vars: {{FAKE_DIB_LINES: '300', FAKE_DIB_LONG_LINE: '30000'}}\n",
        d = dir.path().display()
    );
    let spec = common::spec_from_config(&common::config(&yaml), "deb", "0a");
    DibBuilder::default()
        .build(&spec, CancellationToken::new())
        .await
        .unwrap();

    let traced = String::from_utf8_lossy(&captured.lock().unwrap()).into_owned();
    let output: Vec<&str> = traced
        .lines()
        .filter(|l| l.contains("nodepool_dib::output"))
        .collect();
    assert!(
        output.iter().all(|l| l.contains("DEBUG")),
        "output lines are at debug"
    );
    for i in [0, 150, 299] {
        let want = format!("fake-dib: line {i} of 300");
        assert!(
            output
                .iter()
                .any(|l| l.contains(&format!("{want} build=deb-0a"))),
            "{want} not traced"
        );
    }
    let long = format!("fake-dib: long line {}", "x".repeat(30_000));
    assert!(
        output.iter().any(|l| l.contains(&format!("{long} build="))),
        "the 30 kB line is not traced whole"
    );
    assert!(
        output
            .iter()
            .any(|l| l.contains("Build completed successfully build=")),
        "the last line is traced: {}",
        output.last().unwrap_or(&"")
    );
    assert!(
        traced.contains("running diskimage-builder"),
        "the command is logged at info"
    );
}
