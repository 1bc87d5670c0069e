//! What the benchmarks read about a process from `/proc`.

use std::fs;

use anyhow::Context as _;

/// utime + stime of process `pid` (all its threads), seconds.
pub fn cpu_seconds(pid: u32) -> anyhow::Result<f64> {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat"))?;
    // Fields after `(comm)`: state is field 3, utime 14, stime 15.
    let rest = stat.rsplit_once(") ").context("malformed /proc/PID/stat")?.1;
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks: u64 = f.get(11).context("utime")?.parse::<u64>()? + f.get(12).context("stime")?.parse::<u64>()?;
    Ok(seconds(ticks))
}

/// Busy time of all the machine's CPUs so far, seconds: user, nice, system, irq and softirq from
/// `/proc/stat` (guest time is inside user; idle, iowait and steal are not the machine's work).
/// Whatever runs, in whichever process or softirq context the kernel charges it.
pub fn machine_busy_seconds() -> anyhow::Result<f64> {
    let stat = fs::read_to_string("/proc/stat")?;
    let cpu = stat.lines().next().filter(|l| l.starts_with("cpu ")).context("no cpu line in /proc/stat")?;
    let f: Vec<u64> = cpu.split_whitespace().skip(1).map(str::parse).collect::<Result<_, _>>()?;
    let [user, nice, system, _idle, _iowait, irq, softirq, ..] = f[..] else {
        anyhow::bail!("short cpu line in /proc/stat: {cpu}");
    };
    Ok(seconds(user + nice + system + irq + softirq))
}

/// Clock ticks (`USER_HZ`, the unit of `/proc`'s CPU times) as seconds.
fn seconds(ticks: u64) -> f64 {
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    ticks as f64 / hz as f64
}
