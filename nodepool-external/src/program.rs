//! The running program: one child process in its own process group, one
//! request at a time, killed whenever it misbehaves and on drop.

use std::process::Stdio;
use std::time::Duration;

use nix::sys::signal::{Signal, killpg};
use nix::unistd::Pid;
use nodepool_model::config::ExternalProgram;
use serde_json::{Value, json};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader, Lines};
use tokio::process::{Child, ChildStdin, ChildStdout, Command};

/// How long a program whose output closed may take to exit before it is
/// reported (and killed) without its exit status.
const EXIT_GRACE: Duration = Duration::from_secs(5);

/// The least time a program is given to start and answer the handshake.
pub const MIN_START_ALLOWANCE: Duration = Duration::from_secs(30);

/// The protocol version this launcher speaks.
pub const PROTOCOL_VERSION: u64 = 1;

/// Why a call got no usable answer (the program is killed for each).
#[derive(Debug)]
pub(crate) enum Broken {
    /// No answer within the timeout.
    Hung(Duration),
    /// Anything else: it could not start, exited, closed its output,
    /// printed something that is not a protocol answer.
    Failed(String),
}

/// A started program that has answered the handshake.
pub(crate) struct Running {
    child: Child,
    stdin: ChildStdin,
    stdout: Lines<BufReader<ChildStdout>>,
    /// A request was sent and its answer not read: the call was cancelled
    /// by its caller (the launcher bounds calls too), so the next line out
    /// would answer a request nobody waits for.
    in_flight: bool,
    /// `capabilities` from the handshake.
    pub capabilities: Value,
}

impl std::fmt::Debug for Running {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Running")
            .field("pid", &self.child.id())
            .field("capabilities", &self.capabilities)
            .finish()
    }
}

impl Running {
    /// Starts the program and does the version handshake.
    pub async fn start(program: &ExternalProgram, provider: &str) -> Result<Running, Broken> {
        let mut cmd = Command::new(program.program());
        cmd.args(program.command.iter().skip(1))
            .envs(&program.environment)
            .env("NODEPOOL_PROVIDER_NAME", provider)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            // Its diagnostics go where the launcher's own go.
            .stderr(Stdio::inherit())
            // Its own group, so that whatever it started dies with it.
            .process_group(0)
            .kill_on_drop(true);
        let mut child = cmd
            .spawn()
            .map_err(|e| Broken::Failed(format!("could not be started: {e}")))?;
        let (Some(stdin), Some(stdout)) = (child.stdin.take(), child.stdout.take()) else {
            return Err(Broken::Failed("started without pipes".into()));
        };
        let mut running = Running {
            child,
            stdin,
            stdout: BufReader::new(stdout).lines(),
            in_flight: false,
            capabilities: Value::Null,
        };
        let hello = json!({"op": "hello", "version": PROTOCOL_VERSION, "provider": provider});
        // Starting an interpreter on a busy machine may take longer than
        // answering one request.
        let allowance = program.timeout.max(MIN_START_ALLOWANCE);
        let answer = tokio::time::timeout(allowance, running.exchange(&hello))
            .await
            .map_err(|_| Broken::Hung(allowance))??;
        if answer.get("ok") != Some(&Value::Bool(true)) {
            return Err(Broken::Failed(format!(
                "refused the handshake: {}",
                error_message(&answer)
            )));
        }
        match answer.get("version").and_then(Value::as_u64) {
            Some(PROTOCOL_VERSION) => {}
            v => {
                return Err(Broken::Failed(format!(
                    "speaks protocol version {}, the launcher speaks {PROTOCOL_VERSION}",
                    v.map_or_else(|| "(none given)".to_owned(), |v| v.to_string())
                )));
            }
        }
        running.capabilities = answer
            .get("capabilities")
            .cloned()
            .unwrap_or_else(|| json!({}));
        Ok(running)
    }

    /// The program's process id.
    pub fn pid(&self) -> Option<u32> {
        self.child.id()
    }

    /// Whether a cancelled call left an answer owed (see `in_flight`).
    pub fn owes_an_answer(&self) -> bool {
        self.in_flight
    }

    /// Sends one line and reads one line back (no timeout: the caller's).
    pub async fn exchange(&mut self, request: &Value) -> Result<Value, Broken> {
        self.in_flight = true;
        let answer = self.send_and_read(request).await;
        self.in_flight = false;
        answer
    }

    async fn send_and_read(&mut self, request: &Value) -> Result<Value, Broken> {
        let mut line = request.to_string();
        line.push('\n');
        if let Err(e) = self.stdin.write_all(line.as_bytes()).await {
            return Err(Broken::Failed(format!(
                "its input is closed ({e}){}",
                self.exit_note().await
            )));
        }
        if let Err(e) = self.stdin.flush().await {
            return Err(Broken::Failed(format!(
                "its input is closed ({e}){}",
                self.exit_note().await
            )));
        }
        match self.stdout.next_line().await {
            Ok(Some(answer)) => serde_json::from_str(&answer).map_err(|e| {
                Broken::Failed(format!(
                    "answered with a line that is not JSON ({e}): {}",
                    shorten(&answer)
                ))
            }),
            Ok(None) => Err(Broken::Failed(format!(
                "closed its output without answering{}",
                self.exit_note().await
            ))),
            Err(e) => Err(Broken::Failed(format!(
                "could not be read ({e}){}",
                self.exit_note().await
            ))),
        }
    }

    /// `; it exited with status N` once the program is known to be gone.
    /// Waits briefly for the program to finish exiting, since its output
    /// closes just before its status is known.
    async fn exit_note(&mut self) -> String {
        match tokio::time::timeout(EXIT_GRACE, self.child.wait()).await {
            Ok(Ok(status)) => format!("; it exited with {status}"),
            _ => String::new(),
        }
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        // The whole group: a shell script's children die too. `kill_on_drop`
        // then kills and reaps the child itself.
        if let Some(pid) = self.child.id().and_then(|p| i32::try_from(p).ok()) {
            let _ = killpg(Pid::from_raw(pid), Signal::SIGKILL);
        }
    }
}

/// The `error.message` of a refusal, or the whole answer.
pub(crate) fn error_message(answer: &Value) -> String {
    answer
        .get("error")
        .and_then(|e| e.get("message"))
        .and_then(Value::as_str)
        .map_or_else(|| shorten(&answer.to_string()), str::to_owned)
}

/// At most 200 characters of a line, for error messages.
pub(crate) fn shorten(line: &str) -> String {
    if line.chars().count() <= 200 {
        line.to_owned()
    } else {
        format!("{}…", line.chars().take(200).collect::<String>())
    }
}
