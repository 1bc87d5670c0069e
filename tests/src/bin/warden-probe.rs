//! `warden-probe`: the lab's traffic tool, run inside workload network namespaces and cgroups.
//!
//! - `serve PORT...`: accept on every port; each connection gets `hello <port>\n`, then every
//!   line it sends is echoed back. Each port also echoes UDP datagrams.
//! - `connect IP:PORT [--timeout-ms N]`: one connection attempt (from an `AF_INET6` socket when IP
//!   is IPv6, e.g. `[::ffff:10.0.0.2]:80`, as a dual-stack client makes it); prints one JSON line
//!   `{"result": "allowed"|"eperm"|"timeout"|"refused"|"error", "ms": .., "detail": ..}` and exits 0.
//!   `allowed` means the server's greeting arrived, so both directions passed.
//! - `udp IP:PORT [--timeout-ms N]`: one datagram from an unconnected socket (`sendto`; IPv6 as for
//!   `connect`), and its
//!   echo; prints `{"result": "allowed"|"eperm"|"timeout"|..}`. `eperm` is the send failing at once.
//! - `echo IP:PORT [MESSAGE] [--timeout-ms N]`: one line there and back; prints `{"result": ..,
//!   "seen_as": <the client's address as the server saw it>, "peer": <the server's address as the
//!   client's socket names it (getpeername)>, "intact": <the line came back unchanged>}`.
//! - `hold IP:PORT --seconds S [--interval-ms N] [--line-bytes B]`: keeps one connection and sends a
//!   line every interval (`ping <i>`, padded with letters to B bytes, echoed back and compared);
//!   prints `{"result": .., "round_trips": n, "seen_as": .., "failed_after_ms": ..}`.
//! - `rate IP:PORT --seconds S [--threads T]`: opens, greets and closes connections back to back
//!   (closing with RST so no TIME_WAIT piles up); prints `{"result": "allowed", "connections": n,
//!   "per_second": r, "errors": e, "error_kinds": {"<error> (after <ms> ms)": count, ..}}`.

use std::{
    io::{BufRead, BufReader, ErrorKind, Write},
    net::{SocketAddr, TcpListener, TcpStream, UdpSocket},
    time::{Duration, Instant},
};

fn serve(ports: &[u16]) -> ! {
    for &port in ports {
        let u = UdpSocket::bind(("0.0.0.0", port)).unwrap_or_else(|e| panic!("bind udp {port}: {e}"));
        std::thread::spawn(move || {
            let mut buf = [0u8; 2048];
            while let Ok((n, from)) = u.recv_from(&mut buf) {
                let _ = u.send_to(&buf[..n], from);
            }
        });
        let l = TcpListener::bind(("0.0.0.0", port)).unwrap_or_else(|e| panic!("bind {port}: {e}"));
        std::thread::spawn(move || {
            for conn in l.incoming().flatten() {
                std::thread::spawn(move || {
                    let mut w = conn.try_clone().expect("clone");
                    // The greeting names the client's address as this server sees it.
                    let peer = conn.peer_addr().map_or_else(|_| "?".into(), |a| a.to_string());
                    if w.write_all(format!("hello {port} from {peer}\n").as_bytes()).is_err() {
                        return;
                    }
                    for line in BufReader::new(conn).lines() {
                        let Ok(line) = line else { return };
                        if w.write_all(format!("{line}\n").as_bytes()).is_err() {
                            return;
                        }
                    }
                });
            }
        });
    }
    loop {
        std::thread::park();
    }
}

fn classify(e: &std::io::Error) -> &'static str {
    match e.raw_os_error() {
        Some(libc::EPERM) | Some(libc::EACCES) => "eperm",
        Some(libc::ECONNREFUSED) => "refused",
        Some(libc::ETIMEDOUT) | Some(libc::EAGAIN) => "timeout",
        _ if e.kind() == ErrorKind::TimedOut || e.kind() == ErrorKind::WouldBlock => "timeout",
        _ => "error",
    }
}

fn report(result: &str, start: Instant, detail: &str, extra: serde_json::Value) {
    let mut v = serde_json::json!({"result": result, "ms": start.elapsed().as_millis() as u64, "detail": detail});
    if let (Some(o), Some(x)) = (v.as_object_mut(), extra.as_object()) {
        o.extend(x.clone());
    }
    println!("{v}");
}

fn connect(addr: SocketAddr, timeout: Duration) -> Result<BufReader<TcpStream>, std::io::Error> {
    connect_greeted(addr, timeout).map(|(r, _)| r)
}

/// Connect and read the server's greeting (`hello PORT from CLIENT-ADDR`).
fn connect_greeted(addr: SocketAddr, timeout: Duration) -> Result<(BufReader<TcpStream>, String), std::io::Error> {
    let s = TcpStream::connect_timeout(&addr, timeout)?;
    s.set_read_timeout(Some(timeout))?;
    s.set_write_timeout(Some(timeout))?;
    let mut r = BufReader::new(s);
    let mut hello = String::new();
    r.read_line(&mut hello)?;
    if !hello.starts_with("hello ") {
        return Err(std::io::Error::new(ErrorKind::InvalidData, format!("unexpected greeting {hello:?}")));
    }
    Ok((r, hello.trim_end().to_string()))
}

/// SO_LINGER {on, 0}: the close sends RST and leaves no TIME_WAIT.
fn set_linger_zero(s: &TcpStream) {
    use std::os::fd::AsRawFd;
    let l = libc::linger { l_onoff: 1, l_linger: 0 };
    // SAFETY: valid socket fd and a correctly sized option value.
    unsafe {
        libc::setsockopt(
            s.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_LINGER,
            (&l as *const libc::linger).cast(),
            size_of::<libc::linger>() as u32,
        );
    }
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let flag = |name: &str, default: u64| -> u64 {
        args.iter()
            .position(|a| a == name)
            .and_then(|i| args.get(i + 1))
            .map_or(default, |v| v.parse().expect("number"))
    };
    match args.first().map(String::as_str) {
        Some("serve") => serve(&args[1..].iter().map(|p| p.parse().expect("port")).collect::<Vec<u16>>()),
        Some("connect") => {
            let addr: SocketAddr = args[1].parse().expect("IP:PORT");
            let start = Instant::now();
            match connect(addr, Duration::from_millis(flag("--timeout-ms", 1500))) {
                Ok(_) => report("allowed", start, "", serde_json::json!({})),
                Err(e) => report(classify(&e), start, &e.to_string(), serde_json::json!({})),
            }
        }
        Some("udp") => {
            let addr: SocketAddr = args[1].parse().expect("IP:PORT");
            let start = Instant::now();
            // An IPv6 address (v4-mapped: a dual-stack client) sends from an AF_INET6 socket.
            let any = if addr.is_ipv6() { "[::]:0" } else { "0.0.0.0:0" };
            let result = UdpSocket::bind(any).and_then(|u| {
                u.set_read_timeout(Some(Duration::from_millis(flag("--timeout-ms", 1500))))?;
                u.send_to(b"warden-udp", addr)?;
                let mut buf = [0u8; 64];
                let (n, _) = u.recv_from(&mut buf)?;
                Ok(&buf[..n] == b"warden-udp")
            });
            match result {
                Ok(true) => report("allowed", start, "", serde_json::json!({})),
                Ok(false) => report("error", start, "the echo differs", serde_json::json!({})),
                Err(e) => report(classify(&e), start, &e.to_string(), serde_json::json!({})),
            }
        }
        Some("echo") => {
            // echo IP:PORT MESSAGE: one line there and back; reports what the server saw as the
            // client's address and whether the bytes came back intact.
            let addr: SocketAddr = args[1].parse().expect("IP:PORT");
            let message = args.get(2).cloned().unwrap_or_else(|| "warden-echo".into());
            let start = Instant::now();
            let timeout = Duration::from_millis(flag("--timeout-ms", 2000));
            let result = connect_greeted(addr, timeout).and_then(|(mut r, greeting)| {
                let peer = r.get_ref().peer_addr()?;
                r.get_mut().write_all(format!("{message}\n").as_bytes())?;
                let mut back = String::new();
                r.read_line(&mut back)?;
                Ok((greeting, peer, back.trim_end() == message))
            });
            match result {
                Ok((greeting, peer, intact)) => {
                    let seen = greeting.rsplit(' ').next().unwrap_or("").to_string();
                    let extra = serde_json::json!({"seen_as": seen, "peer": peer.to_string(), "intact": intact});
                    report("allowed", start, "", extra)
                }
                Err(e) => report(classify(&e), start, &e.to_string(), serde_json::json!({})),
            }
        }
        Some("hold") => {
            let addr: SocketAddr = args[1].parse().expect("IP:PORT");
            let seconds = flag("--seconds", 3);
            let interval = Duration::from_millis(flag("--interval-ms", 100));
            // Lines padded to this many bytes (a bulk transfer, each line checked), at least the
            // `ping <i>` itself.
            let line_bytes = flag("--line-bytes", 0) as usize;
            let start = Instant::now();
            let (mut r, greeting) = match connect_greeted(addr, Duration::from_millis(1500)) {
                Ok(r) => r,
                Err(e) => return report(classify(&e), start, &e.to_string(), serde_json::json!({"round_trips": 0})),
            };
            let seen = greeting.rsplit(' ').next().unwrap_or("").to_string();
            // Tell the caller the connection is up, so it can change policy while we hold it.
            eprintln!("established");
            let mut n = 0u64;
            while start.elapsed() < Duration::from_secs(seconds) {
                let mut line = format!("ping {n}");
                if line_bytes > line.len() + 2 {
                    line.push(' ');
                    let pad = line_bytes - line.len() - 1;
                    line.extend((0..pad).map(|i| (b'a' + ((n as usize + i) % 26) as u8) as char));
                }
                line.push('\n');
                let mut back = String::new();
                let ok = r.get_mut().write_all(line.as_bytes()).and_then(|_| r.read_line(&mut back));
                match ok {
                    Ok(_) if back == line => n += 1,
                    Ok(_) => {
                        return report(
                            "error",
                            start,
                            &format!("echo mismatch {back:?}"),
                            serde_json::json!({"round_trips": n, "failed_after_ms": start.elapsed().as_millis() as u64}),
                        );
                    }
                    Err(e) => {
                        return report(
                            classify(&e),
                            start,
                            &e.to_string(),
                            serde_json::json!({"round_trips": n, "failed_after_ms": start.elapsed().as_millis() as u64}),
                        );
                    }
                }
                std::thread::sleep(interval);
            }
            report("allowed", start, "", serde_json::json!({"round_trips": n, "seen_as": seen}));
        }
        Some("rate") => {
            let addr: SocketAddr = args[1].parse().expect("IP:PORT");
            let seconds = flag("--seconds", 3);
            let threads = flag("--threads", 2);
            let start = Instant::now();
            let until = start + Duration::from_secs(seconds);
            let workers: Vec<_> = (0..threads)
                .map(|_| {
                    std::thread::spawn(move || {
                        let mut ok = 0u64;
                        let mut errors = std::collections::BTreeMap::<String, u64>::new();
                        while Instant::now() < until {
                            let begun = Instant::now();
                            match connect(addr, Duration::from_millis(1000)) {
                                Ok(r) => {
                                    // SO_LINGER 0: close with RST, leaving no TIME_WAIT behind.
                                    set_linger_zero(r.get_ref());
                                    ok += 1;
                                }
                                Err(e) => {
                                    let after = begun.elapsed().as_millis();
                                    *errors.entry(format!("{e} (after {after} ms)")).or_default() += 1;
                                }
                            }
                        }
                        (ok, errors)
                    })
                })
                .collect();
            let (mut ok, mut errors) = (0, std::collections::BTreeMap::<String, u64>::new());
            for worker in workers {
                let (n, e) = worker.join().expect("worker");
                ok += n;
                for (what, count) in e {
                    *errors.entry(what).or_default() += count;
                }
            }
            let secs = start.elapsed().as_secs_f64();
            report(
                "allowed",
                start,
                "",
                serde_json::json!({
                    "connections": ok,
                    "errors": errors.values().sum::<u64>(),
                    "error_kinds": errors,
                    "per_second": ok as f64 / secs,
                }),
            );
        }
        _ => {
            eprintln!(
                "usage: warden-probe serve PORT... | connect IP:PORT [--timeout-ms N] | hold IP:PORT --seconds S [--interval-ms N]"
            );
            std::process::exit(2);
        }
    }
}
