//! The checkpoint thread gives free memory back after each job (`holdfast_server::memory`).
//! Its own test binary: the release hook is process-wide, and other tests' stores would call it
//! too.

use std::sync::atomic::{AtomicUsize, Ordering};

use holdfast_core::{ChangeSet, HeldLockView, LeaseId, LeaseRecord, LockKind};
use holdfast_server::Durability;
use holdfast_server::store::Store;

static RELEASES: AtomicUsize = AtomicUsize::new(0);

fn lease(id: u128) -> LeaseRecord {
    LeaseRecord {
        lease_id: LeaseId(id),
        holder: "h".into(),
        ttl_ms: 30_000,
        expires_at_ms: 1_000_000,
        created_at_ms: 1,
        reason: None,
        metadata: None,
        owner: None,
        locks: vec![HeldLockView {
            key: format!("key/{id}"),
            kind: LockKind::Exclusive,
            fencing_token: 7,
            count: 1,
            acquired_at_ms: 1,
            lock_delay_ms: 0,
        }],
    }
}

#[test]
fn every_checkpoint_job_gives_free_memory_back() {
    holdfast_server::memory::set_release_hook(|| {
        RELEASES.fetch_add(1, Ordering::SeqCst);
    });
    let dir = tempfile::tempdir().unwrap();
    let mut store = Store::open(dir.path(), Durability::Async).unwrap();
    store.load().unwrap();
    assert_eq!(RELEASES.load(Ordering::SeqCst), 0, "no job ran yet");
    // The first commit starts a job (it writes the spare segment); more than a segment of
    // records later, the full segment is closed and a second job folds it into redb.
    let mut id = 0u128;
    while RELEASES.load(Ordering::SeqCst) < 2 {
        assert!(id < 400_000, "no second checkpoint after {id} leases");
        let mut cs = ChangeSet::default();
        for _ in 0..1_000 {
            id += 1;
            cs.leases.insert(LeaseId(id), Some(lease(id)));
        }
        store.apply(&cs).unwrap();
        std::thread::sleep(std::time::Duration::from_millis(2));
    }
    drop(store);
    // The folded segment is in redb: everything comes back.
    let mut store = Store::open(dir.path(), Durability::Async).unwrap();
    assert_eq!(
        store.load().unwrap().leases.len(),
        usize::try_from(id).unwrap()
    );
}
