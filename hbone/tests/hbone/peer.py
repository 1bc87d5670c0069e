"""An HBONE peer on stacks independent of warden's: Python's ssl (OpenSSL) for mutual TLS 1.3 and
hyper-h2 for HTTP/2. warden's interop tests run it against warden's HBONE server and client.

    peer.py client --connect HOST:PORT --authority IP:PORT (--bytes N | --send TEXT)
                   [--forwarded VALUE] --cert C --key K --ca CA
        Opens one HBONE tunnel (CONNECT, :authority IP:PORT, and a `forwarded` header if given),
        sends N bytes of a pattern or TEXT, half-closes (END_STREAM), reads until the peer's
        END_STREAM; prints one JSON line: the status, the bytes that came back and whether they
        were the ones sent (with --send: the text that came back), and the TLS session.

    peer.py server --listen HOST:PORT --cert C --key K --ca CA
        Prints {"listening": PORT}. Serves HBONE connections one at a time: a CONNECT stream is
        answered 200 and echoed, and closed (END_STREAM) after the client's END_STREAM; anything else
        is answered 400. Prints one JSON line per finished stream: its request headers, the bytes it
        echoed, and the TLS session.

Identities are SPIFFE URIs in the certificates' subjectAltName; hostnames are not checked.

hyper-h2 validates requests as RFC 7540 section 8.1.2.3 does for every method but extended
CONNECT, so it would demand :scheme and :path, which a plain CONNECT (RFC 9113 section 8.5, what
HBONE sends) must not carry. Its header validation is therefore off and the server checks a
CONNECT itself, as section 8.5 says; hyper-h2 still does the framing, HPACK, flow control and
stream states.
"""

import argparse
import json
import socket
import ssl
import sys

import h2.config
import h2.connection
import h2.events

READ = 256 * 1024


def config(client_side):
    return h2.config.H2Configuration(
        client_side=client_side,
        header_encoding="utf-8",
        validate_outbound_headers=False,
        validate_inbound_headers=False,
    )


def connect_problems(headers):
    """What makes `headers` other than a well-formed plain CONNECT (RFC 9113 section 8.5)."""
    names = [name for name, _ in headers]
    fields = dict(headers)
    problems = [f"duplicate {n}" for n in sorted(set(names)) if n.startswith(":") and names.count(n) > 1]
    if fields.get(":method") != "CONNECT":
        problems.append(f":method is {fields.get(':method')!r}")
    host, _, port = fields.get(":authority", "").rpartition(":")
    if not host or not port.isdigit():
        problems.append(f":authority {fields.get(':authority')!r} is not host:port")
    problems += [f"{n} present" for n in (":scheme", ":path", ":protocol") if n in fields]
    problems += [f"unknown pseudo-header {n}" for n in names if n.startswith(":") and n not in (":method", ":authority", ":scheme", ":path", ":protocol")]
    problems += [f"uppercase header {n}" for n in names if n != n.lower()]
    return problems


def tls_context(server_side, args):
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER if server_side else ssl.PROTOCOL_TLS_CLIENT)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    ctx.load_cert_chain(args.cert, args.key)
    ctx.load_verify_locations(args.ca)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_REQUIRED
    ctx.set_alpn_protocols(["h2"])
    return ctx


def session(tls):
    sans = tls.getpeercert().get("subjectAltName", ())
    return {
        "tls": tls.version(),
        "alpn": tls.selected_alpn_protocol(),
        "cipher": tls.cipher()[0],
        "peer": [value for kind, value in sans if kind == "URI"],
    }


def flush(tls, conn):
    out = conn.data_to_send()
    if out:
        tls.sendall(out)


def send_within_window(conn, stream_id, pending):
    """Sends what flow control allows of `pending` (a bytearray, consumed); returns the count."""
    sent = 0
    while pending:
        n = min(len(pending), conn.local_flow_control_window(stream_id), conn.max_outbound_frame_size)
        if n <= 0:
            break
        conn.send_data(stream_id, bytes(pending[:n]))
        del pending[:n]
        sent += n
    return sent


def addr(text):
    host, port = text.rsplit(":", 1)
    return host, int(port)


def client(args):
    if args.send is not None:
        payload = args.send.encode()
    else:
        payload = bytes((i * 7 + i // 4096) % 251 for i in range(args.bytes))
    tls = tls_context(False, args).wrap_socket(socket.create_connection(addr(args.connect), timeout=10))
    conn = h2.connection.H2Connection(config(True))
    conn.initiate_connection()
    stream = conn.get_next_available_stream_id()
    headers = [(":method", "CONNECT"), (":authority", args.authority)]
    if args.forwarded:
        headers.append(("forwarded", args.forwarded))
    conn.send_headers(stream, headers)
    flush(tls, conn)
    status, reset, ended, half_closed = None, None, False, False
    pending, echoed = bytearray(), bytearray()
    while not ended and reset is None:
        data = tls.recv(READ)
        if not data:
            break
        for event in conn.receive_data(data):
            if isinstance(event, h2.events.ResponseReceived):
                status = dict(event.headers)[":status"]
                if status == "200":
                    pending = bytearray(payload)
            elif isinstance(event, h2.events.DataReceived):
                echoed += event.data
                conn.acknowledge_received_data(event.flow_controlled_length, event.stream_id)
            elif isinstance(event, h2.events.StreamEnded):
                ended = True
            elif isinstance(event, h2.events.StreamReset):
                reset = int(event.error_code)
        if status == "200" and not half_closed and not ended and reset is None:
            send_within_window(conn, stream, pending)
            if not pending:
                conn.end_stream(stream)
                half_closed = True
        flush(tls, conn)
    report = {"status": status, "reset": reset, "ended": ended, "echoed": len(echoed), "intact": bytes(echoed) == payload}
    if args.send is not None:
        report["received"] = echoed.decode("utf-8", "replace")
    report.update(session(tls))
    print(json.dumps(report), flush=True)
    tls.close()


def serve_connection(tls):
    conn = h2.connection.H2Connection(config(False))
    conn.initiate_connection()
    flush(tls, conn)
    streams = {}
    while True:
        data = tls.recv(READ)
        if not data:
            return
        for event in conn.receive_data(data):
            if isinstance(event, h2.events.RequestReceived):
                headers = [[k, v] for k, v in event.headers]
                problems = connect_problems(event.headers)
                streams[event.stream_id] = {
                    "headers": headers, "problems": problems, "pending": bytearray(), "echoed": 0, "ended": False,
                }
                if not problems:
                    conn.send_headers(event.stream_id, [(":status", "200")])
                else:
                    conn.send_headers(event.stream_id, [(":status", "400")], end_stream=True)
                    report(tls, streams.pop(event.stream_id))
            elif isinstance(event, h2.events.DataReceived):
                conn.acknowledge_received_data(event.flow_controlled_length, event.stream_id)
                if event.stream_id in streams:
                    streams[event.stream_id]["pending"] += event.data
            elif isinstance(event, h2.events.StreamEnded):
                if event.stream_id in streams:
                    streams[event.stream_id]["ended"] = True
            elif isinstance(event, h2.events.StreamReset):
                streams.pop(event.stream_id, None)
            elif isinstance(event, h2.events.ConnectionTerminated):
                flush(tls, conn)
                return
        for stream_id, s in list(streams.items()):
            s["echoed"] += send_within_window(conn, stream_id, s["pending"])
            if s["ended"] and not s["pending"]:
                conn.end_stream(stream_id)
                report(tls, streams.pop(stream_id))
        flush(tls, conn)


def report(tls, stream):
    line = {"headers": stream["headers"], "problems": stream["problems"], "echoed": stream["echoed"]}
    line.update(session(tls))
    print(json.dumps(line), flush=True)


def server(args):
    ctx = tls_context(True, args)
    listener = socket.create_server(addr(args.listen))
    print(json.dumps({"listening": listener.getsockname()[1]}), flush=True)
    while True:
        raw, _ = listener.accept()
        try:
            tls = ctx.wrap_socket(raw, server_side=True)
        except (ssl.SSLError, OSError) as e:
            print(json.dumps({"handshake_failed": str(e)}), flush=True)
            continue
        try:
            serve_connection(tls)
        except (ssl.SSLError, OSError) as e:
            print(json.dumps({"connection_failed": str(e)}), flush=True)
        finally:
            tls.close()


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="mode", required=True)
    for mode in ("client", "server"):
        p = sub.add_parser(mode)
        p.add_argument("--cert", required=True)
        p.add_argument("--key", required=True)
        p.add_argument("--ca", required=True)
    c = sub.choices["client"]
    c.add_argument("--connect", required=True)
    c.add_argument("--authority", required=True)
    what = c.add_mutually_exclusive_group(required=True)
    what.add_argument("--bytes", type=int)
    what.add_argument("--send")
    c.add_argument("--forwarded")
    sub.choices["server"].add_argument("--listen", default="127.0.0.1:0")
    args = parser.parse_args()
    client(args) if args.mode == "client" else server(args)


if __name__ == "__main__":
    sys.exit(main())
