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
//! code mapped, against about 2 MiB of heap. [`release_code`] unmaps the read-only pages of the
//! executable and its libraries from the agent's page tables once start-up is done. They stay in the page
//! cache: code that runs later is mapped again on first use, at the cost of a minor fault, so the
//! resident set then holds the code the agent actually runs.
//!
//! Carrying traffic maps the data path's code again (tokio, h2, rustls, aws-lc and, by the same
//! 64 KiB fault-around, their neighbours: about 6 MiB). The trimmer releases it again once the
//! agent has gone quiet after a busy spell ([`Quiescence`]): an idle agent holds the code of its
//! housekeeping only, whatever it carried before. Unmapped pages stay in the page cache, clean and
//! reclaimable, as any file page the node does not use.

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

/// How long the agent stays below [`QUIET_CPU`] before the code a busy spell mapped is released.
pub const QUIET_FOR: Duration = Duration::from_secs(5);
/// The share of one CPU below which a [`TRIM_INTERVAL`] counts as quiet. An idle agent's own
/// housekeeping (policy polls, event drains, a scrape) stays far below it: `bench l4` measures
/// 0.07% with workloads on the node and the access log off.
pub const QUIET_CPU: f64 = 0.01;

/// Decides, from the agent's CPU time at each trimmer tick, when to release code again: once,
/// after a busy tick, when [`QUIET_FOR`] of quiet ticks followed it.
#[derive(Debug)]
pub struct Quiescence {
    last_cpu: Duration,
    busy_since_release: bool,
    quiet: Duration,
}

impl Quiescence {
    /// Start from `cpu`, the process's CPU time now, with code just released.
    pub fn new(cpu: Duration) -> Quiescence {
        Quiescence { last_cpu: cpu, busy_since_release: false, quiet: Duration::ZERO }
    }

    /// `elapsed` after the last tick the process's CPU time is `cpu`: whether to release now.
    pub fn tick(&mut self, cpu: Duration, elapsed: Duration) -> bool {
        let used = cpu.saturating_sub(self.last_cpu);
        self.last_cpu = cpu;
        if used.as_secs_f64() > QUIET_CPU * elapsed.as_secs_f64() {
            self.busy_since_release = true;
            self.quiet = Duration::ZERO;
            return false;
        }
        self.quiet += elapsed;
        if self.busy_since_release && self.quiet >= QUIET_FOR {
            self.busy_since_release = false;
            return true;
        }
        false
    }
}

/// This process's CPU time, user and system, all threads.
pub fn cpu_time() -> Duration {
    // SAFETY: rusage is plain data; zero is a valid value.
    let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: a valid output struct; RUSAGE_SELF cannot fail.
    unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut ru) };
    let tv = |t: libc::timeval| Duration::new(t.tv_sec as u64, t.tv_usec as u32 * 1000);
    tv(ru.ru_utime) + tv(ru.ru_stime)
}

/// Trim every [`TRIM_INTERVAL`], and release code ([`release_code`]) once the agent has gone quiet
/// after a busy spell, both on the blocking pool (a trim walks every arena under its lock, a
/// release reads `/proc/self/smaps`: a millisecond or so, but not on a worker thread).
pub fn spawn_trimmer() {
    tokio::spawn(async {
        let mut tick = tokio::time::interval(TRIM_INTERVAL);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut quiescence = Quiescence::new(cpu_time());
        let mut last = tokio::time::Instant::now();
        loop {
            tick.tick().await;
            let now = tokio::time::Instant::now();
            let release = quiescence.tick(cpu_time(), now - last);
            last = now;
            let _ = tokio::task::spawn_blocking(move || {
                trim();
                if release {
                    match release_code() {
                        Ok(bytes) => tracing::debug!(bytes, "quiet: code released from the resident set"),
                        Err(e) => tracing::debug!("code stays resident: {e}"),
                    }
                }
            })
            .await;
        }
    });
}

/// Unmaps this process's read-only, never-written mappings of its executable and its shared
/// libraries (text and read-only data; not the relocated RELRO pages, nor `.data`, nor shared
/// mappings such as a BPF ring buffer's): `MADV_DONTNEED` on a private file
/// mapping without private copies drops the page-table entries only, and the next access maps the
/// same bytes again from the page cache. Returns the bytes that were resident.
pub fn release_code() -> std::io::Result<u64> {
    let smaps = std::fs::read_to_string("/proc/self/smaps")?;
    let mut released = 0;
    for m in mappings(&smaps).iter().filter(|m| m.releasable()) {
        // SAFETY: the range is one whole private mapping of a file (the executable or a shared
        // library) that is read-only and holds no privately modified page (`releasable`), so
        // dropping its pages changes no byte any thread reads: they are mapped again from the
        // file on the next access.
        let rc = unsafe { libc::madvise(m.start as *mut libc::c_void, m.end - m.start, libc::MADV_DONTNEED) };
        if rc != 0 {
            return Err(std::io::Error::last_os_error());
        }
        released += m.rss_kib * 1024;
    }
    Ok(released)
}

/// One mapping of `/proc/self/smaps`, with the fields [`release_code`] reads.
#[derive(Debug, PartialEq, Eq)]
struct Mapping<'a> {
    start: usize,
    end: usize,
    perms: &'a str,
    path: &'a str,
    rss_kib: u64,
    anonymous_kib: u64,
}

impl Mapping<'_> {
    /// Resident, private, read-only, file-backed, and without a private copy of any page.
    fn releasable(&self) -> bool {
        let read_only = self.perms.starts_with("r-") && self.perms.ends_with('p');
        read_only && self.path.starts_with('/') && self.anonymous_kib == 0 && self.rss_kib != 0
    }
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
7f1000000000-7f1000180000 r-xp 00028000 fe:00 99 /usr/lib/x86_64-linux-gnu/libc.so.6
Rss:                1048 kB
Anonymous:             0 kB
7f2000000000-7f2000200000 r--s 00000000 00:0f 77 anon_inode:bpf-map
Rss:                2052 kB
Anonymous:             0 kB
7ffd00000000-7ffd00002000 r-xp 00000000 00:00 0 [vdso]
Rss:                   8 kB
Anonymous:             0 kB
";

    #[test]
    fn smaps_parse_names_each_mapping_with_its_resident_and_private_pages() {
        let m = mappings(SMAPS);
        assert_eq!(m.len(), 7);
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
        assert_eq!((m[5].path, m[5].perms), ("anon_inode:bpf-map", "r--s"));
        assert_eq!(m[6].path, "[vdso]");
    }

    #[test]
    fn only_clean_read_only_file_mappings_are_released() {
        let releasable: Vec<&str> = mappings(SMAPS).iter().filter(|m| m.releasable()).map(|m| m.perms).collect();
        // The executable's read-only data and text, and libc's text; not the RELRO copy, the
        // heap, a BPF ring buffer (shared) or the vDSO.
        assert_eq!(releasable, ["r--p", "r-xp", "r-xp"]);
        let paths: Vec<&str> = mappings(SMAPS).iter().filter(|m| m.releasable()).map(|m| m.path).collect();
        assert_eq!(paths, ["/usr/bin/warden", "/usr/bin/warden", "/usr/lib/x86_64-linux-gnu/libc.so.6"]);
    }

    #[test]
    fn code_is_released_once_per_busy_spell_after_enough_quiet() {
        let tick = TRIM_INTERVAL;
        let quiet_ticks = QUIET_FOR.as_secs_f64() / tick.as_secs_f64();
        let busy = Duration::from_secs_f64(tick.as_secs_f64() * QUIET_CPU * 2.0);
        let idle = Duration::from_secs_f64(tick.as_secs_f64() * QUIET_CPU / 2.0);
        let mut cpu = Duration::from_secs(3);
        let mut q = Quiescence::new(cpu);
        // Quiet from the start (code just released): nothing to release, however long.
        for _ in 0..(3.0 * quiet_ticks) as usize {
            cpu += idle;
            assert!(!q.tick(cpu, tick));
        }
        // A busy spell, then quiet: released exactly when QUIET_FOR of quiet has passed, once.
        for _ in 0..3 {
            cpu += busy;
            assert!(!q.tick(cpu, tick), "never while busy");
        }
        let released: Vec<bool> = (0..(3.0 * quiet_ticks) as usize)
            .map(|_| {
                cpu += idle;
                q.tick(cpu, tick)
            })
            .collect();
        assert_eq!(released.iter().filter(|r| **r).count(), 1, "{released:?}");
        assert_eq!(released.iter().position(|r| *r), Some(quiet_ticks as usize - 1), "{released:?}");
        // Busy again in the middle of the quiet count: it starts over.
        cpu += busy;
        assert!(!q.tick(cpu, tick));
        for _ in 0..(quiet_ticks as usize - 2) {
            cpu += idle;
            assert!(!q.tick(cpu, tick));
        }
        cpu += busy;
        assert!(!q.tick(cpu, tick), "busy again before QUIET_FOR");
        for _ in 0..(quiet_ticks as usize - 1) {
            cpu += idle;
            assert!(!q.tick(cpu, tick));
        }
        cpu += idle;
        assert!(q.tick(cpu, tick), "QUIET_FOR after the last busy tick");
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
        let released = release_code().expect("madvise");
        assert!(released > 0, "the test binary's code was resident");
        let after = rss();
        assert!(after < before, "RssFile {before} -> {after}");
        // Code and read-only data are mapped again on use: this very test keeps running, and a
        // string constant still reads the same.
        assert_eq!(mappings(SMAPS).len(), 7);
    }
}
