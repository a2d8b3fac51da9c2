"""A seeded fuzzer for the socket a meshd binds (the dispatcher's ROUTER), reusable by any test.

    fuzzer = FrameFuzzer(random.Random(seed), replay=ReplayTarget(...))
    with FuzzSender(endpoint, random.Random(seed)) as sender:
        for message in fuzzer.messages(10_000):
            sender.send(message)
        sent = sender.tally          # Counter of expectations: what the daemon must have counted

Every message says what the daemon should make of it (`expect`):

* BAD_FRAME: reaches the dispatcher and is dropped as a FrameError (counted in `bad_frames`):
  random multipart messages (random frame counts and sizes), valid headers with wrong payload
  lengths or checksums, huge declared sizes, unknown versions/kinds/codecs, truncated headers and
  payloads, wrong frame counts, chunks sent the wrong way, compressed payloads that are corrupt or
  inflate to the declared size with a wrong checksum, and `ready` control messages that are
  invalid (credits out of range, wrong types, other control types, bodies that are not JSON).
* STALE: a result whose header is valid: a *valid* result frame (built as a worker builds it,
  then re-encoded) with a wrong epoch, an unknown job, an unknown chunk, a stale attempt, or as
  it was, and any of the above whose header is fine but whose payload is not (wrong length,
  checksum, corrupt or bomb compression). It comes from a peer that never registered, so the
  dispatcher drops it as a stale result (`stale_results`, not a bad frame) before it looks at the
  payload: no checksum, no decompression, so a zip bomb costs nothing (`verdict_of_unregistered`).
* RAW_TCP: bytes on a plain TCP connection to the port: random bytes, HTTP, TLS, ZMTP greetings
  we do not speak, an incompatible socket type, a frame declaring a huge size then cut off.
  Not all of it stops in ZeroMQ: without ZAP, libzmq (4.3) takes a peer whose first byte is not
  0xFF for an unversioned ZMTP/1.0 peer (no handshake, no socket type check) and delivers
  whatever its bytes parse to as length-prefixed frames. `zmtp_deliverable(raw)` says how many
  messages that can be at most (exact unless two raw peers pick the same routing id); each is a
  bad frame for the dispatcher. (With CURVE and a ZAP handler libzmq refuses ZMTP 1.0/2.0 peers.)

Valid-looking messages are made with the project's own encoder (`frames.encode`, control bodies
as `mesh.transport.protocol` defines them, results as `run_chunk` + `Worker._process` make them), then
mutated; a mutated header gets its CRC recomputed where the point is to reach the check behind it.

Never generated: a fully valid `ready` (valid credits, node and slot). A peer that registers as
a worker and then never answers legitimately holds the chunks it is given (the dispatcher cannot
tell it from a slow worker), so the job would wait for it: keeping such peers out is
authentication (ZeroMQ CURVE + ZAP allowlist), not frame checking.
"""
from __future__ import annotations

import random
import socket
import struct
import zlib
from collections import Counter
from dataclasses import dataclass
from typing import Callable, Iterator

import orjson
import zmq

from mesh.codecs import frames
from mesh.codecs.compression import get_codec
from mesh.codecs.errors import FrameError
from mesh.codecs.frames import MAX_EXTRA, MAX_PAYLOAD, Kind, Segment
from mesh.workers.execute import run_chunk
from mesh.tasks import resolve_task
from zmtp_raw import zmtp_deliverable, zmtp_greeting, zmtp_ready

BAD_FRAME = "bad_frame"
STALE = "stale"
RAW_TCP = "raw_tcp"


def verdict_of_unregistered(parts: tuple[bytes, ...]) -> str:
    """What the dispatcher must make of a message from a peer that never registered: a result
    with a valid header is stale whatever its payload (it is checked only for a chunk we wait
    for); anything else that is malformed is a bad frame."""
    if len(parts) == 2:
        try:
            if frames.decode_header(parts[0]).kind == Kind.RESULT:
                return STALE
        except FrameError:
            pass
    return BAD_FRAME
RAW_AT_MOST = "raw_bad_frames_at_most"  # tally key: sum of zmtp_deliverable() over RAW_TCP messages

#: Frames stay far below any sane ZMQ_MAXMSGSIZE (the largest legitimate frame is a 512 MiB
#: result payload), so what is counted does not change when the ROUTER gets one.
MAX_RANDOM_FRAME = 1 << 20
MAX_BOMB_RAW = 4 << 20
# Byte offsets of the fixed header fields (see mesh.codecs.frames).
VERSION_AT, KIND_AT, CODEC_AT = 4, 5, 6
CHUNK_ID_AT, RAW_LEN_AT, PAYLOAD_LEN_AT, CHECKSUM_AT, JOB_LEN_AT = 16, 30, 38, 46, 50


@dataclass(frozen=True)
class FuzzMessage:
    family: str
    expect: str
    parts: tuple = ()     # a multipart message, sent from a DEALER (the ROUTER prepends our identity)
    raw: bytes = b""      # bytes written on a plain TCP connection (expect RAW_TCP)
    at_most: int = 0      # RAW_TCP: messages ZeroMQ may deliver from `raw` (zmtp_deliverable)


@dataclass(frozen=True)
class ReplayTarget:
    """A running job to replay results at: its id and epoch, a valid result of one of its chunks
    (header, payload) as a worker sends it, and how many chunk ids are plausible."""
    job_id: str
    epoch: int
    result: tuple
    chunks: int = 64


def worker_result(job_id: str, epoch: int, chunk_id: int, data: bytes, task: str = "identity",
                  attempt: int = 0) -> tuple:
    """The result frame a worker sends for a chunk holding `data` (one plain segment): the task
    run by `run_chunk`, output zstd-compressed, meta as JSON, exactly as `Worker._process` does."""
    zstd = get_codec("zstd")
    segment = Segment(0, 0, len(data), len(data))
    outcome = run_chunk(resolve_task(task), {}, (segment,), (memoryview(data),), max_segment_bytes=len(data) + 1,
                        compress_output=zstd.compress)
    return frames.encode(Kind.RESULT, job_id=job_id, epoch=epoch, chunk_id=chunk_id, attempt=attempt,
                         payload=outcome.output, codec="none", record_count=outcome.records_out,
                         extra=orjson.dumps(outcome.meta()))


def patch(header: bytes, offset: int, fmt: str, value, *, fix_crc: bool = True) -> bytes:
    """`header` with one field overwritten; its CRC recomputed unless `fix_crc` is False."""
    body = bytearray(header[:-4])
    struct.pack_into(fmt, body, offset, value)
    crc = zlib.crc32(body) if fix_crc else struct.unpack_from("<I", header, len(header) - 4)[0]
    return bytes(body) + struct.pack("<I", crc)


def recrc(body: bytes) -> bytes:
    """A header body (everything before the CRC) with a correct CRC appended."""
    return body + struct.pack("<I", zlib.crc32(body))


class FrameFuzzer:
    """Seeded generator of hostile messages; `families` picks a subset (default: all that apply)."""

    def __init__(self, rng: random.Random, *, replay: ReplayTarget | None = None,
                 families: tuple[str, ...] | None = None):
        self.rng = rng
        self.replay = replay
        table: dict[str, tuple[int, Callable[[], FuzzMessage]]] = {
            "random_multipart": (20, self.random_multipart),
            "frame_count": (6, self.frame_count),
            "wrong_length": (8, self.wrong_length),
            "wrong_checksum": (8, self.wrong_checksum),
            "huge_declared": (8, self.huge_declared),
            "unknown_version_kind": (8, self.unknown_version_kind),
            "truncated": (8, self.truncated),
            "bad_compressed": (3, self.bad_compressed),
            "bad_ready": (10, self.bad_ready),
            "wrong_direction": (3, self.wrong_direction),
            "raw_tcp": (3, self.raw_tcp),
        }
        if replay is not None:
            table["replay"] = (10, self.replayed_result)
        if families is not None:
            unknown = set(families) - set(table)
            if unknown:
                raise ValueError(f"families must be among {sorted(table)} (got {sorted(unknown)})")
            table = {name: table[name] for name in families}
        self._makers = [maker for _, (_, maker) in table.items()]
        self._weights = [weight for weight, _ in table.values()]

    def messages(self, count: int) -> Iterator[FuzzMessage]:
        for _ in range(count):
            yield self.one()

    def one(self) -> FuzzMessage:
        return self.rng.choices(self._makers, self._weights)[0]()

    # -- helpers --
    def _bytes(self, n: int) -> bytes:
        return self.rng.randbytes(n)

    def _size(self) -> int:
        """Mostly small frames, some of a few KiB, rarely up to MAX_RANDOM_FRAME."""
        roll = self.rng.random()
        if roll < 0.10:
            return 0
        if roll < 0.55:
            return self.rng.randint(1, 64)
        if roll < 0.90:
            return self.rng.randint(65, 4096)
        if roll < 0.995:
            return self.rng.randint(4097, 64 << 10)
        return self.rng.randint(64 << 10, MAX_RANDOM_FRAME)

    def _job_id(self) -> str:
        alphabet = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789._-"
        return "".join(self.rng.choices(alphabet, k=self.rng.randint(1, 128)))

    def _valid(self, kind: Kind | None = None, codec: str = "none") -> tuple[bytes, bytes]:
        """A valid [header, payload] of any kind, with random fields, made by `frames.encode`."""
        kind = kind or self.rng.choice(list(Kind))
        payload = self._bytes(self.rng.randint(0, 2048))
        segments = (Segment(self.rng.randint(0, 9), 0, len(payload), len(payload)),) if payload else ()
        extra = orjson.dumps({"records_in": self.rng.randint(0, 99)}) if self.rng.random() < 0.5 else b""
        return frames.encode(kind, job_id=self._job_id(), epoch=self.rng.getrandbits(64),
                             chunk_id=self.rng.getrandbits(64), attempt=self.rng.getrandbits(16), payload=payload,
                             codec=codec, segments=segments, record_count=self.rng.getrandbits(32), extra=extra)

    def _bad(self, family: str, *parts) -> FuzzMessage:
        parts = tuple(bytes(p) for p in parts)
        return FuzzMessage(family, verdict_of_unregistered(parts), parts)

    # -- families that reach the dispatcher and must be counted as bad frames --
    def random_multipart(self) -> FuzzMessage:
        count = self.rng.choice((1, 1, 2, 2, 2, 3, 4, 6, 9))
        parts = [self._bytes(self._size()) for _ in range(count)]
        if self.rng.random() < 0.3 and parts[0]:  # looks like our header at first sight
            parts[0] = frames.MAGIC + bytes([frames.VERSION]) + parts[0]
        return self._bad("random_multipart", *parts)

    def frame_count(self) -> FuzzMessage:
        header, payload = self._valid()
        shapes = ([header], [payload], [header, payload, b""], [header, payload, header, payload],
                  [b"", header, payload], [header] * self.rng.randint(3, 12))
        return self._bad("frame_count", *self.rng.choice(shapes))

    def wrong_length(self) -> FuzzMessage:
        header, payload = self._valid()
        roll = self.rng.random()
        if roll < 0.4:  # payload frame longer or shorter than payload_len
            payload = payload + self._bytes(self.rng.randint(1, 512)) if self.rng.random() < 0.5 or not payload \
                else payload[:self.rng.randrange(len(payload))]
        elif roll < 0.7:  # payload_len (and raw_len, for "none") says otherwise, CRC fixed
            wrong = len(payload) + self.rng.choice((-1, 1, 7, 4096))
            wrong = max(wrong, 0) if wrong != len(payload) else wrong + 1
            header = patch(patch(header, PAYLOAD_LEN_AT, "<Q", wrong), RAW_LEN_AT, "<Q", wrong)
        else:  # payload_len != raw_len with codec none, CRC fixed
            header = patch(header, RAW_LEN_AT, "<Q", len(payload) + self.rng.randint(1, 1 << 20))
        return self._bad("wrong_length", header, payload)

    def wrong_checksum(self) -> FuzzMessage:
        header, payload = self._valid()
        roll = self.rng.random()
        if roll < 0.35 and payload:  # one payload byte flipped
            i = self.rng.randrange(len(payload))
            payload = payload[:i] + bytes([payload[i] ^ (1 << self.rng.randrange(8))]) + payload[i + 1:]
        elif roll < 0.65:  # the payload checksum field changed, header CRC fixed
            old = struct.unpack_from("<I", header, CHECKSUM_AT)[0]
            header = patch(header, CHECKSUM_AT, "<I", old ^ (1 + self.rng.getrandbits(31)))
        else:  # a header byte flipped, header CRC left as it was
            i = self.rng.randrange(len(header))
            header = header[:i] + bytes([header[i] ^ (1 << self.rng.randrange(8))]) + header[i + 1:]
        return self._bad("wrong_checksum", header, payload)

    def huge_declared(self) -> FuzzMessage:
        header, payload = self._valid(Kind.RESULT)
        huge = self.rng.choice((MAX_PAYLOAD + 1, 1 << 32, 1 << 40, (1 << 63) - 1, (1 << 64) - 1))
        roll = self.rng.random()
        if roll < 0.3:
            header = patch(header, self.rng.choice((RAW_LEN_AT, PAYLOAD_LEN_AT)), "<Q", huge)
        elif roll < 0.5:  # at the limit, codec none, with a tiny payload: the length check, no allocation
            header = patch(patch(header, RAW_LEN_AT, "<Q", MAX_PAYLOAD), PAYLOAD_LEN_AT, "<Q", MAX_PAYLOAD)
        elif roll < 0.7:  # extra length
            job_len = header[JOB_LEN_AT]
            at = JOB_LEN_AT + 1 + job_len + 2  # after job id and a zero segment count
            value = self.rng.choice((MAX_EXTRA + 1, 0xFFFFFFFF, len(header)))
            body = bytearray(header[:at + 4])
            struct.pack_into("<H", body, at - 2, 0)
            struct.pack_into("<I", body, at, value)
            header = recrc(bytes(body) + self._bytes(self.rng.randint(0, 64)))
        elif roll < 0.85:  # segment count far beyond the header
            at = JOB_LEN_AT + 1 + header[JOB_LEN_AT]
            header = patch(header, at, "<H", self.rng.choice((0xFFFF, 1000, 2)))
        else:  # job id length beyond the header
            header = patch(header, JOB_LEN_AT, "<B", 255)
        return self._bad("huge_declared", header, payload)

    def unknown_version_kind(self) -> FuzzMessage:
        header, payload = self._valid()
        roll = self.rng.random()
        if roll < 0.3:
            version = self.rng.choice((0, 2, 3, 0x7F, 0xFF))
            header = patch(header, VERSION_AT, "<B", version, fix_crc=self.rng.random() < 0.5)
        elif roll < 0.6:
            header = patch(header, KIND_AT, "<B", self.rng.choice((0, 4, 5, 0x80, 0xFF)))
        elif roll < 0.85:
            header = patch(header, CODEC_AT, "<B", self.rng.choice((4, 5, 0x7F, 0xFF)))
        else:
            header = self.rng.choice((b"CMSG", b"cmsh", b"\0\0\0\0", b"HTTP")) + header[4:]
        return self._bad("unknown_version_kind", header, payload)

    def truncated(self) -> FuzzMessage:
        header, payload = self._valid()
        if self.rng.random() < 0.5 or not payload:
            return self._bad("truncated", header[:self.rng.randrange(len(header))], payload)
        return self._bad("truncated", header, payload[:self.rng.randrange(len(payload))])

    def bad_compressed(self) -> FuzzMessage:
        """Compressed payloads: corrupt, or a small bomb inflating to the declared size with a
        wrong checksum (bounded by MAX_BOMB_RAW): the dispatcher must never inflate either."""
        codec = self.rng.choice(("lz4", "zstd", "gzip"))
        if self.rng.random() < 0.5:
            header, payload = self._valid(codec=codec)
            cut = self.rng.randrange(max(len(payload), 1))
            payload = payload[:cut] + self._bytes(self.rng.randint(1, 64))
            header = patch(header, PAYLOAD_LEN_AT, "<Q", len(payload))
            return self._bad("bad_compressed", header, payload)
        raw_len = self.rng.randint(1, MAX_BOMB_RAW)
        bomb = get_codec(codec).compress(bytes(raw_len))
        header, _ = frames.encode(Kind.RESULT, job_id=self._job_id(), payload=b"")
        header = patch(patch(header, CODEC_AT, "<B", get_codec(codec).id), RAW_LEN_AT, "<Q", raw_len)
        wrong_crc = zlib.crc32(bytes(raw_len)) ^ 1
        header = patch(patch(header, PAYLOAD_LEN_AT, "<Q", len(bomb)), CHECKSUM_AT, "<I", wrong_crc)
        return self._bad("bad_compressed", header, bomb)

    def bad_ready(self) -> FuzzMessage:
        """`ready` (or another control type) that must be refused; never a fully valid one."""
        roll = self.rng.random()
        node, slot = self.rng.choice((("fuzz-node", 0), ("fuzz-node", 7), ("", -1)))
        if roll < 0.55:  # credits out of range or of the wrong type (JSON true is not a count)
            credits = self.rng.choice((0, -1, 65, 1000, 2**31, 2**63 - 1, -2**63, 1.5, 2.0, "2", None, True, False,
                                       [], {}, [2]))
            body = {"type": "ready", "credits": credits, "pid": 1, "core": 0, "node": node, "slot": slot}
        elif roll < 0.7:  # credits fine, node or slot missing or of the wrong type
            body = {"type": "ready", "credits": self.rng.randint(1, 64),
                    **self.rng.choice(({"node": node}, {"slot": slot}, {"node": 5, "slot": slot},
                                       {"node": node, "slot": "0"}, {"node": node, "slot": True},
                                       {"node": None, "slot": None}))}
        elif roll < 0.85:  # other control types (the dispatcher only accepts ready)
            body = {"type": self.rng.choice(("job", "stop", "peers", "", "READY", None, 42)), "credits": 2}
        else:  # bodies that are not a JSON object
            extra = self.rng.choice((b"not json", b"[1, 2]", b'"ready"', b"null", b"{", b"\xff\xfe",
                                     b"[" * 5000 + b"]" * 5000, self._bytes(self.rng.randint(1, 200))))
            header, payload = frames.encode(Kind.CONTROL, job_id=self.rng.choice(("-", self._job_id())), extra=extra)
            return self._bad("bad_ready", header, payload)
        if self.rng.random() < 0.1:  # padded to a larger body
            body["pad"] = "x" * self.rng.randint(1, 64 << 10)
        header, payload = frames.encode(Kind.CONTROL, job_id="-", extra=orjson.dumps(body))
        return self._bad("bad_ready", header, payload)

    def wrong_direction(self) -> FuzzMessage:
        """Valid frames the dispatcher never accepts: chunks (dispatcher -> worker only)."""
        return self._bad("wrong_direction", *self._valid(Kind.CHUNK))

    # -- replays: valid result frames, dropped as stale --
    def replayed_result(self) -> FuzzMessage:
        target = self.replay
        header, payload = target.result
        h = frames.decode_header(header)
        job_id, epoch, chunk_id, attempt = h.job_id, h.epoch, h.chunk_id, h.attempt
        roll = self.rng.random()
        if roll < 0.25:
            epoch = self.rng.choice((target.epoch + 1, max(target.epoch - 1, 0) if target.epoch else 2, 0,
                                     (1 << 64) - 1, self.rng.getrandbits(64)))
            if epoch == target.epoch:
                epoch += 1
        elif roll < 0.45:
            job_id = self._job_id()
        elif roll < 0.65:
            chunk_id = self.rng.choice((target.chunks + self.rng.randint(0, 1 << 20), (1 << 64) - 1))
        elif roll < 0.85:
            attempt = self.rng.randint(1, 0xFFFF)
        else:  # as it was: still not from a registered worker
            chunk_id = self.rng.randrange(target.chunks)
        header, payload = frames.encode(Kind.RESULT, job_id=job_id, epoch=epoch, chunk_id=chunk_id, attempt=attempt,
                                        payload=payload, codec="none", record_count=h.record_count, extra=h.extra)
        return FuzzMessage("replay", STALE, (header, bytes(payload)))

    # -- bytes that never make it through ZeroMQ --
    def raw_tcp(self) -> FuzzMessage:
        roll = self.rng.random()
        if roll < 0.3:
            raw = self._bytes(self.rng.randint(1, 64 << 10))
        elif roll < 0.4:
            raw = b"GET / HTTP/1.1\r\nHost: meshd\r\n\r\n"
        elif roll < 0.5:
            raw = b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03" + self._bytes(300)  # a TLS ClientHello start
        elif roll < 0.65:  # ZMTP greetings we do not speak: bad signature, old/new major version, CURVE/PLAIN
            raw = self.rng.choice((zmtp_greeting(major=self.rng.choice((1, 2, 4, 0xFF))),
                                   zmtp_greeting(mechanism=self.rng.choice((b"CURVE", b"PLAIN", b"GSSAPI", b"XYZ"))),
                                   b"\x00" + zmtp_greeting()[1:])) + self._bytes(self.rng.randint(0, 256))
        elif roll < 0.8:  # a socket type a ROUTER does not talk to
            raw = zmtp_greeting() + zmtp_ready(self.rng.choice((b"PUB", b"SUB", b"PUSH", b"PULL", b"PAIR", b"BOGUS")))
        else:  # a DEALER that declares a huge frame and stops after a few bytes of it
            declared = self.rng.choice(((1 << 62), (1 << 40), MAX_PAYLOAD + 1, 1 << 24))
            raw = zmtp_greeting() + zmtp_ready(b"DEALER") + b"\x02" + struct.pack(">Q", declared) \
                + self._bytes(self.rng.randint(0, 4096))
        return FuzzMessage("raw_tcp", RAW_TCP, raw=raw, at_most=zmtp_deliverable(raw))


class FuzzSender:
    """Sends FuzzMessages at a ZeroMQ endpoint: multipart ones from a pool of DEALER sockets
    (random identities, one replaced every `rotate_every` messages, so peers come and go), raw
    ones on fresh plain TCP connections. `tally` counts what was sent by expectation, `families`
    by family. Close it only after the daemon has counted what it must: `close()` drops what is
    still queued (completion is known by counting, never by linger)."""

    def __init__(self, endpoint: str, rng: random.Random, *, sockets: int = 8, rotate_every: int = 500,
                 send_timeout_s: float = 30.0):
        if not endpoint.startswith("tcp://"):
            raise ValueError(f"endpoint must be tcp://host:port (got {endpoint!r})")
        self.endpoint = endpoint
        host, _, port = endpoint[len("tcp://"):].rpartition(":")
        self.address = (host.strip("[]"), int(port))
        self.rng = rng
        self.rotate_every = rotate_every
        self.send_timeout_s = send_timeout_s
        self.ctx = zmq.Context()
        self.pool = [self._dealer() for _ in range(sockets)]
        self.tally: Counter = Counter()
        self.families: Counter = Counter()
        self.sent = 0

    def _dealer(self) -> zmq.Socket:
        sock = self.ctx.socket(zmq.DEALER)
        roll = self.rng.random()
        if roll < 0.4:
            sock.setsockopt(zmq.IDENTITY, b"fuzz-%d" % self.rng.getrandbits(32))
        elif roll < 0.7:  # arbitrary bytes, up to ZeroMQ's 255 (a leading zero byte is reserved)
            identity = bytes([self.rng.randint(1, 255)]) + self.rng.randbytes(self.rng.randint(0, 254))
            sock.setsockopt(zmq.IDENTITY, identity)
        sock.setsockopt(zmq.SNDTIMEO, int(self.send_timeout_s * 1000))
        sock.setsockopt(zmq.LINGER, int(self.send_timeout_s * 1000))
        sock.connect(self.endpoint)
        return sock

    def send(self, message: FuzzMessage) -> None:
        if message.raw:
            self._send_raw(message.raw)
        else:
            try:
                self.rng.choice(self.pool).send_multipart(message.parts, copy=False)
            except zmq.Again:
                raise TimeoutError(f"the daemon did not take a message within {self.send_timeout_s}s "
                                   f"({self.sent} sent): is it alive?") from None
        self.tally[message.expect] += 1
        self.tally[RAW_AT_MOST] += message.at_most
        self.families[message.family] += 1
        self.sent += 1
        if self.rotate_every and self.sent % self.rotate_every == 0:
            i = self.rng.randrange(len(self.pool))
            self.pool[i].close()  # with LINGER: ZeroMQ still delivers its queue (the daemon's count checks it)
            self.pool[i] = self._dealer()

    def _send_raw(self, raw: bytes) -> None:
        with socket.create_connection(self.address, timeout=self.send_timeout_s) as conn:  # refused: daemon gone
            try:
                conn.sendall(raw)
                conn.shutdown(socket.SHUT_WR)
            except TimeoutError:
                raise TimeoutError(f"the daemon did not read {len(raw)} bytes within {self.send_timeout_s}s") from None
            except OSError:
                pass  # ZeroMQ hung up on us mid-way (reset, broken pipe, not connected): expected

    def close(self) -> None:
        for sock in self.pool:
            sock.close(linger=0)
        self.ctx.term()

    def __enter__(self) -> "FuzzSender":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
