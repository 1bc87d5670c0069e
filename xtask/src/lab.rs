//! `cargo xtask lab`: the payments mesh of the zero-trust guides on two nodes joined by a wire,
//! each node's agent enforcing the policies in `policies/lab/` and carrying meshed traffic over
//! mutual TLS (HBONE); a matrix of which flows pass, a look at the wire, and how to inspect it.

use std::{fs, net::Ipv4Addr, path::PathBuf, time::Duration};

use warden_common::names;
use warden_tests::{Lab, Spec, probe_bin};

/// Node 1 (the production pin directory) and node 2.
pub const TAG: &str = "lab";
pub const TAG2: &str = "lab2";

/// The payments mesh: five workloads in `fintech-core`, one untrusted workload in `staging`
/// (outside the mesh: it talks plaintext). The payment processor runs on node 2.
pub fn mesh() -> (Vec<Spec>, Vec<Spec>) {
    let ip = |d| Ipv4Addr::new(10, 77, 1, d);
    let mut untrusted = Spec::new("staging", "untrusted-debug", Ipv4Addr::new(10, 77, 2, 10), &[8080]);
    untrusted.labels.push(("istio.io/dataplane-mode".into(), "none".into()));
    let node1 = vec![
        Spec::new("fintech-core", "order-service", ip(10), &[8080]),
        Spec::new("fintech-core", "checkout-service", ip(11), &[8080]),
        Spec::new("fintech-core", "refund-service", ip(12), &[8080]),
        Spec::new("fintech-core", "admin-console", ip(14), &[8080]),
        untrusted,
    ];
    let node2 = vec![Spec::new("fintech-core", "payment-processor", Ipv4Addr::new(10, 77, 3, 13), &[8443, 9090])];
    (node1, node2)
}

/// The payment processor's Service, as Kubernetes would give it one: a virtual address in front of
/// its pod, port 443 to the pod's 8443. The lab has no kube-proxy: only the mesh reaches it.
const PAYMENTS_VIP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 10);

fn payments_service() -> String {
    format!(
        "{{name: payments, namespace: fintech-core, clusterIP: {PAYMENTS_VIP}, selector: {{app: payment-processor}}, \
         ports: [{{port: 443, targetPort: 8443}}]}}"
    )
}

fn short(name: &str) -> &str {
    name.split('-').next().unwrap_or(name)
}

pub fn up() -> anyhow::Result<()> {
    let policies = warden_tests::workspace_root().join("policies/lab");
    let (specs1, specs2) = mesh();
    eprintln!("lab: node {TAG}-node with {} workloads, node {TAG2}-node with {}", specs1.len(), specs2.len());
    let mut n1 = Lab::up(TAG, &specs1)?;
    let mut n2 = Lab::up(TAG2, &specs2)?;
    Lab::wire(&mut n1, &mut n2)?;
    // One CA for the cluster, kept with node 1's files.
    let ca = n1.dir.join("ca");
    fs::create_dir_all(&ca)?;
    for lab in [&mut n1, &mut n2] {
        lab.services = vec![payments_service()];
        let generation = lab.start_mesh_agent(&policies, &ca)?;
        eprintln!("lab: {} agent committed generation {generation}", lab.node);
    }
    eprintln!("lab: probing every flow\n");

    let all: Vec<(&Lab, &Spec)> = specs1.iter().map(|s| (&n1, s)).chain(specs2.iter().map(|s| (&n2, s))).collect();
    let columns: Vec<(Ipv4Addr, String, u16)> =
        all.iter().flat_map(|(_, s)| s.ports.iter().map(move |p| (s.ip, s.name.clone(), *p))).collect();
    let width = 16;
    print!("{:<18}", "FROM \\ TO");
    for (_, to, port) in &columns {
        print!("{:<width$}", format!("{}:{}", short(to), port));
    }
    println!();
    let mut refused = 0;
    for (lab, from) in &all {
        print!("{:<18}", from.name);
        for (ip, to, port) in &columns {
            let cell = if *to == from.name {
                "-".to_string()
            } else {
                let p = lab.probe_addr(&from.name, *ip, *port);
                match p.result.as_str() {
                    "allowed" => "pass".into(),
                    "eperm" => {
                        refused += 1;
                        "DENY(eperm)".into()
                    }
                    "timeout" => {
                        refused += 1;
                        "DROP(tc)".into()
                    }
                    // Captured, then closed by an agent that refused it (HTTP 401 over HBONE).
                    "error" => {
                        refused += 1;
                        "DENY(mtls)".into()
                    }
                    other => other.to_string(),
                }
            };
            print!("{cell:<width$}");
        }
        println!();
    }
    println!("\n{refused} flows refused. pass = connected and answered (between meshed workloads: carried by");
    println!("the agents, over mutual TLS across nodes); DENY(eperm) = connect() refused by the kernel;");
    println!("DENY(mtls) = refused by the destination's agent after the mTLS handshake (DENY by principal);");
    println!("DROP(tc) = dropped on the veth (plaintext to a STRICT workload, or denied by policy).");

    // The wire: a marked payload from order-service to the payment processor, captured on node 1.
    let (iface, _) = n1.wire.clone().expect("wired");
    let pcap = n1.dir.join("wire.pcap");
    let mut tcpdump = n1.capture_wire(&pcap)?;
    let marker = "CARD-4111-1111-1111-1111";
    let echo = n1.echo("order-service", Ipv4Addr::new(10, 77, 3, 13), 8443, marker);
    std::thread::sleep(Duration::from_millis(300));
    // SAFETY: kill(2) on our own child; SIGINT makes tcpdump flush its file.
    unsafe { libc::kill(tcpdump.id() as i32, libc::SIGINT) };
    let _ = tcpdump.wait();
    let wire = fs::read(&pcap).unwrap_or_default();
    let has = |needle: &[u8]| wire.windows(needle.len()).any(|w| w == needle);
    println!("\norder-service -> payment-processor:8443 (node 1 -> node 2), sending {marker:?}:");
    println!(
        "  answered: {}; the payment processor saw the client as {}",
        echo.intact == Some(true),
        echo.seen_as.as_deref().unwrap_or("?")
    );
    println!(
        "  on the wire ({iface}): payload in clear: {}; TLS to port 15008: {}",
        if has(marker.as_bytes()) { "YES" } else { "no" },
        // TLS 1.3 application-data records on the pooled HBONE connection.
        if has(&[0x17, 0x03, 0x03]) && has(&15008u16.to_be_bytes()) { "yes" } else { "NO" }
    );

    // Through the payment processor's Service.
    let p = n1.echo("order-service", PAYMENTS_VIP, 443, "through the payments Service");
    println!(
        "\norder-service -> the payments Service {PAYMENTS_VIP}:443 (a virtual address; no kube-proxy in the lab):"
    );
    println!(
        "  answered: {}; carried to payment-processor:8443, which saw the client as {}; the client's socket names {} as its peer",
        p.intact == Some(true),
        p.seen_as.as_deref().unwrap_or("?"),
        p.peer.as_deref().unwrap_or("?")
    );

    // The same denied flow from a process outside the workload's cgroup: no connect() hook sees
    // it, so the TC program on the veth drops it.
    let untrusted = n1.member("untrusted-debug");
    let out = std::process::Command::new("ip")
        .args(["netns", "exec", &untrusted.netns])
        .arg(probe_bin())
        .args(["connect", "10.77.1.10:8080", "--timeout-ms", "700"])
        .output()?;
    println!(
        "\nuntrusted-debug -> order-service:8080 from outside its cgroup (TC only): {}",
        String::from_utf8_lossy(&out.stdout).trim()
    );

    let warden = warden_tests::warden_bin();
    println!("\nInspect the running nodes:");
    for lab in [&n1, &n2] {
        let pin = lab.pin_dir.display().to_string();
        let state = lab.state_dir.display().to_string();
        let ns = format!("nsenter --net=/run/netns/{}", lab.node);
        println!("  {}:", lab.node);
        println!(
            "    {ns} {} maps --pin-dir {pin} --state-dir {state}   # and the node's mesh routing",
            warden.display()
        );
        for map in [names::POLICY, names::IPCACHE, names::COUNTERS, names::FLOWS] {
            println!("    bpftool map dump pinned {pin}/{map}");
        }
        println!("    {ns} curl -s localhost:15020/stats/prometheus | grep istio_tcp");
        println!("    {ns} {} certs", warden.display());
        println!("    {ns} ip rule; {ns} ip route show table 15008   # HBONE to the node's meshed pods");
        println!("    agent log: {}", lab.agent_log().display());
    }
    println!("  bpftool link show; bpftool prog show name warden_from_wl");
    println!("  edit {} : the agents apply changes live", policies.display());
    // A workload's process lives in its cgroup (where connect4 and the capture hook it) and its
    // network namespace.
    let order = n1.member("order-service");
    println!(
        "  probe a flow as order-service: sh -c 'echo $$ > {}/cgroup.procs && exec nsenter --net=/run/netns/{} {} echo 10.77.3.13:8443 hello'",
        order.cgroup.display(),
        order.netns,
        probe_bin().display()
    );
    println!("Tear down: cargo xtask lab down");

    // Leave the lab running for inspection.
    std::mem::forget(n1);
    std::mem::forget(n2);
    Ok(())
}

pub fn down() -> anyhow::Result<()> {
    let mut leftovers: Vec<PathBuf> = Vec::new();
    for tag in [TAG, TAG2] {
        Lab::down_by_tag(tag);
        leftovers.extend(
            [Lab::pin_dir_for(tag), Lab::dir_for(tag), warden_tests::cgroup_root().join(format!("warden-{tag}"))]
                .into_iter()
                .filter(|p| p.exists()),
        );
    }
    if !leftovers.is_empty() {
        anyhow::bail!("lab down left {leftovers:?}");
    }
    eprintln!("lab: removed");
    Ok(())
}
