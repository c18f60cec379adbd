//! An upload whose server answers only at the end (a file upload, a bulk
//! load, a backup stream): through a listener with every default it must
//! arrive whole, and go through splice(2) rather than user space.

mod common;

use std::time::Duration;

use common::*;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;

const SIZE: usize = 64 << 20;
const T: Duration = Duration::from_secs(60);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upload_to_a_silent_server_is_spliced_with_the_defaults() {
    // Reads exactly SIZE bytes without a word, then answers with their digest.
    let (backend, _) = serve(|mut s| async move {
        let mut got = Vec::with_capacity(SIZE);
        let mut buf = vec![0u8; 1 << 16];
        while got.len() < SIZE {
            match s.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(n) => got.extend_from_slice(&buf[..n]),
            }
        }
        let (len, hash) = digest(&got);
        let _ = s.write_all(format!("{len} {hash}\n").as_bytes()).await;
    })
    .await;
    // protocol = "auto", splice = "auto", the access log on: the defaults.
    let lb = start(with_admin(listener(&[backend]))).await;
    let admin = lb.admin.expect("admin endpoint");
    let spliced = |m: &Samples| get(m, "tcplb_spliced_bytes_total", &[]);
    let before = spliced(&scrape(admin).await);

    let data = random_bytes(SIZE, 64);
    let (len, hash) = digest(&data);
    let s = TcpStream::connect(lb.addr).await.unwrap();
    let (r, mut w) = s.into_split();
    tokio::time::timeout(T, w.write_all(&data)).await.expect("upload timed out").unwrap();
    let mut answer = String::new();
    tokio::time::timeout(T, BufReader::new(r).read_line(&mut answer))
        .await
        .expect("no answer")
        .unwrap();
    assert_eq!(answer.trim(), format!("{len} {hash}"), "the upload arrived changed");

    let moved = spliced(&scrape(admin).await) - before;
    assert!(
        moved >= (SIZE / 2) as f64,
        "only {moved} of {SIZE} bytes were spliced: the upload was copied through user space"
    );
}
