//! Issue 17: the runbooks of `docs/runbooks.md` (the seeds' procedures:
//! bad-image rollback from seed 000, provider removal from seed 001, alien
//! cleanup and a manual snapshot from seed 002, leftover cleanup from seed
//! 004) are run.
//!
//! Each runbook's `nodepool ...` commands are read from the page (its
//! ```` ```sh ```` blocks and its inline code, in order, with their
//! `# prints: ...` claims), and a test sets up the situation the runbook is
//! for and runs them one by one with the real `nodepool` binary, checking
//! what the page says they print and do. Its `openstack ...` commands (what
//! the operator does in the cloud by hand) are read too, and done through
//! the simulated cloud's API. A test steps through its
//! runbook's commands as the page lists them and fails on one it does not
//! expect or one it never ran, so the page and the tests cannot drift
//! apart; [`every_runbook_with_commands_is_run`] fails on a new runbook
//! no test runs.
//!
//! Everything is real and shares state the way an installation does: the
//! store (a SQLite file or a ZooKeeper chroot), the simulated cloud in a
//! state file that the `nodepool-builder` and `nodepool-launcher`
//! processes, every `nodepool` process and this test open, and the builder
//! building with the fake `disk-image-create` of `common`. Waits poll the
//! store, the cloud or the CLI's output, with a generous limit.

mod common;

use std::collections::VecDeque;
use std::path::{Path, PathBuf};
use std::time::Duration;

use common::{Backend, Fixture, Out, row, row_count};
use nodepool_core::config::ApiFault;
use nodepool_core::model::{BuildState, Node, NodeState, UploadState, epoch_now};
use nodepool_core::provider::{IMAGE_BUILD_ID, IMAGE_PROVIDER, ImageUploadSpec, Provider};
use nodepool_core::store::{ImageState, LockWait};
use nodepool_requestor::{NewRequest, Outcome, Requestor};
use nodepool_simulated::SimulatedProvider;

const BUILDER: &str = env!("CARGO_BIN_EXE_nodepool-builder");
const LAUNCHER: &str = env!("CARGO_BIN_EXE_nodepool-launcher");
const LIMIT: Duration = Duration::from_secs(60);
const IMAGE: &str = "ubuntu-jammy";

/// The runbooks this file runs, by section title.
const RUNBOOKS: &[&str] = &[
    "Roll back a bad image",
    "Remove a provider",
    "Clean up aliens",
    "Clean up leftovers",
    "Manually generate a new snapshot",
];

// ---------------------------------------------------------------------------
// The page

/// One command of a runbook, as the page spells it.
#[derive(Clone, Debug, PartialEq, Eq)]
struct DocCommand {
    /// The command line, starting with its program.
    text: String,
    /// The shell comment after it, if any (`prints: ...`, column names).
    note: Option<String>,
}

impl DocCommand {
    /// What the page says the command prints.
    fn prints(&self) -> Option<&str> {
        self.note.as_deref()?.strip_prefix("prints: ")
    }

    /// The arguments after the program, with the page's placeholders
    /// replaced by `subs` (a placeholder replaced by "" is dropped).
    fn args(&self, subs: &[(&str, &str)]) -> Vec<String> {
        self.text
            .split_whitespace()
            .skip(1)
            .map(|w| {
                subs.iter()
                    .find(|(from, _)| *from == w)
                    .map_or(w, |(_, to)| *to)
                    .to_owned()
            })
            .filter(|w| !w.is_empty())
            .collect()
    }
}

/// Commands a runbook has the operator run: the `nodepool` CLI, and the
/// `openstack` CLI for what is done in the cloud by hand.
const PROGRAMS: &[&str] = &["nodepool ", "openstack "];

fn is_command(text: &str) -> bool {
    PROGRAMS.iter().any(|p| text.starts_with(p))
}

/// The commands ([`PROGRAMS`]) of each `## ` section of a Markdown page, in
/// page order: lines of ```` ```sh ```` blocks that start with one (a `#`
/// comment after the command is its note), and inline code spans that do
/// (a span may run over a line break, as in Markdown).
fn runbooks(md: &str) -> Vec<(String, Vec<DocCommand>)> {
    let mut out: Vec<(String, Vec<DocCommand>)> = Vec::new();
    let mut fence: Option<String> = None;
    // The prose paragraph read so far, its lines joined by spaces.
    let mut prose = String::new();
    let flush = |prose: &mut String, out: &mut Vec<(String, Vec<DocCommand>)>| {
        if let Some((_, commands)) = out.last_mut() {
            commands.extend(
                code_spans(prose)
                    .into_iter()
                    .filter(|s| is_command(s))
                    .map(|text| DocCommand { text, note: None }),
            );
        }
        prose.clear();
    };
    for line in md.lines() {
        let t = line.trim();
        if let Some(info) = t.strip_prefix("```") {
            flush(&mut prose, &mut out);
            fence = match fence {
                Some(_) => None,
                None => Some(info.trim().to_owned()),
            };
            continue;
        }
        match &fence {
            None if t.is_empty() => flush(&mut prose, &mut out),
            None => {
                if let Some(title) = t.strip_prefix("## ") {
                    flush(&mut prose, &mut out);
                    out.push((title.to_owned(), Vec::new()));
                } else {
                    prose.push_str(t);
                    prose.push(' ');
                }
            }
            Some(lang) if lang == "sh" && is_command(t) => {
                if let Some((_, commands)) = out.last_mut() {
                    let (text, note) = match t.split_once(" #") {
                        Some((c, n)) => (c.trim(), Some(n.trim().to_owned())),
                        None => (t, None),
                    };
                    commands.push(DocCommand {
                        text: text.to_owned(),
                        note,
                    });
                }
            }
            Some(_) => {}
        }
    }
    flush(&mut prose, &mut out);
    out
}

/// The inline code spans of a line (`` `x` ``, ``` `` x `` ```), trimmed.
fn code_spans(line: &str) -> Vec<String> {
    let b = line.as_bytes();
    let mut spans = Vec::new();
    let mut i = 0;
    while i < b.len() {
        if b[i] != b'`' {
            i += 1;
            continue;
        }
        let run = b[i..].iter().take_while(|&&c| c == b'`').count();
        let start = i + run;
        let mut j = start;
        let mut end = None;
        while j < b.len() {
            if b[j] == b'`' {
                let r = b[j..].iter().take_while(|&&c| c == b'`').count();
                if r == run {
                    end = Some(j);
                    break;
                }
                j += r;
            } else {
                j += 1;
            }
        }
        match end {
            Some(e) => {
                spans.push(line[start..e].trim().to_owned());
                i = e + run;
            }
            None => i = start,
        }
    }
    spans
}

fn page() -> String {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../docs/runbooks.md");
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// A runbook's commands, taken in page order by the test running it.
struct Runbook {
    title: &'static str,
    left: VecDeque<DocCommand>,
}

impl Runbook {
    fn open(title: &'static str) -> Self {
        let (_, commands) = runbooks(&page())
            .into_iter()
            .find(|(t, _)| t == title)
            .unwrap_or_else(|| panic!("docs/runbooks.md has no section {title:?}"));
        Runbook {
            title,
            left: commands.into(),
        }
    }

    /// The runbook's next command, which must be `text`.
    fn next(&mut self, text: &str) -> DocCommand {
        let c = self.left.pop_front().unwrap_or_else(|| {
            panic!(
                "{:?}: the test runs {text:?}, the page has no more commands",
                self.title
            )
        });
        assert_eq!(
            c.text, text,
            "{:?}: the page's next command is not the one the test runs",
            self.title
        );
        c
    }

    /// Every command of the runbook was run.
    fn done(self) {
        assert!(
            self.left.is_empty(),
            "{:?}: the page has commands no test step runs: {:?}",
            self.title,
            self.left
        );
    }
}

#[test]
fn the_page_parser_finds_commands_of_sh_blocks_and_inline_code_in_order() {
    let md = "# T\n\nintro `nodepool list`\n\n## One\n\n1. See `nodepool image-status` or `nodepool\n   info X`, `` nodepool  info  Y ``.\n\n   ```sh\n   nodepool image-pause ubuntu   # prints: image ubuntu paused\n   openstack server delete ID\n   nodepool alien-list\n   ```\n\n   ```yaml\n   nodepool: x\n   ```\n\n## Two\n\n`nodepool.provider.p.leaked` and `--yes`, `nodepool delete ID`\n";
    let books = runbooks(md);
    let cmd = |text: &str, note: Option<&str>| DocCommand {
        text: text.into(),
        note: note.map(Into::into),
    };
    assert_eq!(
        books,
        [
            (
                "One".to_owned(),
                vec![
                    cmd("nodepool image-status", None),
                    cmd("nodepool info X", None),
                    cmd("nodepool  info  Y", None),
                    cmd(
                        "nodepool image-pause ubuntu",
                        Some("prints: image ubuntu paused")
                    ),
                    cmd("openstack server delete ID", None),
                    cmd("nodepool alien-list", None),
                ]
            ),
            ("Two".to_owned(), vec![cmd("nodepool delete ID", None)]),
        ]
    );
    assert_eq!(books[0].1[3].prints(), Some("image ubuntu paused"));
    assert_eq!(
        cmd("nodepool alien-list [PROVIDER]", None).args(&[("[PROVIDER]", "")]),
        ["alien-list"]
    );
    assert_eq!(
        cmd("nodepool delete --now NODE_ID", None).args(&[("NODE_ID", "0000000001")]),
        ["delete", "--now", "0000000001"]
    );
}

#[test]
fn every_runbook_with_commands_is_run() {
    let books = runbooks(&page());
    for title in RUNBOOKS {
        let (_, commands) = books
            .iter()
            .find(|(t, _)| t == title)
            .unwrap_or_else(|| panic!("docs/runbooks.md has no section {title:?}"));
        assert!(!commands.is_empty(), "{title:?} has no command");
    }
    for (title, commands) in &books {
        assert!(
            commands.is_empty() || RUNBOOKS.contains(&title.as_str()),
            "docs/runbooks.md section {title:?} has commands no test runs: {commands:?}"
        );
    }
}

// ---------------------------------------------------------------------------
// Parts

/// A daemon process on the fixture's configuration, its stderr in a log
/// file; killed if the test ends without [`Daemon::stop`].
struct Daemon {
    name: &'static str,
    child: tokio::process::Child,
    log: PathBuf,
}

impl Daemon {
    fn start(f: &Fixture, bin: &str, name: &'static str) -> Self {
        let log = f.dir.path().join(format!("{name}.log"));
        let child = tokio::process::Command::new(bin)
            .arg("-c")
            .arg(&f.config_path)
            .arg("--no-webapp")
            .current_dir(f.dir.path())
            .stdout(std::process::Stdio::null())
            .stderr(std::fs::File::create(&log).expect("log file"))
            .kill_on_drop(true)
            .spawn()
            .unwrap_or_else(|e| panic!("start {name}: {e}"));
        Daemon { name, child, log }
    }

    fn log(&self) -> String {
        format!(
            "--- {} log:\n{}",
            self.name,
            std::fs::read_to_string(&self.log).unwrap_or_default()
        )
    }

    /// SIGTERM, and a clean exit.
    async fn stop(mut self) {
        let pid = self.child.id().expect("running").to_string();
        let ok = std::process::Command::new("kill")
            .args(["-TERM", &pid])
            .status()
            .expect("run kill");
        assert!(ok.success(), "kill -TERM {pid}");
        let status = tokio::time::timeout(LIMIT, self.child.wait())
            .await
            .unwrap_or_else(|_| panic!("{} stops within {LIMIT:?}\n{}", self.name, self.log()))
            .expect("wait");
        assert!(
            status.success(),
            "{} exited {status}\n{}",
            self.name,
            self.log()
        );
    }
}

/// Polls `check` until it gives a value; fails after [`LIMIT`] with the
/// last look and the daemons' logs.
async fn until<T, F, Fut>(what: &str, daemons: &[&Daemon], mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T, String>>,
{
    let deadline = tokio::time::Instant::now() + LIMIT;
    loop {
        match check().await {
            Ok(v) => return v,
            Err(last) => {
                if tokio::time::Instant::now() >= deadline {
                    let logs: Vec<String> = daemons.iter().map(|d| d.log()).collect();
                    panic!(
                        "timed out waiting for {what}; last look: {last}\n{}",
                        logs.join("\n")
                    );
                }
            }
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// The simulated cloud of `provider`, opened from the shared state file.
fn cloud(f: &Fixture, provider: &str) -> SimulatedProvider {
    SimulatedProvider::new(f.config.provider(provider).expect("provider in the config"))
        .expect("the simulated cloud")
}

/// A simulated provider in the shared cloud file, with one pool serving
/// `label` from the diskimage.
fn provider(name: &str, label: &str, extra: &str, pool_extra: &str) -> String {
    format!(
        "  - name: {name}
    driver: simulated
    simulation:
      boot-delay: 0.05
      delete-delay: 0.05
      state-file: cloud.json
{extra}    pools:
      - name: main
{pool_extra}        labels:
          - name: {label}
            diskimage: {IMAGE}
            flavor-name: Fake Flavor
"
    )
}

const WITH_IMAGE: &str = "    diskimages:\n      - name: ubuntu-jammy\n";

/// The parts of a configuration that name the fixture's directory.
fn head(dir: &Path) -> String {
    common::install_fake_dib(dir);
    format!(
        "images-dir: {d}/images\nbuild-log-dir: {d}/logs\n",
        d = dir.display()
    )
}

fn diskimages(dir: &Path, extra: &str) -> String {
    format!(
        "diskimages:\n  - name: {IMAGE}\n    dib-cmd: {}/fake-dib\n    elements: [ubuntu-minimal]\n{extra}",
        dir.display()
    )
}

/// Replaces the configuration's body (everything from `images-dir:` on),
/// keeping its store section; written aside and renamed, so a daemon never
/// reads half a file.
fn rewrite(f: &Fixture, body: &str) {
    let text = std::fs::read_to_string(&f.config_path).expect("read config");
    let at = text.find("images-dir:").expect("a body");
    let tmp = f.config_path.with_extension("new");
    std::fs::write(&tmp, format!("{}{body}", &text[..at])).expect("write config");
    std::fs::rename(&tmp, &f.config_path).expect("rename config");
}

/// How many configurations the daemon's runtime has taken since it started.
fn reloads(d: &Daemon) -> usize {
    std::fs::read_to_string(&d.log)
        .unwrap_or_default()
        .lines()
        .filter(|l| l.contains("nodepool_core::") && l.ends_with(": configuration reloaded"))
        .count()
}

/// [`rewrite`], and wait until every daemon runs the new configuration.
async fn reconfigure(f: &Fixture, body: &str, daemons: &[&Daemon]) {
    let before: Vec<usize> = daemons.iter().map(|d| reloads(d)).collect();
    rewrite(f, body);
    until("the daemons reloaded", daemons, || async {
        let now: Vec<usize> = daemons.iter().map(|d| reloads(d)).collect();
        if now.iter().zip(&before).all(|(n, b)| n > b) {
            Ok(())
        } else {
            Err(format!("reloads before {before:?}, now {now:?}"))
        }
    })
    .await;
}

async fn images(f: &Fixture) -> ImageState {
    f.store.image_state().await.expect("image state")
}

/// Ready builds of the image with a ready upload to `provider`, oldest
/// first.
fn uploaded_builds(st: &ImageState, provider: &str) -> Vec<String> {
    let mut builds: Vec<_> = st
        .builds
        .iter()
        .filter(|b| b.image == IMAGE && b.build.state == BuildState::Ready)
        .filter(|b| {
            st.uploads.iter().any(|u| {
                u.build_id == b.id
                    && u.provider == provider
                    && u.upload.state == UploadState::Ready
                    && u.upload.external_id.is_some()
            })
        })
        .collect();
    builds.sort_by(|a, b| a.build.state_time.total_cmp(&b.build.state_time));
    builds.iter().map(|b| b.id.clone()).collect()
}

async fn nodes_of(f: &Fixture, provider: &str) -> Vec<(String, std::sync::Arc<Node>)> {
    f.store
        .list_nodes()
        .await
        .expect("nodes")
        .records
        .into_iter()
        .filter(|r| r.node.provider == provider)
        .map(|r| (r.id, r.node))
        .collect()
}

async fn ready_node_of(f: &Fixture, provider: &str) -> Result<String, String> {
    let nodes = nodes_of(f, provider).await;
    nodes
        .iter()
        .find(|(_, n)| n.state == NodeState::Ready)
        .map(|(id, _)| id.clone())
        .ok_or_else(|| format!("nodes of {provider}: {nodes:?}"))
}

/// Runs a page's command with the real binary.
async fn run_doc(f: &Fixture, cmd: &DocCommand, subs: &[(&str, &str)]) -> Out {
    let args = cmd.args(subs);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    f.run(&args).await
}

/// Asserts the command printed what the page says it prints.
fn prints_as_documented(cmd: &DocCommand, out: &Out, subs: &[(&str, &str)]) {
    let mut said = cmd.prints().expect("a prints: claim").to_owned();
    for (from, to) in subs {
        said = said.replace(from, to);
    }
    assert_eq!(out.ok(), format!("{said}\n"), "{}", cmd.text);
}

/// Which build a node booted for `small` now comes from: a node is
/// requested through the real CLI from the running launcher.
async fn boot_build(f: &Fixture, daemons: &[&Daemon]) -> String {
    let out = f.run(&["request", "small", "--timeout", "60"]).await;
    if out.code != Some(0) {
        let logs: Vec<String> = daemons.iter().map(|d| d.log()).collect();
        panic!("request failed: {}\n{}", out.stderr, logs.join("\n"));
    }
    let id = row(&out.stdout, "small")[0].clone();
    let node = f.store.get_node(&id).await.expect("read").expect("node");
    let image = node.value.image_id.clone().expect("the node's image");
    let st = images(f).await;
    st.builds
        .iter()
        .find(|b| image.contains(&b.id))
        .map(|b| b.id.clone())
        .unwrap_or_else(|| panic!("node {id} booted from {image}, not a build of ours"))
}

/// An age column (`DD:HH:MM:SS`) in seconds.
fn age_secs(cell: &str) -> u64 {
    cell.split(':')
        .map(|p| p.parse::<u64>().unwrap_or_else(|_| panic!("age {cell:?}")))
        .zip([86_400, 3600, 60, 1])
        .map(|(v, unit)| v * unit)
        .sum()
}

// ---------------------------------------------------------------------------
// Roll back a bad image (seed 000)

async fn roll_back_a_bad_image(backend: Backend) {
    let f = Fixture::with_body_in(backend, |d| rollback_body(d, "")).await;
    let mut book = Runbook::open("Roll back a bad image");
    let builder = Daemon::start(&f, BUILDER, "builder");
    let launcher = Daemon::start(&f, LAUNCHER, "launcher");
    let daemons = [&builder, &launcher];

    // The situation: a previous and a current build, both uploaded; new
    // nodes boot from the current one.
    until("a first build uploaded", &daemons, || async {
        let b = uploaded_builds(&images(&f).await, "sim");
        if b.len() == 1 {
            Ok(())
        } else {
            Err(format!("{b:?}"))
        }
    })
    .await;
    f.store
        .request_image_build(IMAGE)
        .await
        .expect("request a build");
    let (previous, current) = until("a second build uploaded", &daemons, || async {
        match uploaded_builds(&images(&f).await, "sim").as_slice() {
            [a, b] => Ok((a.clone(), b.clone())),
            other => Err(format!("{other:?}")),
        }
    })
    .await;
    assert_eq!(boot_build(&f, &daemons).await, current);
    let bad = format!("{IMAGE}-{current}");
    let good = format!("{IMAGE}-{previous}");
    let bad_images: Vec<String> = images(&f)
        .await
        .uploads
        .iter()
        .filter(|u| u.build_id == current)
        .filter_map(|u| u.upload.external_id.clone())
        .collect();
    assert!(!bad_images.is_empty());

    // 1. Both builds are listed ready; the current one has the shorter age.
    let cmd = book.next("nodepool dib-image-list");
    let out = run_doc(&f, &cmd, &[]).await;
    let table = out.ok();
    let (b, p) = (row(table, &bad), row(table, &good));
    assert_eq!(
        (b[4].as_str(), p[4].as_str()),
        ("ready", "ready"),
        "{table}"
    );
    assert!(age_secs(&b[5]) <= age_secs(&p[5]), "{table}");

    // 2. Stop new builds. In the file (the old spelling warns) ...
    // The daemons take the change without a restart.
    reconfigure(
        &f,
        &rollback_body(f.dir.path(), "    paused: True\n"),
        &daemons,
    )
    .await;
    let out = f.run(&["config-validate", "--no-clouds"]).await;
    out.ok();
    assert!(
        out.stderr.contains(
            "diskimages[0].paused: `paused` is the old spelling of `pause`; read as `pause`"
        ),
        "{}",
        out.stderr
    );
    // ... which refuses a build request (step 4's note) ...
    f.run(&["image-build", IMAGE]).await.fails_with(&format!(
        "diskimage {IMAGE} is paused in the configuration; not requesting a build"
    ));
    reconfigure(&f, &rollback_body(f.dir.path(), ""), &daemons).await;
    // ... or with the command.
    let cmd = book.next("nodepool image-pause ubuntu-jammy");
    let out = run_doc(&f, &cmd, &[]).await;
    prints_as_documented(&cmd, &out, &[]);
    let cmd = book.next("nodepool image-status");
    let out = run_doc(&f, &cmd, &[]).await;
    assert_eq!(row(out.ok(), IMAGE)[1], "True", "paused:\n{}", out.stdout);

    // 3. Delete the bad build: its uploads go from the cloud and the
    // store, its files from disk; new nodes boot from the previous one.
    let cmd = book.next("nodepool dib-image-delete ubuntu-jammy-5b1f0c2e9d8a4f6b8c7d2e1a0f9e8d7c");
    let out = run_doc(
        &f,
        &cmd,
        &[("ubuntu-jammy-5b1f0c2e9d8a4f6b8c7d2e1a0f9e8d7c", &bad)],
    )
    .await;
    assert_eq!(out.ok(), format!("build {bad} marked for deletion\n"));
    let sim = cloud(&f, "sim");
    until(
        "the bad build and its uploads deleted",
        &daemons,
        || async {
            let st = images(&f).await;
            let cloud: Vec<String> = sim
                .list_images()
                .await
                .map_err(|e| e.to_string())?
                .into_iter()
                .map(|i| i.id)
                .filter(|id| bad_images.contains(id))
                .collect();
            let files: Vec<String> = std::fs::read_dir(f.dir.path().join("images"))
                .expect("images dir")
                .filter_map(|e| e.ok())
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .filter(|n| n.contains(&current))
                .collect();
            let left = st.builds.iter().any(|b| b.id == current)
                || st.uploads.iter().any(|u| u.build_id == current);
            if !left && cloud.is_empty() && files.is_empty() {
                Ok(())
            } else {
                Err(format!(
                    "records left: {left}, cloud: {cloud:?}, files: {files:?}"
                ))
            }
        },
    )
    .await;
    assert_eq!(
        uploaded_builds(&images(&f).await, "sim"),
        std::slice::from_ref(&previous)
    );
    assert_eq!(boot_build(&f, &daemons).await, previous);

    // A build in progress cannot be deleted.
    let cmd = book.next("nodepool image-unpause ubuntu-jammy");
    let out = run_doc(&f, &cmd, &[]).await;
    assert_eq!(out.ok(), format!("image {IMAGE} unpaused\n"));
    let hold = f.dir.path().join("hold-builds");
    std::fs::write(&hold, "").expect("hold builds");
    // 4. Ask for a build now.
    let cmd = book.next("nodepool image-build ubuntu-jammy");
    let out = run_doc(&f, &cmd, &[]).await;
    prints_as_documented(&cmd, &out, &[]);
    let building = until("a build in progress", &daemons, || async {
        let st = images(&f).await;
        st.builds
            .iter()
            .find(|b| b.build.state == BuildState::Building)
            .map(|b| b.id.clone())
            .ok_or_else(|| format!("{:?}", st.builds))
    })
    .await;
    let id = format!("{IMAGE}-{building}");
    f.run(&["dib-image-delete", &id])
        .await
        .fails_with(&format!("cannot delete build {id}: it is still building"));
    std::fs::remove_file(&hold).expect("release the build");
    until("the new build uploaded", &daemons, || async {
        let b = uploaded_builds(&images(&f).await, "sim");
        if b.contains(&building) {
            Ok(())
        } else {
            Err(format!("{b:?}"))
        }
    })
    .await;
    book.done();
    builder.stop().await;
    launcher.stop().await;
}
both_stores!(roll_back_a_bad_image);

fn rollback_body(dir: &Path, diskimage_extra: &str) -> String {
    format!(
        "{}labels:\n  - name: small\nproviders:\n{}{}",
        head(dir),
        provider("sim", "small", WITH_IMAGE, "        max-servers: 4\n"),
        diskimages(dir, diskimage_extra)
    )
}

// ---------------------------------------------------------------------------
// Remove a provider (seed 001)

/// Where a provider being removed is.
#[derive(Clone, Copy)]
enum Stage {
    /// Serving, with its uploads.
    Serving,
    /// Step 1: `max-servers: 0` on its pool, no diskimages.
    Draining,
    /// Seed 001: `max-servers: -1` on the provider.
    Removing,
    /// Out of the configuration.
    Gone,
}

fn removal_body(dir: &Path, retired: Stage, legacy: Stage) -> String {
    let one = |name: &str, label: &str, stage: Stage| {
        match stage {
        Stage::Serving => provider(name, label, WITH_IMAGE, "        max-servers: 4\n"),
        Stage::Draining => provider(name, label, "", "        max-servers: 0\n")
            .replace(
                &format!(
                    "        labels:\n          - name: {label}\n            diskimage: {IMAGE}\n            flavor-name: Fake Flavor\n"
                ),
                "        labels: []\n",
            ),
        Stage::Removing => provider(
            name,
            label,
            &format!("    max-servers: -1\n{WITH_IMAGE}"),
            "        max-servers: 4\n",
        ),
        Stage::Gone => String::new(),
    }
    };
    format!(
        "{}labels:
  - name: small
    min-ready: 1
  - name: old-small
    min-ready: 1
  - name: legacy-small
    min-ready: 1
providers:
{}{}{}{}",
        head(dir),
        one("sim", "small", Stage::Serving),
        one("retired", "old-small", retired),
        one("legacy", "legacy-small", legacy),
        diskimages(dir, "")
    )
}

fn lines_naming(table: &str, provider: &str) -> Vec<String> {
    table
        .lines()
        .filter(|l| l.contains(&format!("| {provider} ")))
        .map(str::to_owned)
        .collect()
}

async fn remove_a_provider(backend: Backend) {
    let f =
        Fixture::with_body_in(backend, |d| removal_body(d, Stage::Serving, Stage::Serving)).await;
    let mut book = Runbook::open("Remove a provider");
    let builder = Daemon::start(&f, BUILDER, "builder");
    let launcher = Daemon::start(&f, LAUNCHER, "launcher");
    let daemons = [&builder, &launcher];

    // The situation: every provider has the image and a ready spare, and
    // `retired` has a node in use.
    until("uploads and spares everywhere", &daemons, || async {
        let st = images(&f).await;
        for p in ["sim", "retired", "legacy"] {
            if uploaded_builds(&st, p).is_empty() {
                return Err(format!("no upload to {p}"));
            }
            ready_node_of(&f, p).await?;
        }
        Ok(())
    })
    .await;
    let zuul = Requestor::new(f.store.clone(), "zuul");
    let req = zuul
        .submit(&NewRequest::new(vec!["old-small".into()]))
        .await
        .expect("submit");
    let fulfilled = match zuul.wait(&req, LIMIT).await.expect("wait") {
        Outcome::Fulfilled(v) => v.value,
        other => panic!("request for old-small: {other:?}"),
    };
    let mut in_use = zuul.accept(&req, &fulfilled).await.expect("accept");
    zuul.use_nodes(&mut in_use, "org/project")
        .await
        .expect("use");
    let used = in_use.nodes[0].id.clone();
    until("a spare on retired again", &daemons, || async {
        ready_node_of(&f, "retired").await
    })
    .await;
    let retired_images: Vec<String> = images(&f)
        .await
        .uploads
        .iter()
        .filter(|u| u.provider == "retired")
        .filter_map(|u| u.upload.external_id.clone())
        .collect();
    let retired_cloud = cloud(&f, "retired");

    // 1. max-servers: 0 and no diskimages: the builder deletes its
    // uploads, a node in use is deleted when returned.
    // The pool's label boots from the diskimage, so it goes too: kept, it
    // is an error the daemons would not load.
    let kept_label = removal_body(f.dir.path(), Stage::Draining, Stage::Serving).replace(
        "        labels: []\n",
        &format!("        labels:\n          - name: old-small\n            diskimage: {IMAGE}\n            flavor-name: Fake Flavor\n"),
    );
    rewrite(&f, &kept_label);
    let cmd = book.next("nodepool config-validate");
    let out = run_doc(&f, &cmd, &[]).await;
    assert_eq!(out.code, Some(1), "{}", out.stdout);
    assert!(
        out.stderr.contains("providers[1].pools[0].labels[0].diskimage: diskimage \"ubuntu-jammy\" is not uploaded to provider \"retired\""),
        "{}",
        out.stderr
    );
    reconfigure(
        &f,
        &removal_body(f.dir.path(), Stage::Draining, Stage::Serving),
        &daemons,
    )
    .await;
    let out = run_doc(&f, &cmd, &[]).await;
    assert!(out.ok().contains(": valid ("), "{}", out.stdout);
    until("retired's uploads deleted", &daemons, || async {
        let st = images(&f).await;
        let records = st
            .uploads
            .iter()
            .filter(|u| u.provider == "retired")
            .count();
        let cloud: Vec<String> = retired_cloud
            .list_images()
            .await
            .map_err(|e| e.to_string())?
            .into_iter()
            .map(|i| i.id)
            .filter(|id| retired_images.contains(id))
            .collect();
        if records == 0 && cloud.is_empty() {
            Ok(())
        } else {
            Err(format!("{records} records, in the cloud: {cloud:?}"))
        }
    })
    .await;
    // The pool takes no new requests: one only it served fails, and
    // nothing is launched for it.
    let before: Vec<String> = nodes_of(&f, "retired")
        .await
        .into_iter()
        .map(|(id, _)| id)
        .collect();
    let late = zuul
        .submit(&NewRequest::new(vec!["old-small".into()]))
        .await
        .expect("submit");
    match zuul.wait(&late, LIMIT).await.expect("wait") {
        Outcome::Failed(_) => {}
        other => panic!("a request only retired served: {other:?}"),
    }
    let after: Vec<String> = nodes_of(&f, "retired")
        .await
        .into_iter()
        .map(|(id, _)| id)
        .collect();
    assert!(
        after.iter().all(|id| before.contains(id)),
        "launched: {after:?} (before: {before:?})"
    );
    let used_server = in_use.nodes[0].node.external_id.clone().expect("a server");
    zuul.return_nodes(in_use).await.expect("return");
    until("the returned node deleted", &daemons, || async {
        let node = f.store.get_node(&used).await.map_err(|e| e.to_string())?;
        let server = retired_cloud
            .get_instance(&used_server)
            .await
            .map_err(|e| e.to_string())?;
        if node.is_none() && server.is_none() {
            Ok(())
        } else {
            Err(format!("node {node:?}, server {server:?}"))
        }
    })
    .await;
    let spares: Vec<String> = nodes_of(&f, "retired")
        .await
        .into_iter()
        .map(|(id, n)| {
            assert_eq!(n.state, NodeState::Ready, "only spares are left: {id}");
            id
        })
        .collect();
    assert!(!spares.is_empty(), "the spares stay");

    // 2. Delete the spares; wait until nothing is listed for the provider.
    let cmd = book.next("nodepool delete ID");
    for spare in &spares {
        let out = run_doc(&f, &cmd, &[("ID", spare)]).await;
        assert_eq!(row(out.ok(), spare)[6], "deleting", "{}", out.stdout);
    }
    let list = book.next("nodepool list");
    let image_list = book.next("nodepool image-list");
    until("nothing listed for retired", &daemons, || async {
        let nodes = run_doc(&f, &list, &[]).await;
        let uploads = run_doc(&f, &image_list, &[]).await;
        let left = [
            lines_naming(nodes.ok(), "retired"),
            lines_naming(uploads.ok(), "retired"),
        ]
        .concat();
        if left.is_empty() {
            Ok(())
        } else {
            Err(format!("{left:?}"))
        }
    })
    .await;
    let nodes = run_doc(&f, &list, &[]).await;
    assert!(
        !lines_naming(nodes.ok(), "sim").is_empty(),
        "{}",
        nodes.stdout
    );
    let uploads = run_doc(&f, &image_list, &[]).await;
    assert!(
        !lines_naming(uploads.ok(), "sim").is_empty(),
        "{}",
        uploads.stdout
    );
    assert!(retired_cloud.instances().await.is_empty(), "no server left");

    // 3. Out of the configuration.
    reconfigure(
        &f,
        &removal_body(f.dir.path(), Stage::Gone, Stage::Serving),
        &daemons,
    )
    .await;

    // Seed 001's way: max-servers: -1 on the provider, with a warning
    // naming today's steps; its uploads are deleted, its spare stays.
    let legacy_spare = ready_node_of(&f, "legacy").await.expect("legacy's spare");
    reconfigure(
        &f,
        &removal_body(f.dir.path(), Stage::Gone, Stage::Removing),
        &daemons,
    )
    .await;
    let out = f.run(&["config-validate", "--no-clouds"]).await;
    out.ok();
    assert!(
        out.stderr.contains("providers[1].max-servers")
            && out
                .stderr
                .contains("`max-servers: 0` on every pool, remove its `diskimages`"),
        "{}",
        out.stderr
    );
    // Any other provider-level value is an error naming the pool's key.
    let text = std::fs::read_to_string(&f.config_path).expect("read config");
    let other = f.dir.path().join("provider-max-servers.yaml");
    std::fs::write(
        &other,
        text.replace("    max-servers: -1\n", "    max-servers: 5\n"),
    )
    .expect("write config");
    let mut validate = tokio::process::Command::new(env!("CARGO_BIN_EXE_nodepool"));
    validate
        .arg("-c")
        .arg(&other)
        .args(["config-validate", "--no-clouds"]);
    let out = common::run_process(validate, "").await;
    assert_eq!(out.code, Some(1), "{}", out.stdout);
    assert!(
        out.stderr.contains("providers[1].max-servers")
            && out.stderr.contains("pools[].max-servers"),
        "{}",
        out.stderr
    );
    until("legacy's uploads deleted", &daemons, || async {
        let st = images(&f).await;
        let left = st.uploads.iter().filter(|u| u.provider == "legacy").count();
        if left == 0 {
            Ok(())
        } else {
            Err(format!("{left} uploads"))
        }
    })
    .await;
    let legacy_nodes = nodes_of(&f, "legacy").await;
    assert_eq!(legacy_nodes.len(), 1, "{legacy_nodes:?}");
    assert_eq!(legacy_nodes[0].0, legacy_spare);
    assert_eq!(legacy_nodes[0].1.state, NodeState::Ready);
    let legacy_server = legacy_nodes[0].1.external_id.clone().expect("a server");

    // Removed before it was drained: its records stay until erased; its
    // server stays in the cloud.
    reconfigure(
        &f,
        &removal_body(f.dir.path(), Stage::Gone, Stage::Gone),
        &daemons,
    )
    .await;
    let cmd = book.next("nodepool info PROVIDER");
    let out = run_doc(&f, &cmd, &[("PROVIDER", "legacy")]).await;
    assert_eq!(
        row(out.ok(), &legacy_spare),
        [legacy_spare.as_str(), legacy_server.as_str()],
        "{}",
        out.stdout
    );
    let cmd = book.next("nodepool erase PROVIDER");
    run_doc(&f, &cmd, &[("PROVIDER", "legacy")])
        .await
        .fails_with("pass --yes");
    assert_eq!(
        nodes_of(&f, "legacy").await.len(),
        1,
        "nothing erased unasked"
    );
    let mut args = cmd.args(&[("PROVIDER", "legacy")]);
    args.push("--yes".into());
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let out = f.run(&args).await;
    assert_eq!(
        out.ok(),
        "Erasing build data for legacy...\nErasing node data for legacy...\n"
    );
    assert!(nodes_of(&f, "legacy").await.is_empty());
    let legacy_cloud = cloud(&f, "legacy");
    assert!(
        legacy_cloud
            .get_instance(&legacy_server)
            .await
            .expect("look")
            .is_some(),
        "deleting its server is left to the operator"
    );
    book.done();
    builder.stop().await;
    launcher.stop().await;
}
both_stores!(remove_a_provider);

// ---------------------------------------------------------------------------
// Clean up aliens (seed 002)

fn cloud_body(dir: &Path) -> String {
    format!(
        "{}labels:\n  - name: small\nproviders:\n{}{}{}",
        head(dir),
        provider("sim", "small", WITH_IMAGE, "        max-servers: 4\n"),
        provider("other", "small", WITH_IMAGE, "        max-servers: 4\n"),
        diskimages(dir, "")
    )
}

/// What an `openstack` command of a runbook does, done to the simulated
/// cloud through its API.
async fn in_the_cloud(sim: &SimulatedProvider, args: &[String]) {
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    match args.as_slice() {
        ["server", "delete", id] => sim.delete_instance(id).await,
        ["image", "delete", id] => sim.delete_image(id).await,
        other => panic!("no simulated equivalent of `openstack {}`", other.join(" ")),
    }
    .unwrap_or_else(|e| panic!("openstack {}: {e}", args.join(" ")));
}

async fn clean_up_aliens(backend: Backend) {
    let f = Fixture::with_body_in(backend, cloud_body).await;
    let mut book = Runbook::open("Clean up aliens");
    let sim = cloud(&f, "sim");
    // A server no node knows, and an image of ours no upload knows, left
    // where no launcher or builder runs.
    let server = sim.inject_leaked_server("0000000777").await;
    let file = f.dir.path().join("image.qcow2");
    std::fs::write(&file, b"not really an image").expect("write");
    let mut properties = indexmap::IndexMap::new();
    properties.insert(IMAGE_BUILD_ID.to_owned(), "0123456789abcdef".to_owned());
    properties.insert(IMAGE_PROVIDER.to_owned(), "sim".to_owned());
    let image = sim
        .upload_image(&ImageUploadSpec {
            name: format!("{IMAGE}-1700000000"),
            path: file,
            format: "qcow2".into(),
            properties,
            md5: None,
            sha256: None,
            timeout: LIMIT,
            sent: Default::default(),
        })
        .await
        .expect("upload");

    let cmd = book.next("nodepool alien-list [PROVIDER]");
    let columns: Vec<String> = cmd
        .note
        .as_deref()
        .expect("the columns")
        .split(", ")
        .map(str::to_owned)
        .collect();
    for provider in ["sim", ""] {
        let out = run_doc(&f, &cmd, &[("[PROVIDER]", provider)]).await;
        let t = out.ok();
        assert_eq!(common::header(t), columns);
        assert_eq!(
            row(t, &server)[..3],
            ["sim", "np0000000777", server.as_str()]
        );
        assert_eq!(row_count(t), 1, "{t}");
    }
    let cmd = book.next("nodepool alien-image-list [PROVIDER]");
    let out = run_doc(&f, &cmd, &[("[PROVIDER]", "sim")]).await;
    let t = out.ok();
    assert_eq!(
        row(t, &image),
        ["sim", &format!("{IMAGE}-1700000000"), &image]
    );
    assert_eq!(row_count(t), 1, "{t}");

    let cmd = book.next("openstack server delete SERVER_ID");
    in_the_cloud(&sim, &cmd.args(&[("SERVER_ID", &server)])).await;
    let cmd = book.next("nodepool alien-list");
    assert_eq!(cmd.note.as_deref(), Some("empty table when done"));
    until("an empty alien list", &[], || async {
        let out = run_doc(&f, &cmd, &[]).await;
        let t = out.ok();
        if row_count(t) == 0 {
            Ok(())
        } else {
            Err(t.to_owned())
        }
    })
    .await;
    let cmd = book.next("openstack image delete ID");
    in_the_cloud(&sim, &cmd.args(&[("ID", &image)])).await;
    let out = f.run(&["alien-image-list"]).await;
    assert_eq!(row_count(out.ok()), 0, "{}", out.stdout);

    // A cloud that cannot be listed: what could be listed, a warning, and
    // a failure.
    let leaked = sim.inject_leaked_server("0000000778").await;
    cloud(&f, "other")
        .set_api_fault(Some(ApiFault::ServerError))
        .await;
    let out = f.run(&["alien-list"]).await;
    out.fails_with("the listing is incomplete: ");
    row(&out.stdout, &leaked);
    assert!(
        out.stderr
            .lines()
            .any(|l| l.starts_with("warning: ") && l.contains("other")),
        "{}",
        out.stderr
    );
    let out = f.run(&["alien-image-list"]).await;
    out.fails_with("the listing is incomplete: ");
    assert_eq!(
        common::header(&out.stdout),
        ["Provider", "Name", "Image ID"]
    );
    book.done();
}
both_stores!(clean_up_aliens);

// ---------------------------------------------------------------------------
// Clean up leftovers (seed 004)

/// A node of `sim` in `state` with a server in the cloud.
async fn node_with_server(
    f: &Fixture,
    sim: &SimulatedProvider,
    state: NodeState,
) -> (String, String) {
    let node = Node::new(state, epoch_now(), "sim", "main", vec!["small".into()]);
    let id = f.store.create_node(&node).await.expect("create node");
    let server = sim.inject_leaked_server(&id).await;
    let mut v = f.store.get_node(&id).await.expect("read").expect("node");
    v.value.external_id = Some(server.clone());
    f.store
        .update_node(&id, &v.value, v.version)
        .await
        .expect("record the server");
    (id, server)
}

async fn clean_up_leftovers(backend: Backend) {
    let f = Fixture::with_body_in(backend, cloud_body).await;
    let mut book = Runbook::open("Clean up leftovers");
    let sim = cloud(&f, "sim");
    // A node stuck in `deleting` (no launcher runs its provider), and a
    // node some launcher or Zuul holds locked.
    let (stuck, stuck_server) = node_with_server(&f, &sim, NodeState::Deleting).await;
    let (locked, locked_server) = node_with_server(&f, &sim, NodeState::InUse).await;

    // 1. The State and Age columns show it.
    let cmd = book.next("nodepool list");
    let out = run_doc(&f, &cmd, &[]).await;
    let t = out.ok();
    let header = common::header(t);
    let state = header.iter().position(|h| h == "State").expect("State");
    assert!(header.iter().any(|h| h == "Age"), "{t}");
    assert_eq!(row(t, &stuck)[state], "deleting");

    // Deleted in the foreground: server, then record.
    let cmd = book.next("nodepool delete --now NODE_ID");
    let out = run_doc(&f, &cmd, &[("NODE_ID", &stuck)]).await;
    assert_eq!(row_count(out.ok()), 0, "the node is gone:\n{}", out.stdout);
    assert!(f.store.get_node(&stuck).await.expect("read").is_none());
    assert!(
        sim.get_instance(&stuck_server)
            .await
            .expect("look")
            .is_none(),
        "the server is gone"
    );

    // A locked node is refused, and left as it was.
    let guard = f
        .store
        .lock_node(&locked, LockWait::NonBlocking)
        .await
        .expect("lock");
    run_doc(&f, &cmd, &[("NODE_ID", &locked)])
        .await
        .fails_with(&format!(
            "node {locked} is locked by someone else (a launcher or Zuul); gave up after 5 s"
        ));
    guard.release().await.expect("unlock");
    let v = f
        .store
        .get_node(&locked)
        .await
        .expect("read")
        .expect("node");
    assert_eq!(v.value.state, NodeState::InUse);
    assert!(
        sim.get_instance(&locked_server)
            .await
            .expect("look")
            .is_some()
    );
    book.done();
}
both_stores!(clean_up_leftovers);

// ---------------------------------------------------------------------------
// Manually generate a new snapshot (seed 002)

const SNAPSHOT: &str = "tripleo-precise";
const SNAPSHOT_CLOUD: &str = "tripleo-test-cloud";

/// A snapshot as the store has it: build, upload, cloud image.
type Snapshot = (String, String, String);

/// The snapshot image's ready snapshots (ready build, ready upload),
/// oldest first.
fn ready_snapshots(st: &ImageState) -> Vec<Snapshot> {
    let mut builds: Vec<_> = st
        .builds
        .iter()
        .filter(|b| b.image == SNAPSHOT && b.build.state == BuildState::Ready)
        .collect();
    builds.sort_by(|a, b| a.build.state_time.total_cmp(&b.build.state_time));
    builds
        .iter()
        .filter_map(|b| {
            st.uploads.iter().find_map(|u| {
                let ready = u.build_id == b.id
                    && u.provider == SNAPSHOT_CLOUD
                    && u.upload.state == UploadState::Ready;
                let ext = u.upload.external_id.clone().filter(|_| ready)?;
                Some((b.id.clone(), u.id.clone(), ext))
            })
        })
        .collect()
}

/// The cloud image ids of the snapshot cloud, as the builder left them.
async fn snapshot_cloud_images(f: &Fixture) -> Vec<String> {
    cloud(f, SNAPSHOT_CLOUD)
        .list_images()
        .await
        .expect("list the cloud's images")
        .into_iter()
        .map(|i| i.id)
        .collect()
}

async fn manually_generate_a_new_snapshot(backend: Backend) {
    let sshd = common::sshd::Sshd::start_with_login();
    let f = Fixture::with_body_in(backend, |d| {
        common::snapshot_body(d, &sshd, SNAPSHOT_CLOUD, SNAPSHOT)
    })
    .await;
    let mut book = Runbook::open("Manually generate a new snapshot");
    let builder = Daemon::start(&f, BUILDER, "builder");
    let daemons = [&builder];

    // The situation: the builder made the image's first snapshot.
    let first = until("a first snapshot", &daemons, || async {
        match ready_snapshots(&images(&f).await).as_slice() {
            [one] => Ok(one.clone()),
            other => Err(format!("{other:?}")),
        }
    })
    .await;

    // 1. The snapshot is listed, one upload of its build.
    let cmd = book.next("nodepool image-list");
    let out = run_doc(&f, &cmd, &[]).await;
    let r = row(out.ok(), &first.2);
    assert_eq!(
        r[..7],
        [
            first.0.as_str(),
            first.1.as_str(),
            SNAPSHOT_CLOUD,
            SNAPSHOT,
            r[4].as_str(),
            first.2.as_str(),
            "ready"
        ],
        "{}",
        out.stdout
    );
    assert_eq!(row_count(&out.stdout), 1, "{}", out.stdout);

    // 2. A new one, followed until ready; the last line names it.
    let cmd =
        book.next("nodepool image-update tripleo-test-cloud tripleo-precise --wait --timeout 7200");
    let out = run_doc(&f, &cmd, &[]).await;
    let text = out.ok();
    assert!(
        text.starts_with(&format!(
            "snapshot of {SNAPSHOT} in {SNAPSHOT_CLOUD} requested\n"
        )),
        "{text}"
    );
    let last = text.lines().last().expect("a last line");
    let made: Snapshot = last
        .strip_prefix("snapshot ")
        .and_then(|r| {
            r.split_once(&format!(
                " of {SNAPSHOT} in {SNAPSHOT_CLOUD} ready: upload "
            ))
        })
        .and_then(|(b, r)| r.split_once(", cloud image ").map(|(u, e)| (b, u, e)))
        .map(|(b, u, e)| (b.to_owned(), u.to_owned(), e.to_owned()))
        .unwrap_or_else(|| panic!("the new snapshot named: {text}"));
    assert_eq!(
        ready_snapshots(&images(&f).await),
        [first.clone(), made.clone()]
    );

    // 3. Both listed ready; the new one is current (the shorter age).
    let cmd = book.next("nodepool image-list");
    let out = run_doc(&f, &cmd, &[]).await;
    let table = out.ok();
    let (new, old) = (row(table, &made.2), row(table, &first.2));
    assert_eq!(
        (new[0].as_str(), new[6].as_str(), old[6].as_str()),
        (made.0.as_str(), "ready", "ready"),
        "{table}"
    );
    assert!(age_secs(&new[7]) <= age_secs(&old[7]), "{table}");
    assert_eq!(row_count(table), 2, "{table}");

    // 4. Roll back: paused, the newest deleted from the cloud and the
    // store (build included); the first one is current again.
    let cmd = book.next("nodepool image-pause tripleo-precise");
    let out = run_doc(&f, &cmd, &[]).await;
    prints_as_documented(&cmd, &out, &[]);
    assert!(snapshot_cloud_images(&f).await.contains(&made.2));
    let cmd = book.next(
        "nodepool image-delete --provider tripleo-test-cloud --image tripleo-precise --build-id BUILD_ID --upload-id UPLOAD_ID",
    );
    let subs = [
        ("BUILD_ID", made.0.as_str()),
        ("UPLOAD_ID", made.1.as_str()),
    ];
    let out = run_doc(&f, &cmd, &subs).await;
    assert_eq!(
        out.ok(),
        format!(
            "image upload {} of {SNAPSHOT} build {} to {SNAPSHOT_CLOUD} marked for deletion\n",
            made.1, made.0
        )
    );
    until("the newest snapshot deleted", &daemons, || async {
        let st = images(&f).await;
        let left = st.builds.iter().any(|b| b.id == made.0)
            || st.uploads.iter().any(|u| u.build_id == made.0);
        let in_cloud = snapshot_cloud_images(&f).await.contains(&made.2);
        if !left && !in_cloud {
            Ok(())
        } else {
            Err(format!("records left: {left}, in the cloud: {in_cloud}"))
        }
    })
    .await;
    let cmd = book.next("nodepool image-list");
    let out = run_doc(&f, &cmd, &[]).await;
    let table = out.ok();
    assert_eq!(row(table, &first.2)[6], "ready", "{table}");
    assert_eq!(row_count(table), 1, "{table}");
    assert_eq!(
        ready_snapshots(&images(&f).await),
        std::slice::from_ref(&first)
    );
    let cmd = book.next("nodepool image-unpause tripleo-precise");
    let out = run_doc(&f, &cmd, &[]).await;
    assert_eq!(out.ok(), format!("image {SNAPSHOT} unpaused\n"));
    book.done();
    builder.stop().await;
}
both_stores!(manually_generate_a_new_snapshot);
