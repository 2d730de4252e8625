//! Durable storage of the engine's state in one redb database, `<data-dir>/holdfast.redb`.
//!
//! Tables (see `docs/storage.md`):
//! - `leases`: lease id (`u128`) → postcard [`LeaseRecord`] (the lease with its locks);
//! - `idempotency`: key → postcard [`IdempotencyRecord`];
//! - `lock_delays`: key → end of its lock-delay (epoch ms);
//! - `meta`: `format_version`, `fencing_next`, `event_seq_next`, and the reserved ceilings
//!   `fencing_ceiling` / `event_seq_ceiling` that keep counters increasing across a crash in
//!   `async` mode.
//!
//! Every [`Store::apply`] is one record appended to the write-ahead log (`crate::wal`); in
//! `sync` mode it is followed by one `fdatasync`, so the server can acknowledge everything the
//! batch contained. A checkpointer thread folds full log segments into redb; at startup the
//! whole log is folded in before redb is read. Records are validated when read; a record that
//! does not decode stops the startup with a message naming the table and the record, never a
//! silent reset.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use holdfast_core::{ChangeSet, DurableState, IdempotencyRecord, LeaseId, LeaseRecord};
use redb::{Database, ReadableDatabase, ReadableTable, ReadableTableMetadata, TableDefinition};

use crate::config::Durability;
use crate::wal::{self, Closed, Counters, Folded, WalError, WalFs, WalSync, WalWriter};

const LEASES: TableDefinition<u128, &[u8]> = TableDefinition::new("leases");
const IDEMPOTENCY: TableDefinition<&str, &[u8]> = TableDefinition::new("idempotency");
const LOCK_DELAYS: TableDefinition<&str, u64> = TableDefinition::new("lock_delays");
const META: TableDefinition<&str, u64> = TableDefinition::new("meta");

/// Version of the on-disk format; bumped on any incompatible change. Version 2 added the
/// write-ahead log: a build that reads only version 1 would ignore `wal/` and miss the batches
/// not yet checkpointed, so the version stops it.
pub const FORMAT_VERSION: u64 = 2;
/// Versions this build opens; older ones are upgraded in place (version 1 had no log, so its
/// redb holds everything).
const FORMAT_VERSIONS_READ: [u64; 2] = [1, 2];
/// File name inside the data directory.
pub const DB_FILE_NAME: &str = "holdfast.redb";
/// In `async` mode counters are reserved this far ahead with a durable commit, so a crash that
/// loses unsynced commits never makes a fencing token or event sequence number go backwards.
const COUNTER_RESERVE: u64 = 100_000;
/// At most this many lease records are announced (for sizing) before reading them.
const LOAD_RESERVE_MAX: usize = 1 << 22;

const META_FORMAT: &str = "format_version";
const META_FENCING: &str = "fencing_next";
const META_EVENT_SEQ: &str = "event_seq_next";
const META_FENCING_CEILING: &str = "fencing_ceiling";
const META_EVENT_SEQ_CEILING: &str = "event_seq_ceiling";
/// The last write-ahead-log batch folded into the database.
const META_WAL_APPLIED: &str = "wal_applied_seq";

/// redb's page cache, in bytes. redb's default (1 GiB) kept a copy of every page read at
/// startup or written since: with a million leases that was ~300 MB on top of the engine's own
/// state. The engine holds everything it needs in memory, so the store only needs enough cache
/// for the B-tree pages a commit touches; other reads come from the OS page cache. A checkpoint
/// writes its leases in id order, so it touches one leaf and its ancestors at a time: 256 KiB
/// (half of it redb's write buffer) did as well as 4 MiB in W1 `sync` (checkpoint thread CPU
/// the same) and in W4's million acquisitions, and saved ~40 bytes per lock at 100,000 locks.
pub const CACHE_SIZE_BYTES: usize = 256 * 1024;

fn builder() -> redb::Builder {
    let mut b = redb::Builder::new();
    b.set_cache_size(CACHE_SIZE_BYTES);
    b
}

/// A storage failure. At startup it stops the server; during operation it is fail-stop.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The database could not be opened or created.
    #[error("cannot open database {path}: {source}")]
    Open {
        /// The file.
        path: PathBuf,
        /// Why.
        source: Box<redb::Error>,
    },
    /// The data directory could not be created.
    #[error("cannot create data directory {path}: {source}")]
    DataDir {
        /// The directory.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// A record failed to decode or validate.
    #[error(
        "corrupt record in table {table} ({record}): {reason}; the data directory needs repair or restore from backup, it is never reset automatically"
    )]
    Corrupt {
        /// Table name.
        table: &'static str,
        /// Which record.
        record: String,
        /// Why.
        reason: String,
    },
    /// The on-disk format is from another version.
    #[error(
        "database format version {found} is not supported (this build reads versions 1 to {FORMAT_VERSION})"
    )]
    Version {
        /// Found version.
        found: u64,
    },
    /// A read, write or commit failed.
    #[error("storage error: {0}")]
    Io(Box<redb::Error>),
    /// The write-ahead log failed or is damaged.
    #[error(
        "{0}; the data directory needs repair or restore from backup, it is never reset automatically"
    )]
    Wal(#[from] WalError),
    /// The checkpointer thread stopped.
    #[error("the write-ahead log checkpointer stopped: {0}")]
    Checkpointer(String),
    /// A commit before [`Store::load_with`] recovered the log (a bug of the caller).
    #[error("the store was not loaded before a commit")]
    NotLoaded,
    /// The syncer thread failed to sync the log, or stopped.
    #[error("syncing the write-ahead log failed: {0}")]
    Sync(String),
}

impl<E: Into<redb::Error>> From<E> for StoreError {
    fn from(e: E) -> Self {
        StoreError::Io(Box::new(e.into()))
    }
}

/// What [`Store::load_with`] knows before the first lease record.
#[derive(Clone, Copy, Debug)]
pub struct LoadHeader {
    /// Next fencing token (above every stored token; the async-mode ceiling included).
    pub fencing_next: u64,
    /// Next event sequence number.
    pub event_seq_next: u64,
    /// Number of lease records (bounded: a hint for sizing).
    pub leases: usize,
}

/// Counters of the commits a store performed (for metrics and the benchmark).
#[derive(Clone, Copy, Debug, Default)]
pub struct CommitInfo {
    /// True if this commit was fsynced.
    pub synced: bool,
}

/// The open database and its write-ahead log.
pub struct Store {
    /// First field: dropped (its queue synced and delivered) before anything else.
    syncer: Option<Syncer>,
    db: Arc<Database>,
    durability: Durability,
    /// Durable ceilings of the counters (async mode).
    fencing_ceiling: u64,
    event_seq_ceiling: u64,
    /// When the first commit since the last sync happened (`None`: everything is synced).
    unsynced_since: Option<Instant>,
    fs: Arc<dyn WalFs>,
    segment_bytes: u64,
    /// The log's appending end; `None` until [`Store::load_with`] has recovered the log.
    wal: Option<WalWriter>,
    checkpoints: Checkpoints,
}

/// The log as recovery finds it.
struct LogOnDisk {
    segments: Vec<(String, Vec<u8>)>,
    spare: bool,
    applied: u64,
}

/// Where the zero-filled spare segment stands.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Spare {
    Ready,
    Requested,
    Missing,
}

/// Work for the checkpointer: fold these closed segments into redb, then (optionally) write a
/// new spare.
struct Job {
    segments: Vec<Closed>,
    /// Batches up to this one are in redb already (segments left from before a restart).
    after: u64,
    make_spare: bool,
}

/// Runs checkpoint jobs: on its own thread in the server, on the host thread in the crash
/// tests (so that every crash point is reproducible). There a job runs only at the second
/// commit after it was queued, so that commits made while a checkpoint is still running (as
/// with the thread) are part of every crash history.
enum Checkpointer {
    Inline {
        queued: Option<Job>,
        /// Commits since the job was queued.
        age: u32,
    },
    Thread {
        jobs: Option<mpsc::Sender<Job>>,
        done: mpsc::Receiver<Result<bool, StoreError>>,
        thread: Option<std::thread::JoinHandle<()>>,
    },
}

struct Checkpoints {
    runner: Checkpointer,
    /// A job was handed to the thread and has not reported.
    busy: bool,
    /// Closed segments waiting for the next job.
    closed: Vec<Closed>,
    /// The batch redb held at startup: older batches in recovered segments are skipped.
    fold_after: u64,
    spare: Spare,
}

impl Drop for Checkpoints {
    fn drop(&mut self) {
        if let Checkpointer::Thread { jobs, thread, .. } = &mut self.runner {
            // Closing the queue ends the thread after its current job.
            jobs.take();
            if let Some(thread) = thread.take() {
                let _ = thread.join();
            }
        }
    }
}

/// What the engine host does when the syncer thread syncs or fails.
pub struct SyncHooks {
    /// After every `fdatasync` (metrics).
    pub on_sync: Box<dyn Fn() + Send>,
    /// Once, when a sync fails (fail-stop: log, mark the server failed, exit).
    pub on_failure: Box<dyn Fn(&str) + Send>,
}

/// A batch waiting for durability: once the log is synced up to `seq`, `then` runs (it sends
/// the batch's replies and publishes its events).
struct SyncItem {
    /// The segment that holds batch `seq` (`None`: the batch wrote nothing; it only waits for
    /// the batches before it).
    file: Option<Arc<dyn WalSync>>,
    seq: u64,
    then: Box<dyn FnOnce() + Send>,
}

/// `sync` mode's `fdatasync`s, on their own thread so the engine host applies the next batch
/// while the previous one is being synced (pipelined group commit). Batches are delivered in
/// order; one sync covers every batch queued when it starts.
struct Syncer {
    items: Option<mpsc::Sender<SyncItem>>,
    thread: Option<std::thread::JoinHandle<()>>,
    /// Items handed over whose `then` has not run yet.
    outstanding: Arc<AtomicUsize>,
    /// Why the thread stopped, if a sync failed.
    failure: Arc<Mutex<Option<String>>>,
}

impl Drop for Syncer {
    fn drop(&mut self) {
        // The thread syncs and delivers what is queued, then ends.
        self.items.take();
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

fn run_syncer(
    items: &mpsc::Receiver<SyncItem>,
    durable: &AtomicU64,
    outstanding: &AtomicUsize,
    failure: &Mutex<Option<String>>,
    hooks: &SyncHooks,
) {
    while let Ok(first) = items.recv() {
        let mut group = vec![first];
        while let Ok(item) = items.try_recv() {
            group.push(item);
        }
        // Batches in an earlier segment were synced when it was closed: syncing the segment of
        // the last batch covers the whole group.
        if let Some((file, seq)) = group
            .iter()
            .rev()
            .find_map(|i| i.file.as_ref().map(|f| (f, i.seq)))
            && durable.load(Ordering::Acquire) < seq
        {
            if let Err(e) = file.sync_data() {
                let message = e.to_string();
                if let Ok(mut slot) = failure.lock() {
                    *slot = Some(message.clone());
                }
                // Nothing of the group is delivered: dropping the replies answers "stopped".
                (hooks.on_failure)(&message);
                return;
            }
            durable.fetch_max(seq, Ordering::AcqRel);
            (hooks.on_sync)();
        }
        for item in group {
            (item.then)();
            outstanding.fetch_sub(1, Ordering::AcqRel);
        }
    }
}

/// Fold closed segments into redb, one segment per durable transaction (so that a checkpoint
/// that fell behind never holds more than one segment in memory), delete them, write a spare.
fn run_job(
    db: &Database,
    fs: &dyn WalFs,
    job: &Job,
    segment_bytes: u64,
) -> Result<bool, StoreError> {
    let mut expected = None;
    let mut folded_up_to = job.after;
    for segment in &job.segments {
        let data = (segment.name.clone(), fs.read(&segment.name)?);
        let mut folded = Folded::default();
        wal::fold_closed(&data, folded_up_to, &mut expected, &mut folded)?;
        write_folded(db, &folded)?;
        folded_up_to = folded.last_seq.unwrap_or(folded_up_to);
        fs.remove(&segment.name)?;
    }
    if let Some(last) = job.segments.last() {
        fs.sync_dir()?;
        if folded_up_to != last.last {
            return Err(WalError::Corrupt {
                segment: last.name.clone(),
                reason: format!(
                    "closed segments end at batch {folded_up_to}, expected {}",
                    last.last
                ),
            }
            .into());
        }
    }
    if job.make_spare {
        wal::make_spare(fs, segment_bytes)?;
    }
    Ok(job.make_spare)
}

/// Write folded log batches into redb in one durable transaction, with the last batch's
/// number.
fn write_folded(db: &Database, folded: &Folded<'_>) -> Result<(), StoreError> {
    let Some(last) = folded.last_seq else {
        return Ok(());
    };
    let mut tx = db.begin_write()?;
    tx.set_durability(redb::Durability::Immediate)?;
    {
        let mut meta = tx.open_table(META)?;
        let c = &folded.counters;
        for (name, value) in [
            (META_FENCING, c.fencing_next),
            (META_EVENT_SEQ, c.event_seq_next),
            (META_FENCING_CEILING, c.fencing_ceiling),
            (META_EVENT_SEQ_CEILING, c.event_seq_ceiling),
        ] {
            if let Some(value) = value {
                meta.insert(name, value)?;
            }
        }
        meta.insert(META_WAL_APPLIED, last)?;
        let mut leases = tx.open_table(LEASES)?;
        for (id, record) in &folded.leases {
            match record {
                Some(bytes) => {
                    leases.insert(*id, *bytes)?;
                }
                None => {
                    leases.remove(*id)?;
                }
            }
        }
        let mut idem = tx.open_table(IDEMPOTENCY)?;
        for (key, record) in &folded.idempotency {
            match record {
                Some(bytes) => {
                    idem.insert(*key, *bytes)?;
                }
                None => {
                    idem.remove(*key)?;
                }
            }
        }
        let mut delays = tx.open_table(LOCK_DELAYS)?;
        for (key, until) in &folded.lock_delays {
            match until {
                Some(until) => {
                    delays.insert(*key, *until)?;
                }
                None => {
                    delays.remove(*key)?;
                }
            }
        }
    }
    tx.commit()?;
    Ok(())
}

impl std::fmt::Debug for Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Store")
            .field("durability", &self.durability)
            .finish_non_exhaustive()
    }
}

impl Store {
    /// Open (or create) `<data_dir>/holdfast.redb` and the log directory `<data_dir>/wal`.
    ///
    /// # Errors
    /// The directory cannot be created, the file is not a redb database, or is already open.
    pub fn open(data_dir: &Path, durability: Durability) -> Result<Self, StoreError> {
        std::fs::create_dir_all(data_dir).map_err(|source| StoreError::DataDir {
            path: data_dir.to_path_buf(),
            source,
        })?;
        let path = data_dir.join(DB_FILE_NAME);
        let db = builder().create(&path).map_err(|e| StoreError::Open {
            path: path.clone(),
            source: Box::new(e.into()),
        })?;
        // The log is touched only once redb holds its file lock: a second server on the same
        // directory stops above.
        let wal_dir = data_dir.join(wal::WAL_DIR);
        let fs = wal::DirFs::new(&wal_dir).map_err(|source| StoreError::DataDir {
            path: wal_dir,
            source,
        })?;
        Self::new(db, Arc::new(fs), durability, wal::SEGMENT_BYTES, true)
    }

    /// Open (or create) a database on any redb storage backend and log files (crash-image
    /// tests use ones that can drop unsynced writes). Checkpoints run inline.
    ///
    /// # Errors
    /// The backend does not hold a redb database.
    #[cfg(test)]
    pub(crate) fn open_with_backend(
        backend: impl redb::StorageBackend,
        fs: Arc<dyn WalFs>,
        durability: Durability,
        segment_bytes: u64,
    ) -> Result<Self, StoreError> {
        let db = builder()
            .create_with_backend(backend)
            .map_err(|e| StoreError::Open {
                path: PathBuf::from("(custom backend)"),
                source: Box::new(e.into()),
            })?;
        Self::new(db, fs, durability, segment_bytes, false)
    }

    fn new(
        db: Database,
        fs: Arc<dyn WalFs>,
        durability: Durability,
        segment_bytes: u64,
        background: bool,
    ) -> Result<Self, StoreError> {
        let db = Arc::new(db);
        let runner = if background {
            let (jobs, queue) = mpsc::channel::<Job>();
            let (report, done) = mpsc::channel();
            let (thread_db, thread_fs) = (Arc::clone(&db), Arc::clone(&fs));
            let thread = std::thread::Builder::new()
                .name("holdfast-checkpoint".into())
                .spawn(move || {
                    for job in queue {
                        let outcome = run_job(&thread_db, thread_fs.as_ref(), &job, segment_bytes);
                        // The segment's bytes, the folded maps and redb's transaction
                        // buffers are freed: give their pages back before the next burst.
                        crate::memory::release_free_memory();
                        let failed = outcome.is_err();
                        if report.send(outcome).is_err() || failed {
                            break;
                        }
                    }
                });
            let thread = thread.map_err(|e| {
                StoreError::Checkpointer(format!("cannot start the checkpoint thread: {e}"))
            })?;
            Checkpointer::Thread {
                jobs: Some(jobs),
                done,
                thread: Some(thread),
            }
        } else {
            Checkpointer::Inline {
                queued: None,
                age: 0,
            }
        };
        Ok(Self {
            syncer: None,
            db,
            durability,
            fencing_ceiling: 0,
            event_seq_ceiling: 0,
            unsynced_since: None,
            fs,
            segment_bytes,
            wal: None,
            checkpoints: Checkpoints {
                runner,
                busy: false,
                closed: Vec::new(),
                fold_after: 0,
                spare: Spare::Missing,
            },
        })
    }

    /// Hand the closed segments (and a spare request) to the checkpointer if it is idle.
    fn start_checkpoint(&mut self) -> Result<(), StoreError> {
        let cp = &mut self.checkpoints;
        if cp.busy || (cp.closed.is_empty() && cp.spare != Spare::Missing) {
            return Ok(());
        }
        let job = Job {
            segments: std::mem::take(&mut cp.closed),
            after: cp.fold_after,
            make_spare: cp.spare == Spare::Missing,
        };
        if job.make_spare {
            cp.spare = Spare::Requested;
        }
        cp.busy = true;
        let sent = match &mut cp.runner {
            Checkpointer::Inline { queued, age } => {
                *queued = Some(job);
                *age = 0;
                true
            }
            Checkpointer::Thread { jobs, .. } => {
                jobs.as_ref().is_some_and(|jobs| jobs.send(job).is_ok())
            }
        };
        if !sent {
            return Err(self.checkpointer_gone());
        }
        Ok(())
    }

    /// A job finished: take the spare into account, rotate if the segment is full, go on.
    fn finished(&mut self, made_spare: bool) -> Result<(), StoreError> {
        self.checkpoints.busy = false;
        if made_spare {
            self.checkpoints.spare = Spare::Ready;
        }
        self.rotate_if_full()?;
        self.start_checkpoint()
    }

    fn checkpointer_gone(&mut self) -> StoreError {
        if let Checkpointer::Thread { thread, .. } = &mut self.checkpoints.runner
            && let Some(thread) = thread.take()
            && let Err(panic) = thread.join()
        {
            std::panic::resume_unwind(panic);
        }
        StoreError::Checkpointer("the checkpoint thread is gone".into())
    }

    /// Take the reports of finished jobs; with `wait`, until the checkpointer is idle.
    fn poll_checkpoints(&mut self, wait: bool) -> Result<(), StoreError> {
        while self.checkpoints.busy {
            let report = match &mut self.checkpoints.runner {
                Checkpointer::Inline { queued, age } => {
                    if !wait && *age < 2 {
                        *age += 1;
                        return Ok(());
                    }
                    let Some(job) = queued.take() else {
                        return Ok(());
                    };
                    Ok(run_job(
                        &self.db,
                        self.fs.as_ref(),
                        &job,
                        self.segment_bytes,
                    ))
                }
                Checkpointer::Thread { done, .. } => {
                    if wait {
                        done.recv().map_err(|_| mpsc::TryRecvError::Disconnected)
                    } else {
                        done.try_recv()
                    }
                }
            };
            match report {
                Ok(Ok(made)) => self.finished(made)?,
                Ok(Err(e)) => return Err(e),
                Err(mpsc::TryRecvError::Empty) => return Ok(()),
                Err(mpsc::TryRecvError::Disconnected) => return Err(self.checkpointer_gone()),
            }
        }
        Ok(())
    }

    /// Continue in the spare once the current segment is full.
    fn rotate_if_full(&mut self) -> Result<(), StoreError> {
        let Some(wal) = &mut self.wal else {
            return Ok(());
        };
        if wal.full() && self.checkpoints.spare == Spare::Ready {
            let closed = wal.rotate()?;
            self.unsynced_since = None;
            self.checkpoints.spare = Spare::Missing;
            self.checkpoints.closed.push(closed);
            self.start_checkpoint()?;
        }
        Ok(())
    }

    /// Read the log for recovery: the segments (name, bytes, in order), whether a spare is
    /// there, and the last batch redb already holds.
    fn read_log(&mut self) -> Result<LogOnDisk, StoreError> {
        // A store loaded before (tests reload): finish its syncs and checkpoints and close its
        // segment; recovery reads it back like any other.
        self.syncer = None;
        if let Some(wal) = &mut self.wal {
            wal.sync()?;
            self.poll_checkpoints(true)?;
            self.wal = None;
            self.checkpoints.closed.clear();
        }
        let applied = {
            let tx = self.db.begin_read()?;
            let meta = tx.open_table(META)?;
            meta.get(META_WAL_APPLIED)?.map_or(0, |v| v.value())
        };
        let (names, spare) = wal::list_segments(self.fs.as_ref())?;
        let mut segments = Vec::with_capacity(names.len());
        for name in names {
            let bytes = self.fs.read(&name)?;
            segments.push((name, bytes));
        }
        Ok(LogOnDisk {
            segments,
            spare,
            applied,
        })
    }

    /// After recovery: start a new segment after the last recovered batch. Segments with
    /// batches redb lacks are folded in by the checkpointer in the background (inline in
    /// tests); the others are deleted.
    fn resume_log(
        &mut self,
        names: Vec<String>,
        spare: bool,
        applied: u64,
        recovered_last: Option<u64>,
    ) -> Result<(), StoreError> {
        let next = recovered_last.unwrap_or(applied).max(applied) + 1;
        // The checkpointer reads these segments again rather than keeping their bytes from
        // recovery: until the first commit they would sit in memory beside the engine state,
        // and the second read comes from the page cache.
        // A segment is named after its first batch: one named after the recovered end holds
        // only a discarded tail (and its name is the new segment's).
        for name in &names {
            let holds_recovered = recovered_last
                .is_some_and(|last| wal::segment_seq(name).is_some_and(|first| first <= last));
            if holds_recovered {
                self.checkpoints.closed.push(Closed {
                    name: name.clone(),
                    last: recovered_last.unwrap_or(applied),
                });
            } else {
                self.fs.remove(name)?;
            }
        }
        self.checkpoints.fold_after = applied;
        self.wal = Some(WalWriter::start(
            Arc::clone(&self.fs),
            next,
            spare,
            self.segment_bytes,
        )?);
        self.checkpoints.spare = Spare::Missing;
        self.unsynced_since = None;
        // The first checkpoint (recovered segments, a new spare) waits for the first commit:
        // it would compete with the rest of the startup for the CPU.
        Ok(())
    }

    /// Read and validate the whole durable state. Creates the tables of a new database.
    ///
    /// # Errors
    /// Any record that does not decode or is inconsistent with its key.
    pub fn load(&mut self) -> Result<DurableState, StoreError> {
        let loaded = self.load_with(
            |header| {
                let mut leases = Vec::new();
                let _ = leases.try_reserve(header.leases);
                Ok::<_, std::convert::Infallible>(leases)
            },
            |leases, record| {
                leases.push(record);
                Ok(())
            },
        )?;
        let Ok((leases, mut state)) = loaded;
        state.leases = leases;
        Ok(state)
    }

    /// Read and validate the whole durable state, handing every lease record to `add` as soon
    /// as it is decoded, so that no list of all records is ever built (a restart of a million
    /// leases would otherwise hold them twice: as records and as engine state). `start` is
    /// called once with the counters before the first record and makes the sink; the rest of
    /// the state (counters, idempotency records, lock-delays) is returned with `leases` empty.
    /// Creates the tables of a new database.
    ///
    /// # Errors
    /// Outer: any record that does not decode or is inconsistent with its key. Inner: the
    /// first error of `start` or `add` (reading stops there).
    pub fn load_with<S, E>(
        &mut self,
        start: impl FnOnce(LoadHeader) -> Result<S, E>,
        mut add: impl FnMut(&mut S, LeaseRecord) -> Result<(), E>,
    ) -> Result<Result<(S, DurableState), E>, StoreError> {
        // Create missing tables and stamp the format version in one durable commit.
        {
            let mut tx = self.db.begin_write()?;
            tx.set_durability(redb::Durability::Immediate)?;
            {
                tx.open_table(LEASES)?;
                tx.open_table(IDEMPOTENCY)?;
                tx.open_table(LOCK_DELAYS)?;
                let mut meta = tx.open_table(META)?;
                let version = meta.get(META_FORMAT)?.map(|v| v.value());
                match version {
                    Some(FORMAT_VERSION) => {}
                    None => {
                        meta.insert(META_FORMAT, FORMAT_VERSION)?;
                    }
                    Some(found) if FORMAT_VERSIONS_READ.contains(&found) => {
                        meta.insert(META_FORMAT, FORMAT_VERSION)?;
                    }
                    Some(found) => return Err(StoreError::Version { found }),
                }
            }
            tx.commit()?;
        }
        // Batches in the log that redb lacks overlay what redb holds, record by record; they
        // reach redb later, through the checkpointer (a restart never waits for that write).
        let log = self.read_log()?;
        let mut folded = Folded::default();
        let end = wal::replay(&log.segments, log.applied, &mut folded)?;
        if let Some((segment, offset)) = &end.discarded_tail {
            tracing::warn!(
                segment,
                offset,
                "write-ahead log: discarded a half-written batch at the end (never acknowledged)"
            );
        }
        let tx = self.db.begin_read()?;
        let mut state = DurableState::default();
        let meta = tx.open_table(META)?;
        let get = |name: &str| -> Result<u64, StoreError> {
            Ok(meta.get(name)?.map_or(0, |v| v.value()))
        };
        let logged = folded.counters;
        let fencing_next = get(META_FENCING)?.max(logged.fencing_next.unwrap_or(0));
        let event_seq_next = get(META_EVENT_SEQ)?.max(logged.event_seq_next.unwrap_or(0));
        self.fencing_ceiling = get(META_FENCING_CEILING)?.max(logged.fencing_ceiling.unwrap_or(0));
        self.event_seq_ceiling =
            get(META_EVENT_SEQ_CEILING)?.max(logged.event_seq_ceiling.unwrap_or(0));
        // A crash in async mode may have lost the last counter values, never the ceilings.
        state.fencing_next = fencing_next.max(self.fencing_ceiling).max(1);
        state.event_seq_next = event_seq_next.max(self.event_seq_ceiling).max(1);

        let leases = tx.open_table(LEASES)?;
        // redb keeps the row count in the table header: the sink can size its tables once
        // (bounded, so a damaged count cannot ask for absurd memory).
        let rows = usize::try_from(leases.len()?).unwrap_or(usize::MAX);
        let header = LoadHeader {
            fencing_next: state.fencing_next,
            event_seq_next: state.event_seq_next,
            leases: rows
                .saturating_add(folded.leases.len())
                .min(LOAD_RESERVE_MAX),
        };
        let mut sink = match start(header) {
            Ok(sink) => sink,
            Err(e) => return Ok(Err(e)),
        };
        // Reading and decoding the records (a third of a restart with a million leases) runs
        // on a second thread, a batch ahead of `add`, which rebuilds the engine's tables.
        let added = std::thread::scope(|scope| {
            let (batches, received) = std::sync::mpsc::sync_channel::<Vec<LeaseRecord>>(4);
            // A hash set: the reader looks up every stored lease in it.
            let overlaid: std::collections::HashSet<u128> = folded.leases.keys().copied().collect();
            let reader = scope.spawn(move || read_lease_records(&leases, &overlaid, &batches));
            let mut outcome = Ok(());
            for batch in received {
                for record in batch {
                    if let Err(e) = add(&mut sink, record) {
                        outcome = Err(e);
                        break;
                    }
                }
                if outcome.is_err() {
                    // Dropping the receiver stops the reader at its next batch.
                    break;
                }
            }
            // A panic while reading is a bug, not a corrupt record: raise it here as before.
            let read = reader
                .join()
                .unwrap_or_else(|panic| std::panic::resume_unwind(panic));
            (read, outcome)
        });
        match added {
            (_, Err(e)) => return Ok(Err(e)),
            (Err(e), Ok(())) => return Err(e),
            (Ok(()), Ok(())) => {}
        }
        for (id, bytes) in &folded.leases {
            let Some(bytes) = bytes else { continue };
            let id = LeaseId(*id);
            let record: LeaseRecord = decode_record(
                "leases (write-ahead log)",
                || format!("lease {id}"),
                bytes,
                |r: &LeaseRecord| {
                    (r.lease_id != id).then(|| format!("record names lease {}", r.lease_id))
                },
            )?;
            if let Err(e) = add(&mut sink, record) {
                return Ok(Err(e));
            }
        }
        let idem = tx.open_table(IDEMPOTENCY)?;
        for entry in idem.iter()? {
            let (k, v) = entry?;
            let key = k.value();
            if folded.idempotency.contains_key(key) {
                continue;
            }
            let record: IdempotencyRecord = decode_record(
                "idempotency",
                || format!("key {key:?}"),
                v.value(),
                |r: &IdempotencyRecord| {
                    (r.key != key).then(|| format!("record names key {:?}", r.key))
                },
            )?;
            state.idempotency.push(record);
        }
        for (key, bytes) in &folded.idempotency {
            let Some(bytes) = bytes else { continue };
            let record: IdempotencyRecord = decode_record(
                "idempotency (write-ahead log)",
                || format!("key {key:?}"),
                bytes,
                |r: &IdempotencyRecord| {
                    (r.key != *key).then(|| format!("record names key {:?}", r.key))
                },
            )?;
            state.idempotency.push(record);
        }
        let delays = tx.open_table(LOCK_DELAYS)?;
        for entry in delays.iter()? {
            let (k, v) = entry?;
            if !folded.lock_delays.contains_key(k.value()) {
                state.lock_delays.push((k.value().to_owned(), v.value()));
            }
        }
        for (key, until) in &folded.lock_delays {
            if let Some(until) = until {
                state.lock_delays.push(((*key).to_owned(), *until));
            }
        }
        drop(tx);
        let recovered_last = folded.last_seq;
        if recovered_last.is_some() {
            tracing::info!(
                batches = end.batches,
                leases = folded.leases.len(),
                "write-ahead log replayed over the database"
            );
        }
        drop(folded);
        let LogOnDisk {
            segments,
            spare,
            applied,
        } = log;
        let names = segments.into_iter().map(|(name, _)| name).collect();
        self.resume_log(names, spare, applied, recovered_last)?;
        Ok(Ok((sink, state)))
    }

    /// In `sync` mode, move the `fdatasync`s to a thread of their own: from now on
    /// [`Store::commit`] returns before its batch is durable and runs the batch's `then` once it
    /// is. No-op in other modes.
    ///
    /// # Errors
    /// The thread cannot be started, or the store was not loaded.
    pub fn start_syncer(&mut self, hooks: SyncHooks) -> Result<(), StoreError> {
        if self.durability != Durability::Sync || self.syncer.is_some() {
            return Ok(());
        }
        let Some(wal) = &self.wal else {
            return Err(StoreError::NotLoaded);
        };
        let (items, queue) = mpsc::channel::<SyncItem>();
        let outstanding = Arc::new(AtomicUsize::new(0));
        let failure = Arc::new(Mutex::new(None));
        let durable = Arc::clone(wal.durable());
        let (thread_outstanding, thread_failure) = (Arc::clone(&outstanding), Arc::clone(&failure));
        let thread = std::thread::Builder::new()
            .name("holdfast-sync".into())
            .spawn(move || {
                run_syncer(
                    &queue,
                    &durable,
                    &thread_outstanding,
                    &thread_failure,
                    &hooks,
                );
            })
            .map_err(|e| StoreError::Sync(format!("cannot start the sync thread: {e}")))?;
        self.syncer = Some(Syncer {
            items: Some(items),
            thread: Some(thread),
            outstanding,
            failure,
        });
        Ok(())
    }

    /// Commit one batch and run `then` (deliver its replies) once it is durable: at once unless
    /// a syncer thread runs ([`Store::start_syncer`]), else on that thread after the sync that
    /// covers it. A batch without changes still waits for the batches before it, so replies
    /// and events never get ahead of durability or of each other.
    ///
    /// `caller_idle` says that nothing else waits for the caller (the engine host's queue is
    /// empty). Then, if no earlier batch is still waiting for its sync, the caller syncs this
    /// one itself and runs `then` before returning: handing it to the syncer thread would only
    /// add a thread wake-up, since there is nothing to apply meanwhile; commands that arrive
    /// during the sync form the next batch. (W1 `sync` at 64 clients: 37.0–38.0k → 40.9–43.5k
    /// pairs/s, docs/benchmarks.md.)
    ///
    /// # Errors
    /// Any storage failure, including an earlier failed sync; the caller must stop.
    pub fn commit(
        &mut self,
        changes: &ChangeSet,
        then: Box<dyn FnOnce() + Send>,
        caller_idle: bool,
    ) -> Result<CommitInfo, StoreError> {
        let Some(syncer) = &self.syncer else {
            return self.commit_now(changes, then);
        };
        if let Some(message) = syncer.failure.lock().ok().and_then(|f| f.clone()) {
            return Err(StoreError::Sync(message));
        }
        // Every earlier batch's `then` has run (the syncer counts an item down only after it),
        // so syncing and delivering here keeps the batch order.
        if caller_idle && syncer.outstanding.load(Ordering::Acquire) == 0 {
            return self.commit_now(changes, then);
        }
        let Some(wal) = &mut self.wal else {
            return Err(StoreError::NotLoaded);
        };
        let item = if changes.is_empty() {
            if syncer.outstanding.load(Ordering::Acquire) == 0 {
                then();
                return Ok(CommitInfo::default());
            }
            SyncItem {
                file: None,
                seq: wal.written(),
                then,
            }
        } else {
            let counters = Counters {
                fencing_next: changes.fencing_next,
                event_seq_next: changes.event_seq_next,
                ..Counters::default()
            };
            let seq = wal.append(changes, counters, false)?;
            SyncItem {
                file: Some(wal.file_sync()),
                seq,
                then,
            }
        };
        syncer.outstanding.fetch_add(1, Ordering::AcqRel);
        let sent = syncer
            .items
            .as_ref()
            .is_some_and(|items| items.send(item).is_ok());
        if !sent {
            syncer.outstanding.fetch_sub(1, Ordering::AcqRel);
            let message = syncer.failure.lock().ok().and_then(|f| f.clone());
            return Err(StoreError::Sync(
                message.unwrap_or_else(|| "the sync thread stopped".into()),
            ));
        }
        if !changes.is_empty() {
            self.poll_checkpoints(false)?;
            self.start_checkpoint()?;
            self.rotate_if_full()?;
        }
        Ok(CommitInfo { synced: false })
    }

    /// Write (and in `sync` mode sync) the batch on the calling thread, then run `then`.
    fn commit_now(
        &mut self,
        changes: &ChangeSet,
        then: Box<dyn FnOnce() + Send>,
    ) -> Result<CommitInfo, StoreError> {
        let info = if changes.is_empty() {
            CommitInfo::default()
        } else {
            self.apply(changes)?
        };
        then();
        Ok(info)
    }

    /// Write one change set as one log record. In `sync` mode it is durable when this
    /// returns; in `async` mode after the next [`Store::flush`] (or at once when a counter
    /// passes its reserved ceiling).
    ///
    /// # Errors
    /// Any storage failure (including a failed checkpoint); the caller must stop (fail-stop):
    /// nothing in this batch may be acknowledged.
    pub fn apply(&mut self, changes: &ChangeSet) -> Result<CommitInfo, StoreError> {
        self.poll_checkpoints(false)?;
        self.start_checkpoint()?;
        let mut durable = self.durability == Durability::Sync;
        let mut counters = Counters {
            fencing_next: changes.fencing_next,
            event_seq_next: changes.event_seq_next,
            ..Counters::default()
        };
        if self.durability == Durability::Async {
            if let Some(v) = changes.fencing_next
                && v >= self.fencing_ceiling
            {
                self.fencing_ceiling = v + COUNTER_RESERVE;
                counters.fencing_ceiling = Some(self.fencing_ceiling);
                durable = true;
            }
            if let Some(v) = changes.event_seq_next
                && v >= self.event_seq_ceiling
            {
                self.event_seq_ceiling = v + COUNTER_RESERVE;
                counters.event_seq_ceiling = Some(self.event_seq_ceiling);
                durable = true;
            }
        }
        let Some(wal) = &mut self.wal else {
            return Err(StoreError::NotLoaded);
        };
        wal.append(changes, counters, durable)?;
        if durable {
            self.unsynced_since = None;
        } else {
            self.unsynced_since.get_or_insert_with(Instant::now);
        }
        self.rotate_if_full()?;
        Ok(CommitInfo { synced: durable })
    }

    /// When the oldest unsynced commit was made, if any (`async` mode).
    #[must_use]
    pub fn unsynced_since(&self) -> Option<Instant> {
        self.unsynced_since
    }

    /// Make every earlier commit durable (one `fdatasync` of the log). No-op if nothing is
    /// unsynced.
    ///
    /// # Errors
    /// Storage failure (fail-stop).
    pub fn flush(&mut self) -> Result<bool, StoreError> {
        if self.unsynced_since.is_none() {
            return Ok(false);
        }
        let synced = match &mut self.wal {
            Some(wal) => wal.sync()?,
            None => false,
        };
        self.unsynced_since = None;
        Ok(synced)
    }
}

#[cfg(test)]
mod crash_image_tests {
    //! Crash images: a machine whose redb file and log files keep what was last synced;
    //! "crashing" reopens from that image, optionally with the first unsynced write of a log
    //! file half done (a torn write). Whatever sync the crash follows, recovery yields exactly
    //! the state after some committed batch (never half of one), never goes back past a batch
    //! that was acknowledged, and the engine accepts it. Segments are tiny, so the history
    //! rotates segments and runs checkpoints (inline) many times.

    use std::collections::BTreeMap;
    use std::sync::{Arc, Mutex};

    use holdfast_core::{
        AcquireOutcome, AcquireRequest, Engine, LeaseTarget, Limits, LockKind, LockSpec, NewLease,
    };

    use super::*;
    use crate::wal::WalFile;

    /// Log segment size in these tests: a few batches each.
    const TINY_SEGMENT: u64 = 200;

    #[derive(Clone, Default)]
    struct FileState {
        volatile: Vec<u8>,
        synced: Vec<u8>,
        /// Writes since the last sync that counted.
        pending: Vec<(usize, Vec<u8>)>,
    }

    #[derive(Default)]
    struct DiskState {
        /// The redb file.
        volatile: Vec<u8>,
        synced: Vec<u8>,
        /// Syncs of any file or of the log directory.
        syncs: u64,
        /// Syncs after this many are lost (the "crash" happened there).
        freeze_after: Option<u64>,
        /// Log file syncs fail (a disk error).
        fail_syncs: bool,
        /// Log files by inode, and the directory (name → inode) as seen and as synced.
        inodes: Vec<FileState>,
        dir: BTreeMap<String, usize>,
        dir_synced: BTreeMap<String, usize>,
    }

    impl DiskState {
        /// Count a sync; true if it reaches the disk.
        fn sync_counts(&mut self) -> bool {
            self.syncs += 1;
            self.freeze_after.is_none_or(|n| self.syncs <= n)
        }
    }

    #[derive(Clone, Default)]
    struct Disk(Arc<Mutex<DiskState>>);

    impl std::fmt::Debug for Disk {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.write_str("Disk")
        }
    }

    fn write_into(buf: &mut Vec<u8>, offset: usize, data: &[u8]) {
        if buf.len() < offset + data.len() {
            buf.resize(offset + data.len(), 0);
        }
        buf[offset..offset + data.len()].copy_from_slice(data);
    }

    impl Disk {
        fn state(&self) -> std::sync::MutexGuard<'_, DiskState> {
            self.0.lock().unwrap()
        }
        /// What a restart after a crash finds: synced data only; with `torn`, the first
        /// write after each log file's last sync is half on disk.
        fn crash_image(&self, torn: bool) -> Disk {
            let st = self.state();
            let inodes = st
                .inodes
                .iter()
                .map(|f| {
                    let mut content = f.synced.clone();
                    if torn && let Some((offset, data)) = f.pending.first() {
                        write_into(&mut content, *offset, &data[..data.len() / 2]);
                    }
                    FileState {
                        volatile: content.clone(),
                        synced: content,
                        pending: Vec::new(),
                    }
                })
                .collect();
            Disk(Arc::new(Mutex::new(DiskState {
                volatile: st.synced.clone(),
                synced: st.synced.clone(),
                inodes,
                dir: st.dir_synced.clone(),
                dir_synced: st.dir_synced.clone(),
                ..DiskState::default()
            })))
        }
        fn open(&self, durability: Durability) -> Store {
            Store::open_with_backend(
                self.clone(),
                Arc::new(MemFs(self.clone())),
                durability,
                TINY_SEGMENT,
            )
            .unwrap()
        }
    }

    impl redb::StorageBackend for Disk {
        fn len(&self) -> std::io::Result<u64> {
            Ok(self.state().volatile.len() as u64)
        }
        fn read(&self, offset: u64, out: &mut [u8]) -> std::io::Result<()> {
            let st = self.state();
            let start = usize::try_from(offset).unwrap();
            let src = st.volatile.get(start..start + out.len()).ok_or_else(|| {
                std::io::Error::new(std::io::ErrorKind::InvalidInput, "out of range")
            })?;
            out.copy_from_slice(src);
            Ok(())
        }
        fn set_len(&self, len: u64) -> std::io::Result<()> {
            self.state()
                .volatile
                .resize(usize::try_from(len).unwrap(), 0);
            Ok(())
        }
        fn sync_data(&self) -> std::io::Result<()> {
            let mut st = self.state();
            if st.sync_counts() {
                st.synced = st.volatile.clone();
            }
            Ok(())
        }
        fn write(&self, offset: u64, data: &[u8]) -> std::io::Result<()> {
            let mut st = self.state();
            write_into(&mut st.volatile, usize::try_from(offset).unwrap(), data);
            Ok(())
        }
    }

    /// The log directory of a [`Disk`].
    struct MemFs(Disk);

    struct MemFile {
        disk: Disk,
        inode: usize,
    }

    fn not_found(name: &str) -> std::io::Error {
        std::io::Error::new(std::io::ErrorKind::NotFound, name.to_owned())
    }

    impl WalFs for MemFs {
        fn list(&self) -> std::io::Result<Vec<String>> {
            Ok(self.0.state().dir.keys().cloned().collect())
        }
        fn create(&self, name: &str) -> std::io::Result<Box<dyn WalFile>> {
            let mut st = self.0.state();
            st.inodes.push(FileState::default());
            let inode = st.inodes.len() - 1;
            st.dir.insert(name.to_owned(), inode);
            Ok(Box::new(MemFile {
                disk: self.0.clone(),
                inode,
            }))
        }
        fn open(&self, name: &str) -> std::io::Result<Box<dyn WalFile>> {
            let inode = *self
                .0
                .state()
                .dir
                .get(name)
                .ok_or_else(|| not_found(name))?;
            Ok(Box::new(MemFile {
                disk: self.0.clone(),
                inode,
            }))
        }
        fn read(&self, name: &str) -> std::io::Result<Vec<u8>> {
            let st = self.0.state();
            let inode = *st.dir.get(name).ok_or_else(|| not_found(name))?;
            Ok(st.inodes[inode].volatile.clone())
        }
        fn rename(&self, from: &str, to: &str) -> std::io::Result<()> {
            let mut st = self.0.state();
            let inode = st.dir.remove(from).ok_or_else(|| not_found(from))?;
            st.dir.insert(to.to_owned(), inode);
            Ok(())
        }
        fn remove(&self, name: &str) -> std::io::Result<()> {
            self.0
                .state()
                .dir
                .remove(name)
                .ok_or_else(|| not_found(name))?;
            Ok(())
        }
        fn sync_dir(&self) -> std::io::Result<()> {
            let mut st = self.0.state();
            if st.sync_counts() {
                st.dir_synced = st.dir.clone();
            }
            Ok(())
        }
    }

    impl WalFile for MemFile {
        fn write_at(&mut self, offset: u64, data: &[u8]) -> std::io::Result<()> {
            let mut st = self.disk.state();
            let offset = usize::try_from(offset).unwrap();
            let file = &mut st.inodes[self.inode];
            write_into(&mut file.volatile, offset, data);
            file.pending.push((offset, data.to_vec()));
            Ok(())
        }
        fn sync_data(&mut self) -> std::io::Result<()> {
            WalSync::sync_data(self)
        }
        fn sync_handle(&self) -> std::io::Result<Arc<dyn WalSync>> {
            Ok(Arc::new(MemFile {
                disk: self.disk.clone(),
                inode: self.inode,
            }))
        }
    }

    impl WalSync for MemFile {
        fn sync_data(&self) -> std::io::Result<()> {
            let mut st = self.disk.state();
            if st.fail_syncs {
                return Err(std::io::Error::other("injected I/O error"));
            }
            if st.sync_counts() {
                let file = &mut st.inodes[self.inode];
                file.synced = file.volatile.clone();
                file.pending.clear();
            }
            Ok(())
        }
    }

    fn normalized(mut s: DurableState) -> DurableState {
        s.leases.sort_by_key(|l| l.lease_id);
        s.idempotency.sort_by(|a, b| a.key.cmp(&b.key));
        s.lock_delays.sort();
        s.fencing_next = s.fencing_next.max(1);
        s.event_seq_next = s.event_seq_next.max(1);
        s
    }

    /// Run a fixed history of batches, handing each non-empty change set to `commit` with its
    /// index (from 1); return the durable state before the first and after each batch.
    fn history(mut commit: impl FnMut(usize, &ChangeSet)) -> Vec<DurableState> {
        let mut engine = Engine::new(Limits::default());
        let mut states = vec![normalized(engine.durable_state())];
        let mut leases = Vec::new();
        let mut now = 1_000_000;
        for i in 0u64..30 {
            now += 10;
            match i % 3 {
                0 | 1 => {
                    let request = AcquireRequest {
                        target: LeaseTarget::New(NewLease {
                            lease_id: LeaseId(u128::from(i) + 1),
                            holder: format!("h{i}"),
                            ttl_ms: 60_000,
                            reason: Some(format!("batch {i}")),
                            metadata: None,
                            owner: None,
                        }),
                        locks: vec![LockSpec {
                            key: format!("k/{}", i % 7),
                            kind: LockKind::Exclusive,
                            lock_delay_ms: 0,
                        }],
                        wait_ms: 0,
                        reentrant: true,
                    };
                    if let Ok(AcquireOutcome::Granted(g)) = engine.acquire(now, request) {
                        leases.push(g.lease.lease_id);
                    }
                }
                _ => {
                    if let Some(id) = leases.first().copied() {
                        leases.remove(0);
                        let _ = engine.release_lease(now, id);
                    }
                }
            }
            let changes = engine.take_changes();
            if changes.is_empty() {
                continue;
            }
            commit(states.len(), &changes);
            states.push(normalized(engine.durable_state()));
        }
        states
    }

    /// Run the history through [`Store::apply`]: the durable state after each commit, with the
    /// number of syncs the disk had seen when that commit returned.
    fn run_history_counted(store: &mut Store, disk: &Disk) -> Vec<(DurableState, u64)> {
        let mut syncs = vec![0];
        let states = history(|_, changes| {
            store.apply(changes).unwrap();
            syncs.push(disk.state().syncs);
        });
        states.into_iter().zip(syncs).collect()
    }

    fn run_history(store: &mut Store, disk: &Disk) -> Vec<DurableState> {
        run_history_counted(store, disk)
            .into_iter()
            .map(|(s, _)| s)
            .collect()
    }

    #[test]
    fn every_crash_point_recovers_a_committed_prefix() {
        // Syncs of the history after the database was created and loaded (a crash while a
        // brand-new database is being created leaves no database to recover).
        let (history_syncs, batches) = {
            let disk = Disk::default();
            let mut store = disk.open(Durability::Sync);
            store.load().unwrap();
            let base = disk.state().syncs;
            let batches = run_history(&mut store, &disk).len();
            drop(store);
            (disk.state().syncs - base, batches)
        };
        assert!(history_syncs > 40, "{history_syncs}");
        let mut rotations = 0;
        for torn in [false, true] {
            let mut last_index = 0;
            for k in 0..=history_syncs {
                let disk = Disk::default();
                let mut store = disk.open(Durability::Sync);
                store.load().unwrap();
                let freeze = {
                    let mut st = disk.state();
                    st.freeze_after = Some(st.syncs + k);
                    st.syncs + k
                };
                let counted = run_history_counted(&mut store, &disk);
                drop(store);
                rotations = rotations.max(disk.state().inodes.len());
                // Every batch whose commit returned before the crash was acknowledged.
                let acknowledged = counted
                    .iter()
                    .rposition(|(_, syncs)| *syncs <= freeze)
                    .unwrap_or(0);
                let states: Vec<DurableState> = counted.into_iter().map(|(s, _)| s).collect();
                let image = disk.crash_image(torn);
                let recovered = normalized(image.open(Durability::Sync).load().unwrap());
                let index = states
                    .iter()
                    .position(|s| *s == recovered)
                    .unwrap_or_else(|| panic!("crash after sync {freeze} (torn: {torn}): recovered state is no committed state: {recovered:?}"));
                assert!(
                    index >= last_index,
                    "crash after sync {freeze} (torn: {torn}): went back from batch {last_index} to {index}"
                );
                assert!(
                    index >= acknowledged,
                    "crash after sync {freeze} (torn: {torn}): acknowledged batch {acknowledged} lost (recovered {index})"
                );
                last_index = index;
                // The recovered server goes on: a few more batches on top of the recovered
                // segments (which the checkpointer folds in meanwhile), then a second crash
                // after the last sync.
                let mut engine =
                    Engine::restore(Limits::default(), recovered.clone(), 2_000_000, 10_000)
                        .unwrap();
                let mut again = image.open(Durability::Sync);
                assert_eq!(normalized(again.load().unwrap()), recovered);
                for n in 0..4u128 {
                    let request = AcquireRequest {
                        target: LeaseTarget::New(NewLease {
                            lease_id: LeaseId(1000 + n),
                            holder: "after".into(),
                            ttl_ms: 60_000,
                            reason: None,
                            metadata: None,
                            owner: None,
                        }),
                        locks: vec![LockSpec {
                            key: format!("after/{n}"),
                            kind: LockKind::Exclusive,
                            lock_delay_ms: 0,
                        }],
                        wait_ms: 0,
                        reentrant: true,
                    };
                    engine.acquire(2_000_000, request).unwrap();
                    again.apply(&engine.take_changes()).unwrap();
                }
                drop(again);
                let expected = normalized(engine.durable_state());
                let twice = normalized(
                    image
                        .crash_image(false)
                        .open(Durability::Sync)
                        .load()
                        .unwrap(),
                );
                assert_eq!(twice, expected, "crash after sync {freeze}: second crash");
            }
            assert_eq!(
                last_index,
                batches - 1,
                "the last crash point keeps every batch"
            );
        }
        assert!(
            rotations > 8,
            "the history rotated segments ({rotations} files)"
        );
    }

    #[test]
    fn async_crash_never_moves_fencing_tokens_back() {
        for torn in [false, true] {
            let mut k = 0;
            loop {
                let disk = Disk::default();
                let mut store = disk.open(Durability::Async);
                store.load().unwrap();
                let base = {
                    let mut st = disk.state();
                    st.freeze_after = Some(st.syncs + k);
                    st.syncs
                };
                let states = run_history_counted(&mut store, &disk);
                store.flush().unwrap();
                drop(store);
                let total = disk.state().syncs - base;
                let mut recovered_store = disk.crash_image(torn).open(Durability::Async);
                let recovered = normalized(recovered_store.load().unwrap());
                // Grants acknowledged before the crash: their commit returned with at most
                // `base + k` syncs done.
                let max_token = states
                    .iter()
                    .filter(|(_, syncs)| *syncs <= base + k)
                    .flat_map(|(s, _)| {
                        s.leases
                            .iter()
                            .flat_map(|l| l.locks.iter().map(|x| x.fencing_token))
                    })
                    .max()
                    .unwrap_or(0);
                assert!(
                    recovered.fencing_next > max_token,
                    "crash after sync {k} (torn: {torn}): fencing_next {} <= issued {max_token}",
                    recovered.fencing_next
                );
                assert!(
                    states.iter().any(|(s, _)| s.leases == recovered.leases),
                    "crash after sync {k} (torn: {torn}): leases are not a committed prefix"
                );
                Engine::restore(Limits::default(), recovered, 2_000_000, 10_000).unwrap();
                if k >= total {
                    break;
                }
                k += 1;
            }
        }
    }

    /// Polls `done` a bounded number of times (a hang guard, not a speed check).
    fn poll_until(what: &str, done: impl Fn() -> bool) {
        for _ in 0..20_000 {
            if done() {
                return;
            }
            std::thread::sleep(std::time::Duration::from_millis(1));
        }
        panic!("gave up waiting until {what}");
    }

    #[test]
    fn a_failed_sync_delivers_nothing_more_and_stops_every_later_commit() {
        let disk = Disk::default();
        let mut store = disk.open(Durability::Sync);
        store.load().unwrap();
        let failed = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let flag = Arc::clone(&failed);
        store
            .start_syncer(SyncHooks {
                on_sync: Box::new(|| {}),
                on_failure: Box::new(move |_| flag.store(true, Ordering::SeqCst)),
            })
            .unwrap();
        let delivered = Arc::new(Mutex::new(Vec::new()));
        let mut states = Vec::new();
        let history_states = history(|index, changes| {
            if index == 3 {
                disk.state().fail_syncs = true;
            }
            let sink = Arc::clone(&delivered);
            let outcome = store.commit(
                changes,
                Box::new(move || sink.lock().unwrap().push(index)),
                false,
            );
            states.push((index, outcome.is_ok()));
            // Batches 1 and 2 are synced before the disk fails: otherwise batch 2's sync could
            // be the one that fails, and commit 3 would already be refused.
            if index <= 2 {
                poll_until("the batch is delivered", || {
                    delivered.lock().unwrap().contains(&index)
                });
            }
            if index == 3 {
                poll_until("the sync failure is reported", || {
                    failed.load(Ordering::SeqCst)
                });
            }
        });
        // Batch 3's sync failed: neither it nor anything after it was delivered.
        let delivered = delivered.lock().unwrap().clone();
        assert_eq!(delivered, [1, 2], "a batch whose sync failed was delivered");
        // Every commit after the failure is refused (fail-stop).
        let refused: Vec<usize> = states
            .iter()
            .filter(|(_, ok)| !ok)
            .map(|(i, _)| *i)
            .collect();
        assert!(
            !refused.is_empty() && refused.iter().all(|i| *i > 3),
            "{states:?}"
        );
        assert_eq!(refused.first(), Some(&4), "{states:?}");
        drop(store);
        // Restarted (the disk works again): a committed state, with every delivered batch.
        let image = disk.crash_image(false);
        image.state().fail_syncs = false;
        let recovered = normalized(image.open(Durability::Sync).load().unwrap());
        let index = history_states
            .iter()
            .position(|s| *s == recovered)
            .expect("recovered state is a committed state");
        assert!(
            index >= *delivered.iter().max().unwrap(),
            "{index} {delivered:?}"
        );
    }

    /// A loaded `sync` store on `disk` with its syncer thread running (a failed sync panics).
    fn syncing_store(disk: &Disk) -> Store {
        let mut store = disk.open(Durability::Sync);
        store.load().unwrap();
        store
            .start_syncer(SyncHooks {
                on_sync: Box::new(|| {}),
                on_failure: Box::new(|e| panic!("sync failed: {e}")),
            })
            .unwrap();
        store
    }

    #[test]
    fn an_idle_caller_with_nothing_outstanding_syncs_and_delivers_before_commit_returns() {
        let disk = Disk::default();
        let mut store = syncing_store(&disk);
        let delivered = Arc::new(Mutex::new(Vec::new()));
        let mut batches = 0;
        history(|index, changes| {
            batches += 1;
            let syncs_before = disk.state().syncs;
            let (sink, seen) = (Arc::clone(&delivered), disk.clone());
            let info = store
                .commit(
                    changes,
                    Box::new(move || sink.lock().unwrap().push((index, seen.state().syncs))),
                    true,
                )
                .unwrap();
            // The previous batch was delivered before this commit returned, so nothing is
            // outstanding: this one was synced and delivered on the calling thread.
            assert!(info.synced, "batch {index}: synced by the caller");
            let last = *delivered.lock().unwrap().last().unwrap();
            assert_eq!(
                last.0, index,
                "batch {index} delivered before commit returned"
            );
            assert!(
                last.1 > syncs_before,
                "batch {index} delivered after its sync"
            );
        });
        assert!(batches > 10);
        drop(store);
        let order: Vec<usize> = delivered.lock().unwrap().iter().map(|d| d.0).collect();
        assert_eq!(order, (1..=batches).collect::<Vec<_>>());
    }

    #[test]
    fn pipelined_commits_are_delivered_only_once_durable() {
        // `Store::commit` with the syncer thread: a batch's `then` (its replies) may run only
        // after a sync that covers it, and batches are delivered in order. The thread makes
        // the sync points vary from run to run; each run is checked against its own
        // acknowledgements. Every third batch comes from an idle caller, which syncs it itself
        // whenever the syncer has nothing outstanding, so histories mix both paths.
        let total = {
            let disk = Disk::default();
            let mut store = disk.open(Durability::Sync);
            store.load().unwrap();
            let base = disk.state().syncs;
            run_history(&mut store, &disk);
            disk.state().syncs - base
        };
        for torn in [false, true] {
            for k in 0..=total {
                let disk = Disk::default();
                let mut store = syncing_store(&disk);
                let freeze = {
                    let mut st = disk.state();
                    st.freeze_after = Some(st.syncs + k);
                    st.syncs + k
                };
                // (batch index, syncs seen when its replies went out), in delivery order.
                let acks = Arc::new(Mutex::new(Vec::new()));
                let states = history(|index, changes| {
                    let (acks, disk) = (Arc::clone(&acks), disk.clone());
                    store
                        .commit(
                            changes,
                            Box::new(move || {
                                let syncs = disk.state().syncs;
                                acks.lock().unwrap().push((index, syncs));
                            }),
                            index % 3 == 0,
                        )
                        .unwrap();
                });
                drop(store);
                let acks = acks.lock().unwrap().clone();
                let delivered: Vec<usize> = acks.iter().map(|(index, _)| *index).collect();
                assert_eq!(
                    delivered,
                    (1..states.len()).collect::<Vec<_>>(),
                    "every batch delivered once, in order"
                );
                let acknowledged = acks
                    .iter()
                    .filter(|(_, syncs)| *syncs <= freeze)
                    .map(|(index, _)| *index)
                    .max()
                    .unwrap_or(0);
                let recovered = normalized(
                    disk.crash_image(torn)
                        .open(Durability::Sync)
                        .load()
                        .unwrap(),
                );
                let index = states
                    .iter()
                    .position(|s| *s == recovered)
                    .unwrap_or_else(|| panic!("crash after sync {freeze} (torn: {torn}): recovered state is no committed state"));
                assert!(
                    index >= acknowledged,
                    "crash after sync {freeze} (torn: {torn}): delivered batch {acknowledged} lost (recovered {index})"
                );
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use holdfast_core::{HeldLockView, LockKind};

    fn lease(id: u128) -> LeaseRecord {
        LeaseRecord {
            lease_id: LeaseId(id),
            holder: "h".into(),
            ttl_ms: 30_000,
            expires_at_ms: 1_000_000,
            created_at_ms: 1,
            reason: Some("r".into()),
            metadata: None,
            owner: Some("tok".into()),
            locks: vec![HeldLockView {
                key: "a/b".into(),
                kind: LockKind::Exclusive,
                fencing_token: 7,
                count: 1,
                acquired_at_ms: 1,
                lock_delay_ms: 0,
            }],
        }
    }

    #[test]
    fn round_trip_and_delete() {
        let dir = tempfile::tempdir().unwrap();
        {
            let mut store = Store::open(dir.path(), Durability::Sync).unwrap();
            assert_eq!(store.load().unwrap().leases.len(), 0);
            let mut cs = ChangeSet {
                fencing_next: Some(8),
                event_seq_next: Some(3),
                ..ChangeSet::default()
            };
            cs.leases.insert(LeaseId(1), Some(lease(1)));
            cs.leases.insert(LeaseId(2), Some(lease(2)));
            cs.lock_delays.insert("k".into(), Some(99));
            assert!(store.apply(&cs).unwrap().synced);
            let mut cs = ChangeSet::default();
            cs.leases.insert(LeaseId(2), None);
            store.apply(&cs).unwrap();
        }
        let mut store = Store::open(dir.path(), Durability::Sync).unwrap();
        let state = store.load().unwrap();
        assert_eq!(state.fencing_next, 8);
        assert_eq!(state.event_seq_next, 3);
        assert_eq!(state.leases, vec![lease(1)]);
        assert_eq!(state.lock_delays, vec![("k".to_owned(), 99)]);
    }

    #[test]
    fn load_across_many_batches_keeps_order_and_stops_at_a_refusal_or_a_corrupt_record() {
        let dir = tempfile::tempdir().unwrap();
        let mut store = Store::open(dir.path(), Durability::Sync).unwrap();
        store.load().unwrap();
        let n = 3 * LOAD_BATCH as u128 + 5;
        let mut cs = ChangeSet {
            fencing_next: Some(8),
            ..ChangeSet::default()
        };
        for id in 1..=n {
            cs.leases.insert(LeaseId(id), Some(lease(id)));
        }
        store.apply(&cs).unwrap();
        let ids: Vec<u128> = store
            .load()
            .unwrap()
            .leases
            .iter()
            .map(|l| l.lease_id.0)
            .collect();
        assert_eq!(ids, (1..=n).collect::<Vec<_>>());

        // The sink refuses the 1500th record: nothing after it is added.
        let mut added = 0u32;
        let refused = store
            .load_with(
                |_| Ok::<_, String>(()),
                |(), record| {
                    added += 1;
                    if record.lease_id == LeaseId(1500) {
                        Err(format!("refused {}", record.lease_id))
                    } else {
                        Ok(())
                    }
                },
            )
            .unwrap();
        assert_eq!(refused.unwrap_err(), format!("refused {}", LeaseId(1500)));
        assert_eq!(added, 1500);

        // A record that does not decode, stored in redb beside the ones still in the log: the
        // load fails naming it.
        {
            let tx = store.db.begin_write().unwrap();
            tx.open_table(LEASES)
                .unwrap()
                .insert(n + 2500, &[0xffu8, 0xff, 0xff][..])
                .unwrap();
            tx.commit().unwrap();
        }
        let err = store.load().unwrap_err();
        assert!(
            matches!(
                err,
                StoreError::Corrupt {
                    table: "leases",
                    ..
                }
            ),
            "{err}"
        );
        assert!(
            err.to_string().contains(&LeaseId(n + 2500).to_string()),
            "{err}"
        );
    }

    #[test]
    fn streaming_load_restores_like_load_and_stops_at_the_first_refusal() {
        use holdfast_core::{Engine, Limits, Restorer};
        let dir = tempfile::tempdir().unwrap();
        let mut store = Store::open(dir.path(), Durability::Sync).unwrap();
        store.load().unwrap();
        let mut cs = ChangeSet {
            fencing_next: Some(8),
            event_seq_next: Some(3),
            ..ChangeSet::default()
        };
        cs.leases.insert(LeaseId(1), Some(lease(1)));
        store.apply(&cs).unwrap();

        let restore = |store: &mut Store| {
            store
                .load_with(
                    |h| {
                        assert_eq!((h.fencing_next, h.event_seq_next), (8, 3));
                        assert!(h.leases >= 1);
                        Restorer::new(Limits::default(), h.fencing_next, h.event_seq_next, 0, 0, 1)
                    },
                    |r, record| r.add_lease(record),
                )
                .unwrap()
                .and_then(|(r, rest)| r.finish(rest.idempotency, rest.lock_delays))
        };
        let streamed = restore(&mut store).unwrap();
        let whole = Engine::restore(Limits::default(), store.load().unwrap(), 0, 0).unwrap();
        assert_eq!(streamed.durable_state(), whole.durable_state());

        // A second lease holding the same exclusive key: refused by the restorer, named.
        let mut other = lease(2);
        other.locks[0].fencing_token = 6;
        let mut cs = ChangeSet::default();
        cs.leases.insert(LeaseId(2), Some(other));
        store.apply(&cs).unwrap();
        let err = restore(&mut store).unwrap_err();
        assert!(err.0.contains("conflicting holders"), "{err}");
    }

    #[test]
    fn async_mode_reserves_counter_ceilings() {
        let dir = tempfile::tempdir().unwrap();
        let mut store = Store::open(dir.path(), Durability::Async).unwrap();
        store.load().unwrap();
        let cs = ChangeSet {
            fencing_next: Some(5),
            ..ChangeSet::default()
        };
        assert!(
            store.apply(&cs).unwrap().synced,
            "first counter move reserves durably"
        );
        let cs = ChangeSet {
            fencing_next: Some(6),
            ..ChangeSet::default()
        };
        assert!(!store.apply(&cs).unwrap().synced);
        assert!(store.unsynced_since().is_some());
        assert!(store.flush().unwrap());
        drop(store);
        let mut store = Store::open(dir.path(), Durability::Async).unwrap();
        assert!(store.load().unwrap().fencing_next >= 5 + COUNTER_RESERVE);
    }

    #[test]
    fn an_undecodable_record_in_the_log_stops_the_startup_naming_it() {
        let dir = tempfile::tempdir().unwrap();
        {
            let mut store = Store::open(dir.path(), Durability::Sync).unwrap();
            store.load().unwrap();
        }
        // Batch 1, intact (its checksum matches), writing lease 7 as bytes that do not decode.
        let mut payload = vec![0u8];
        payload.extend_from_slice(&1u32.to_le_bytes());
        payload.extend_from_slice(&7u128.to_le_bytes());
        payload.push(1);
        payload.extend_from_slice(&3u32.to_le_bytes());
        payload.extend_from_slice(&[0xff, 0xff, 0xff]);
        payload.extend_from_slice(&0u32.to_le_bytes());
        payload.extend_from_slice(&0u32.to_le_bytes());
        let segment = dir.path().join(wal::WAL_DIR).join(wal::segment_name(1));
        std::fs::write(&segment, wal::raw_record(1, 0, &payload)).unwrap();
        let mut store = Store::open(dir.path(), Durability::Sync).unwrap();
        let err = store.load().unwrap_err().to_string();
        assert!(err.contains("write-ahead log"), "{err}");
        assert!(err.contains(&LeaseId(7).to_string()), "{err}");
        assert!(err.contains("never reset"), "{err}");
        // Nothing was deleted or repaired: the same startup fails the same way.
        drop(store);
        assert!(segment.exists());
        let mut again = Store::open(dir.path(), Durability::Sync).unwrap();
        assert_eq!(again.load().unwrap_err().to_string(), err);
    }

    #[test]
    fn a_version_1_directory_is_upgraded_and_a_future_one_refused() {
        let dir = tempfile::tempdir().unwrap();
        {
            let mut store = Store::open(dir.path(), Durability::Sync).unwrap();
            store.load().unwrap();
            let mut cs = ChangeSet::default();
            cs.leases.insert(LeaseId(1), Some(lease(1)));
            store.apply(&cs).unwrap();
            // Fold the log into redb, then mark the directory as written by version 1.
            store.load().unwrap();
            store.apply(&ChangeSet::default()).unwrap();
            store.poll_checkpoints(true).unwrap();
        }
        let set_version = |v: u64| {
            let store = Store::open(dir.path(), Durability::Sync).unwrap();
            let tx = store.db.begin_write().unwrap();
            tx.open_table(META).unwrap().insert(META_FORMAT, v).unwrap();
            tx.commit().unwrap();
        };
        set_version(1);
        let mut store = Store::open(dir.path(), Durability::Sync).unwrap();
        assert_eq!(store.load().unwrap().leases, vec![lease(1)]);
        let tx = store.db.begin_read().unwrap();
        let stamped = tx
            .open_table(META)
            .unwrap()
            .get(META_FORMAT)
            .unwrap()
            .unwrap()
            .value();
        assert_eq!(stamped, FORMAT_VERSION);
        drop(tx);
        drop(store);
        set_version(FORMAT_VERSION + 1);
        let mut store = Store::open(dir.path(), Durability::Sync).unwrap();
        let err = store.load().unwrap_err();
        assert!(
            matches!(err, StoreError::Version { found } if found == FORMAT_VERSION + 1),
            "{err}"
        );
    }

    #[test]
    fn garbage_file_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join(DB_FILE_NAME), vec![0x5a; 64 * 1024]).unwrap();
        let err = Store::open(dir.path(), Durability::Sync).and_then(|mut s| s.load().map(|_| ()));
        assert!(err.is_err());
    }

    #[test]
    fn undecodable_record_names_table() {
        let dir = tempfile::tempdir().unwrap();
        {
            let store = Store::open(dir.path(), Durability::Sync).unwrap();
            let tx = store.db.begin_write().unwrap();
            tx.open_table(LEASES)
                .unwrap()
                .insert(5u128, &[0xff_u8, 0xff, 0xff][..])
                .unwrap();
            tx.commit().unwrap();
        }
        let mut store = Store::open(dir.path(), Durability::Sync).unwrap();
        let err = store.load().unwrap_err().to_string();
        assert!(err.contains("leases"), "{err}");
    }
}

/// Lease records per batch handed from the reading thread to the restore.
const LOAD_BATCH: usize = 1024;

/// Read and decode every lease record into `batches`; stops early, without error, when the
/// receiving side hung up (the restore failed).
fn read_lease_records(
    leases: &redb::ReadOnlyTable<u128, &[u8]>,
    overlaid: &std::collections::HashSet<u128>,
    batches: &std::sync::mpsc::SyncSender<Vec<LeaseRecord>>,
) -> Result<(), StoreError> {
    let mut batch = Vec::with_capacity(LOAD_BATCH);
    for entry in leases.iter()? {
        let (k, v) = entry?;
        if !overlaid.is_empty() && overlaid.contains(&k.value()) {
            // The log holds a later version (or the delete).
            continue;
        }
        let id = LeaseId(k.value());
        let record: LeaseRecord = decode_record(
            "leases",
            || format!("lease {id}"),
            v.value(),
            |r: &LeaseRecord| {
                (r.lease_id != id).then(|| format!("record names lease {}", r.lease_id))
            },
        )?;
        batch.push(record);
        if batch.len() == LOAD_BATCH
            && batches
                .send(std::mem::replace(
                    &mut batch,
                    Vec::with_capacity(LOAD_BATCH),
                ))
                .is_err()
        {
            return Ok(());
        }
    }
    if !batch.is_empty() {
        let _ = batches.send(batch);
    }
    Ok(())
}

/// Decode one stored record and check it is filed under its own key (`misfiled` answers why
/// not); either failure is `Corrupt`, naming the table and the record.
fn decode_record<T: serde::de::DeserializeOwned>(
    table: &'static str,
    record: impl Fn() -> String,
    bytes: &[u8],
    misfiled: impl FnOnce(&T) -> Option<String>,
) -> Result<T, StoreError> {
    let value: T = postcard::from_bytes(bytes).map_err(|e| StoreError::Corrupt {
        table,
        record: record(),
        reason: e.to_string(),
    })?;
    match misfiled(&value) {
        None => Ok(value),
        Some(reason) => Err(StoreError::Corrupt {
            table,
            record: record(),
            reason,
        }),
    }
}
