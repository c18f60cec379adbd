//! Prometheus metrics, read at scrape time.
//!
//! Everything is counted where it happens, in the atomics of
//! [`crate::stats`] and on each backend; a prometheus-client [`Collector`]
//! reads them on each scrape and encodes them with the library's text
//! encoder, so the data path never takes a lock or allocates for metrics.

use std::sync::atomic::Ordering;
use std::sync::Arc;

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, MetricEncoder, NoLabelSet};
use prometheus_client::metrics::MetricType;
use prometheus_client::registry::Registry;

use crate::stats::{
    Histogram, ACCEPT_ERRORS, CONNECTIONS_LIMITED, CONNECTION_PANICS, LAST_RELOAD_SUCCESS,
    LOG_LINES_DROPPED, RELOADS_APPLIED, RELOADS_FAILED, SPLICED_BYTES, SPLICE_PIPES, SYNTHESIZED,
    WORKER_HANDOFFS,
};
use crate::upstream::clients::Refusal;
use crate::upstream::{ConnectFailure, Service};

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

/// The standard process metrics (as every Prometheus client library
/// exports them), read from /proc at scrape time; left out when /proc
/// cannot be read.
fn encode_process(encoder: &mut DescriptorEncoder<'_>) -> Result<(), std::fmt::Error> {
    let Ok(me) = procfs::process::Process::myself() else { return Ok(()) };
    let Ok(stat) = me.stat() else { return Ok(()) };
    let ticks = procfs::ticks_per_second().max(1) as f64;
    let cpu = (stat.utime + stat.stime) as f64 / ticks;
    let mut m = encoder.encode_descriptor(
        "process_cpu_seconds",
        "Total user and system CPU time spent in seconds.",
        None,
        MetricType::Counter,
    )?;
    m.encode_counter::<NoLabelSet, _, u64>(&cpu, None)?;
    let start =
        procfs::boot_time_secs().ok().map(|boot| boot as f64 + stat.starttime as f64 / ticks);
    let max_fds = me.limits().ok().and_then(|l| match l.max_open_files.soft_limit {
        procfs::process::LimitValue::Value(n) => Some(n as f64),
        procfs::process::LimitValue::Unlimited => None,
    });
    let gauges = [
        (
            "process_resident_memory_bytes",
            "Resident memory size in bytes.",
            Some((stat.rss * procfs::page_size()) as f64),
        ),
        (
            "process_open_fds",
            "Number of open file descriptors.",
            me.fd_count().ok().map(|n| n as f64),
        ),
        ("process_max_fds", "Maximum number of open file descriptors.", max_fds),
        (
            "process_start_time_seconds",
            "Start time of the process since the Unix epoch in seconds.",
            start,
        ),
    ];
    for (name, help, value) in gauges {
        if let Some(v) = value {
            encoder.encode_descriptor(name, help, None, MetricType::Gauge)?.encode_gauge(&v)?;
        }
    }
    Ok(())
}

/// The OpenMetrics content type.
pub const OPENMETRICS: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";
/// Prometheus's classic text format.
pub const CLASSIC: &str = "text/plain; version=0.0.4; charset=utf-8";

/// [`encode`]'s OpenMetrics text in Prometheus's classic format (0.0.4): a
/// counter's HELP and TYPE name its samples' `_total` name, and there is no
/// `# EOF` or `# UNIT` line. Everything else is the same in both formats.
pub fn to_classic(openmetrics: &str) -> String {
    use std::collections::HashSet;
    let counters: HashSet<&str> = openmetrics
        .lines()
        .filter_map(|l| l.strip_prefix("# TYPE "))
        .filter_map(|l| l.strip_suffix(" counter"))
        .collect();
    let mut out = String::with_capacity(openmetrics.len() + 64 * counters.len());
    for line in openmetrics.lines() {
        if line == "# EOF" || line.starts_with("# UNIT ") {
            continue;
        }
        let meta = line.strip_prefix("# HELP ").map(|r| ("# HELP ", r));
        let meta = meta.or_else(|| line.strip_prefix("# TYPE ").map(|r| ("# TYPE ", r)));
        match meta {
            Some((kind, rest)) => {
                let (name, tail) = rest.split_once(' ').unwrap_or((rest, ""));
                let total = if counters.contains(name) { "_total" } else { "" };
                out.push_str(&format!("{kind}{name}{total} {tail}"));
            }
            None => out.push_str(line),
        }
        out.push('\n');
    }
    out
}

/// Encodes `registry` in the OpenMetrics text format.
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
    encoder: &mut DescriptorEncoder<'_>,
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
    fn encode(&self, mut encoder: DescriptorEncoder<'_>) -> Result<(), std::fmt::Error> {
        let services = self.source.services();
        // (listener name, backend address, backend) for every backend.
        let backends: Vec<(String, String, _)> = services
            .iter()
            .flat_map(|s| {
                let all = s.backends().into_iter().chain(s.removed());
                all.map(move |b| (s.name.to_string(), b.addr.to_string(), b))
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
                SYNTHESIZED.map(|code| {
                    let label: &'static str = match code {
                        408 => "408",
                        502 => "502",
                        503 => "503",
                        _ => "504",
                    };
                    (vec![("listener", n.as_str()), ("status", label)], s.stats.synthesized(code))
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
        // Listeners with routes: where their clients went, by route
        // (`default`: the listener's own upstreams).
        let routed: Vec<(&str, &str, u64)> = services
            .iter()
            .filter(|s| s.name.contains('/') || !s.snapshot().config.routes.is_empty())
            .map(|s| {
                let (listener, route) = s.name.split_once('/').unwrap_or((&s.name, "default"));
                (listener, route, s.stats.routed.load(Ordering::Relaxed))
            })
            .collect();
        family(
            &mut encoder,
            "tcplb_routed_connections",
            "Clients of a listener with routes, by the route their TLS server name or HTTP Host chose.",
            MetricType::Counter,
            routed.iter().map(|&(l, r, n)| (vec![("listener", l), ("route", r)], n)),
        )?;
        family(
            &mut encoder,
            "tcplb_unrouted_connections",
            "Clients that matched no route of a listener without a default pool: closed (or answered 503).",
            MetricType::Counter,
            services.iter().zip(&names).filter(|(s, _)| !s.snapshot().config.routes.is_empty()).map(
                |(s, n)| (vec![("listener", n.as_str())], s.stats.unrouted.load(Ordering::Relaxed)),
            ),
        )?;
        let limited: Vec<(&str, &'static str, u64)> = services
            .iter()
            .zip(&names)
            .filter(|(s, _)| s.snapshot().config.client_limits().any())
            .flat_map(|(s, n)| {
                [Refusal::Listener, Refusal::ClientConnections, Refusal::ClientRate]
                    .map(|why| (n.as_str(), why.as_str(), s.clients.refused(why)))
            })
            .collect();
        family(
            &mut encoder,
            "tcplb_limited_connections",
            "Clients closed at once by a share limit: the listener's max_connections, or a client's connections or rate.",
            MetricType::Counter,
            limited.iter().map(|&(l, why, n)| (vec![("listener", l), ("limit", why)], n)),
        )?;
        family(
            &mut encoder,
            "tcplb_clients_untracked",
            "Clients let through without per-client limits because the listener's table of clients was full of clients holding connections.",
            MetricType::Counter,
            services.iter().zip(&names).filter(|(s, _)| s.snapshot().config.client_limits().any()).map(
                |(s, n)| (vec![("listener", n.as_str())], s.clients.untracked()),
            ),
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
            "tcplb_connections_limited",
            "Accepted connections that waited for a slot under max_connections.",
            MetricType::Counter,
            std::iter::once((Vec::new(), CONNECTIONS_LIMITED.load(Ordering::Relaxed))),
        )?;
        family(
            &mut encoder,
            "tcplb_reloads",
            "Configuration reloads, by result (a rejected file or a failed resolve or bind: failure).",
            MetricType::Counter,
            [("success", &RELOADS_APPLIED), ("failure", &RELOADS_FAILED)]
                .into_iter()
                .map(|(result, n)| (vec![("result", result)], n.load(Ordering::Relaxed))),
        )?;
        family(
            &mut encoder,
            "tcplb_last_reload_success_timestamp_seconds",
            "When the configuration was last applied, start included (Unix time).",
            MetricType::Gauge,
            std::iter::once((Vec::new(), LAST_RELOAD_SUCCESS.load(Ordering::Relaxed))),
        )?;
        family(
            &mut encoder,
            "tcplb_build_info",
            "1, labelled with the version of this build.",
            MetricType::Gauge,
            std::iter::once((vec![("version", env!("CARGO_PKG_VERSION"))], 1)),
        )?;
        encode_process(&mut encoder)?;
        family(
            &mut encoder,
            "tcplb_log_lines_dropped",
            "Log lines dropped because the reader of stderr fell behind (the log \
             writer never blocks a connection).",
            MetricType::Counter,
            std::iter::once((Vec::new(), LOG_LINES_DROPPED.load(Ordering::Relaxed))),
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
