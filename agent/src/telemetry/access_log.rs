//! Access logs: one line per event of the kernel's ring buffer (`warden_events_v1`): every newly
//! decided flow (allowed and denied, TC and `connect()`), and every TCP close. Written to
//! stdout by a dedicated thread, one line per event, as `key=value` text or as JSON
//! (`--access-log text|json|off`), apart from the agent's own logs on stderr.
//!
//! Fields: `time`, `event` (`open` | `deny` | `close`), `verdict`, `reason`, `policy`,
//! `direction` (of the flow, relative to the reporting workload), `reporter`, `hook`, `proto`,
//! `src`/`dst` (address:port, initiator first), and `src_workload`, `src_namespace`,
//! `src_principal`, `dst_workload`, `dst_namespace`, `dst_principal` named as in the metrics.

use std::{
    io::Write as _,
    net::Ipv4Addr,
    path::Path,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use aya::maps::{Map, MapData, RingBuf};
use serde::Serialize;
use warden_common::{
    Direction, DropReason, EVENT_CLOSED, FlowEvent, HOOK_CONNECT, HOOK_TUNNEL, PROTO_ICMP, PROTO_TCP, PROTO_UDP,
    Verdict, names,
};

use super::names::{Names, RecordNames};

/// `--access-log`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum AccessLogFormat {
    /// `key=value` pairs, one event per line.
    #[default]
    Text,
    /// One JSON object per line.
    Json,
    /// No access log (the ring buffer is not read).
    Off,
}

#[derive(Debug, thiserror::Error)]
pub enum AccessLogError {
    #[error("cannot open the event ring buffer {path}: {source}")]
    Open { path: String, source: aya::maps::MapError },
    #[error("pinned map {path} is not a ring buffer: {source}")]
    Layout { path: String, source: aya::maps::MapError },
}

/// One access-log line.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Entry {
    pub time: String,
    pub event: &'static str,
    pub verdict: &'static str,
    pub reason: &'static str,
    pub policy: String,
    pub direction: &'static str,
    pub reporter: &'static str,
    pub hook: &'static str,
    pub proto: String,
    pub src: String,
    pub dst: String,
    pub src_workload: String,
    pub src_namespace: String,
    pub src_principal: String,
    pub dst_workload: String,
    pub dst_namespace: String,
    pub dst_principal: String,
}

fn proto_name(p: u8) -> String {
    match p {
        PROTO_TCP => "tcp".into(),
        PROTO_UDP => "udp".into(),
        PROTO_ICMP => "icmp".into(),
        p => p.to_string(),
    }
}

/// RFC 3339, UTC, milliseconds.
pub fn rfc3339(t: SystemTime) -> String {
    let d = t.duration_since(UNIX_EPOCH).unwrap_or_default();
    let secs = d.as_secs();
    let (days, rem) = ((secs / 86_400) as i64, secs % 86_400);
    // Civil date from days since 1970-01-01 (Howard Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}.{:03}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60,
        d.subsec_millis()
    )
}

/// Wall-clock time of a boot-clock timestamp (the kernel stamps events with it).
fn wall_time(ktime_ns: u64) -> SystemTime {
    // SAFETY: clock_gettime writes only into `ts`.
    let mut ts: libc::timespec = unsafe { std::mem::zeroed() };
    let now_boot = if unsafe { libc::clock_gettime(libc::CLOCK_BOOTTIME, &mut ts) } == 0 {
        ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
    } else {
        ktime_ns
    };
    SystemTime::now() - Duration::from_nanos(now_boot.saturating_sub(ktime_ns))
}

/// The access-log entry of an event.
pub fn entry(e: &FlowEvent, names: &Names, time: SystemTime) -> Entry {
    let direction = Direction::from_u8(e.direction).unwrap_or(Direction::Ingress);
    let local = names.local(e.endpoint_id);
    let remote = names.remote(e.remote_identity);
    let allowed = e.verdict == Verdict::Allow as u8;
    let (reporter, src, dst) = match direction {
        Direction::Ingress => ("destination", remote, local),
        Direction::Egress => ("source", local, remote),
    };
    // Initiator first. A close may be seen on a reply packet: swap it back, knowing the local
    // workload's address (the destination of an ingress flow, the source of an egress flow).
    let (mut sa, mut sp, mut da, mut dp) = (Ipv4Addr::from(e.saddr), e.sport, Ipv4Addr::from(e.daddr), e.dport);
    if let Some(ip) = names.local_ip(e.endpoint_id) {
        let reversed = match direction {
            Direction::Ingress => sa == ip && da != ip,
            Direction::Egress => da == ip && sa != ip,
        };
        if reversed {
            (sa, sp, da, dp) = (da, dp, sa, sp);
        }
    }
    Entry {
        time: rfc3339(time),
        event: if e.kind == EVENT_CLOSED {
            "close"
        } else if allowed {
            "open"
        } else {
            "deny"
        },
        verdict: if allowed { Verdict::Allow.name() } else { Verdict::Deny.name() },
        reason: DropReason::from_u8(e.reason).map_or("unknown", DropReason::name),
        policy: if allowed && e.policy_id == warden_common::POLICY_ID_NONE {
            "-".into()
        } else {
            names.policy(e.policy_id)
        },
        direction: direction.name(),
        reporter,
        hook: match e.hook {
            HOOK_CONNECT => "connect",
            HOOK_TUNNEL => "tunnel",
            _ => "tc",
        },
        proto: proto_name(e.proto),
        src: format!("{sa}:{sp}"),
        dst: format!("{da}:{dp}"),
        src_workload: src.workload,
        src_namespace: src.namespace,
        src_principal: src.principal,
        dst_workload: dst.workload,
        dst_namespace: dst.namespace,
        dst_principal: dst.principal,
    }
}

/// `key=value` rendering. Values never contain spaces (names, addresses, principals).
pub fn render_text(e: &Entry) -> String {
    format!(
        "time={} event={} verdict={} reason={} policy={} direction={} reporter={} hook={} proto={} src={} dst={} src_workload={} src_namespace={} src_principal={} dst_workload={} dst_namespace={} dst_principal={}",
        e.time,
        e.event,
        e.verdict,
        e.reason,
        e.policy,
        e.direction,
        e.reporter,
        e.hook,
        e.proto,
        e.src,
        e.dst,
        e.src_workload,
        e.src_namespace,
        e.src_principal,
        e.dst_workload,
        e.dst_namespace,
        e.dst_principal
    )
}

pub fn render(e: &Entry, format: AccessLogFormat) -> Option<String> {
    match format {
        AccessLogFormat::Text => Some(render_text(e)),
        AccessLogFormat::Json => Some(serde_json::to_string(e).expect("entry serializes")),
        AccessLogFormat::Off => None,
    }
}

/// Open the pinned event ring buffer.
pub fn open(pin_dir: &Path) -> Result<RingBuf<MapData>, AccessLogError> {
    let path = pin_dir.join(names::EVENTS);
    let shown = path.display().to_string();
    let data = MapData::from_pin(&path).map_err(|source| AccessLogError::Open { path: shown.clone(), source })?;
    let map = Map::from_map_data(data).map_err(|source| AccessLogError::Layout { path: shown.clone(), source })?;
    RingBuf::try_from(map).map_err(|source| AccessLogError::Layout { path: shown, source })
}

/// How often the reader drains the ring buffer. The kernel writes events without waking a
/// reader (`BPF_RB_NO_WAKEUP`): a wakeup per event cost each new flow microseconds in the
/// datapath under connection churn (`cargo xtask bench l4`). 1 MiB of ring holds ~21k events,
/// far more than accumulate between drains.
const DRAIN_INTERVAL: Duration = Duration::from_millis(50);

/// Copy events from the ring buffer to stdout on a dedicated thread (writes to stdout may
/// block on a slow log pipe; that must never stall the agent's runtime) until `stop` is set.
pub fn spawn(
    ring: RingBuf<MapData>,
    names: Arc<RecordNames>,
    format: AccessLogFormat,
    stop: Arc<AtomicBool>,
) -> std::io::Result<std::thread::JoinHandle<()>> {
    std::thread::Builder::new().name("access-log".into()).spawn(move || {
        if let Err(e) = run(ring, &names, format, &stop) {
            tracing::error!("access log stopped: {e}");
        }
    })
}

fn run(
    mut ring: RingBuf<MapData>,
    names: &RecordNames,
    format: AccessLogFormat,
    stop: &AtomicBool,
) -> Result<(), AccessLogError> {
    while !stop.load(Ordering::Relaxed) {
        std::thread::sleep(DRAIN_INTERVAL);
        let names = names.get();
        // One write per drain, not per line (stdout is line-buffered).
        let mut out = std::io::BufWriter::with_capacity(1 << 16, std::io::stdout().lock());
        while let Some(item) = ring.next() {
            if item.len() < std::mem::size_of::<FlowEvent>() {
                tracing::warn!(len = item.len(), "BUG: short access-log event");
                continue;
            }
            // SAFETY: the item holds at least one FlowEvent (checked above); FlowEvent is plain
            // data valid for any bit pattern; read_unaligned makes no alignment assumption.
            let e: FlowEvent = unsafe { std::ptr::read_unaligned(item.as_ptr().cast()) };
            if let Some(line) = render(&entry(&e, &names, wall_time(e.ktime_ns)), format) {
                let _ = writeln!(out, "{line}");
            }
        }
        let _ = out.flush();
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use warden_common::{EVENT_DECIDED, HOOK_TC};

    use super::*;
    use crate::telemetry::names::tests::record;

    fn event(
        kind: u8,
        verdict: Verdict,
        reason: DropReason,
        (s, sp): ([u8; 4], u16),
        (d, dp): ([u8; 4], u16),
    ) -> FlowEvent {
        FlowEvent {
            ktime_ns: 0,
            endpoint_id: 2,
            remote_identity: 2,
            policy_id: 1,
            saddr: s,
            daddr: d,
            sport: sp,
            dport: dp,
            proto: PROTO_TCP,
            kind,
            verdict: verdict as u8,
            reason: reason as u8,
            direction: Direction::Ingress as u8,
            hook: HOOK_TC,
            _pad: [0; 2],
        }
    }

    const A: [u8; 4] = [10, 66, 0, 2];
    const B: [u8; 4] = [10, 66, 0, 3];

    #[test]
    fn a_denial_names_both_sides_the_policy_and_the_reason() {
        let n = Names::from_record(&record());
        let t = UNIX_EPOCH + Duration::from_millis(1_764_030_600_123);
        let e = entry(&event(EVENT_DECIDED, Verdict::Deny, DropReason::PolicyDeny, (A, 40000), (B, 8080)), &n, t);
        assert_eq!(
            render_text(&e),
            "time=2025-11-25T00:30:00.123Z event=deny verdict=DENY reason=policy_deny policy=team/b-access direction=ingress \
             reporter=destination hook=tc proto=tcp src=10.66.0.2:40000 dst=10.66.0.3:8080 src_workload=a src_namespace=team \
             src_principal=spiffe://cluster.local/ns/team/sa/a dst_workload=b dst_namespace=team dst_principal=spiffe://cluster.local/ns/team/sa/b"
        );
        let j: serde_json::Value = serde_json::from_str(&render(&e, AccessLogFormat::Json).unwrap()).unwrap();
        assert_eq!(j["policy"], "team/b-access");
        assert_eq!(j["src_principal"], "spiffe://cluster.local/ns/team/sa/a");
        assert_eq!(render(&e, AccessLogFormat::Off), None);
    }

    #[test]
    fn a_close_seen_on_the_reply_is_written_initiator_first() {
        let n = Names::from_record(&record());
        let e = entry(&event(EVENT_CLOSED, Verdict::Allow, DropReason::None, (B, 8080), (A, 40000)), &n, UNIX_EPOCH);
        assert_eq!((e.event, e.src.as_str(), e.dst.as_str()), ("close", "10.66.0.2:40000", "10.66.0.3:8080"));
        assert_eq!(e.time, "1970-01-01T00:00:00.000Z");
    }

    #[test]
    fn dates_are_civil() {
        assert_eq!(rfc3339(UNIX_EPOCH + Duration::from_secs(951_782_400)), "2000-02-29T00:00:00.000Z");
        assert_eq!(rfc3339(UNIX_EPOCH + Duration::from_secs(4_102_444_799)), "2099-12-31T23:59:59.000Z");
    }
}
