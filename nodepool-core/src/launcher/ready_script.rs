//! Ready scripts (seeds 002 and 003): after nodescan and before a node is
//! `ready`, the launcher logs in to it over SSH as the image's `username`
//! with its `private-key` and runs the label's script from `script-dir`.
//! A non-zero exit, a failed login or a timeout fails the launch attempt
//! (which is retried like any launch failure), with the script's output
//! in the failure reason; the output also goes to the DEBUG log.
//!
//! The script travels on the session's standard input into a temporary
//! file on the node, which is then executed (so its `#!` line picks the
//! interpreter), with `NODEPOOL_NODE_ID` and `NODEPOOL_LABEL` set, and
//! removed. The launcher keeps the input open while the script runs:
//! when it closes it (the timeout) or the connection drops (the launcher
//! died), a watcher on the node sends SIGTERM to the session's process
//! group, so a hung script and everything it started do not outlive the
//! attempt. (SSH `signal` requests would not do: sshd refuses them for
//! root logins.)

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use russh::ChannelMsg;
use russh::keys::PrivateKeyWithHashAlg;

use crate::config::{Config, ReadyScript};
use crate::planner::{LaunchImage, PoolKey};

/// Output kept for the log and the failure reason (the end of it).
const OUTPUT_LIMIT: usize = 64 * 1024;
/// The end of the output quoted in the failure reason.
const REASON_OUTPUT: usize = 2000;
/// Connecting, logging in and starting the script (not counted in the
/// script's own timeout).
const START_TIMEOUT: Duration = Duration::from_secs(60);
/// After a timeout, how long the script gets to go before the launcher
/// hangs up.
const HANG_UP_GRACE: Duration = Duration::from_secs(5);

/// A ready script to run on a new node, with the login that runs it.
#[derive(Clone, Debug)]
pub(crate) struct ReadyScriptRun {
    /// The script, its file and time limit.
    pub script: ReadyScript,
    /// The image's login user.
    pub username: String,
    /// The image's private key file.
    pub private_key: PathBuf,
}

/// The ready script for a launch of `label` in `target` booting `image`,
/// when its pool label has one and its image names a login (the
/// configuration refuses a ready script without one).
pub(crate) fn for_launch(
    config: &Config,
    target: &PoolKey,
    label: &str,
    image: &LaunchImage,
) -> Option<ReadyScriptRun> {
    let pc = config.provider(&target.provider)?;
    let pool = pc.pool(&target.pool)?;
    let script = pool.ready_script(label)?.clone();
    let (username, private_key) = match image {
        LaunchImage::Cloud { name } => {
            let ci = pc.cloud_image(name)?;
            (ci.username.clone()?, ci.private_key.clone()?)
        }
        // A snapshot image's uploads are recorded like a diskimage's.
        LaunchImage::Upload { image, .. } => match config.diskimage(image) {
            Some(d) => (d.username.clone(), d.private_key.clone()?),
            None => {
                let si = pc.snapshot_image(image)?;
                (si.username.clone(), si.private_key.clone())
            }
        },
    };
    Some(ReadyScriptRun {
        script,
        username,
        private_key,
    })
}

/// Accepts the node's SSH server when its key is one nodescan recorded
/// (any key when nodescan did not run: `host-key-checking: false`).
struct KnownHost {
    keys: Vec<String>,
}

impl russh::client::Handler for KnownHost {
    type Error = russh::Error;

    async fn check_server_key(
        &mut self,
        key: &russh::keys::PublicKey,
    ) -> Result<bool, Self::Error> {
        if self.keys.is_empty() {
            return Ok(true);
        }
        let Ok(text) = key.to_openssh() else {
            return Ok(false);
        };
        let mut parts = text.split_whitespace();
        let typed = match (parts.next(), parts.next()) {
            (Some(t), Some(b)) => format!("{t} {b}"),
            _ => return Ok(false),
        };
        Ok(self.keys.contains(&typed))
    }
}

/// Single-quotes a value for a POSIX shell.
fn quoted(s: &str) -> String {
    format!("'{}'", s.replace('\'', r"'\''"))
}

/// The end of `output`, at most `limit` bytes, as text.
fn tail(output: &[u8], limit: usize) -> String {
    let start = output.len().saturating_sub(limit);
    String::from_utf8_lossy(&output[start..]).trim().to_owned()
}

/// Where and as whom the script runs.
pub(crate) struct Target<'a> {
    /// The node's id (for the environment and the log).
    pub node_id: &'a str,
    /// The label (for the environment).
    pub label: &'a str,
    /// The node's address.
    pub host: &'a str,
    /// Its SSH port.
    pub port: u16,
    /// Host keys nodescan recorded; empty when it did not run.
    pub host_keys: &'a [String],
}

/// Runs the ready script on the node; `Err` is the launch failure reason
/// (with the end of the script's output when it ran).
pub(crate) async fn run(job: &ReadyScriptRun, target: Target<'_>) -> Result<(), String> {
    let name = &job.script.name;
    let body = tokio::fs::read(&job.script.path).await.map_err(|e| {
        format!(
            "ready script {name}: cannot read {}: {e}",
            job.script.path.display()
        )
    })?;
    let key = russh::keys::load_secret_key(&job.private_key, None).map_err(|e| {
        format!(
            "ready script {name}: cannot load private key {}: {e}",
            job.private_key.display()
        )
    })?;
    let mut output = Vec::new();
    let result = session(job, &target, &body, key, &mut output).await;
    let text = tail(&output, OUTPUT_LIMIT);
    tracing::debug!(node = %target.node_id, script = %name, output = %text, "ready script output");
    result.map_err(|why| {
        let quoted = tail(&output, REASON_OUTPUT);
        if quoted.is_empty() {
            format!("ready script {name}: {why}")
        } else {
            format!("ready script {name}: {why}; output: {quoted}")
        }
    })
}

/// Logs in, runs the script and waits for its exit status, appending
/// everything it prints (stdout and stderr) to `output`.
async fn session(
    job: &ReadyScriptRun,
    target: &Target<'_>,
    body: &[u8],
    key: russh::keys::PrivateKey,
    output: &mut Vec<u8>,
) -> Result<(), String> {
    let (ssh, mut channel) = tokio::time::timeout(START_TIMEOUT, start(job, target, body, key))
        .await
        .map_err(|_| format!("could not start it within {START_TIMEOUT:?}"))??;
    let mut status = None;
    let mut signal = None;
    let ended = tokio::time::timeout(job.script.timeout, async {
        while let Some(msg) = channel.wait().await {
            match msg {
                ChannelMsg::Data { data } | ChannelMsg::ExtendedData { data, .. } => {
                    output.extend_from_slice(&data);
                    if output.len() > 2 * OUTPUT_LIMIT {
                        output.drain(..output.len() - OUTPUT_LIMIT);
                    }
                }
                ChannelMsg::ExitStatus { exit_status } => status = Some(exit_status),
                ChannelMsg::ExitSignal { signal_name, .. } => signal = Some(signal_name),
                _ => {}
            }
        }
    })
    .await;
    if ended.is_err() {
        // The watcher stops the script; wait a little for it to go.
        let _ = channel.eof().await;
        let _ = tokio::time::timeout(HANG_UP_GRACE, async {
            while channel.wait().await.is_some() {}
        })
        .await;
        let _ = ssh
            .disconnect(russh::Disconnect::ByApplication, "", "en")
            .await;
        return Err(format!("did not finish within {:?}", job.script.timeout));
    }
    let _ = ssh
        .disconnect(russh::Disconnect::ByApplication, "", "en")
        .await;
    match (status, signal) {
        (Some(0), _) => Ok(()),
        (Some(code), _) => Err(format!("exited with status {code}")),
        (None, Some(sig)) => Err(format!("killed by signal {sig:?}")),
        (None, None) => Err("the session ended without an exit status".into()),
    }
}

/// Connects, logs in and starts the script; returns the connection and
/// the script's session, whose input stays open.
async fn start(
    job: &ReadyScriptRun,
    target: &Target<'_>,
    body: &[u8],
    key: russh::keys::PrivateKey,
) -> Result<
    (
        russh::client::Handle<KnownHost>,
        russh::Channel<russh::client::Msg>,
    ),
    String,
> {
    let handler = KnownHost {
        keys: target.host_keys.to_vec(),
    };
    let config = Arc::new(russh::client::Config::default());
    let mut ssh = russh::client::connect(config, (target.host, target.port), handler)
        .await
        .map_err(|e| format!("cannot connect to {}:{}: {e}", target.host, target.port))?;
    let hash = ssh.best_supported_rsa_hash().await.ok().flatten().flatten();
    let auth = ssh
        .authenticate_publickey(
            job.username.clone(),
            PrivateKeyWithHashAlg::new(Arc::new(key), hash),
        )
        .await
        .map_err(|e| format!("login as {} failed: {e}", job.username))?;
    if !auth.success() {
        return Err(format!(
            "login as {} with {} was refused",
            job.username,
            job.private_key.display()
        ));
    }
    let channel = ssh
        .channel_open_session()
        .await
        .map_err(|e| format!("cannot open a session: {e}"))?;
    // sshd starts the command in a session (process group) of its own,
    // which `kill -TERM 0` ends when the input closes early. The watcher
    // reads the input through fd 3: a background command's own standard
    // input is /dev/null.
    let command = format!(
        "f=$(mktemp) && head -c {len} > \"$f\" && chmod 700 \"$f\" || exit 125\n\
         trap 'rm -f \"$f\"; exit 143' TERM\n\
         exec 3<&0\n\
         NODEPOOL_NODE_ID={id} NODEPOOL_LABEL={label} \"$f\" < /dev/null 3<&- & script=$!\n\
         (cat <&3 > /dev/null; kill -TERM 0) > /dev/null 2>&1 & watcher=$!\n\
         wait $script; rc=$?\n\
         kill $watcher; rm -f \"$f\"; exit $rc",
        len = body.len(),
        id = quoted(target.node_id),
        label = quoted(target.label)
    );
    channel
        .exec(true, command)
        .await
        .map_err(|e| format!("cannot start it: {e}"))?;
    channel
        .data(body)
        .await
        .map_err(|e| format!("cannot send it: {e}"))?;
    Ok((ssh, channel))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn values_are_quoted_for_the_shell() {
        assert_eq!(quoted("0000000001"), "'0000000001'");
        assert_eq!(quoted("it's"), r"'it'\''s'");
    }

    /// A label booting a snapshot image (`diskimage: NAME` naming a
    /// provider `images` entry) runs its ready script as that image's login.
    #[test]
    fn a_snapshot_images_login_runs_its_labels_ready_script() {
        let d = tempfile::tempdir().expect("tempdir");
        std::fs::write(d.path().join("ready.sh"), "true\n").expect("script");
        std::fs::write(d.path().join("setup.sh"), "true\n").expect("script");
        std::fs::write(d.path().join("id_test"), "key\n").expect("key");
        let yaml = format!(
            "script-dir: {dir:?}
labels: [{{name: small}}]
providers:
  - name: sim
    driver: simulated
    cloud-images: [{{name: base}}]
    images:
      - {{name: prepared, base-image: base, setup: setup.sh, username: jenkins, private-key: id_test, min-ram: 1}}
    pools:
      - name: main
        labels: [{{name: small, diskimage: prepared, min-ram: 1, ready-script: ready.sh}}]
",
            dir = d.path().display().to_string()
        );
        let config = Config::from_yaml_with_secure(&yaml, None, Some(d.path()))
            .unwrap_or_else(|e| panic!("{e}"));
        let target = PoolKey {
            provider: "sim".into(),
            pool: "main".into(),
        };
        let image = LaunchImage::Upload {
            image: "prepared".into(),
            build: "0000000001".into(),
            upload: "0000000001".into(),
            external_id: "img".into(),
        };
        let run = for_launch(&config, &target, "small", &image).expect("a ready script runs");
        assert_eq!(run.username, "jenkins");
        assert_eq!(run.private_key, d.path().join("id_test"));
        assert_eq!(run.script.path, d.path().join("ready.sh"));
    }

    #[test]
    fn the_reason_quotes_the_end_of_the_output() {
        assert_eq!(tail(b"  first\nlast  \n", 100), "first\nlast");
        assert_eq!(tail(b"abcdef", 3), "def");
    }
}
