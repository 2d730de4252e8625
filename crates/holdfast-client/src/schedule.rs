//! The renewal scheduler of one [`crate::Client`]: a guard's renewal task is spawned only when
//! its first renewal is due.
//!
//! Why: most locks are held for far less than a third of their TTL. Spawning a task per guard
//! (allocate, poll it once to arm its timer, abort it, poll it again to cancel) cost more than
//! the rest of an uncontended acquire+release on the client side. Instead a guard puts its
//! first renewal in this per-client queue (a `BTreeMap` insert under a mutex) and takes it out
//! on release; one driver task per client sleeps until the earliest first renewal and only
//! then spawns the guard's renewal loop, which runs as before from there on.
//!
//! The driver is woken (a `Notify`) only when a new entry is due before the instant it already
//! sleeps to; while the queue is empty it still wakes every [`IDLE_TICK`], so that a queue that
//! keeps becoming empty between two locks (one lock at a time, the common case) does not wake
//! it for every lock. After [`IDLE_TICKS_BEFORE_PARK`] empty ticks it parks until the next
//! entry.
//!
//! A renewal loop runs on the runtime of the guard it renews (the entry keeps that runtime's
//! handle). The driver runs on the runtime that first needed it; when that runtime shuts down
//! while a client shared with another runtime still has entries waiting, the dropped driver
//! moves itself to a waiting entry's runtime (`DriverExit`), so those guards keep renewing.

use std::collections::{BTreeMap, HashMap};
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use tokio::runtime::Handle;
use tokio::sync::Notify;
use tokio::task::JoinHandle;
use tokio::time::Instant;

/// How often an idle driver re-checks its queue.
const IDLE_TICK: Duration = Duration::from_secs(1);
/// Empty ticks before an idle driver parks (waits for a notification only).
const IDLE_TICKS_BEFORE_PARK: u32 = 60;

/// A renewal loop, spawned when its first renewal is due. A closure that builds the loop's
/// future then, not the future itself: the future (with the renewal call inside) is several
/// times larger than what it captures, and most guards are released before it is needed.
pub(crate) type RenewalJob = Box<dyn FnOnce() -> Pin<Box<dyn Future<Output = ()> + Send>> + Send>;

/// The per-client queue of first renewals.
#[derive(Default)]
pub(crate) struct Scheduler {
    shared: Arc<Shared>,
}

#[derive(Default)]
struct Shared {
    state: Mutex<State>,
    wake: Notify,
}

#[derive(Default)]
struct State {
    next_id: u64,
    /// First renewals not yet due, by due instant, with the runtime of the call that
    /// scheduled each (its loop runs there).
    due: BTreeMap<(Instant, u64), (Handle, RenewalJob)>,
    /// Renewal loops already spawned, by entry id (removed by their guard); `None` while the
    /// driver is spawning it.
    running: HashMap<u64, Option<JoinHandle<()>>>,
    /// The instant the driver sleeps to; `None` if parked (or not started).
    target: Option<Instant>,
    driver: Option<JoinHandle<()>>,
    /// A dropped driver is moving to another runtime (see `DriverExit`).
    handing_over: bool,
    closed: bool,
}

impl std::fmt::Debug for Scheduler {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let state = self.shared.lock();
        f.debug_struct("Scheduler")
            .field("due", &state.due.len())
            .field("running", &state.running.len())
            .finish_non_exhaustive()
    }
}

impl Shared {
    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// A scheduled renewal; [`Scheduled::cancel`] (or dropping it) stops it wherever it is.
#[derive(Debug)]
pub(crate) struct Scheduled {
    shared: Arc<Shared>,
    key: (Instant, u64),
}

impl Scheduled {
    /// Take the renewal out of the queue, or abort its loop if it already runs.
    pub(crate) fn cancel(&self) {
        let (job, task) = {
            let mut state = self.shared.lock();
            (
                state.due.remove(&self.key),
                state.running.remove(&self.key.1),
            )
        };
        // Dropped outside the lock: a job owns a `Client`, whose drop may close the scheduler.
        drop(job);
        if let Some(Some(task)) = task {
            task.abort();
        }
    }
}

impl Drop for Scheduled {
    fn drop(&mut self) {
        self.cancel();
    }
}

impl std::fmt::Debug for Shared {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Shared")
    }
}

impl Scheduler {
    /// Run `job` from `at` on (spawned on the current runtime then), unless cancelled first.
    /// Must be called inside a tokio runtime.
    pub(crate) fn schedule(&self, at: Instant, job: RenewalJob) -> Scheduled {
        let runtime = Handle::current();
        let mut state = self.shared.lock();
        state.next_id += 1;
        let key = (at, state.next_id);
        state.due.insert(key, (runtime.clone(), job));
        let driver_alive = state.driver.as_ref().is_some_and(|d| !d.is_finished());
        let start_driver = !driver_alive && !state.handing_over;
        if start_driver {
            // First use, or the runtime that ran the driver is gone.
            state.target = Some(at);
        } else if state.target.is_none_or(|t| at < t) {
            state.target = Some(at);
            self.shared.wake.notify_one();
        }
        drop(state);
        if start_driver {
            // Spawned outside the lock: on a runtime that is shutting down the future is
            // dropped inside `spawn`, and its exit hook takes the lock.
            let driver = runtime.spawn(driver(Arc::clone(&self.shared)));
            let mut state = self.shared.lock();
            if state.driver.as_ref().is_none_or(JoinHandle::is_finished) {
                state.driver = Some(driver);
            }
            // Otherwise a concurrent call started one too: both run, harmlessly (each entry is
            // taken once, under the lock), and both stop when the scheduler closes.
        }
        Scheduled {
            shared: Arc::clone(&self.shared),
            key,
        }
    }
}

impl Drop for Scheduler {
    fn drop(&mut self) {
        let (jobs, running, driver) = {
            let mut state = self.shared.lock();
            state.closed = true;
            (
                std::mem::take(&mut state.due),
                std::mem::take(&mut state.running),
                state.driver.take(),
            )
        };
        drop(jobs);
        // A parked driver this scheduler does not track (see `schedule`) wakes and returns.
        self.shared.wake.notify_waiters();
        for task in running.into_values().flatten() {
            task.abort();
        }
        if let Some(driver) = driver {
            driver.abort();
        }
    }
}

/// Most runtimes a dropped driver tries before giving up on handing itself over.
const HANDOVER_TRIES: usize = 64;

/// Dropped with the driver's future (polled or not). Unless the scheduler closed, the
/// driver's runtime is shutting down: the driver moves to the runtime of a waiting entry, so
/// the guards of a client shared with another runtime keep their renewals.
struct DriverExit(Arc<Shared>);

impl Drop for DriverExit {
    fn drop(&mut self) {
        let runtimes: Vec<Handle> = {
            let mut state = self.0.lock();
            // A driver spawned by a handover onto a runtime that is going down too is dropped
            // inside `spawn` below: the handover in progress goes on with the next runtime.
            if state.closed || state.handing_over {
                return;
            }
            state.target = None;
            state.driver = None;
            state.handing_over = true;
            state
                .due
                .values()
                .take(HANDOVER_TRIES)
                .map(|(runtime, _)| runtime.clone())
                .collect()
        };
        // Entries of the runtime going down spawn nothing (the task is cancelled at once).
        let mut taken = None;
        for runtime in runtimes {
            let driver = runtime.spawn(driver(Arc::clone(&self.0)));
            if !driver.is_finished() {
                taken = Some(driver);
                break;
            }
        }
        let mut state = self.0.lock();
        state.handing_over = false;
        if let Some(driver) = taken {
            // A driver started meanwhile by `schedule` may run beside this one: each entry is
            // still taken once, under the lock, and each driver recomputes its wake-up.
            if state.closed {
                driver.abort();
            } else {
                state.driver = Some(driver);
            }
        }
    }
}

/// A driver's future, with its exit hook armed before the first poll.
fn driver(shared: Arc<Shared>) -> impl Future<Output = ()> + Send + 'static {
    let exit = DriverExit(Arc::clone(&shared));
    async move {
        let _exit = exit;
        drive(shared).await;
    }
}

/// The driver: spawns each job when it is due.
async fn drive(shared: Arc<Shared>) {
    let mut idle_ticks = 0u32;
    loop {
        let now = Instant::now();
        let ready = {
            let mut state = shared.lock();
            if state.closed {
                return;
            }
            let later = state.due.split_off(&(now, u64::MAX));
            let ready = std::mem::replace(&mut state.due, later);
            for (_, id) in ready.keys() {
                state.running.insert(*id, None);
            }
            ready
        };
        // Spawned outside the lock: on a runtime that is shutting down the job is dropped
        // inside `spawn`, and with it a `Client`, whose drop may close the scheduler.
        for ((_, id), (runtime, job)) in ready {
            let task = runtime.spawn(job());
            let cancelled = match shared.lock().running.get_mut(&id) {
                Some(slot) => {
                    *slot = Some(task);
                    None
                }
                // Cancelled while it was being spawned.
                None => Some(task),
            };
            if let Some(task) = cancelled {
                task.abort();
            }
        }
        let next = {
            let mut state = shared.lock();
            if state.closed {
                return;
            }
            let next = if let Some(((at, _), _)) = state.due.first_key_value() {
                idle_ticks = 0;
                Some(*at)
            } else if idle_ticks < IDLE_TICKS_BEFORE_PARK {
                idle_ticks += 1;
                Some(now + IDLE_TICK)
            } else {
                None
            };
            state.target = next;
            next
        };
        match next {
            Some(at) => {
                tokio::select! {
                    () = tokio::time::sleep_until(at) => {}
                    () = shared.wake.notified() => {}
                }
            }
            None => shared.wake.notified().await,
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicU32, Ordering};

    use super::*;

    fn counting_job(count: &Arc<AtomicU32>) -> RenewalJob {
        let count = Arc::clone(count);
        Box::new(move || {
            Box::pin(async move {
                count.fetch_add(1, Ordering::SeqCst);
            })
        })
    }

    async fn settle() {
        for _ in 0..10 {
            tokio::task::yield_now().await;
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_job_runs_when_due_and_not_before() {
        let scheduler = Scheduler::default();
        let runs = Arc::new(AtomicU32::new(0));
        let _entry = scheduler.schedule(
            Instant::now() + Duration::from_secs(10),
            counting_job(&runs),
        );
        tokio::time::sleep(Duration::from_secs(9)).await;
        settle().await;
        assert_eq!(runs.load(Ordering::SeqCst), 0, "ran before it was due");
        tokio::time::sleep(Duration::from_secs(2)).await;
        settle().await;
        assert_eq!(runs.load(Ordering::SeqCst), 1);
    }

    #[tokio::test(start_paused = true)]
    async fn an_earlier_job_wakes_a_driver_sleeping_to_a_later_one() {
        let scheduler = Scheduler::default();
        let late = Arc::new(AtomicU32::new(0));
        let early = Arc::new(AtomicU32::new(0));
        let _late = scheduler.schedule(
            Instant::now() + Duration::from_secs(100),
            counting_job(&late),
        );
        settle().await;
        let _early = scheduler.schedule(
            Instant::now() + Duration::from_millis(50),
            counting_job(&early),
        );
        tokio::time::sleep(Duration::from_millis(60)).await;
        settle().await;
        assert_eq!(early.load(Ordering::SeqCst), 1);
        assert_eq!(late.load(Ordering::SeqCst), 0);
    }

    #[tokio::test(start_paused = true)]
    async fn a_cancelled_job_never_runs() {
        let scheduler = Scheduler::default();
        let runs = Arc::new(AtomicU32::new(0));
        let entry = scheduler.schedule(
            Instant::now() + Duration::from_millis(100),
            counting_job(&runs),
        );
        entry.cancel();
        tokio::time::sleep(Duration::from_secs(1)).await;
        settle().await;
        assert_eq!(runs.load(Ordering::SeqCst), 0);
        assert!(scheduler.shared.lock().due.is_empty());
    }

    #[tokio::test(start_paused = true)]
    async fn a_job_scheduled_after_the_driver_parked_still_runs() {
        let scheduler = Scheduler::default();
        let runs = Arc::new(AtomicU32::new(0));
        drop(scheduler.schedule(Instant::now(), counting_job(&runs)));
        // Let the driver go through its idle ticks and park.
        tokio::time::sleep(IDLE_TICK * (IDLE_TICKS_BEFORE_PARK + 5)).await;
        settle().await;
        assert!(
            scheduler.shared.lock().target.is_none(),
            "driver not parked"
        );
        let _entry =
            scheduler.schedule(Instant::now() + Duration::from_secs(5), counting_job(&runs));
        tokio::time::sleep(Duration::from_secs(6)).await;
        settle().await;
        assert_eq!(runs.load(Ordering::SeqCst), 1);
    }

    #[tokio::test(start_paused = true)]
    async fn cancelling_a_running_job_aborts_it() {
        let scheduler = Scheduler::default();
        let started = Arc::new(AtomicU32::new(0));
        let finished = Arc::new(AtomicU32::new(0));
        let (s, f) = (Arc::clone(&started), Arc::clone(&finished));
        let entry = scheduler.schedule(
            Instant::now(),
            Box::new(move || {
                Box::pin(async move {
                    s.fetch_add(1, Ordering::SeqCst);
                    tokio::time::sleep(Duration::from_secs(10)).await;
                    f.fetch_add(1, Ordering::SeqCst);
                })
            }),
        );
        tokio::time::sleep(Duration::from_millis(1)).await;
        settle().await;
        assert_eq!(started.load(Ordering::SeqCst), 1);
        entry.cancel();
        tokio::time::sleep(Duration::from_secs(20)).await;
        settle().await;
        assert_eq!(finished.load(Ordering::SeqCst), 0);
    }

    /// A client shared by two runtimes: the one that started the driver shuts down while the
    /// other's guard waits for its first renewal; the renewal still runs, on the other runtime.
    #[test]
    fn the_driver_moves_to_a_live_runtime_when_its_own_shuts_down() {
        let first = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .unwrap();
        let second = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .unwrap();
        let scheduler = Arc::new(Scheduler::default());
        let early = Arc::new(AtomicU32::new(0));
        let late = Arc::new(AtomicU32::new(0));
        // The first runtime starts the driver with the earliest entry, so the handover first
        // tries the runtime that is going down.
        let first_entry = first.block_on({
            let scheduler = Arc::clone(&scheduler);
            let early = Arc::clone(&early);
            async move {
                scheduler.schedule(
                    Instant::now() + Duration::from_secs(3600),
                    counting_job(&early),
                )
            }
        });
        // The second runtime's entry is due in 200 ms.
        let second_entry = second.block_on({
            let scheduler = Arc::clone(&scheduler);
            let late = Arc::clone(&late);
            async move {
                scheduler.schedule(
                    Instant::now() + Duration::from_millis(200),
                    counting_job(&late),
                )
            }
        });
        drop(first);
        let ran = second.block_on(async {
            for _ in 0..500 {
                if late.load(Ordering::SeqCst) == 1 {
                    return true;
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            false
        });
        assert!(
            ran,
            "the second runtime's renewal never ran after the first runtime shut down"
        );
        assert_eq!(early.load(Ordering::SeqCst), 0);
        drop((first_entry, second_entry));
    }
}
