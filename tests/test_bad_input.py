"""Bad input: unusable URLs, TLS mismatches, servers that break RFC 6455, undecodable payloads and
oversized messages. Each gives a clear exception, early, that names the cause; protocol
violations also send the server the close code RFC 6455 asks for."""

from __future__ import annotations

import datetime
import ipaddress
import json
import ssl
import subprocess
import sys
import time
from pathlib import Path

import pytest
from evil_server import (
    BINARY,
    CLOSE,
    CONT,
    PING,
    PONG,
    TEXT,
    EvilServer,
    close_frame,
    frame,
)

import wspool
from wspool.testing import MockServer

# ---------------------------------------------------------------------------------------- URLs


@pytest.mark.parametrize(
    ("url", "cause"),
    [
        ("http://x", "scheme must be ws or wss"),
        ("ws://", "invalid URL"),
        ("ws://127.0.0.1:99999/", "invalid port"),
        ("not a url", "relative URL"),
    ],
)
def test_unusable_urls_raise_value_error_before_any_thread(url, cause, threads):
    with pytest.raises(ValueError, match=cause):
        wspool.consume(url)
    threads.assert_back()


def test_a_listener_that_never_answers_times_out_within_open_timeout(silent_url):
    started = time.monotonic()
    with pytest.raises(wspool.Timeout, match=r"timed out after 0\.5 s") as info:
        wspool.consume(silent_url, open_timeout=0.5)
    took = time.monotonic() - started
    assert 0.4 < took < 5.0
    assert info.value.url == silent_url


# ----------------------------------------------------------------------------------------- TLS


def _make_certs(directory: Path) -> tuple[Path, Path, Path]:
    """A CA, and a certificate for 127.0.0.1 signed by it: (ca.pem, server.pem, server.key)."""
    x509 = pytest.importorskip("cryptography.x509")
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    now = datetime.datetime.now(datetime.timezone.utc)

    def name(cn: str) -> x509.Name:
        return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])

    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca = (
        x509.CertificateBuilder()
        .subject_name(name("wspool test CA"))
        .issuer_name(name("wspool test CA"))
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(days=1))
        .not_valid_after(now + datetime.timedelta(days=2))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .sign(ca_key, hashes.SHA256())
    )
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (
        x509.CertificateBuilder()
        .subject_name(name("127.0.0.1"))
        .issuer_name(ca.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(days=1))
        .not_valid_after(now + datetime.timedelta(days=2))
        .add_extension(
            x509.SubjectAlternativeName(
                [x509.IPAddress(ipaddress.ip_address("127.0.0.1")), x509.DNSName("localhost")]
            ),
            critical=False,
        )
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .sign(ca_key, hashes.SHA256())
    )
    paths = directory / "ca.pem", directory / "server.pem", directory / "server.key"
    paths[0].write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    paths[1].write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    paths[2].write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return paths


@pytest.fixture(scope="module")
def certs(tmp_path_factory) -> tuple[Path, Path, Path]:
    return _make_certs(tmp_path_factory.mktemp("certs"))


@pytest.fixture
def tls_context(certs) -> ssl.SSLContext:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(certs[1], certs[2])
    return context


HELLO = [frame(b"hello"), close_frame(1000)]


def test_an_untrusted_certificate_is_a_connect_error_naming_the_tls_cause(tls_context):
    with EvilServer(HELLO, tls=tls_context) as server:
        with pytest.raises(wspool.ConnectError) as info:
            wspool.consume(server.url, open_timeout=5)
    message = str(info.value)
    assert "TLS handshake failed" in message
    assert "invalid peer certificate: UnknownIssuer" in message
    assert not isinstance(info.value, wspool.HandshakeError)


def test_ca_trusts_a_private_ca(tls_context, certs):
    with EvilServer(HELLO, tls=tls_context) as server:
        with wspool.consume(server.url, ca=certs[0], open_timeout=5) as stream:
            values = [r.value for r in stream]
    assert values == ["hello"]
    assert server.close_codes == [1000]


def test_ca_must_be_a_readable_pem_bundle(tmp_path, threads):
    with pytest.raises(ValueError, match="cannot read"):
        wspool.consume("wss://127.0.0.1:1/", ca=tmp_path / "missing.pem")
    empty = tmp_path / "empty.pem"
    empty.write_text("not a certificate\n")
    with pytest.raises(ValueError, match="no certificate"):
        wspool.consume("wss://127.0.0.1:1/", ca=empty)
    threads.assert_back()


def test_wss_to_a_plain_server_names_tls():
    with EvilServer(HELLO) as server:
        url = server.url.replace("ws://", "wss://")
        with pytest.raises(wspool.ConnectError) as info:
            wspool.consume(url, open_timeout=5)
    message = str(info.value)
    assert "TLS handshake failed" in message
    assert "does the server speak TLS" in message


def test_ws_to_a_tls_server_names_tls(tls_context):
    with EvilServer(HELLO, tls=tls_context) as server:
        url = server.url.replace("wss://", "ws://")
        with pytest.raises(wspool.ConnectError) as info:
            wspool.consume(url, open_timeout=5)
    assert "is it a TLS server? then use wss://" in str(info.value)


# ------------------------------------------------------------------------- protocol violations

GOOD = [frame(b"first"), frame(b"second")]

VIOLATIONS = {
    "invalid UTF-8 in a text frame": ([frame(b"ok \xff\xfe")], "invalid UTF-8", 1007),
    "invalid UTF-8 across fragments": (
        [frame(b"ok \xe2\x82", fin=False), frame(b"\x41", CONT)],
        "invalid UTF-8",
        1007,
    ),
    "RSV bits without an extension": ([frame(b"x", rsv=4)], "RSV bits set", 1002),
    "a masked server frame": ([frame(b"x", mask=True)], "masked frame", 1002),
    "a reserved data opcode": ([frame(b"x", 0x3)], "reserved data opcode 0x3", 1002),
    "a reserved control opcode": ([frame(b"x", 0xB)], "reserved control opcode 0xb", 1002),
    "a fragmented control frame": (
        [frame(b"p", PING, fin=False)],
        "control frame is fragmented",
        1002,
    ),
    "an oversized control frame": ([frame(b"p" * 126, PING)], "over 125 bytes", 1002),
    "an orphan continuation": ([frame(b"x", CONT)], "continuation frame with no message", 1002),
    "a new message inside a fragmented one": (
        [frame(b"a", fin=False), frame(b"b", BINARY)],
        "began before the fragmented one ended",
        1002,
    ),
    "a forbidden close code (1005)": ([close_frame(1005)], "code RFC 6455 does not allow", 1002),
    "a close code below 1000": ([close_frame(999)], "code RFC 6455 does not allow", 1002),
    "a 1-byte close payload": ([frame(b"\x03", CLOSE)], "1-byte payload", 1002),
    "invalid UTF-8 in a close reason": (
        [close_frame(1000, b"\xff")],
        "invalid UTF-8",
        1007,
    ),
}


@pytest.mark.parametrize("violation", list(VIOLATIONS))
def test_protocol_violations_deliver_earlier_messages_then_raise(violation):
    bad, text, code = VIOLATIONS[violation]
    with EvilServer([*GOOD, *bad, 5.0]) as server:
        values = []
        started = time.monotonic()
        with pytest.raises(wspool.ProtocolError) as info:
            with wspool.consume(server.url, workers=1, ordered=True, close_timeout=3) as stream:
                for r in stream:
                    values.append(r.value)
        took = time.monotonic() - started
        assert server.wait_done()
    assert values == ["first", "second"]
    message = str(info.value)
    assert text in message, message
    assert f"closed with {code}" in message
    assert server.close_codes == [code]
    # The server's hang-up ends the closing wait: no close_timeout spent.
    assert took < 3.0


def test_fragmented_messages_with_pings_interleaved_arrive_once():
    script = [
        frame(b"hel", TEXT, fin=False),
        frame(b"p1", PING),
        frame(b"lo ", CONT, fin=False),
        frame(b"p2", PING),
        frame(b"world", CONT),
        frame(b"\x00\x01", BINARY, fin=False),
        frame(b"p3", PING),
        frame(b"\x02", CONT),
        frame(b"after"),
        close_frame(1000),
    ]
    with EvilServer(script) as server:
        with wspool.consume(server.url, decode="bytes", workers=1, ordered=True) as stream:
            results = list(stream)
        assert server.wait_done()
    assert [(r.job.type, r.value) for r in results] == [
        ("text", b"hello world"),
        ("binary", b"\x00\x01\x02"),
        ("text", b"after"),
    ]
    assert [d for op, d in server.frames if op == PONG] == [b"p1", b"p2", b"p3"]
    assert server.close_codes == [1000]


# ------------------------------------------------------------------------------- bad payloads


def test_malformed_json_is_that_jobs_decode_error_and_the_stream_goes_on():
    messages = ['{"seq": 0}', '{"seq": 1,', '{"seq": 2}', "[1, 2", '{"seq": 4}']
    with MockServer(messages=messages) as server:
        with wspool.consume(server.url, decode="json") as stream:
            results = {r.job.id: r for r in stream}
    assert sorted(results) == [0, 1, 2, 3, 4]
    for i in (0, 2, 4):
        assert results[i].ok and results[i].value == {"seq": i}
    for i in (1, 3):
        error = results[i].error
        assert isinstance(error, wspool.DecodeError)
        assert error.job_id == i
        assert error.payload == messages[i].encode()
        assert f"job {i}" in str(error)
        assert results[i].value is None
    assert stream.stats.failed == 2 and stream.stats.processed == 3


# ------------------------------------------------------------------------------ size limits

RSS_CLIENT = """
import json, sys, wspool

def rss(field):
    for line in open("/proc/self/status"):
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise SystemExit("no " + field)

url, limit = sys.argv[1], int(sys.argv[2])
# Warm up every code path on a first stream, so only the refused message is measured.
with wspool.consume(sys.argv[3], workers=1) as stream:
    list(stream)
before = rss("VmRSS")
with open("/proc/self/clear_refs", "w") as f:   # resets VmHWM (peak RSS) to the current RSS
    f.write("5")
values, error = [], None
try:
    with wspool.consume(url, workers=1, max_message_size=limit, close_timeout=3) as stream:
        for r in stream:
            values.append(r.value)
except wspool.WspoolError as e:
    error = e
print(json.dumps({
    "values": values,
    "error": type(error).__name__,
    "message": str(error),
    "size": getattr(error, "size", None),
    "limit": getattr(error, "limit", None),
    "growth": rss("VmHWM") - before,
}))
"""

MB = 1 << 20


def _one_huge_frame():
    yield frame(b"small")
    # The header announces 100 MB; a little of it follows, then the server waits.
    yield frame(b"", length=100 * MB) + b"x" * 65536
    yield 8.0


def _endless_fragments(piece: int):
    yield frame(b"small")
    yield frame(b"y" * piece, TEXT, fin=False)
    for _ in range(100 * MB // piece):
        yield frame(b"y" * piece, CONT, fin=False)


@pytest.mark.parametrize(
    ("shape", "limit"),
    [("one 100 MB frame", 16 * MB), ("100 MB in 256 KiB fragments", 2 * MB)],
)
def test_an_oversized_message_is_refused_without_allocating_it(shape, limit):
    script = _one_huge_frame() if shape.startswith("one") else _endless_fragments(256 << 10)
    # The consumer runs in a subprocess: its peak RSS is measured alone, and a hang shows.
    with EvilServer([frame(b"warm"), close_frame(1000)]) as warm, EvilServer(script) as server:
        proc = subprocess.Popen(
            [sys.executable, "-c", RSS_CLIENT, server.url, str(limit), warm.url],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        try:
            out, err = proc.communicate(timeout=60)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        assert proc.returncode == 0, err
        assert server.wait_done()
    report = json.loads(out)
    assert report["values"] == ["small"]
    assert report["error"] == "MessageTooBig", report
    assert report["limit"] == limit
    assert report["size"] > limit
    assert server.close_codes == [1009]
    print(f"{shape}: peak RSS grew {report['growth'] / MB:.1f} MB")
    assert report["growth"] < 10 * MB, report
