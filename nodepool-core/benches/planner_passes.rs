//! A fixed number of planning passes over the planner bench's installation,
//! for instruction counts: wall times on a shared machine swing by 2×, the
//! instruction count of a pass does not.
//!
//! ```text
//! cargo bench -p nodepool-core --features testing --bench planner_passes --no-run
//! valgrind --tool=callgrind --toggle-collect='nodepool_core::planner::plan' \
//!     target/release/deps/planner_passes-* base 10
//! ```
//!
//! Arguments: size (`tenth`, `base`, `ten_x`; default `base`) and number of
//! passes (default 10). Prints the plan's digest so two builds can be
//! checked to decide the same.

mod common;

use std::hash::{DefaultHasher, Hash, Hasher};
use std::hint::black_box;

fn main() {
    let mut args = std::env::args().skip(1).filter(|a| a != "--bench");
    let size = args.next().unwrap_or_else(|| "base".to_owned());
    let passes: usize = match args.next() {
        None => 10,
        Some(n) => n
            .parse()
            .unwrap_or_else(|_| panic!("passes: {n:?} is not a number")),
    };
    let Some((_, sz)) = common::SIZES.iter().find(|(name, _)| *name == size) else {
        panic!("unknown size {size:?} (tenth, base, ten_x)");
    };
    let w = common::world(sz);
    let cpu_start = thread_cpu_ns();
    let start = std::time::Instant::now();
    let mut last = None;
    for _ in 0..passes {
        last = Some(black_box(w.plan()));
    }
    let elapsed = start.elapsed();
    // Time on a CPU, without the time spent waiting for one on a busy machine.
    let cpu = match (cpu_start, thread_cpu_ns()) {
        (Some(a), Some(b)) => format!(
            ", {:.3} ms on-CPU per pass",
            (b - a) as f64 / 1e6 / passes.max(1) as f64
        ),
        _ => String::new(),
    };
    if let Some(p) = last {
        let mut h = DefaultHasher::new();
        format!("{:?}", p).hash(&mut h);
        let mut kinds = std::collections::BTreeMap::<String, usize>::new();
        for a in &p.actions {
            let d = format!("{a:?}");
            let kind = d
                .split([' ', '{', '('])
                .next()
                .unwrap_or_default()
                .to_owned();
            *kinds.entry(kind).or_default() += 1;
        }
        println!(
            "{size}: {passes} passes, {:.3} ms per pass{cpu}, {} actions {kinds:?}, {} paused pools, digest {:016x}",
            elapsed.as_secs_f64() * 1000.0 / passes.max(1) as f64,
            p.actions.len(),
            p.pools.iter().filter(|s| s.paused).count(),
            h.finish()
        );
    }
}

/// This thread's time on a CPU so far (Linux), in nanoseconds.
fn thread_cpu_ns() -> Option<u64> {
    let stat = std::fs::read_to_string("/proc/thread-self/schedstat").ok()?;
    stat.split_whitespace().next()?.parse().ok()
}
