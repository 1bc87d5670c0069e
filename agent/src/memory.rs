//! The agent's heap: a node agent should hold what it uses, not what it once used.
//!
//! glibc's allocator keeps freed memory for reuse: one arena per thread that ever allocated (up to
//! eight per core), and freed chunks inside each until they reach the top of the heap. An agent
//! that relayed a burst of connections would keep their buffers' worth of resident memory for
//! its whole life. Two settings bound that: at most [`ARENAS`] arenas (the runtime has two worker
//! threads), and a periodic `malloc_trim`, which hands free pages of every arena back to the
//! kernel (`MADV_DONTNEED`), so resident memory follows the live load.

use std::time::Duration;

/// Arenas: one per runtime worker thread.
const ARENAS: libc::c_int = 2;
/// How often free heap pages are returned.
pub const TRIM_INTERVAL: Duration = Duration::from_secs(5);

/// Call first in `main`, before any thread starts.
pub fn limit_arenas() {
    // SAFETY: mallopt only sets an allocator parameter; called before other threads exist.
    unsafe { libc::mallopt(libc::M_ARENA_MAX, ARENAS) };
}

/// Return free heap pages to the kernel now.
pub fn trim() {
    // SAFETY: no arguments beyond the padding to keep; safe to call at any time.
    unsafe { libc::malloc_trim(0) };
}

/// Trim every [`TRIM_INTERVAL`] on the blocking pool (a trim walks every arena under its lock:
/// a millisecond at most, but not on a worker thread).
pub fn spawn_trimmer() {
    tokio::spawn(async {
        let mut tick = tokio::time::interval(TRIM_INTERVAL);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            let _ = tokio::task::spawn_blocking(trim).await;
        }
    });
}
