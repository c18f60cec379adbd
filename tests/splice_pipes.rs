//! Splice pipes are held only while bytes are in flight. Its own test binary:
//! it counts the pipe descriptors of the whole process, which tests running
//! alongside in the same binary would disturb.

mod common;

use std::time::Duration;

use common::*;
use tcplb::config::{Protocol, SpliceMode};
use tokio::net::TcpStream;

const T: Duration = Duration::from_secs(10);

/// Keep-alive connections that once moved bulk data, then went quiet, must
/// not each keep two 1 MiB pipes: those count against the per-user pipe
/// quota (64 MiB by default), and once it is used up every other connection
/// has to copy. Quiet directions give their pipes back, and take one again
/// when bytes come.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn quiet_spliced_connections_hold_no_pipes() {
    const CONNS: usize = 32;
    let (echo, _) = echo_backend().await;
    let mut l = listener(&[echo]);
    l.splice = SpliceMode::On;
    l.protocol = Protocol::Tcp;
    let lb = start_one(l).await;
    let before = pipe_fds();

    let mut conns = Vec::new();
    for i in 0..CONNS {
        let mut s = TcpStream::connect(lb.addr).await.expect("connect to tcplb");
        echo_on(&mut s, &random_bytes(200_000 + i, i as u64)).await;
        conns.push(s);
    }
    // All quiet: what is left is at most the pool (8 pipes, two descriptors
    // each), not two pipes per connection (128 descriptors).
    let quiet = eventually(T, || pipe_fds().saturating_sub(before) <= 16).await;
    assert!(
        quiet,
        "{} pipe descriptors held by {CONNS} quiet spliced connections",
        pipe_fds().saturating_sub(before)
    );

    // Each quiet connection splices again, byte for byte, when bytes come.
    for (i, s) in conns.iter_mut().enumerate() {
        echo_on(s, &random_bytes(70_000 + i, 1000 + i as u64)).await;
    }
}
