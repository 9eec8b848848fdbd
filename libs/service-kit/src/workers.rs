//! Bounded worker pools for CPU-heavy work such as password hashing.
//!
//! A pool has a fixed number of threads and a fixed-size queue. A job that finds the queue full
//! is refused at once ([`PoolError::Busy`], answered as 503 with `Retry-After`), so a burst costs
//! bounded memory and bounded threads instead of piling up. The threads run at a lower CPU
//! priority than the HTTP workers, so while the pool is saturated the rest of the process still
//! gets the CPU it needs to answer other requests quickly.

use std::panic::AssertUnwindSafe;
use std::sync::OnceLock;
use std::time::Instant;

use crossbeam_channel::{Receiver, Sender, TrySendError};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::error::ApiError;
use crate::metrics as names;

type Job = Box<dyn FnOnce() + Send>;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum PoolError {
    /// Every worker is busy and the queue is full: the caller should try again shortly.
    #[error("the {pool} worker pool is saturated")]
    Busy { pool: &'static str },
    /// The job panicked, or the pool's threads are gone.
    #[error("a job in the {pool} worker pool failed")]
    Failed { pool: &'static str },
}

impl From<PoolError> for ApiError {
    fn from(err: PoolError) -> Self {
        match err {
            PoolError::Busy { .. } => Self::unavailable("the server is busy; try again shortly"),
            PoolError::Failed { .. } => Self::internal(err),
        }
    }
}

/// A fixed set of threads fed by a bounded queue. Dropping the pool lets its threads finish
/// the queued jobs and exit.
pub struct WorkerPool {
    name: &'static str,
    sender: Sender<Job>,
}

impl WorkerPool {
    /// Starts `workers` threads named after `name`, with room for `queue` waiting jobs. The
    /// threads' niceness is raised by `nice` (0 leaves it as is; Linux only).
    pub fn start(
        name: &'static str,
        workers: usize,
        queue: usize,
        nice: i32,
    ) -> std::io::Result<Self> {
        let (sender, receiver) = crossbeam_channel::bounded::<Job>(queue);
        for index in 0..workers {
            let receiver: Receiver<Job> = receiver.clone();
            std::thread::Builder::new()
                .name(format!("{name}-{index}"))
                .spawn(move || {
                    lower_priority(nice);
                    for job in receiver.iter() {
                        metrics::gauge!(names::WORKER_POOL_QUEUE_DEPTH, "pool" => name)
                            .set(receiver.len() as f64);
                        // A panicking job must not take the worker with it; its caller sees
                        // `Failed` because the job's reply channel is dropped unanswered.
                        let _ = std::panic::catch_unwind(AssertUnwindSafe(job));
                    }
                })?;
        }
        metrics::gauge!(names::WORKER_POOL_WORKERS, "pool" => name).set(workers as f64);
        // Every series from the start, at 0: a counter that first appears at 1 has no
        // increase() in Prometheus (the first rejections would not alert), and dashboards
        // show 0 rather than nothing.
        metrics::counter!(names::WORKER_POOL_REJECTED, "pool" => name).increment(0);
        metrics::gauge!(names::WORKER_POOL_QUEUE_DEPTH, "pool" => name).set(0.0);
        Ok(Self { name, sender })
    }

    /// Queues `job` and waits for its result without blocking the async runtime.
    pub async fn run<T, F>(&self, job: F) -> Result<T, PoolError>
    where
        T: Send + 'static,
        F: FnOnce() -> T + Send + 'static,
    {
        let name = self.name;
        let (reply, result) = tokio::sync::oneshot::channel();
        let queued_at = Instant::now();
        let job: Job = Box::new(move || {
            metrics::histogram!(names::WORKER_POOL_WAIT, "pool" => name)
                .record(queued_at.elapsed());
            // The caller may have given up (client gone): nothing to do then.
            let _ = reply.send(job());
        });
        match self.sender.try_send(job) {
            Ok(()) => {}
            Err(TrySendError::Full(_)) => {
                metrics::counter!(names::WORKER_POOL_REJECTED, "pool" => name).increment(1);
                return Err(PoolError::Busy { pool: name });
            }
            Err(TrySendError::Disconnected(_)) => return Err(PoolError::Failed { pool: name }),
        }
        metrics::gauge!(names::WORKER_POOL_QUEUE_DEPTH, "pool" => name)
            .set(self.sender.len() as f64);
        result.await.map_err(|_| PoolError::Failed { pool: name })
    }
}

/// The process's background tasks (periodic chores, the replica monitor, key refreshes): each
/// is tracked, and [`Background::stop`] ends them all and waits for them on shutdown, before the
/// database pools close under them.
pub struct Background {
    tracker: TaskTracker,
    stopping: CancellationToken,
}

/// The process's [`Background`].
pub fn background() -> &'static Background {
    static BACKGROUND: OnceLock<Background> = OnceLock::new();
    BACKGROUND.get_or_init(|| Background {
        tracker: TaskTracker::new(),
        stopping: CancellationToken::new(),
    })
}

impl Background {
    /// Runs `task` until it ends or the process stops (it is dropped at its next `.await`
    /// then). Call it inside the runtime.
    pub fn spawn<F>(&self, task: F)
    where
        F: std::future::Future<Output = ()> + Send + 'static,
    {
        let stopping = self.stopping.clone();
        self.tracker.spawn(async move {
            tokio::select! {
                () = stopping.cancelled() => {}
                () = task => {}
            }
        });
    }

    /// Ends every background task and waits for them, up to `limit`; whether they all ended.
    pub async fn stop(&self, limit: std::time::Duration) -> bool {
        self.stopping.cancel();
        self.tracker.close();
        tokio::time::timeout(limit, self.tracker.wait())
            .await
            .is_ok()
    }
}

/// Runs `chore` every `period` until the process stops ([`Background`]), the first time at once;
/// runs never overlap. A failure is logged with `name` once per streak (a database outage would
/// otherwise log every period), and the recovery too; the next run goes ahead either way.
pub fn spawn_periodic<F, Fut>(name: &'static str, period: std::time::Duration, chore: F)
where
    F: Fn() -> Fut + Send + 'static,
    Fut: std::future::Future<Output = Result<(), String>> + Send,
{
    background().spawn(async move {
        let mut tick = tokio::time::interval(period);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut failures = 0u32;
        loop {
            tick.tick().await;
            match chore().await {
                Ok(()) if failures > 0 => {
                    tracing::info!(chore = name, failures, "periodic chore works again");
                    failures = 0;
                }
                Ok(()) => {}
                Err(err) if failures == 0 => {
                    tracing::warn!(chore = name, error = %err, "periodic chore failed; retrying every {period:?}");
                    failures = 1;
                }
                Err(err) => {
                    tracing::debug!(chore = name, error = %err, "periodic chore failed again");
                    failures += 1;
                }
            }
        }
    });
}

/// A task that runs until asked to stop (an outbox relay, a consumer). It is handed a receiver
/// that turns `true` when [`StoppableTask::stop`] is called.
pub struct StoppableTask {
    stop: tokio::sync::watch::Sender<bool>,
    task: std::sync::Mutex<Option<tokio::task::JoinHandle<()>>>,
}

impl StoppableTask {
    pub fn spawn<F, Fut>(run: F) -> Self
    where
        F: FnOnce(tokio::sync::watch::Receiver<bool>) -> Fut,
        Fut: std::future::Future<Output = ()> + Send + 'static,
    {
        let (stop, stopped) = tokio::sync::watch::channel(false);
        Self {
            stop,
            task: std::sync::Mutex::new(Some(tokio::spawn(run(stopped)))),
        }
    }

    /// Asks the task to stop and waits up to `limit` for it to finish; `false` if it was still
    /// running then (it is left to end with the process). Later calls return `true` at once.
    pub async fn stop(&self, limit: std::time::Duration) -> bool {
        let _ = self.stop.send(true);
        let task = self.task.lock().ok().and_then(|mut task| task.take());
        match task {
            Some(task) => tokio::time::timeout(limit, task).await.is_ok(),
            None => true,
        }
    }
}

/// Raises the calling thread's niceness: on Linux `setpriority(PRIO_PROCESS, 0, …)` applies to
/// the calling thread only, not the whole process.
fn lower_priority(nice: i32) {
    if nice == 0 {
        return;
    }
    // SAFETY: setpriority has no memory-safety preconditions; failure leaves the priority as is,
    // which only costs the fairness this is an optimisation for.
    let _ = unsafe { libc::setpriority(libc::PRIO_PROCESS, 0, nice) };
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::{Arc, Barrier};
    use std::time::Duration;

    #[tokio::test]
    async fn a_stoppable_task_is_told_to_stop_and_waited_for() {
        let finished = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let flag = finished.clone();
        let task = StoppableTask::spawn(|mut stopped| async move {
            let _ = stopped.wait_for(|stop| *stop).await;
            flag.store(true, std::sync::atomic::Ordering::SeqCst);
        });
        assert!(task.stop(Duration::from_secs(5)).await);
        assert!(finished.load(std::sync::atomic::Ordering::SeqCst));
        assert!(task.stop(Duration::from_secs(5)).await, "a second stop");

        let stubborn = StoppableTask::spawn(|_| std::future::pending());
        assert!(!stubborn.stop(Duration::from_millis(50)).await);
    }

    #[tokio::test]
    async fn runs_jobs_and_returns_their_results() {
        let pool = WorkerPool::start("test-run", 2, 8, 0).unwrap();
        let results =
            futures_util::future::join_all((0..8u64).map(|n| pool.run(move || n * n))).await;
        let squares: Vec<u64> = results.into_iter().map(Result::unwrap).collect();
        assert_eq!(squares, vec![0, 1, 4, 9, 16, 25, 36, 49]);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn refuses_work_when_the_queue_is_full() {
        let pool = Arc::new(WorkerPool::start("test-full", 1, 1, 0).unwrap());
        let gate = Arc::new(Barrier::new(2));
        // The only worker takes a job that waits at the gate...
        let (started, running) = tokio::sync::oneshot::channel();
        let held = tokio::spawn({
            let (pool, gate) = (pool.clone(), gate.clone());
            async move {
                pool.run(move || {
                    let _ = started.send(());
                    gate.wait();
                    "first"
                })
                .await
            }
        });
        running.await.unwrap();
        // ...a second job fills the one-slot queue...
        let queued = tokio::spawn({
            let pool = pool.clone();
            async move { pool.run(|| "second").await }
        });
        tokio::time::timeout(Duration::from_secs(5), async {
            while pool.sender.is_empty() {
                tokio::task::yield_now().await;
            }
        })
        .await
        .expect("second job queued");
        // ...so a third is refused at once, and the first two still complete.
        assert_eq!(
            pool.run(|| "third").await,
            Err(PoolError::Busy { pool: "test-full" })
        );
        gate.wait();
        assert_eq!(held.await.unwrap(), Ok("first"));
        assert_eq!(queued.await.unwrap(), Ok("second"));
    }

    #[tokio::test]
    async fn a_panicking_job_fails_alone() {
        let pool = WorkerPool::start("test-panic", 1, 4, 0).unwrap();
        let failed = pool.run(|| -> u8 { panic!("boom") }).await;
        assert_eq!(failed, Err(PoolError::Failed { pool: "test-panic" }));
        assert_eq!(pool.run(|| 7).await, Ok(7));
    }
}
