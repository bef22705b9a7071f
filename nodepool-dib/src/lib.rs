//! The [`ImageBuilder`](nodepool_model::image_builder::ImageBuilder) that
//! builds disk images with diskimage-builder (`disk-image-create`), as
//! Nodepool's builder does (reference §5.3), without leaking what a killed
//! build leaves behind.
//!
//! Start with [`DibBuilder`]: [`ImageBuilder::build`] plans the command,
//! runs it, always sweeps after it, and returns the verified files.
//!
//! [`ImageBuilder::build`]: nodepool_model::image_builder::ImageBuilder::build
//!
//! # Layout
//!
//! - [`builder`]: [`DibBuilder`] and its [`DibOptions`]; one build end to end.
//! - [`command`]: the command line and environment, computed as a value
//!   (no I/O): what DIB is asked for, the per-build `TMP_DIR`, the vhd plan.
//! - `run` (private): the process: own group, output streamed to the log,
//!   timeout, cancellation, SIGTERM → grace → SIGKILL of the group.
//! - `stream` (private): line splitting and the bounded log tail.
//! - [`sweep`](mod@sweep): after every build, processes, mounts, loop devices,
//!   `/dev/mapper` links, the temp directory and `*-new` files.
//! - `procs` (private): finding a build's processes in procfs.
//! - [`output`]: sizes and checksums, verified against DIB's files.
//! - [`retention`]: pruning old build logs (`build-log-retention`).
//!
//! The `fake-disk-image-create` binary of this crate is a stand-in for DIB
//! used by the fast tests: it checks the arguments and environment it gets
//! and writes files as DIB does (see its `--help`).
//!
//! # Decisions
//!
//! - **One `TMP_DIR` per build** (`<work dir>/<image>-<build id>`, also
//!   `TMPDIR`): everything a killed DIB leaks (mounts, loop devices backed
//!   by files, temp dirs) is under it, so the sweep cleans exactly this
//!   build's leftovers even when builds run side by side.
//! - **Kill sequence**: SIGTERM to DIB's main process only (its EXIT trap
//!   unmounts; signalling the whole group would stop the trap's own
//!   commands), [`DibOptions::term_grace`] (30 s), SIGKILL to the group,
//!   wait until procfs shows no live member, then the sweep — always, also
//!   after a success, since the trap can leave a tmpfs mounted during the
//!   final `qemu-img convert`.
//! - **vhd**: DIB makes it when `vhd-util` is on the build's `PATH` (DIB
//!   refuses `-t vhd` without it, and the patched `vhd-util` is what
//!   Rackspace-style clouds need). Otherwise `vhd` is not passed to DIB;
//!   `raw` is (added if not requested, removed afterwards) and converted
//!   with `qemu-img convert -O vpc -o subformat=dynamic,force_size=on`,
//!   its checksums computed and written as DIB would. See [`VhdStrategy`].
//! - **Logs**: the build log gets the output bytes verbatim (a 25 kB line
//!   stays whole; memory does not depend on line length), then
//!   `Exit code: N` (N negative for a signal, like Python's `returncode`).
//!   Tracing gets each line at debug (capped at 64 KiB), the error report
//!   the last 50 lines (each capped at 1 KiB).

pub mod builder;
pub mod command;
pub mod output;
mod procs;
pub mod retention;
mod run;
mod stream;
pub mod sweep;

#[cfg(test)]
mod test_support;

pub use builder::{DibBuilder, DibOptions};
pub use command::{DibCommand, PlanError, VhdStrategy};
pub use retention::prune_build_logs;
pub use sweep::{SweepReport, sweep};
