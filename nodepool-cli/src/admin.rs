//! The `nodepool` admin command.

use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use nodepool_core::config::ConfigSource;

/// Default configuration file, as Nodepool's.
pub const DEFAULT_CONFIG: &str = "/etc/nodepool/nodepool.yaml";

/// Inspect and steer a Nodepool installation.
#[derive(Debug, Parser)]
#[command(name = "nodepool", version, about, long_about = None, arg_required_else_help = true)]
pub struct Cli {
    /// Configuration file.
    #[arg(short = 'c', long = "config", global = true, default_value = DEFAULT_CONFIG)]
    pub config: PathBuf,
    /// Secure configuration file (ZooKeeper servers and TLS, secret diskimage env-vars).
    #[arg(short = 's', long = "secure", global = true)]
    pub secure: Option<PathBuf>,
    /// Log debug messages to stderr.
    #[arg(long, global = true)]
    pub debug: bool,
    /// What to do.
    #[command(subcommand)]
    pub command: Command,
}

/// The subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Check the configuration file (and secure file) and report every problem.
    ConfigValidate,
}

/// Runs the CLI with arguments; writes to the given streams; returns the exit code.
pub fn run(cli: Cli, out: &mut dyn Write, err: &mut dyn Write) -> ExitCode {
    match cli.command {
        Command::ConfigValidate => {
            match ConfigSource::new(&cli.config, cli.secure.clone()).load() {
                Ok(cfg) => {
                    let _ = writeln!(
                        out,
                        "{}: valid ({} labels, {} providers, {} diskimages)",
                        cli.config.display(),
                        cfg.labels.len(),
                        cfg.providers.len(),
                        cfg.diskimages.len()
                    );
                    ExitCode::SUCCESS
                }
                Err(e) => {
                    let _ = writeln!(err, "{e}");
                    ExitCode::FAILURE
                }
            }
        }
    }
}
