//! `nodepool`: the admin command line.

use std::process::ExitCode;

use clap::Parser;
use nodepool_cli::admin::{Cli, run};

fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) => {
            let code = if e.use_stderr() { 1 } else { 0 };
            let _ = e.print();
            // clap exits 2 on usage errors; Nodepool's CLI exits 1.
            return ExitCode::from(code);
        }
    };
    run(cli, &mut std::io::stdout(), &mut std::io::stderr())
}
