//! The write-ahead log that makes a `sync` or `async` commit durable.
//!
//! A commit of the engine host is one **record** appended to the current **segment** file in
//! `<data-dir>/wal/`, followed (in `sync` mode) by one `fdatasync`. Segments are written into
//! space that was zero-filled and synced beforehand (the **spare**), so the `fdatasync` of a
//! commit flushes only the data pages it wrote, never file-size or extent metadata: a redb
//! write transaction per commit cost about four times the CPU and twice the time.
//!
//! When a segment is full (`SEGMENT_BYTES`), the host renames the spare into place as the next
//! segment and hands the closed segments to the **checkpointer** thread. It reads them back,
//! folds their records (last write wins) and writes the result into the redb database in one
//! durable transaction that also stores the last batch it contains (`wal_applied_seq`); then
//! it deletes the segments and zero-fills a new spare. At startup every segment is folded into
//! redb the same way before the database is read, so the rest of the store only ever reads
//! redb.
//!
//! Record layout (8-byte aligned, little-endian): `len u32 | flags u32 | seq u64 |
//! durable u64 | crc32 u32 | 0 u32 | payload (len bytes) | zero padding`, where the CRC covers
//! the first 24 header bytes and the payload. `seq` numbers the batches consecutively across
//! segments; a segment is named after the first batch it holds. `durable` is the last batch
//! known to be synced when this record was written. Recovery follows the chain of consecutive
//! records from the first segment; where it ends (a torn or never-written record), any later
//! intact record whose `durable` reaches the damaged batch proves that batch had been synced,
//! i.e. possibly acknowledged: the startup then stops with an error instead of dropping it. A
//! damaged tail without such a witness is a commit that was never acknowledged (or, in `async`
//! mode, not yet flushed) and is discarded.

use std::collections::BTreeMap;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use holdfast_core::ChangeSet;

/// Sub-directory of the data directory that holds the segments.
pub const WAL_DIR: &str = "wal";
/// Size of a segment (and of the zero-filled spare).
pub const SEGMENT_BYTES: u64 = 4 << 20;
/// The zero-filled next segment, ready to be renamed into place.
pub const SPARE: &str = "spare.log";
/// A spare being written (deleted at startup: it may be incomplete).
const SPARE_TMP: &str = "spare.tmp";
const HEADER: usize = 32;

/// The files of the log. The server uses [`DirFs`]; the crash tests use one that can forget
/// whatever was not synced.
pub trait WalFs: Send + Sync + 'static {
    /// Names of the files in the log directory.
    ///
    /// # Errors
    /// The directory cannot be read.
    fn list(&self) -> io::Result<Vec<String>>;
    /// Create (or truncate) a file for writing.
    ///
    /// # Errors
    /// The file cannot be created.
    fn create(&self, name: &str) -> io::Result<Box<dyn WalFile>>;
    /// Open an existing file for writing.
    ///
    /// # Errors
    /// The file cannot be opened.
    fn open(&self, name: &str) -> io::Result<Box<dyn WalFile>>;
    /// Read a whole file.
    ///
    /// # Errors
    /// The file cannot be read.
    fn read(&self, name: &str) -> io::Result<Vec<u8>>;
    /// Rename a file (atomically replacing `to`).
    ///
    /// # Errors
    /// The rename failed.
    fn rename(&self, from: &str, to: &str) -> io::Result<()>;
    /// Delete a file.
    ///
    /// # Errors
    /// The file cannot be deleted.
    fn remove(&self, name: &str) -> io::Result<()>;
    /// Make creations, renames and deletions in the directory durable.
    ///
    /// # Errors
    /// The sync failed.
    fn sync_dir(&self) -> io::Result<()>;
}

/// One open log file.
pub trait WalFile: Send {
    /// Write all of `data` at `offset` (the file grows as needed).
    ///
    /// # Errors
    /// The write failed.
    fn write_at(&mut self, offset: u64, data: &[u8]) -> io::Result<()>;
    /// Make the file's data durable (`fdatasync`).
    ///
    /// # Errors
    /// The sync failed.
    fn sync_data(&mut self) -> io::Result<()>;
    /// A handle that syncs this file from another thread.
    ///
    /// # Errors
    /// The file cannot be shared.
    fn sync_handle(&self) -> io::Result<Arc<dyn WalSync>>;
}

/// Syncs one log file; shared with the thread that syncs in `sync` mode.
pub trait WalSync: Send + Sync {
    /// `fdatasync` the file.
    ///
    /// # Errors
    /// The sync failed.
    fn sync_data(&self) -> io::Result<()>;
}

/// The log in a real directory.
#[derive(Debug)]
pub struct DirFs {
    dir: PathBuf,
}

impl DirFs {
    /// Use (and create) `dir`.
    ///
    /// # Errors
    /// The directory cannot be created.
    pub fn new(dir: &Path) -> io::Result<Self> {
        std::fs::create_dir_all(dir)?;
        Ok(Self {
            dir: dir.to_path_buf(),
        })
    }
}

struct DirFile(std::fs::File);

impl WalFile for DirFile {
    fn write_at(&mut self, offset: u64, data: &[u8]) -> io::Result<()> {
        std::os::unix::fs::FileExt::write_all_at(&self.0, data, offset)
    }
    fn sync_data(&mut self) -> io::Result<()> {
        self.0.sync_data()
    }
    fn sync_handle(&self) -> io::Result<Arc<dyn WalSync>> {
        Ok(Arc::new(DirSync(self.0.try_clone()?)))
    }
}

struct DirSync(std::fs::File);

impl WalSync for DirSync {
    fn sync_data(&self) -> io::Result<()> {
        self.0.sync_data()
    }
}

impl WalFs for DirFs {
    fn list(&self) -> io::Result<Vec<String>> {
        let mut names = Vec::new();
        for entry in std::fs::read_dir(&self.dir)? {
            names.push(entry?.file_name().to_string_lossy().into_owned());
        }
        Ok(names)
    }
    fn create(&self, name: &str) -> io::Result<Box<dyn WalFile>> {
        let file = std::fs::OpenOptions::new()
            .create(true)
            .truncate(true)
            .write(true)
            .open(self.dir.join(name))?;
        Ok(Box::new(DirFile(file)))
    }
    fn open(&self, name: &str) -> io::Result<Box<dyn WalFile>> {
        let file = std::fs::OpenOptions::new()
            .write(true)
            .open(self.dir.join(name))?;
        Ok(Box::new(DirFile(file)))
    }
    fn read(&self, name: &str) -> io::Result<Vec<u8>> {
        std::fs::read(self.dir.join(name))
    }
    fn rename(&self, from: &str, to: &str) -> io::Result<()> {
        std::fs::rename(self.dir.join(from), self.dir.join(to))
    }
    fn remove(&self, name: &str) -> io::Result<()> {
        std::fs::remove_file(self.dir.join(name))
    }
    fn sync_dir(&self) -> io::Result<()> {
        std::fs::File::open(&self.dir)?.sync_all()
    }
}

/// The name of the segment whose first batch is `seq`.
#[must_use]
pub fn segment_name(seq: u64) -> String {
    format!("{seq:020}.log")
}

/// The first batch of a segment, from its name; `None` for other files.
pub fn segment_seq(name: &str) -> Option<u64> {
    let digits = name.strip_suffix(".log")?;
    (digits.len() == 20 && digits.bytes().all(|b| b.is_ascii_digit()))
        .then(|| digits.parse().ok())
        .flatten()
}

/// The segments in the log directory, in batch order, and whether a spare is present. A
/// half-written spare is deleted.
///
/// # Errors
/// The directory cannot be read or cleaned.
pub fn list_segments(fs: &dyn WalFs) -> io::Result<(Vec<String>, bool)> {
    let mut segments = Vec::new();
    let mut spare = false;
    for name in fs.list()? {
        if let Some(seq) = segment_seq(&name) {
            segments.push((seq, name));
        } else if name == SPARE {
            spare = true;
        } else if name == SPARE_TMP {
            fs.remove(&name)?;
        }
    }
    segments.sort();
    Ok((segments.into_iter().map(|(_, n)| n).collect(), spare))
}

/// Create `name` filled with `bytes` zeros, synced.
fn create_zeroed(fs: &dyn WalFs, name: &str, bytes: u64) -> io::Result<()> {
    let mut file = fs.create(name)?;
    let chunk = vec![0u8; 1 << 20];
    let mut offset = 0;
    while offset < bytes {
        let n = usize::try_from((bytes - offset).min(chunk.len() as u64)).unwrap_or(chunk.len());
        file.write_at(offset, &chunk[..n])?;
        offset += n as u64;
    }
    file.sync_data()
}

/// Write a zero-filled spare (through a temporary name, so a crash never leaves a partial one
/// under the spare's name).
///
/// # Errors
/// Storage failure.
pub fn make_spare(fs: &dyn WalFs, bytes: u64) -> io::Result<()> {
    create_zeroed(fs, SPARE_TMP, bytes)?;
    fs.rename(SPARE_TMP, SPARE)?;
    fs.sync_dir()
}

/// A record's bytes could not be understood although its checksum matched (a bug or a
/// deliberate edit): the startup stops.
#[derive(Debug, thiserror::Error)]
pub enum WalError {
    /// Storage failure.
    #[error("{0}")]
    Io(#[from] io::Error),
    /// A record is damaged in a way that loses acknowledged commits, or undecodable.
    #[error("write-ahead log {segment}: {reason}")]
    Corrupt {
        /// Segment file name.
        segment: String,
        /// What is wrong.
        reason: String,
    },
}

/// The counters a batch moves (besides its records).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Counters {
    /// New `fencing_next`.
    pub fencing_next: Option<u64>,
    /// New `event_seq_next`.
    pub event_seq_next: Option<u64>,
    /// New reserved ceiling of the fencing counter (async mode).
    pub fencing_ceiling: Option<u64>,
    /// New reserved ceiling of the event sequence (async mode).
    pub event_seq_ceiling: Option<u64>,
}

impl Counters {
    fn merge(&mut self, other: Counters) {
        let max = |a: Option<u64>, b: Option<u64>| match (a, b) {
            (Some(a), Some(b)) => Some(a.max(b)),
            (a, b) => a.or(b),
        };
        self.fencing_next = max(self.fencing_next, other.fencing_next);
        self.event_seq_next = max(self.event_seq_next, other.event_seq_next);
        self.fencing_ceiling = max(self.fencing_ceiling, other.fencing_ceiling);
        self.event_seq_ceiling = max(self.event_seq_ceiling, other.event_seq_ceiling);
    }
}

/// Records folded from a run of batches, last write winning, borrowing the segments' bytes.
/// Lease and idempotency records stay in their stored (postcard) encoding: they are decoded
/// and validated when redb is read, like every other record.
#[derive(Debug, Default)]
pub struct Folded<'a> {
    /// Counters (the highest value seen).
    pub counters: Counters,
    /// Lease id → record bytes, or `None` for a delete.
    pub leases: BTreeMap<u128, Option<&'a [u8]>>,
    /// Idempotency key → record bytes, or `None` for a delete.
    pub idempotency: BTreeMap<&'a str, Option<&'a [u8]>>,
    /// Lock-delay key → end, or `None` for a delete.
    pub lock_delays: BTreeMap<&'a str, Option<u64>>,
    /// The last batch folded in.
    pub last_seq: Option<u64>,
}

impl Folded<'_> {
    /// True if no batch was folded in.
    #[must_use]
    pub fn is_empty(&self) -> bool {
        self.last_seq.is_none()
    }
}

// ---- payload encoding ---------------------------------------------------------------------

fn put_u32(buf: &mut Vec<u8>, v: usize) -> Result<(), String> {
    let v = u32::try_from(v).map_err(|_| format!("length {v} does not fit a record"))?;
    buf.extend_from_slice(&v.to_le_bytes());
    Ok(())
}

fn put_str(buf: &mut Vec<u8>, s: &str) -> Result<(), String> {
    put_u32(buf, s.len())?;
    buf.extend_from_slice(s.as_bytes());
    Ok(())
}

/// Append `value` postcard-encoded, length-prefixed.
fn put_record<T: serde::Serialize>(buf: &mut Vec<u8>, value: &T) -> Result<(), String> {
    let at = buf.len();
    buf.extend_from_slice(&[0; 4]);
    let taken = std::mem::take(buf);
    *buf = postcard::to_extend(value, taken).map_err(|e| format!("encode: {e}"))?;
    let len = buf.len() - at - 4;
    let len = u32::try_from(len).map_err(|_| format!("record of {len} bytes"))?;
    buf[at..at + 4].copy_from_slice(&len.to_le_bytes());
    Ok(())
}

/// Encode one batch's payload.
fn encode_payload(
    changes: &ChangeSet,
    counters: Counters,
    buf: &mut Vec<u8>,
) -> Result<(), String> {
    let fields = [
        counters.fencing_next,
        counters.event_seq_next,
        counters.fencing_ceiling,
        counters.event_seq_ceiling,
    ];
    let mut present = 0u8;
    for (i, f) in fields.iter().enumerate() {
        if f.is_some() {
            present |= 1 << i;
        }
    }
    buf.push(present);
    for v in fields.into_iter().flatten() {
        buf.extend_from_slice(&v.to_le_bytes());
    }
    put_u32(buf, changes.leases.len())?;
    for (id, record) in &changes.leases {
        buf.extend_from_slice(&id.0.to_le_bytes());
        put_optional(buf, record.as_ref(), put_record)?;
    }
    put_u32(buf, changes.idempotency.len())?;
    for (key, record) in &changes.idempotency {
        put_str(buf, key)?;
        put_optional(buf, record.as_ref(), put_record)?;
    }
    put_u32(buf, changes.lock_delays.len())?;
    for (key, until) in &changes.lock_delays {
        put_str(buf, key)?;
        put_optional(buf, *until, |buf, until| {
            buf.extend_from_slice(&until.to_le_bytes());
            Ok(())
        })?;
    }
    Ok(())
}

/// A tag (1: present, 0: a delete), then the value if present.
fn put_optional<T>(
    buf: &mut Vec<u8>,
    value: Option<T>,
    put: impl FnOnce(&mut Vec<u8>, T) -> Result<(), String>,
) -> Result<(), String> {
    match value {
        Some(value) => {
            buf.push(1);
            put(buf, value)
        }
        None => {
            buf.push(0);
            Ok(())
        }
    }
}

/// A cursor over a payload; every read is bounds-checked.
struct Reader<'a> {
    bytes: &'a [u8],
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], String> {
        if self.bytes.len() < n {
            return Err("truncated payload".into());
        }
        let (head, rest) = self.bytes.split_at(n);
        self.bytes = rest;
        Ok(head)
    }
    fn u8(&mut self) -> Result<u8, String> {
        Ok(self.take(1)?[0])
    }
    fn u32(&mut self) -> Result<usize, String> {
        let b = self.take(4)?;
        Ok(u32::from_le_bytes([b[0], b[1], b[2], b[3]]) as usize)
    }
    fn u64(&mut self) -> Result<u64, String> {
        let mut a = [0u8; 8];
        a.copy_from_slice(self.take(8)?);
        Ok(u64::from_le_bytes(a))
    }
    fn u128(&mut self) -> Result<u128, String> {
        let mut a = [0u8; 16];
        a.copy_from_slice(self.take(16)?);
        Ok(u128::from_le_bytes(a))
    }
    fn bytes(&mut self) -> Result<&'a [u8], String> {
        let n = self.u32()?;
        self.take(n)
    }
    fn str(&mut self) -> Result<&'a str, String> {
        std::str::from_utf8(self.bytes()?).map_err(|_| "key is not UTF-8".to_string())
    }
    /// What [`put_optional`] wrote.
    fn optional<T>(
        &mut self,
        read: impl FnOnce(&mut Self) -> Result<T, String>,
    ) -> Result<Option<T>, String> {
        match self.u8()? {
            0 => Ok(None),
            1 => read(self).map(Some),
            t => Err(format!("bad tag {t}")),
        }
    }
}

/// Fold one payload into `folded`.
fn fold_payload<'a>(payload: &'a [u8], folded: &mut Folded<'a>) -> Result<(), String> {
    let mut r = Reader { bytes: payload };
    let present = r.u8()?;
    let mut fields = [None; 4];
    for (i, f) in fields.iter_mut().enumerate() {
        if present & (1 << i) != 0 {
            *f = Some(r.u64()?);
        }
    }
    folded.counters.merge(Counters {
        fencing_next: fields[0],
        event_seq_next: fields[1],
        fencing_ceiling: fields[2],
        event_seq_ceiling: fields[3],
    });
    for _ in 0..r.u32()? {
        let id = r.u128()?;
        let record = r.optional(Reader::bytes)?;
        folded.leases.insert(id, record);
    }
    for _ in 0..r.u32()? {
        let key = r.str()?;
        let record = r.optional(Reader::bytes)?;
        folded.idempotency.insert(key, record);
    }
    for _ in 0..r.u32()? {
        let key = r.str()?;
        let until = r.optional(Reader::u64)?;
        folded.lock_delays.insert(key, until);
    }
    if !r.bytes.is_empty() {
        return Err(format!(
            "{} unexpected bytes after the batch",
            r.bytes.len()
        ));
    }
    Ok(())
}

// ---- framing ------------------------------------------------------------------------------

fn round_up8(n: usize) -> usize {
    n.div_ceil(8) * 8
}

/// Frame a batch into `buf` (cleared first).
fn encode_record(
    seq: u64,
    durable: u64,
    changes: &ChangeSet,
    counters: Counters,
    buf: &mut Vec<u8>,
) -> Result<(), String> {
    buf.clear();
    buf.extend_from_slice(&[0; HEADER]);
    encode_payload(changes, counters, buf)?;
    seal(seq, durable, buf)
}

/// Fill in the header of `buf` (a header's room followed by the payload) and pad it.
fn seal(seq: u64, durable: u64, buf: &mut Vec<u8>) -> Result<(), String> {
    let len = buf.len() - HEADER;
    let len32 = u32::try_from(len).map_err(|_| format!("batch of {len} bytes"))?;
    buf[0..4].copy_from_slice(&len32.to_le_bytes());
    buf[8..16].copy_from_slice(&seq.to_le_bytes());
    buf[16..24].copy_from_slice(&durable.to_le_bytes());
    let mut crc = crc32fast::Hasher::new();
    crc.update(&buf[0..24]);
    crc.update(&buf[HEADER..]);
    buf[24..28].copy_from_slice(&crc.finalize().to_le_bytes());
    buf.resize(HEADER + round_up8(len), 0);
    Ok(())
}

/// A record around any payload (tests write records the encoder never would).
#[cfg(test)]
pub(crate) fn raw_record(seq: u64, durable: u64, payload: &[u8]) -> Vec<u8> {
    let mut buf = vec![0; HEADER];
    buf.extend_from_slice(payload);
    seal(seq, durable, &mut buf).expect("small payload");
    buf
}

/// One intact record.
struct Frame<'a> {
    seq: u64,
    /// The last batch known durable when this one was written.
    durable: u64,
    payload: &'a [u8],
    /// Offset just after the record (and its padding).
    end: usize,
}

/// The intact record at `offset`, if there is one.
fn frame_at(bytes: &[u8], offset: usize) -> Option<Frame<'_>> {
    let h = bytes.get(offset..offset.checked_add(HEADER)?)?;
    let word = |i: usize| u32::from_le_bytes([h[i], h[i + 1], h[i + 2], h[i + 3]]);
    let len = word(0) as usize;
    if len == 0 || word(4) != 0 || word(28) != 0 {
        return None;
    }
    let start = offset + HEADER;
    let payload = bytes.get(start..start.checked_add(len)?)?;
    let mut crc = crc32fast::Hasher::new();
    crc.update(&h[0..24]);
    crc.update(payload);
    if crc.finalize() != word(24) {
        return None;
    }
    let long = |i: usize| {
        let mut a = [0u8; 8];
        a.copy_from_slice(&h[i..i + 8]);
        u64::from_le_bytes(a)
    };
    Some(Frame {
        seq: long(8),
        durable: long(16),
        payload,
        end: start + round_up8(len),
    })
}

/// What recovery found at the end of the log.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct ReplayEnd {
    /// Batches read (applied or not).
    pub batches: u64,
    /// A damaged or half-written record after the last intact one was discarded: (segment,
    /// offset).
    pub discarded_tail: Option<(String, usize)>,
}

/// Fold every batch after `applied` from `segments` (name, bytes; in order), following the
/// chain of consecutive batches, and check that nothing acknowledged lies beyond its end.
///
/// # Errors
/// `Corrupt` if a batch is missing between redb and the log, if an intact record written after
/// a durable one follows the end of the chain, or if an intact record does not decode.
pub fn replay<'a>(
    segments: &'a [(String, Vec<u8>)],
    applied: u64,
    folded: &mut Folded<'a>,
) -> Result<ReplayEnd, WalError> {
    let corrupt = |segment: &str, reason: String| WalError::Corrupt {
        segment: segment.to_owned(),
        reason,
    };
    let mut end = ReplayEnd::default();
    let mut expected: Option<u64> = None;
    // Where the chain stopped: (segment index, offset).
    let mut stop = None;
    for (index, segment) in segments.iter().enumerate() {
        let chain_starts_here = expected.is_none();
        let walked = fold_closed(segment, applied, &mut expected, folded)?;
        if chain_starts_here
            && let Some(first) = walked.first
            && first > applied + 1
        {
            return Err(corrupt(
                &segment.0,
                format!(
                    "the log starts at batch {first} but the database holds batches only up to {applied}: batches are missing"
                ),
            ));
        }
        end.batches += walked.batches;
        // The end of this segment's records: the chain goes on only if the next segment
        // starts with the expected batch.
        let next_starts = segments.get(index + 1).is_some_and(|(_, next)| {
            frame_at(next, 0).is_some_and(|f| expected.is_none_or(|e| f.seq == e))
        });
        if !next_starts {
            stop = Some((index, walked.end));
            break;
        }
    }
    let Some((stop_index, stop_offset)) = stop else {
        return Ok(end);
    };
    // Beyond the end of the chain: an intact record written when the damaged batch was
    // already durable proves that a durable batch was lost.
    let expected = expected.unwrap_or(applied + 1);
    let mut damaged = false;
    for (index, (name, bytes)) in segments.iter().enumerate().skip(stop_index) {
        let mut offset = if index == stop_index { stop_offset } else { 0 };
        while offset + HEADER <= bytes.len() {
            if index == stop_index && offset == stop_offset {
                damaged |= bytes[offset..(offset + HEADER).min(bytes.len())]
                    .iter()
                    .any(|&b| b != 0);
            }
            if let Some(frame) = frame_at(bytes, offset)
                && frame.seq > expected
                && frame.durable >= expected
            {
                return Err(corrupt(
                    name,
                    format!(
                        "batch {expected} (segment {}, offset {stop_offset}) is damaged but the durable batch {} follows it at offset {offset}; refusing to drop acknowledged commits",
                        segments[stop_index].0, frame.seq
                    ),
                ));
            }
            offset += 8;
        }
    }
    if damaged {
        end.discarded_tail = Some((segments[stop_index].0.clone(), stop_offset));
    }
    Ok(end)
}

/// How far [`fold_closed`] got in a segment.
#[derive(Debug)]
pub struct Walked {
    /// The first batch of the run, if there was one.
    pub first: Option<u64>,
    /// Batches in the run (folded or skipped).
    pub batches: u64,
    /// Offset just after the run's last record.
    pub end: usize,
}

/// Fold the run of consecutive batches at the start of `segment` that continues the chain at
/// `expected` (any batch, if `None`; updated to the batch after the run), folding those after
/// `after`. Recovery walks every segment with it; the checkpointer the closed ones. A segment
/// left from before a restart may end in a discarded half-written batch; the chain continues
/// in the next segment.
///
/// # Errors
/// `Corrupt` if a record does not decode.
pub fn fold_closed<'a>(
    segment: &'a (String, Vec<u8>),
    after: u64,
    expected: &mut Option<u64>,
    folded: &mut Folded<'a>,
) -> Result<Walked, WalError> {
    let (name, bytes) = segment;
    let mut walked = Walked {
        first: None,
        batches: 0,
        end: 0,
    };
    while let Some(frame) = frame_at(bytes, walked.end) {
        if expected.is_some_and(|e| frame.seq != e) {
            break;
        }
        if frame.seq > after {
            fold_payload(frame.payload, folded).map_err(|reason| WalError::Corrupt {
                segment: name.clone(),
                reason: format!("batch {} at offset {}: {reason}", frame.seq, walked.end),
            })?;
            folded.last_seq = Some(frame.seq);
        }
        walked.first.get_or_insert(frame.seq);
        walked.batches += 1;
        *expected = Some(frame.seq + 1);
        walked.end = frame.end;
    }
    Ok(walked)
}

/// The appending side of the log, owned by the engine host.
pub struct WalWriter {
    fs: Arc<dyn WalFs>,
    file: Box<dyn WalFile>,
    /// Syncs `file` from the syncer thread.
    file_sync: Arc<dyn WalSync>,
    name: String,
    offset: u64,
    next_seq: u64,
    /// The last batch known to be on disk (advanced here and by the syncer thread).
    durable: Arc<AtomicU64>,
    segment_bytes: u64,
    buf: Vec<u8>,
}

impl std::fmt::Debug for WalWriter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WalWriter")
            .field("segment", &self.name)
            .field("offset", &self.offset)
            .field("next_seq", &self.next_seq)
            .finish_non_exhaustive()
    }
}

/// A segment the writer closed: it holds batches up to `last`.
#[derive(Debug)]
pub struct Closed {
    /// Segment file name.
    pub name: String,
    /// The last batch in it.
    pub last: u64,
}

impl WalWriter {
    /// Start a new segment for batch `next_seq`, from the spare if there is one (`spare`),
    /// else as an empty file that grows until a spare is ready.
    ///
    /// # Errors
    /// Storage failure.
    pub fn start(
        fs: Arc<dyn WalFs>,
        next_seq: u64,
        spare: bool,
        segment_bytes: u64,
    ) -> io::Result<Self> {
        let name = segment_name(next_seq);
        let file = if spare {
            fs.rename(SPARE, &name)?;
            fs.open(&name)?
        } else {
            fs.create(&name)?
        };
        fs.sync_dir()?;
        Ok(Self {
            fs,
            file_sync: file.sync_handle()?,
            file,
            name,
            offset: 0,
            next_seq,
            durable: Arc::new(AtomicU64::new(next_seq - 1)),
            segment_bytes,
            buf: Vec::new(),
        })
    }

    /// The last batch written.
    #[must_use]
    pub fn written(&self) -> u64 {
        self.next_seq - 1
    }

    /// The last batch known to be on disk; shared with whoever syncs on another thread.
    #[must_use]
    pub fn durable(&self) -> &Arc<AtomicU64> {
        &self.durable
    }

    /// Syncs the current segment from another thread.
    #[must_use]
    pub fn file_sync(&self) -> Arc<dyn WalSync> {
        Arc::clone(&self.file_sync)
    }

    /// Append one batch; with `sync_now` it is on disk when this returns. Returns its number.
    ///
    /// # Errors
    /// Storage failure (the caller must stop), or a batch that cannot be encoded.
    pub fn append(
        &mut self,
        changes: &ChangeSet,
        counters: Counters,
        sync_now: bool,
    ) -> Result<u64, WalError> {
        let seq = self.next_seq;
        let durable = self.durable.load(Ordering::Acquire);
        encode_record(seq, durable, changes, counters, &mut self.buf).map_err(|reason| {
            WalError::Corrupt {
                segment: self.name.clone(),
                reason,
            }
        })?;
        self.file.write_at(self.offset, &self.buf)?;
        self.offset += self.buf.len() as u64;
        self.next_seq += 1;
        if sync_now {
            self.sync()?;
        }
        // A large batch's buffer is not kept.
        if self.buf.capacity() > 1 << 20 {
            self.buf = Vec::new();
        }
        Ok(seq)
    }

    /// Sync what was written; false if there was nothing to sync.
    ///
    /// # Errors
    /// Storage failure.
    pub fn sync(&mut self) -> io::Result<bool> {
        let written = self.written();
        if self.durable.load(Ordering::Acquire) >= written {
            return Ok(false);
        }
        self.file.sync_data()?;
        self.durable.fetch_max(written, Ordering::AcqRel);
        Ok(true)
    }

    /// True once the current segment has reached its size.
    #[must_use]
    pub fn full(&self) -> bool {
        self.offset >= self.segment_bytes
    }

    /// Continue in the spare (which must exist): the current segment is synced and closed.
    ///
    /// # Errors
    /// Storage failure.
    pub fn rotate(&mut self) -> io::Result<Closed> {
        self.sync()?;
        let name = segment_name(self.next_seq);
        self.fs.rename(SPARE, &name)?;
        self.fs.sync_dir()?;
        let file = self.fs.open(&name)?;
        self.file_sync = file.sync_handle()?;
        self.file = file;
        self.offset = 0;
        Ok(Closed {
            name: std::mem::replace(&mut self.name, name),
            last: self.next_seq - 1,
        })
    }
}

#[cfg(test)]
mod tests {
    use holdfast_core::{HeldLockView, LeaseId, LeaseRecord, LockKind};

    use super::*;

    fn changes(id: u128, put: bool) -> ChangeSet {
        let mut cs = ChangeSet::default();
        let record = LeaseRecord {
            lease_id: LeaseId(id),
            holder: "h".into(),
            ttl_ms: 1,
            expires_at_ms: 2,
            created_at_ms: 3,
            reason: None,
            metadata: None,
            owner: None,
            locks: vec![HeldLockView {
                key: format!("k{id}"),
                kind: LockKind::Exclusive,
                fencing_token: 4,
                count: 1,
                acquired_at_ms: 3,
                lock_delay_ms: 0,
            }],
        };
        cs.leases.insert(LeaseId(id), put.then_some(record));
        cs.idempotency.insert(format!("i{id}"), None);
        cs.lock_delays.insert(format!("d{id}"), put.then_some(9));
        cs.fencing_next = Some(id as u64 + 5);
        cs
    }

    fn record(seq: u64, durable: u64, cs: &ChangeSet) -> Vec<u8> {
        let mut buf = Vec::new();
        let counters = Counters {
            fencing_next: cs.fencing_next,
            ..Counters::default()
        };
        encode_record(seq, durable, cs, counters, &mut buf).unwrap();
        buf
    }

    fn segment(records: &[Vec<u8>], size: usize) -> Vec<u8> {
        let mut bytes: Vec<u8> = records.concat();
        bytes.resize(size.max(bytes.len()), 0);
        bytes
    }

    #[test]
    fn a_batch_round_trips_through_a_record() {
        let cs = changes(7, true);
        let bytes = record(3, 2, &cs);
        assert_eq!(bytes.len() % 8, 0);
        let frame = frame_at(&bytes, 0).unwrap();
        assert_eq!((frame.seq, frame.durable, frame.end), (3, 2, bytes.len()));
        let mut folded = Folded::default();
        fold_payload(frame.payload, &mut folded).unwrap();
        let stored = postcard::to_stdvec(cs.leases[&LeaseId(7)].as_ref().unwrap()).unwrap();
        assert_eq!(folded.leases[&7], Some(stored.as_slice()));
        assert_eq!(folded.idempotency["i7"], None);
        assert_eq!(folded.lock_delays["d7"], Some(9));
        assert_eq!(folded.counters.fencing_next, Some(12));
        // Any flipped byte breaks the checksum.
        for i in 0..bytes.len() {
            let mut bad = bytes.clone();
            bad[i] ^= 0x40;
            if i < HEADER + frame.payload.len() {
                assert!(frame_at(&bad, 0).is_none(), "flip at {i} went unnoticed");
            }
        }
    }

    #[test]
    fn replay_follows_the_chain_across_segments_and_skips_applied_batches() {
        let a = segment(
            &[
                record(1, 0, &changes(1, true)),
                record(2, 1, &changes(2, true)),
            ],
            512,
        );
        let b = segment(&[record(3, 2, &changes(1, false))], 512);
        let segments = vec![(segment_name(1), a), (segment_name(3), b)];
        let mut folded = Folded::default();
        let end = replay(&segments, 1, &mut folded).unwrap();
        assert_eq!(
            end,
            ReplayEnd {
                batches: 3,
                discarded_tail: None
            }
        );
        assert_eq!(folded.last_seq, Some(3));
        assert_eq!(
            folded.leases.len(),
            2,
            "batch 1 was applied already; 2 and 3 fold"
        );
        assert_eq!(folded.leases[&1], None, "the later delete wins");
        assert!(folded.leases[&2].is_some());
    }

    #[test]
    fn a_torn_tail_is_discarded_but_a_damaged_durable_batch_stops_the_startup() {
        let r1 = record(1, 0, &changes(1, true));
        let r2 = record(2, 1, &changes(2, true));
        let r3 = record(3, 2, &changes(3, true));
        // The last write was cut in half: discarded.
        let mut torn = r2.clone();
        torn.truncate(r2.len() / 2);
        let seg = segment(&[r1.clone(), torn], 1024);
        let segments = vec![(segment_name(1), seg)];
        let mut folded = Folded::default();
        let end = replay(&segments, 0, &mut folded).unwrap();
        assert_eq!(folded.last_seq, Some(1));
        assert_eq!(end.discarded_tail, Some((segment_name(1), r1.len())));

        // Batch 2 damaged while batch 3, written after 2 was synced, is intact: refused.
        let mut bad = r2.clone();
        bad[HEADER + 2] ^= 1;
        let seg = segment(&[r1.clone(), bad.clone(), r3.clone()], 1024);
        let segments = vec![(segment_name(1), seg)];
        let err = replay(&segments, 0, &mut Folded::default()).unwrap_err();
        assert!(err.to_string().contains("durable batch 3"), "{err}");

        // The same when 3 was written before 2 was synced (async mode, or the syncer thread
        // behind): 3 is discarded with 2.
        let r3_async = record(3, 1, &changes(3, true));
        let seg = segment(&[r1.clone(), bad, r3_async], 1024);
        let segments = vec![(segment_name(1), seg)];
        let mut folded = Folded::default();
        replay(&segments, 0, &mut folded).unwrap();
        assert_eq!(folded.last_seq, Some(1));

        // A missing batch between the database and the log.
        let seg = segment(&[r3], 1024);
        let segments = vec![(segment_name(3), seg)];
        let err = replay(&segments, 1, &mut Folded::default()).unwrap_err();
        assert!(err.to_string().contains("missing"), "{err}");
    }

    #[test]
    fn a_witness_in_a_later_segment_also_counts() {
        let r1 = record(1, 0, &changes(1, true));
        let mut r2 = record(2, 1, &changes(2, true));
        r2[HEADER] ^= 1;
        let r3 = record(3, 2, &changes(3, true));
        let segments = vec![
            (segment_name(1), segment(&[r1, r2], 512)),
            (segment_name(3), segment(&[r3], 512)),
        ];
        let err = replay(&segments, 0, &mut Folded::default()).unwrap_err();
        assert!(err.to_string().contains("refusing"), "{err}");
    }

    #[test]
    fn segment_names_sort_in_batch_order() {
        assert_eq!(segment_seq(&segment_name(42)), Some(42));
        assert_eq!(segment_seq("spare.log"), None);
        assert_eq!(segment_seq("0042.log"), None);
        assert!(segment_name(9) < segment_name(10));
    }
}
