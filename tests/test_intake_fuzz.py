"""Fuzzing the intake: no input makes the proxy answer 500 or log a traceback.

A real proxy process in front of a real fake-upstream process; hypothesis
builds requests from the pieces hostile input is made of (deep nesting,
numbers past 64 bits, lone surrogates, truncated JSON, raw bytes, odd
paths, queries and header bytes, broken gzip and chunked framing) and
sends each as raw bytes on a socket. Every answer must be a status the
proxy means (never 500), and after the run the log holds no traceback and
no error line.
"""

from __future__ import annotations

import gzip
import http.client
import json
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson
import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.proxy_process import REPO, free_port

POLICY: dict[str, Any] = {
    "log": {"level": "debug"},
    "limits": {"max_body_bytes": "64KiB", "header_timeout": "2s", "body_timeout": "2s"},
    "routes": [
        {"match": {"path": "/v1/chat/completions"}, "upstream": "fake", "cache": {"ttl": "1h"}},
        {
            "match": {"path": "/v1/embeddings"},
            "upstream": "fake",
            "vary_headers": ["OpenAI-Organization"],
        },
        {"match": {"path": "/v1/*"}, "upstream": "fake"},
    ],
}


@dataclass
class Served:
    port: int
    log: Path


def _wait_ready(port: int, proc: subprocess.Popen[bytes], deadline: float) -> None:
    while time.monotonic() < deadline:
        assert proc.poll() is None, "exited early"
        try:
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=1)
            conn.request("GET", "/readyz")
            if conn.getresponse().status == 200:
                return
        except OSError:
            time.sleep(0.05)
    raise AssertionError("not ready in time")


def _wait_listening(port: int, deadline: float) -> None:
    while time.monotonic() < deadline:
        with socket.socket() as sock:
            if sock.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.05)
    raise AssertionError("not listening in time")


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    tmp = tmp_path_factory.mktemp("fuzz")
    fake_port, port = free_port(), free_port()
    policy = {
        **POLICY,
        "upstreams": {"fake": {"base_url": f"http://127.0.0.1:{fake_port}/v1"}},
    }
    (tmp / "policy.yaml").write_text(yaml.safe_dump(policy))
    env = {k: v for k, v in os.environ.items() if not k.startswith("LLM_SIDECAR_")}
    log = tmp / "proxy.log"
    procs: list[subprocess.Popen[bytes]] = []
    try:
        with (tmp / "fake.log").open("wb") as fake_out, log.open("wb") as out:
            fake_cmd = ["-m", "proxy", "fake-upstream", "--port", str(fake_port)]
            procs.append(
                subprocess.Popen(
                    [sys.executable, *fake_cmd], cwd=REPO, env=env, stdout=fake_out, stderr=fake_out
                )
            )
            serve = [
                "-m",
                "proxy",
                "serve",
                "--policy",
                str(tmp / "policy.yaml"),
                "--port",
                str(port),
            ]
            procs.append(
                subprocess.Popen(
                    [sys.executable, *serve], cwd=REPO, env=env, stdout=out, stderr=out
                )
            )
        deadline = time.monotonic() + 20
        _wait_listening(fake_port, deadline)
        _wait_ready(port, procs[1], deadline)
        yield Served(port, log)
        assert_clean_log(log)  # whatever order the tests ran in
    finally:
        for proc in procs:
            proc.kill()
            proc.wait(timeout=10)


def assert_clean_log(log: Path) -> None:
    for raw in log.read_text().splitlines():
        line = orjson.loads(raw)
        assert line["level"] != "error" and "exc" not in line, line


def exchange(port: int, raw: bytes) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(raw)
        chunks = []
        while chunk := sock.recv(65536):
            chunks.append(chunk)
    return b"".join(chunks)


# -- what hostile input is made of ---------------------------------------------------------------

scalars = (
    st.none()
    | st.booleans()
    | st.integers()  # unbounded: past 64 bits too
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=12)  # lone surrogates included
    | st.sampled_from(["system", "user", "stream", "", "\u0000", "\ud800"])
)
values = st.recursive(
    scalars,
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=6), inner, max_size=4)
    ),
    max_leaves=16,
)
FIELDS = ["model", "messages", "input", "prompt", "stream", "stream_options", "user", "n", "seed",
          "temperature", "max_tokens", "tools", "x"]  # fmt: skip
objects = st.dictionaries(st.sampled_from(FIELDS), values, max_size=6)


def _deep(depth: int, where: str, opener: bytes, closer: bytes) -> bytes:
    return (
        b'{"model":"m","messages":[],"%s":' % where.encode()
        + opener * depth
        + b"1" * (opener == b'{"a":')
        + closer * depth
        + b"}"
    )


deep = st.builds(
    _deep,
    st.integers(0, 1500),
    st.sampled_from(["x", "user", "stream_options", "messages"]),
    st.sampled_from([b"[", b'{"a":']),
).map(lambda b: b.replace(b"[]", b"[]", 1))
bodies = st.one_of(
    objects.map(lambda o: json.dumps(o).encode()),  # surrogates escaped: \ud800
    objects.map(lambda o: json.dumps(o, ensure_ascii=False).encode("utf-8", "surrogatepass")),
    st.builds(lambda o, cut: json.dumps(o).encode()[:cut], objects, st.integers(0, 40)),
    deep,
    values.map(lambda v: json.dumps(v).encode()),  # not an object
    st.binary(max_size=64),
    st.sampled_from(
        [b"", b"null", b"[]", b"{}", b'{"model":1e999}', b'{"a":NaN}', b"\xef\xbb\xbf{}"]
    ),
)
PATHS = ["/v1/chat/completions", "/v1/embeddings", "/v1/completions", "/v1/responses", "/v1/models"]
path_pieces = st.sampled_from(
    ["/", "//", ".", "..", "%2e", "%2F", "%5c", "%00", "%25", ";", "a", "%ff", "%", "~", "@", ":"]
)
paths = st.one_of(
    st.sampled_from(PATHS),
    st.lists(path_pieces, max_size=8).map(lambda ps: "/v1/" + "".join(ps)),
    st.builds(
        lambda p, ps: p + "".join(ps), st.sampled_from(PATHS), st.lists(path_pieces, max_size=4)
    ),
)
query_chars = st.characters(min_codepoint=33, max_codepoint=126, exclude_characters="#")
queries = st.one_of(
    st.just(""),
    st.lists(
        st.tuples(
            st.sampled_from(["key", "api-key", "api_key", "%6Bey", "api-version", "x", ""]),
            st.text(
                st.characters(min_codepoint=33, max_codepoint=126, exclude_characters="#"),
                max_size=8,
            ),
        ),
        max_size=3,
    ).map(lambda pairs: "?" + "&".join(f"{k}={v}" for k, v in pairs)),
)
header_bytes = st.binary(max_size=24).map(
    lambda b: b.replace(b"\r", b"").replace(b"\n", b"").replace(b"\x00", b"").strip()
)
HEADER_NAMES = [b"Authorization", b"Api-Key", b"Cache-Control", b"X-Request-Id",
                b"OpenAI-Organization", b"Content-Type", b"Accept-Encoding"]  # fmt: skip
headers = st.lists(st.tuples(st.sampled_from(HEADER_NAMES), header_bytes), max_size=4)
framings = st.sampled_from(["length", "chunked", "gzip", "bad-gzip", "bad-chunked"])


def build(
    method: str, path: str, query: str, hdrs: list[tuple[bytes, bytes]], body: bytes, framing: str
) -> bytes:
    head = [f"{method} {path}{query} HTTP/1.1".encode(), b"Host: fuzz", b"Connection: close"]
    head += [name + b": " + value for name, value in hdrs]
    if framing == "gzip":
        body = gzip.compress(body)
        head.append(b"Content-Encoding: gzip")
    elif framing == "bad-gzip":
        head.append(b"Content-Encoding: gzip")
    if framing in ("chunked", "bad-chunked"):
        head.append(b"Transfer-Encoding: chunked")
        size = b"zz" if framing == "bad-chunked" else b"%x" % len(body)
        payload = (size + b"\r\n" + body + b"\r\n" if body else b"") + b"0\r\n\r\n"
    else:
        head.append(b"Content-Length: %d" % len(body))
        payload = body
    return b"\r\n".join(head) + b"\r\n\r\n" + payload


@settings(max_examples=250, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    st.sampled_from(["POST", "POST", "POST", "GET", "PUT"]),
    paths,
    queries,
    headers,
    bodies,
    framings,
)
def test_no_input_makes_a_500(
    served: Served,
    method: str,
    path: str,
    query: str,
    hdrs: list[tuple[bytes, bytes]],
    body: bytes,
    framing: str,
) -> None:
    answer = exchange(served.port, build(method, path, query, hdrs, body, framing))
    status_line, _, rest = answer.partition(b"\r\n")
    status = int(status_line.split(b" ")[1])
    assert status != 500, answer[:400]
    if status < 500 and b"x-llm-sidecar" not in rest.lower() and status != 200:
        # The proxy's own refusals are OpenAI-style JSON.
        body_part = rest.partition(b"\r\n\r\n")[2]
        assert "error" in orjson.loads(body_part), answer[:400]


def test_the_fuzzed_proxy_logged_no_traceback(served: Served) -> None:
    # After the fuzz in file order (the fixture checks again at its end).
    exchange(served.port, build("POST", "/v1/chat/completions", "", [], b"{", "length"))
    assert_clean_log(served.log)
