//! Prometheus metrics, without a lock or an allocation per connection.
//!
//! Everything is counted where it happens in plain atomics that already live
//! on backends and listeners; a prometheus-client [`Collector`] reads them at
//! scrape time and encodes them with the library's text encoder. Durations go
//! into [`Histogram`]s of fixed buckets, one atomic per bucket.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, MetricEncoder, NoLabelSet};
use prometheus_client::metrics::MetricType;
use prometheus_client::registry::Registry;

use crate::backend::ConnectFailure;
use crate::http::Status;
use crate::service::Service;

/// Accept errors of every listener since start.
pub static ACCEPT_ERRORS: AtomicU64 = AtomicU64::new(0);
/// Connection tasks that panicked (a bug), caught and counted.
pub static CONNECTION_PANICS: AtomicU64 = AtomicU64::new(0);
/// Bytes forwarded with splice(2), both directions, every listener.
pub static SPLICED_BYTES: AtomicU64 = AtomicU64::new(0);
/// Connections handed by the worker that accepted them to a less busy one.
pub static WORKER_HANDOFFS: AtomicU64 = AtomicU64::new(0);
/// Splice pipes open now: carrying bytes or pooled.
pub static SPLICE_PIPES: AtomicU64 = AtomicU64::new(0);

/// Upper bounds (seconds) of the duration buckets: 100µs to 1h.
const BUCKETS: [f64; 16] = [
    0.0001, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 5.0, 30.0, 300.0,
    3600.0,
];

/// A histogram of durations: one atomic per bucket, no lock.
#[derive(Debug, Default)]
pub struct Histogram {
    /// Observations per bucket (not cumulative), plus one for +Inf.
    buckets: [AtomicU64; BUCKETS.len() + 1],
    /// Sum of observations in microseconds.
    sum_us: AtomicU64,
    /// Number of observations.
    count: AtomicU64,
}

impl Histogram {
    /// Records one duration.
    pub fn observe(&self, d: Duration) {
        let secs = d.as_secs_f64();
        let i = BUCKETS.iter().position(|&b| secs <= b).unwrap_or(BUCKETS.len());
        self.buckets[i].fetch_add(1, Ordering::Relaxed);
        self.sum_us.fetch_add(d.as_micros().min(u64::MAX as u128) as u64, Ordering::Relaxed);
        self.count.fetch_add(1, Ordering::Relaxed);
    }

    /// (sum in seconds, count, cumulative buckets) as Prometheus wants them.
    fn snapshot(&self) -> (f64, u64, Vec<(f64, u64)>) {
        let mut cumulative = 0;
        let mut out = Vec::with_capacity(BUCKETS.len() + 1);
        for (i, b) in self.buckets.iter().enumerate() {
            cumulative += b.load(Ordering::Relaxed);
            out.push((BUCKETS.get(i).copied().unwrap_or(f64::INFINITY), cumulative));
        }
        let sum = self.sum_us.load(Ordering::Relaxed) as f64 / 1e6;
        (sum, cumulative.max(self.count.load(Ordering::Relaxed)), out)
    }

    /// Number of observations.
    pub fn count(&self) -> u64 {
        self.count.load(Ordering::Relaxed)
    }
}

/// Per-listener counters that are not per backend.
#[derive(Debug, Default)]
pub struct ListenerStats {
    /// Time from accept to an established backend connection.
    pub connect_duration: Histogram,
    /// Time from accept to the end of the connection.
    pub connection_duration: Histogram,
    /// Synthesized HTTP responses: 502, 503, 504.
    synthesized: [AtomicU64; 3],
    /// Clients closed by an allow/deny rule.
    pub denied: AtomicU64,
}

impl ListenerStats {
    /// Counts a synthesized response.
    pub fn record_synthesized(&self, status: Status) {
        self.synthesized[status_index(status)].fetch_add(1, Ordering::Relaxed);
    }

    /// Synthesized responses with `status` so far.
    pub fn synthesized(&self, status: Status) -> u64 {
        self.synthesized[status_index(status)].load(Ordering::Relaxed)
    }
}

fn status_index(s: Status) -> usize {
    match s {
        Status::BadGateway => 0,
        Status::ServiceUnavailable => 1,
        Status::GatewayTimeout => 2,
    }
}

/// Where the collector finds the live listeners.
pub trait Source: std::fmt::Debug + Send + Sync + 'static {
    /// The listeners now.
    fn services(&self) -> Arc<Vec<Arc<Service>>>;

    /// Connections each data-plane worker serves now, by worker index
    /// (empty before the workers run).
    fn workers(&self) -> Vec<usize> {
        Vec::new()
    }
}

/// Encodes the live state on each scrape.
#[derive(Debug)]
struct LiveCollector<S> {
    /// The listeners.
    source: S,
}

/// A registry holding tcplb's collector.
pub fn registry(source: impl Source) -> Registry {
    let mut r = Registry::default();
    r.register_collector(Box::new(LiveCollector { source }));
    r
}

/// Encodes `registry` in the Prometheus text format.
pub fn encode(registry: &Registry) -> String {
    let mut out = String::new();
    // Writing into a String cannot fail.
    let _ = prometheus_client::encoding::text::encode(&mut out, registry);
    out
}

type Labels<'a> = Vec<(&'static str, &'a str)>;

/// The listener and backend labels.
fn lb<'a>(listener: &'a str, backend: &'a str) -> Labels<'a> {
    vec![("listener", listener), ("backend", backend)]
}

/// Writes one metric family: `values` gives (labels, value) pairs.
fn family<'a>(
    encoder: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    kind: MetricType,
    values: impl Iterator<Item = (Labels<'a>, u64)>,
) -> Result<(), std::fmt::Error> {
    let mut m = encoder.encode_descriptor(name, help, None, kind)?;
    for (labels, v) in values {
        // A metric without labels is written bare, not with an empty `{}`.
        if labels.is_empty() {
            write_value(&mut m, kind, v)?;
        } else {
            write_value(&mut m.encode_family(&labels)?, kind, v)?;
        }
    }
    Ok(())
}

fn write_value(f: &mut MetricEncoder<'_>, kind: MetricType, v: u64) -> Result<(), std::fmt::Error> {
    match kind {
        MetricType::Counter => f.encode_counter::<NoLabelSet, _, u64>(&v, None),
        _ => f.encode_gauge(&(v as i64)),
    }
}

impl<S: Source> Collector for LiveCollector<S> {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let services = self.source.services();
        // (listener name, backend address, backend) for every backend.
        let backends: Vec<(String, String, _)> = services
            .iter()
            .flat_map(|s| {
                s.backends().into_iter().map(move |b| (s.name.to_string(), b.addr.to_string(), b))
            })
            .collect();

        family(
            &mut encoder,
            "tcplb_connections",
            "Client connections established to a backend.",
            MetricType::Counter,
            backends.iter().map(|(l, a, b)| (lb(l, a), b.total())),
        )?;
        family(
            &mut encoder,
            "tcplb_connections_active",
            "Client connections currently held by a backend (connects in progress included).",
            MetricType::Gauge,
            backends.iter().map(|(l, a, b)| (lb(l, a), b.active() as u64)),
        )?;
        family(
            &mut encoder,
            "tcplb_bytes",
            "Bytes proxied; direction up is client to backend, down is backend to client.",
            MetricType::Counter,
            backends.iter().flat_map(|(l, a, b)| {
                let (up, down) = b.bytes();
                let mut u = lb(l, a);
                u.push(("direction", "up"));
                let mut d = lb(l, a);
                d.push(("direction", "down"));
                [(u, up), (d, down)]
            }),
        )?;
        family(
            &mut encoder,
            "tcplb_connect_errors",
            "Failed connects to a backend, by reason.",
            MetricType::Counter,
            backends.iter().flat_map(|(l, a, b)| {
                ConnectFailure::ALL.iter().map(move |r| {
                    let mut labels = lb(l, a);
                    labels.push(("reason", r.as_str()));
                    (labels, b.connect_failures_for(*r))
                })
            }),
        )?;
        family(
            &mut encoder,
            "tcplb_backend_up",
            "1 when the backend is up (health), 0 when down.",
            MetricType::Gauge,
            backends.iter().map(|(l, a, b)| (lb(l, a), b.health.is_up() as u64)),
        )?;
        family(
            &mut encoder,
            "tcplb_backend_draining",
            "1 when the backend is out of rotation (drained or removed).",
            MetricType::Gauge,
            backends.iter().map(|(l, a, b)| (lb(l, a), b.is_draining() as u64)),
        )?;
        family(
            &mut encoder,
            "tcplb_health_checks",
            "Active health probes, by result.",
            MetricType::Counter,
            backends.iter().flat_map(|(l, a, b)| {
                let (ok, failed) = b.probes();
                let mut s = lb(l, a);
                s.push(("result", "success"));
                let mut f = lb(l, a);
                f.push(("result", "failure"));
                [(s, ok), (f, failed)]
            }),
        )?;
        let names: Vec<String> = services.iter().map(|s| s.name.to_string()).collect();
        for (name, help, pick) in [
            (
                "tcplb_connect_duration_seconds",
                "Time from accept to an established backend connection.",
                (|s: &Service| &s.stats.connect_duration) as fn(&Service) -> &Histogram,
            ),
            (
                "tcplb_connection_duration_seconds",
                "Time from accept to the end of a proxied connection.",
                |s: &Service| &s.stats.connection_duration,
            ),
        ] {
            let mut m = encoder.encode_descriptor(name, help, None, MetricType::Histogram)?;
            for (s, n) in services.iter().zip(&names) {
                let (sum, count, buckets) = pick(s).snapshot();
                let labels: Labels<'_> = vec![("listener", n)];
                m.encode_family(&labels)?
                    .encode_histogram::<NoLabelSet>(sum, count, &buckets, None)?;
            }
        }
        family(
            &mut encoder,
            "tcplb_synthesized_responses",
            "HTTP responses tcplb wrote itself because no backend could be reached.",
            MetricType::Counter,
            services.iter().zip(&names).flat_map(|(s, n)| {
                [Status::BadGateway, Status::ServiceUnavailable, Status::GatewayTimeout].map(|st| {
                    let code: &'static str = match st {
                        Status::BadGateway => "502",
                        Status::ServiceUnavailable => "503",
                        Status::GatewayTimeout => "504",
                    };
                    (vec![("listener", n.as_str()), ("status", code)], s.stats.synthesized(st))
                })
            }),
        )?;
        family(
            &mut encoder,
            "tcplb_denied_connections",
            "Clients closed right after accept by an allow/deny rule.",
            MetricType::Counter,
            services.iter().zip(&names).map(|(s, n)| {
                (vec![("listener", n.as_str())], s.stats.denied.load(Ordering::Relaxed))
            }),
        )?;
        family(
            &mut encoder,
            "tcplb_accept_errors",
            "Failed accept calls (e.g. out of file descriptors).",
            MetricType::Counter,
            std::iter::once((Vec::new(), ACCEPT_ERRORS.load(Ordering::Relaxed))),
        )?;
        let workers: Vec<(String, usize)> = self
            .source
            .workers()
            .into_iter()
            .enumerate()
            .map(|(i, n)| (i.to_string(), n))
            .collect();
        family(
            &mut encoder,
            "tcplb_worker_connections",
            "Client connections each data-plane worker thread serves now.",
            MetricType::Gauge,
            workers.iter().map(|(i, n)| (vec![("worker", i.as_str())], *n as u64)),
        )?;
        family(
            &mut encoder,
            "tcplb_worker_handoffs",
            "Connections handed by the worker that accepted them to a less busy one.",
            MetricType::Counter,
            std::iter::once((Vec::new(), WORKER_HANDOFFS.load(Ordering::Relaxed))),
        )?;
        family(
            &mut encoder,
            "tcplb_connection_panics",
            "Connection tasks that panicked (a bug); the process carried on.",
            MetricType::Counter,
            std::iter::once((Vec::new(), CONNECTION_PANICS.load(Ordering::Relaxed))),
        )?;
        family(
            &mut encoder,
            "tcplb_spliced_bytes",
            "Bytes forwarded with splice(2) (zero copy), both directions, every listener; \
             also counted in tcplb_bytes.",
            MetricType::Counter,
            std::iter::once((Vec::new(), SPLICED_BYTES.load(Ordering::Relaxed))),
        )?;
        family(
            &mut encoder,
            "tcplb_splice_pipes",
            "Splice pipes open, carrying bytes or pooled: two descriptors each, and 1 MiB of \
             the per-user pipe quota (pipe-user-pages-soft).",
            MetricType::Gauge,
            std::iter::once((Vec::new(), SPLICE_PIPES.load(Ordering::Relaxed))),
        )?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn histogram_buckets_are_cumulative() {
        let h = Histogram::default();
        h.observe(Duration::from_micros(50));
        h.observe(Duration::from_millis(3));
        h.observe(Duration::from_secs(7200));
        let (sum, count, buckets) = h.snapshot();
        assert_eq!(count, 3);
        assert!((sum - 7200.00305).abs() < 1e-6, "{sum}");
        assert_eq!(buckets[0], (0.0001, 1));
        assert_eq!(buckets.iter().find(|(b, _)| *b == 0.005).unwrap().1, 2);
        assert_eq!(buckets.last().unwrap(), &(f64::INFINITY, 3));
    }
}
