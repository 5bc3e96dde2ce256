//! Threads for the storage work that scans: metadata digests, chunk listings and digests,
//! scrub, garbage collection and space reclaim, reference scans, snapshot builds. They run at a
//! lower CPU priority (nice 10) than the rest of the brick, so on a busy host the Raft log,
//! heartbeats and client requests get the processors first and a heal run or a snapshot of a
//! million entries does not stretch an AppendEntries past openraft's limit.

use mortar_proto::FsError;
use std::sync::mpsc;
use std::sync::{Mutex, OnceLock};
use tokio::sync::oneshot;

/// How many background threads; scans wait for one.
const THREADS: usize = 2;
/// Their nice value (0 is the brick's own).
const NICE: i32 = 10;

type Job = Box<dyn FnOnce() + Send>;

fn queue() -> &'static Mutex<mpsc::Sender<Job>> {
    static QUEUE: OnceLock<Mutex<mpsc::Sender<Job>>> = OnceLock::new();
    QUEUE.get_or_init(|| {
        let (tx, rx) = mpsc::channel::<Job>();
        let rx = std::sync::Arc::new(Mutex::new(rx));
        for i in 0..THREADS {
            let rx = rx.clone();
            std::thread::Builder::new()
                .name(format!("mortar-scan-{i}"))
                .spawn(move || {
                    // SAFETY: setpriority(2) on this thread (a Linux thread is its own task);
                    // lowering one's priority needs no privilege. Failing leaves it at 0.
                    unsafe {
                        libc::setpriority(libc::PRIO_PROCESS, libc::gettid() as libc::id_t, NICE)
                    };
                    loop {
                        let job = rx.lock().expect("scan queue").recv();
                        match job {
                            // A job that panics fails its caller, not the thread.
                            Ok(job) => {
                                let _ = std::panic::catch_unwind(std::panic::AssertUnwindSafe(job));
                            }
                            Err(_) => return,
                        }
                    }
                })
                .expect("start a background storage thread");
        }
        Mutex::new(tx)
    })
}

/// Run `f` on a background thread and wait for its result.
pub async fn run<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, FsError> + Send + 'static,
) -> Result<T, FsError> {
    let (tx, rx) = oneshot::channel();
    let job: Job = Box::new(move || {
        let _ = tx.send(f());
    });
    queue()
        .lock()
        .expect("scan queue")
        .send(job)
        .map_err(|_| FsError::Io("background storage threads stopped".into()))?;
    rx.await
        .map_err(|_| FsError::Io("a background storage job panicked".into()))?
}

#[cfg(test)]
mod tests {
    #[tokio::test]
    async fn jobs_run_at_a_lower_priority_and_return_their_results() {
        let nice = super::run(|| {
            // SAFETY: getpriority(2) of this thread.
            Ok(unsafe { libc::getpriority(libc::PRIO_PROCESS, libc::gettid() as libc::id_t) })
        })
        .await
        .unwrap();
        assert_eq!(nice, super::NICE);
        let e = super::run(|| Err::<(), _>(mortar_proto::FsError::NotFound)).await;
        assert_eq!(e, Err(mortar_proto::FsError::NotFound));
    }
}
