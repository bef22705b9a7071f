//! Metrics with Nodepool's names (reference §7.2): sent to statsd when
//! `STATSD_HOST` is set, and always kept in memory for Prometheus'
//! `/metrics`.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::net::UdpSocket;
use std::sync::Mutex;
use std::time::Duration;

#[derive(Default)]
struct Registry {
    counters: BTreeMap<String, u64>,
    gauges: BTreeMap<String, f64>,
    timers: BTreeMap<String, (u64, f64)>,
}

struct Statsd {
    socket: UdpSocket,
    target: String,
}

/// A metrics sink. Cheap to call from any task.
pub struct Metrics {
    registry: Mutex<Registry>,
    statsd: Option<Statsd>,
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Metrics")
            .field("statsd", &self.statsd.as_ref().map(|s| s.target.clone()))
            .finish()
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics::in_memory()
    }
}

/// Statsd names may not contain `.` or `:` inside a component (Nodepool
/// replaces them in requestor names).
pub fn sanitize_component(s: &str) -> String {
    s.replace(['.', ':'], "_")
}

impl Metrics {
    /// Only in memory (tests, embedding without statsd).
    pub fn in_memory() -> Self {
        Metrics {
            registry: Mutex::new(Registry::default()),
            statsd: None,
        }
    }

    /// In memory, plus statsd when `STATSD_HOST` (and optionally
    /// `STATSD_PORT`, default 8125) is set, as Nodepool does.
    pub fn from_env() -> Self {
        let mut m = Metrics::in_memory();
        if let Ok(host) = std::env::var("STATSD_HOST") {
            let port = std::env::var("STATSD_PORT").unwrap_or_else(|_| "8125".into());
            let target = format!("{host}:{port}");
            match UdpSocket::bind("0.0.0.0:0").and_then(|s| s.set_nonblocking(true).map(|()| s)) {
                Ok(socket) => m.statsd = Some(Statsd { socket, target }),
                Err(e) => tracing::warn!(%target, error = %e, "cannot open a statsd socket"),
            }
        }
        m
    }

    fn send(&self, line: String) {
        if let Some(s) = &self.statsd {
            // Metrics must never block or fail the caller; a lost packet is fine.
            let _ = s.socket.send_to(line.as_bytes(), &s.target);
        }
    }

    fn registry(&self) -> std::sync::MutexGuard<'_, Registry> {
        self.registry.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Adds one to a counter.
    pub fn incr(&self, name: &str) {
        *self.registry().counters.entry(name.to_owned()).or_default() += 1;
        self.send(format!("{name}:1|c"));
    }

    /// Sets a gauge.
    pub fn gauge(&self, name: &str, value: f64) {
        self.registry().gauges.insert(name.to_owned(), value);
        self.send(format!("{name}:{value}|g"));
    }

    /// Records a duration (a statsd timer) and counts it.
    pub fn timing(&self, name: &str, d: Duration) {
        let ms = d.as_secs_f64() * 1000.0;
        {
            let mut r = self.registry();
            let t = r.timers.entry(name.to_owned()).or_default();
            t.0 += 1;
            t.1 += ms;
        }
        self.send(format!("{name}:{ms:.3}|ms"));
        self.incr(name);
    }

    /// A counter's value (tests).
    pub fn counter(&self, name: &str) -> u64 {
        self.registry().counters.get(name).copied().unwrap_or(0)
    }

    /// A gauge's value (tests).
    pub fn gauge_value(&self, name: &str) -> Option<f64> {
        self.registry().gauges.get(name).copied()
    }

    /// The Prometheus text exposition of everything recorded.
    pub fn prometheus(&self) -> String {
        fn prom(name: &str) -> String {
            name.chars()
                .map(|c| {
                    if c.is_ascii_alphanumeric() || c == '_' || c == ':' {
                        c
                    } else {
                        '_'
                    }
                })
                .collect()
        }
        let r = self.registry();
        let mut out = String::new();
        for (k, v) in &r.counters {
            let n = prom(k);
            let _ = writeln!(out, "# TYPE {n}_total counter\n{n}_total {v}");
        }
        for (k, v) in &r.gauges {
            let n = prom(k);
            let _ = writeln!(out, "# TYPE {n} gauge\n{n} {v}");
        }
        for (k, (count, sum)) in &r.timers {
            let n = prom(k);
            let _ = writeln!(
                out,
                "# TYPE {n}_ms summary\n{n}_ms_sum {sum}\n{n}_ms_count {count}"
            );
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn statsd_lines_reach_a_udp_listener_and_prometheus_text_is_valid() {
        let listener = UdpSocket::bind("127.0.0.1:0").expect("bind");
        listener
            .set_read_timeout(Some(Duration::from_secs(5)))
            .expect("timeout");
        let mut m = Metrics::in_memory();
        let socket = UdpSocket::bind("127.0.0.1:0").expect("bind");
        m.statsd = Some(Statsd {
            socket,
            target: listener.local_addr().expect("addr").to_string(),
        });
        m.incr("nodepool.launch.ready");
        let mut buf = [0u8; 256];
        let n = listener.recv(&mut buf).expect("packet");
        assert_eq!(&buf[..n], b"nodepool.launch.ready:1|c");
        m.gauge("nodepool.nodes.ready", 3.0);
        m.timing(
            "nodepool.launch.provider.p.ready",
            Duration::from_millis(1500),
        );
        let text = m.prometheus();
        assert!(text.contains("nodepool_launch_ready_total 1"), "{text}");
        assert!(text.contains("nodepool_nodes_ready 3"), "{text}");
        assert!(
            text.contains("nodepool_launch_provider_p_ready_ms_count 1"),
            "{text}"
        );
        assert_eq!(
            sanitize_component("NodePool:min-ready"),
            "NodePool_min-ready"
        );
    }
}
