//! Istio's TCP metrics for the connections the agent carries: the source side of captured
//! connections (the kernel sees only their hop to the agent) and refusals the agent decides. The
//! destination side of an allowed connection is the kernel's count of the last hop (`tunnel`).

use warden_hbone::TransferStats;

use super::view::MeshWorkload;
use crate::telemetry::metrics::{
    DenialLabels, FLAGS_DENY, FLAGS_NONE, SecurityPolicy, TcpLabels, TcpRecorder, TcpTotals,
};

/// Who reports a series (Istio's `reporter`).
#[derive(Clone, Copy)]
pub enum Reporter {
    Source,
    Destination,
}

fn labels(reporter: Reporter, src: &MeshWorkload, dst: &MeshWorkload, flags: &str) -> TcpLabels {
    TcpLabels {
        reporter: match reporter {
            Reporter::Source => "source",
            Reporter::Destination => "destination",
        }
        .into(),
        source_workload: src.workload.name.clone(),
        source_workload_namespace: src.workload.namespace.clone(),
        source_principal: src.identity.to_string(),
        destination_workload: dst.workload.name.clone(),
        destination_workload_namespace: dst.workload.namespace.clone(),
        destination_principal: dst.identity.to_string(),
        connection_security_policy: SecurityPolicy::MutualTls.label().into(),
        response_flags: flags.into(),
    }
}

/// A connection carried from `src` to `dst`: `stats.sent` is the request direction.
pub fn carried(rec: &TcpRecorder, reporter: Reporter, src: &MeshWorkload, dst: &MeshWorkload, stats: &TransferStats) {
    let t = TcpTotals { opened: 1, closed: 1, received_bytes: stats.sent, sent_bytes: stats.received };
    rec.connection(&labels(reporter, src, dst, FLAGS_NONE), &t);
}

/// A connection refused by `policy` for `reason` (a drop reason's name), attributed to the
/// destination workload.
pub fn refused(
    rec: &TcpRecorder,
    reporter: Reporter,
    src: &MeshWorkload,
    dst: &MeshWorkload,
    policy: &str,
    reason: &str,
) {
    let t = TcpTotals { opened: 1, closed: 1, received_bytes: 0, sent_bytes: 0 };
    rec.connection(&labels(reporter, src, dst, FLAGS_DENY), &t);
    if matches!(reporter, Reporter::Destination) {
        rec.denials(
            &DenialLabels {
                policy: policy.into(),
                workload: dst.workload.name.clone(),
                namespace: dst.workload.namespace.clone(),
                direction: "ingress".into(),
                reason: reason.into(),
            },
            1,
        );
    }
}
