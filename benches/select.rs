//! Backend selection cost: ns per pick, by pool size.

use std::net::SocketAddr;
use std::sync::Arc;

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion};
use tcplb::backend::{Backend, Pool};
use tcplb::config::StrategyKind;

fn pool(n: usize) -> Pool {
    let backends = (0..n)
        .map(|i| {
            let addr = SocketAddr::from(([127, 0, 0, 1], 1000 + i as u16));
            Arc::new(Backend::new(addr, "bench".into(), 2, 3))
        })
        .collect();
    Pool::new(backends, StrategyKind::RoundRobin)
}

fn round_robin(c: &mut Criterion) {
    let client = SocketAddr::from(([127, 0, 0, 1], 40000));
    let mut group = c.benchmark_group("round-robin");
    for n in [2usize, 16, 256] {
        let p = pool(n);
        group.bench_with_input(BenchmarkId::from_parameter(n), &n, |b, _| {
            b.iter(|| p.candidates(client, 3).next().map(|b| b.addr))
        });
    }
    group.finish();
}

criterion_group!(benches, round_robin);
criterion_main!(benches);
