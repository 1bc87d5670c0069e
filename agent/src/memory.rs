//! The agent's heap: a node agent should hold what it uses, not what it once used.
//!
//! glibc's allocator keeps freed memory for reuse: one arena per thread that ever allocated (up to
//! eight per core), and freed chunks inside each until they reach the top of the heap. An agent
//! that relayed a burst of connections would keep their buffers' worth of resident memory for
//! its whole life. Two settings bound that: a single arena, and a periodic `malloc_trim`, which
//! hands the arena's free pages back to the kernel (`MADV_DONTNEED`, and the top of the heap with
//! `brk`), so resident memory follows the live load.
//!
//! One arena, not one per worker thread: `malloc_trim` releases the free top of the main arena
//! only, and the top of a second arena stays resident until a `free` finds it larger than
//! glibc's trim threshold, which grows (up to 64 MiB) with every large buffer freed. Measured in
//! the bench lab after a cross-node transfer: 4.7 MiB resident in the second arena, 85 KiB of it
//! in use; with one arena, 1.9 MiB in all. Small allocations stay per thread (glibc's tcache);
//! only the relay's chunk buffers take the arena lock.
//!
//! The executable is the other half. Start-up runs code that never runs again (argument parsing,
//! loading and verifying the eBPF object, compiling policy, issuing certificates), and the kernel
//! maps 64 KiB around every page it faults in: a started agent has some 12 MiB of its 17 MiB of
//! code mapped, against about 2 MiB of heap. [`release_startup_code`] unmaps the executable's
//! read-only pages from the agent's page tables once start-up is done. They stay in the page
//! cache: code that runs later is mapped again on first use, at the cost of a minor fault, so the
//! resident set then holds the code the agent actually runs.

use std::time::Duration;

/// How often free heap pages are returned.
pub const TRIM_INTERVAL: Duration = Duration::from_secs(1);

/// One malloc arena for every thread. Call first in `main`, before any thread starts.
pub fn single_arena() {
    // SAFETY: mallopt only sets an allocator parameter; called before other threads exist.
    unsafe { libc::mallopt(libc::M_ARENA_MAX, 1) };
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

/// Unmaps this process's read-only, never-written mappings of its own executable (text and
/// read-only data; not the relocated RELRO pages, nor `.data`): `MADV_DONTNEED` on a private file
/// mapping without private copies drops the page-table entries only, and the next access maps the
/// same bytes again from the page cache. Returns the bytes that were resident.
pub fn release_startup_code() -> std::io::Result<u64> {
    let exe = std::fs::read_link("/proc/self/exe")?;
    let smaps = std::fs::read_to_string("/proc/self/smaps")?;
    let mut released = 0;
    for m in mappings(&smaps) {
        let read_only = m.perms.starts_with("r-") && m.perms.ends_with('p');
        if !read_only || m.anonymous_kib != 0 || m.rss_kib == 0 || std::path::Path::new(m.path) != exe {
            continue;
        }
        // SAFETY: the range is one whole mapping of this process's executable that is read-only
        // and holds no privately modified page (checked above), so dropping its pages changes no
        // byte any thread reads: they are mapped again from the file on the next access.
        let rc = unsafe { libc::madvise(m.start as *mut libc::c_void, m.end - m.start, libc::MADV_DONTNEED) };
        if rc != 0 {
            return Err(std::io::Error::last_os_error());
        }
        released += m.rss_kib * 1024;
    }
    Ok(released)
}

/// One mapping of `/proc/self/smaps`, with the fields [`release_startup_code`] reads.
#[derive(Debug, PartialEq, Eq)]
struct Mapping<'a> {
    start: usize,
    end: usize,
    perms: &'a str,
    path: &'a str,
    rss_kib: u64,
    anonymous_kib: u64,
}

fn mappings(smaps: &str) -> Vec<Mapping<'_>> {
    let mut out: Vec<Mapping<'_>> = Vec::new();
    for line in smaps.lines() {
        let mut fields = line.split_whitespace();
        let Some(first) = fields.next() else { continue };
        if let Some((start, end)) = first.split_once('-').filter(|_| !first.ends_with(':')) {
            let (Ok(start), Ok(end)) = (usize::from_str_radix(start, 16), usize::from_str_radix(end, 16)) else {
                continue;
            };
            let perms = fields.next().unwrap_or("");
            // offset, device, inode, then the path (absent for anonymous mappings).
            let path = fields.nth(3).unwrap_or("");
            out.push(Mapping { start, end, perms, path, rss_kib: 0, anonymous_kib: 0 });
        } else if let Some(m) = out.last_mut() {
            let kib = fields.next().and_then(|v| v.parse().ok()).unwrap_or(0);
            match first {
                "Rss:" => m.rss_kib = kib,
                "Anonymous:" => m.anonymous_kib = kib,
                _ => {}
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    const SMAPS: &str = "\
55fdc6497000-55fdc6aa4000 r--p 00000000 fe:00 1234 /usr/bin/warden
Size:               6196 kB
Rss:                1024 kB
Anonymous:             0 kB
55fdc6aa4000-55fdc7b12000 r-xp 0060c000 fe:00 1234 /usr/bin/warden
Rss:               11000 kB
Anonymous:             0 kB
55fdc7b12000-55fdc7bc9000 r--p 01679000 fe:00 1234 /usr/bin/warden
Rss:                 732 kB
Anonymous:           732 kB
7f0000000000-7f0000021000 rw-p 00000000 00:00 0
Rss:                 132 kB
Anonymous:           132 kB
";

    #[test]
    fn smaps_parse_names_each_mapping_with_its_resident_and_private_pages() {
        let m = mappings(SMAPS);
        assert_eq!(m.len(), 4);
        assert_eq!(
            m[1],
            Mapping {
                start: 0x55fdc6aa4000,
                end: 0x55fdc7b12000,
                perms: "r-xp",
                path: "/usr/bin/warden",
                rss_kib: 11000,
                anonymous_kib: 0
            }
        );
        // RELRO: read-only now, but relocated (private copies): never released.
        assert_eq!((m[2].perms, m[2].anonymous_kib), ("r--p", 732));
        assert_eq!(m[3].path, "");
    }

    #[test]
    fn released_code_runs_again_and_the_resident_set_shrinks() {
        // The other tests of this binary run on other threads meanwhile and fault code in (on a
        // cold first run, more than is released): measure in a process of its own, running only
        // this test.
        const ALONE: &str = "WARDEN_MEMORY_TEST_ALONE";
        if std::env::var_os(ALONE).is_none() {
            let name = "memory::tests::released_code_runs_again_and_the_resident_set_shrinks";
            let out = std::process::Command::new(std::env::current_exe().unwrap())
                .args(["--exact", name, "--test-threads=1"])
                .env(ALONE, "1")
                .output()
                .unwrap();
            let text = String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
            assert!(out.status.success() && text.contains("1 passed"), "{text}");
            return;
        }
        let rss = || -> u64 {
            let status = std::fs::read_to_string("/proc/self/status").unwrap();
            let line = status.lines().find(|l| l.starts_with("RssFile:")).unwrap();
            line.split_whitespace().nth(1).unwrap().parse().unwrap()
        };
        let before = rss();
        let released = release_startup_code().expect("madvise");
        assert!(released > 0, "the test binary's code was resident");
        let after = rss();
        assert!(after < before, "RssFile {before} -> {after}");
        // Code and read-only data are mapped again on use: this very test keeps running, and a
        // string constant still reads the same.
        assert_eq!(mappings(SMAPS).len(), 4);
    }
}
