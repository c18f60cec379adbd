//! Backend selection cost: ns per pick for each strategy with 2, 16 and 256
//! backends, single-threaded and with contention from every core.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion};
use tcplb::config::StrategyKind;
use tcplb::{Backend, Pool};

const STRATEGIES: [StrategyKind; 4] = [
    StrategyKind::RoundRobin,
    StrategyKind::LeastConnections,
    StrategyKind::RandomTwo,
    StrategyKind::Maglev,
];

fn pool(n: usize, kind: StrategyKind) -> Pool {
    let backends = (0..n)
        .map(|i| {
            let addr = SocketAddr::from(([10, 0, (i / 256) as u8, (i % 256) as u8], 8080));
            Arc::new(Backend::new(addr, "bench".into(), 2, 3))
        })
        .collect();
    Pool::new(backends, kind)
}

fn client(i: u64) -> SocketAddr {
    SocketAddr::from(([192, 0, (i >> 8) as u8, i as u8], 40000))
}

fn single_thread(c: &mut Criterion) {
    for kind in STRATEGIES {
        let mut group = c.benchmark_group(format!("pick/{}", kind.as_str()));
        for n in [2usize, 16, 256] {
            let p = pool(n, kind);
            let mut i = 0u64;
            group.bench_with_input(BenchmarkId::from_parameter(n), &n, |b, _| {
                b.iter(|| {
                    i = i.wrapping_add(1);
                    p.candidates(client(i), 3).next().map(|b| b.addr)
                })
            });
        }
        group.finish();
    }
}

fn contended(c: &mut Criterion) {
    let threads = std::thread::available_parallelism().map_or(2, |n| n.get());
    for kind in STRATEGIES {
        let mut group = c.benchmark_group(format!("pick-contended-{threads}t/{}", kind.as_str()));
        for n in [2usize, 16, 256] {
            let p = Arc::new(pool(n, kind));
            group.bench_with_input(BenchmarkId::from_parameter(n), &n, |b, _| {
                // Time per pick with every core picking from the same pool.
                b.iter_custom(|iters| {
                    let per_thread = iters.div_ceil(threads as u64);
                    let start = Instant::now();
                    std::thread::scope(|s| {
                        for t in 0..threads {
                            let p = Arc::clone(&p);
                            s.spawn(move || {
                                for i in 0..per_thread {
                                    let c = client(i ^ ((t as u64) << 20));
                                    std::hint::black_box(p.candidates(c, 3).next());
                                }
                            });
                        }
                    });
                    let total: Duration = start.elapsed();
                    // Wall time per pick per thread: what one connection waits.
                    total.mul_f64(1.0 / per_thread.max(1) as f64).mul_f64(iters as f64)
                });
            });
        }
        group.finish();
    }
}

criterion_group! {
    name = benches;
    config = Criterion::default().measurement_time(Duration::from_secs(2)).warm_up_time(Duration::from_millis(500));
    targets = single_thread, contended
}
criterion_main!(benches);
