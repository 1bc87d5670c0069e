//! One agent per pin directory. The agent holds an exclusive `flock` on the pin directory itself
//! for its whole life, so a second agent started with the same pins (by hand on a node the
//! DaemonSet runs on, or a second DaemonSet) stops before it touches a map, and `warden cleanup`
//! refuses to take the pins and the routing from under a running agent, which would put the
//! routing back within seconds. The kernel drops the lock when the agent exits, however it exits:
//! there is no stale lock to clear.

use std::{
    fs::File,
    io,
    os::{
        fd::AsRawFd as _,
        unix::fs::{MetadataExt as _, OpenOptionsExt as _},
    },
    path::{Path, PathBuf},
};

/// The lock on a pin directory, held until dropped.
#[derive(Debug)]
pub struct PinLock {
    _dir: File,
}

#[derive(Debug, thiserror::Error)]
pub enum LockError {
    #[error("a warden agent{} holds {path}", holder.map(|p| format!(" (pid {p})")).unwrap_or_default())]
    Held { path: PathBuf, holder: Option<u32> },
    #[error("locking {path}: {source}")]
    Io { path: PathBuf, source: io::Error },
}

impl PinLock {
    /// [`PinLock::acquire`] when `pin_dir` exists; `None` when it does not (nothing to protect
    /// yet).
    pub fn acquire_existing(pin_dir: &Path) -> Result<Option<PinLock>, LockError> {
        match PinLock::acquire(pin_dir) {
            Ok(lock) => Ok(Some(lock)),
            Err(LockError::Io { source, .. }) if source.kind() == io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// Lock `pin_dir`, which must exist. Never waits: a held lock is an error naming its holder.
    pub fn acquire(pin_dir: &Path) -> Result<PinLock, LockError> {
        let io = |source| LockError::Io { path: pin_dir.into(), source };
        let dir = File::options().read(true).custom_flags(libc::O_DIRECTORY).open(pin_dir).map_err(io)?;
        // SAFETY: flock on a descriptor this function owns.
        if unsafe { libc::flock(dir.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
            let e = io::Error::last_os_error();
            if e.raw_os_error() != Some(libc::EWOULDBLOCK) {
                return Err(io(e));
            }
            let holder = dir.metadata().ok().and_then(|m| {
                let locks = std::fs::read_to_string("/proc/locks").ok()?;
                flock_holder(&locks, m.dev(), m.ino())
            });
            return Err(LockError::Held { path: pin_dir.into(), holder });
        }
        Ok(PinLock { _dir: dir })
    }
}

/// The pid holding a `flock` on the file (`dev`, `ino`), from `/proc/locks`:
/// `1: FLOCK  ADVISORY  WRITE 1234 00:2a:5678 0 EOF`, the device as `major:minor` in hex.
fn flock_holder(locks: &str, dev: u64, ino: u64) -> Option<u32> {
    let file = format!("{:02x}:{:02x}:{ino}", libc::major(dev), libc::minor(dev));
    locks.lines().find_map(|line| {
        let f: Vec<&str> = line.split_whitespace().collect();
        // A lock someone waits for is listed as `1: -> FLOCK ...`; only the holder counts.
        (f.get(1) == Some(&"FLOCK") && f.get(5) == Some(&file.as_str())).then(|| f[4].parse().ok()).flatten()
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_holder_of_a_flock_is_read_from_proc_locks() {
        let locks = "1: POSIX  ADVISORY  WRITE 99 00:2a:5678 0 EOF\n\
                     2: FLOCK  ADVISORY  WRITE 1234 00:2a:5678 0 EOF\n\
                     2: -> FLOCK  ADVISORY  WRITE 777 00:2a:5678 0 EOF\n\
                     3: FLOCK  ADVISORY  WRITE 55 00:2a:9999 0 EOF\n";
        let dev = libc::makedev(0, 0x2a);
        assert_eq!(flock_holder(locks, dev, 5678), Some(1234));
        assert_eq!(flock_holder(locks, dev, 1), None);
    }

    #[test]
    fn a_second_lock_on_a_directory_is_refused_with_its_holder_and_freed_on_drop() {
        let dir = std::env::temp_dir().join(format!("warden-pinlock-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let first = PinLock::acquire(&dir).unwrap();
        // flock locks belong to the open file: a second open in the same process conflicts too.
        match PinLock::acquire(&dir) {
            Err(LockError::Held { holder, .. }) => assert_eq!(holder, Some(std::process::id())),
            other => panic!("{other:?}"),
        }
        drop(first);
        PinLock::acquire(&dir).unwrap();
        std::fs::remove_dir(&dir).unwrap();
    }
}
