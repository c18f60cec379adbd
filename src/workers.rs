//! The data-plane threads: one current-thread runtime each, so a
//! connection's tasks, sockets and timers never leave the thread that
//! accepted it.

use std::io;
use std::time::Duration;

use tokio_util::sync::CancellationToken;

/// The data-plane threads: one current-thread runtime each. Connections
/// live on the worker that accepted them; the control plane (reload, DNS,
/// probes, admin) stays on the caller's runtime.
pub struct Workers {
    /// Spawn handles, one per worker.
    pub handles: Vec<tokio::runtime::Handle>,
    /// Cancelled (also on drop) to end the worker threads.
    stop: CancellationToken,
}

impl Workers {
    /// Starts `n` worker threads (at least one).
    pub fn start(n: usize) -> Result<Workers, io::Error> {
        let stop = CancellationToken::new();
        let mut handles = Vec::with_capacity(n);
        for i in 0..n.max(1) {
            let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
            handles.push(rt.handle().clone());
            let stop = stop.clone();
            std::thread::Builder::new()
                .name(format!("tcplb-worker-{i}"))
                .spawn(move || rt.block_on(work_until(stop)))?;
        }
        Ok(Workers { handles, stop })
    }
}

/// How often a worker's timer floor fires; below the shortest timeout a
/// connection usually sets (3 s connect, 1 s peek).
const TIMER_FLOOR: Duration = Duration::from_millis(500);

/// A worker's main future: runs until `stop`, and keeps one timer of the
/// worker always due within [`TIMER_FLOOR`].
///
/// tokio's timer writes to the driver's eventfd (and so costs one more
/// `epoll_wait`) whenever a new timer is due before all the others, because
/// it cannot tell that the timer was set on the driver's own thread, which
/// is awake anyway. On a worker that happens for nearly every connection's
/// connect timeout. With a timer always due sooner, new timers never come
/// first; the floor costs two wake-ups per second.
async fn work_until(stop: CancellationToken) {
    let floor = async {
        loop {
            tokio::time::sleep(TIMER_FLOOR).await;
        }
    };
    tokio::select! {
        () = stop.cancelled() => {}
        () = floor => {}
    }
}

impl Drop for Workers {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}
