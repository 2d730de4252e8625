//! Giving freed memory back to the operating system after bursts of temporary allocation.
//!
//! A checkpoint reads a 4 MiB log segment, folds it into maps and writes it into redb; a
//! restart reads every segment and rebuilds the engine. Both free what they allocated, but the
//! allocator may keep the pages (mimalloc keeps them in the freeing thread's heap until that
//! heap is collected), and a server holding 100,000 locks in `sync` mode then stayed 2–4 MB
//! larger than it needs to be. The allocator is the binary's choice, so the binary registers
//! how to return its free memory ([`set_release_hook`]); the server calls it after each of
//! those bursts ([`release_free_memory`]). Without a hook (tests, embedders) nothing happens.

use std::sync::OnceLock;

static RELEASE_HOOK: OnceLock<fn()> = OnceLock::new();

/// Register how the process's allocator returns free memory to the OS (once; later calls are
/// ignored). The hook runs on the checkpoint thread after every checkpoint and once after a
/// restart's recovery; it must be safe to call from any thread at any time.
pub fn set_release_hook(hook: fn()) {
    let _ = RELEASE_HOOK.set(hook);
}

/// Return free memory to the OS, if the binary said how.
pub fn release_free_memory() {
    if let Some(hook) = RELEASE_HOOK.get() {
        hook();
    }
}
