"""Deterministic, seeded generator of realistic web access logs (JSON lines).

Every record is one compact JSON object, keys in this order::

    {"ts":"2024-03-01T00:00:00.031Z","ip":"81.134.7.22","method":"GET",
     "url":"/api/v1/users/5812","status":200,"bytes":1834,
     "ua":"Mozilla/5.0 (...)","user_id":48121}

* ``ts``: ISO-8601 UTC with milliseconds, strictly increasing over a corpus.
* ``ip``: IPv4 from a fixed pool of ~3,000 addresses, Zipf-skewed, so a few
  heavy hitters (crawlers, an office NAT, health checks) dominate.
* ``method``: ~86% GET, then POST, HEAD, PUT, DELETE; the URL pool depends
  on the method (no ``DELETE /static/app.js``).
* ``url``: ~1,000 paths per method (API ids, static assets, searches),
  Zipf-skewed.
* ``status``: 85% 200; 201/204/301/304 9%; 4xx 8% (400/401/403/404/429);
  5xx 2% (500/502/503).
* ``bytes``: depends on the URL and the status (0 for 204/304, and HEAD).
* ``ua``: 20 user agents (browsers, bots, HTTP libraries); heavy-hitter
  bots and probes keep their own UA.
* ``user_id``: an int, or ``null`` (bots, probes, anonymous) for ~40%.

Determinism: the same seed gives byte-identical records everywhere.  Only
``random.Random(seed).randbytes`` drives the record stream (Mersenne Twister,
stable across CPython versions and platforms), the pools are built with
integer arithmetic only (no float ``pow``/``log`` whose last bit could differ
between libms) from a fixed pool seed, and multi-byte values are read little
endian regardless of the host.  Compressed files use fixed settings (gzip:
level 6, mtime 0, no file name in the header; zstd: level 3, single thread;
lz4 frame: level 0, 64 KiB blocks), so their bytes are identical for the same
compression library builds (a different zlib, e.g. zlib-ng, may encode the
same data differently; the decompressed content never changes).

Speed: records are produced in blocks; per record there is one slice of a
``randbytes`` buffer, eight table look-ups and one ``%`` format.  See
``python -m bench.corpus --help``.
"""
from __future__ import annotations

import argparse
import gzip
import os
import zlib
import re
import sys
import time
from array import array
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from itertools import accumulate
from pathlib import Path
from random import Random
from typing import Iterator, Sequence

__all__ = [
    "AVG_RECORD_BYTES",
    "CorpusInfo",
    "DEFAULT_START",
    "LogGenerator",
    "SHAPES",
    "generate_records",
    "main",
    "write_corpus",
]

DEFAULT_START = datetime(2024, 3, 1, tzinfo=timezone.utc)
_EPOCH = datetime(1970, 1, 1, tzinfo=timezone.utc)

# Measured mean record size (bytes, newline included; ~222 for seed 7); turns the
# byte-size targets of the "demo" shape into record counts.
AVG_RECORD_BYTES = 222

GZIP_LEVEL = 6
ZSTD_LEVEL = 3
LZ4_LEVEL = 0
BLOCK_RECORDS = 8192  # records per generated block (~1.6 MB)

_TABLE_BITS = 16
_TABLE_SIZE = 1 << _TABLE_BITS
_POOL_SEED = 0x6368756E6B  # fixed: pools are the same for every corpus seed
# uint16 random values consumed per record (3 used, 1 spare).  8 bytes keeps
# every randbytes() call a whole number of 32-bit MT words, so the output does
# not depend on how a stream is cut into blocks.
_FIELDS_PER_RECORD = 4


# --------------------------------------------------------------------------
# Pools and look-up tables (built once, lazily, from a fixed seed)
# --------------------------------------------------------------------------

def _table(items: list, weights: list[int], size: int = _TABLE_SIZE) -> list:
    """A list of ``size`` slots where each item fills a share of slots
    proportional to its integer weight (rounded quantiles, no randomness), so
    a uniform index into it samples the weighted distribution."""
    total = sum(weights)
    out: list = []
    cum = prev = 0
    for item, w in zip(items, weights):
        cum += w
        end = (2 * cum * size + total) // (2 * total)  # round(cum*size/total)
        out.extend([item] * (end - prev))
        prev = end
    assert len(out) == size
    return out


def _zipf(n: int, offset: int = 1) -> list[int]:
    """Zipf-Mandelbrot weights 1/(k+offset), as integers."""
    return [10**12 // (k + offset) for k in range(n)]


_UNSAFE = re.compile(r'["\\\x00-\x1f\x7f-\U0010ffff]')


def _check_plain(s: str) -> str:
    # Pool strings are inlined into JSON unescaped: keep them JSON-safe ASCII.
    if _UNSAFE.search(s):
        raise ValueError(f"pool string needs JSON escaping: {s!r}")
    return s


_UAS: list[tuple[str, int]] = [
    ("Mozilla/5.0 (Windows NT 10.0; Win64; x64) AppleWebKit/537.36 (KHTML, like Gecko) "
     "Chrome/122.0.0.0 Safari/537.36", 160),
    ("Mozilla/5.0 (Macintosh; Intel Mac OS X 10_15_7) AppleWebKit/537.36 (KHTML, like Gecko) "
     "Chrome/122.0.0.0 Safari/537.36", 90),
    ("Mozilla/5.0 (iPhone; CPU iPhone OS 17_3 like Mac OS X) AppleWebKit/605.1.15 "
     "(KHTML, like Gecko) Version/17.3 Mobile/15E148 Safari/604.1", 90),
    ("Mozilla/5.0 (Linux; Android 14; Pixel 8) AppleWebKit/537.36 (KHTML, like Gecko) "
     "Chrome/122.0.6261.64 Mobile Safari/537.36", 70),
    ("Mozilla/5.0 (Windows NT 10.0; Win64; x64; rv:123.0) Gecko/20100101 Firefox/123.0", 45),
    ("Mozilla/5.0 (Macintosh; Intel Mac OS X 10_15_7) AppleWebKit/605.1.15 (KHTML, like Gecko) "
     "Version/17.3 Safari/605.1.15", 40),
    ("Mozilla/5.0 (Windows NT 10.0; Win64; x64) AppleWebKit/537.36 (KHTML, like Gecko) "
     "Chrome/122.0.0.0 Safari/537.36 Edg/122.0.2365.66", 30),
    ("Mozilla/5.0 (X11; Linux x86_64; rv:123.0) Gecko/20100101 Firefox/123.0", 12),
    ("Mozilla/5.0 (compatible; Googlebot/2.1; +http://www.google.com/bot.html)", 45),
    ("Mozilla/5.0 (compatible; bingbot/2.0; +http://www.bing.com/bingbot.htm)", 20),
    ("Mozilla/5.0 (compatible; AhrefsBot/7.0; +http://ahrefs.com/robot/)", 12),
    ("facebookexternalhit/1.1 (+http://www.facebook.com/externalhit_uatext.php)", 6),
    ("Slackbot-LinkExpanding 1.0 (+https://api.slack.com/robots)", 4),
    ("curl/8.5.0", 60),
    ("python-requests/2.31.0", 70),
    ("Go-http-client/1.1", 55),
    ("okhttp/4.12.0", 60),
    ("kube-probe/1.29", 5),
    ("PostmanRuntime/7.36.3", 8),
    ("Wget/1.21.4", 5),
]

_METHODS: list[tuple[str, int]] = [
    ("GET", 860), ("POST", 80), ("HEAD", 25), ("PUT", 22), ("DELETE", 13),
]

# status -> (weight per 10,000, scales with URL payload?, fixed body bytes)
_STATUSES: list[tuple[int, int, int, int]] = [
    (200, 8500, 1, 0),
    (201, 150, 0, 310),
    (204, 100, 0, 0),
    (301, 100, 0, 178),
    (304, 150, 0, 0),
    (400, 100, 0, 142),
    (401, 120, 0, 96),
    (403, 80, 0, 153),
    (404, 400, 0, 548),
    (429, 100, 0, 87),
    (500, 90, 0, 265),
    (502, 60, 0, 552),
    (503, 50, 0, 299),
]

_SEARCH_TERMS = [
    "running+shoes", "laptop", "usb-c+cable", "coffee", "headphones", "desk+lamp",
    "backpack", "gift+card", "water+bottle", "phone+case", "monitor", "keyboard",
    "yoga+mat", "sunglasses", "tent", "air+fryer", "book", "chair", "jacket", "socks",
]
_SLUGS = [
    "summer-sale", "new-arrivals", "how-we-ship", "returns", "sustainability",
    "gift-guide", "size-chart", "faq", "careers", "press", "store-locator", "about",
]


@dataclass(frozen=True)
class _Pools:
    # "client" slots: an IP with its UA and user (bots: own UA, no user)
    ip: list[str]       # '151.6.78.68","method":"'
    tail: list[str]     # ',"ua":"...","user_id":123}\n'
    req: list[str]      # 'GET","url":"/x","status":200,"bytes":1834' slots
    inc: list[int]      # ms between consecutive records (>= 1)
    ms: list[str]       # '.007Z","ip":"' for 0..999


def _hex(rng: Random, digits: int) -> str:
    return format(rng.getrandbits(4 * digits), f"0{digits}x")


# Heavy hitters: (ip, fixed UA or None for "any human/library UA", weight rank)
_HEAVY = [
    ("66.249.66.1", "Mozilla/5.0 (compatible; Googlebot/2.1; +http://www.google.com/bot.html)"),
    ("10.0.3.17", "kube-probe/1.29"),
    ("203.0.113.45", None),  # office NAT: many users behind one address
    ("157.55.39.12", "Mozilla/5.0 (compatible; bingbot/2.0; +http://www.bing.com/bingbot.htm)"),
    ("10.0.3.18", "kube-probe/1.29"),
    ("198.51.100.7", "okhttp/4.12.0"),  # a partner's integration
    ("54.36.148.92", "Mozilla/5.0 (compatible; AhrefsBot/7.0; +http://ahrefs.com/robot/)"),
    ("185.191.171.4", "python-requests/2.31.0"),  # a scraper
]


def _ip_pool(rng: Random, n: int = 3000) -> list[str]:
    firsts = [24, 31, 37, 46, 49, 62, 66, 71, 73, 77, 81, 86, 92, 98, 103, 109,
              115, 124, 142, 151, 163, 176, 185, 188, 190, 194, 203, 212, 217, 223]
    ips = [ip for ip, _ in _HEAVY]
    seen = set(ips)
    while len(ips) < n:
        r = rng.getrandbits(32)
        ip = (f"{firsts[r % len(firsts)]}.{(r >> 5) & 255}."
              f"{(r >> 13) & 255}.{1 + ((r >> 21) % 254)}")
        if ip not in seen:
            seen.add(ip)
            ips.append(ip)
    return ips


def _url_pools(rng: Random) -> dict[str, list[tuple[str, int]]]:
    """Per method: URLs in popularity order with a typical response size."""
    def uid() -> int:
        return 1 + rng.getrandbits(20) % 250_000

    h = [_hex(rng, 4) for _ in range(4)]
    head_get = [
        ("/", 18_400), ("/api/v1/session", 412), (f"/static/app.{h[0]}.js", 148_230),
        (f"/static/vendor.{h[1]}.js", 412_881), (f"/static/styles.{h[2]}.css", 38_112),
        ("/favicon.ico", 4_286), ("/health", 15), ("/api/v1/cart", 1_204),
        ("/static/img/logo.svg", 6_840), ("/robots.txt", 212), ("/api/v1/products?page=1", 9_880),
        (f"/static/chunk-checkout.{h[3]}.js", 52_410), ("/sitemap.xml", 48_210),
        ("/api/v1/recommendations", 5_320), ("/index.html", 18_400),
    ]
    get_tail: list[tuple[str, int]] = []
    while len(get_tail) < 1000:
        k = rng.getrandbits(4)
        if k < 5:
            i = uid()
            sub = ("", "/orders", "/profile", "/addresses")[rng.getrandbits(2)]
            get_tail.append((f"/api/v1/users/{i}{sub}", 600 + rng.getrandbits(11)))
        elif k < 8:
            get_tail.append((f"/api/v1/products/{uid()}", 1_500 + rng.getrandbits(12)))
        elif k < 10:
            get_tail.append((f"/images/products/{uid()}.jpg", 20_000 + rng.getrandbits(17)))
        elif k < 12:
            t = _SEARCH_TERMS[rng.getrandbits(8) % len(_SEARCH_TERMS)]
            page = 1 + rng.getrandbits(2)
            get_tail.append((f"/search?q={t}&page={page}", 7_000 + rng.getrandbits(13)))
        elif k < 13:
            get_tail.append((f"/api/v1/orders/{uid()}", 900 + rng.getrandbits(11)))
        elif k < 14:
            s = _SLUGS[rng.getrandbits(8) % len(_SLUGS)]
            get_tail.append((f"/blog/{s}", 22_000 + rng.getrandbits(14)))
        else:
            get_tail.append((f"/products/{uid()}", 16_000 + rng.getrandbits(14)))
    get = head_get + get_tail

    post = [("/api/v1/events", 2), ("/api/v1/login", 340), ("/api/v1/cart/items", 1_210),
            ("/api/v1/orders", 1_890), ("/api/v1/search", 8_230), ("/api/v1/logout", 2),
            ("/api/v1/password/reset", 64), ("/api/v1/newsletter", 48)]
    post += [(f"/api/v1/users/{uid()}/orders", 1_700 + rng.getrandbits(10)) for _ in range(300)]
    put = [(f"/api/v1/users/{uid()}", 700 + rng.getrandbits(10)) for _ in range(300)]
    put = [("/api/v1/cart", 1_180)] + put
    delete = [("/api/v1/sessions/current", 2)]
    delete += [(f"/api/v1/cart/items/{uid()}", 2) for _ in range(300)]
    return {"GET": get, "HEAD": get, "POST": post, "PUT": put, "DELETE": delete}


_POOLS: _Pools | None = None


def _pools() -> _Pools:
    global _POOLS
    if _POOLS is not None:
        return _POOLS
    rng = Random(_POOL_SEED)

    ips = _ip_pool(rng)
    ip_table = _table(ips, _zipf(len(ips), offset=2))

    # Joint (method, url) table: method by weight, URL Zipf within method.
    urls = _url_pools(rng)
    pairs: list[tuple[str, int]] = []
    weights: list[int] = []
    for m, mw in _METHODS:
        pool = urls[m]
        zw = _zipf(len(pool), offset=2)
        zt = sum(zw)
        for (u, size), w in zip(pool, zw):
            tok = f'{m}","url":"{_check_plain(u)}"'
            pairs.append((tok, 0 if m == "HEAD" else size))
            weights.append(mw * w * 10**6 // zt)
    joint = _table(pairs, weights)

    # Request slots: (method, url) by popularity, each slot with its own
    # status and body size, so a uniform slot index yields the status mix
    # and a URL's size varies a little from slot to slot.
    st = _table(_STATUSES, [w for _, w, _, _ in _STATUSES])
    req: list[str] = []
    for tok, size in joint:
        r = rng.getrandbits(32)
        code, _, scaled, body = st[r & 0xFFFF]
        nbytes = ((size * scaled + body) * ((r >> 16) + 32768)) >> 16
        req.append(f'{tok},"status":{code},"bytes":{nbytes}')

    ua_table = _table([_check_plain(u) for u, _ in _UAS], [w for _, w in _UAS])

    # Humans: 20% anonymous, else Zipf over 50,000 user ids in 1..999,999.
    ids: list[str] = []
    seen: set[int] = set()
    while len(ids) < 50_000:
        i = 1 + rng.getrandbits(20) % 999_999
        if i not in seen:
            seen.add(i)
            ids.append(str(i))
    uw = _zipf(len(ids), offset=5)
    ut = sum(uw)
    user_table = _table(["null"] + ids, [ut // 4] + uw)

    # Client slots: the IP skew decides the traffic; bots keep their own UA
    # and are never logged in, other slots draw a UA and a user.
    fixed = {ip: _check_plain(ua) for ip, ua in _HEAVY if ua is not None}
    ip_tok: list[str] = []
    tail: list[str] = []
    for ip in ip_table:
        ua = fixed.get(ip)
        if ua is None:
            r = rng.getrandbits(32)
            ua, user = ua_table[r & 0xFFFF], user_table[r >> 16]
            if "bot" in ua or "probe" in ua or "facebookexternalhit" in ua:
                user = "null"
        else:
            user = "null"
        ip_tok.append(f'{ip}","method":"')
        tail.append(f',"ua":"{ua}","user_id":{user}}}\n')

    # Inter-arrival times: 1 + 120 u^3 ms (mean ~31 ms, max 121 ms).
    size3 = _TABLE_SIZE ** 3
    inc = [1 + (i ** 3 * 120) // size3 for i in range(_TABLE_SIZE)]

    _POOLS = _Pools(
        ip=ip_tok,
        tail=tail,
        req=req,
        inc=inc,
        ms=[f'.{i:03d}Z","ip":"' for i in range(1000)],
    )
    return _POOLS


# --------------------------------------------------------------------------
# Record generation
# --------------------------------------------------------------------------

def _to_epoch_ms(start_ts: datetime | int | float) -> int:
    if isinstance(start_ts, datetime):
        if start_ts.tzinfo is None:
            start_ts = start_ts.replace(tzinfo=timezone.utc)
        return (start_ts - _EPOCH) // timedelta(milliseconds=1)
    return int(round(float(start_ts) * 1000))  # epoch seconds


class LogGenerator:
    """Stateful record stream: consecutive :meth:`block` calls continue the
    timeline (timestamps keep increasing) and the random stream.

    ``rng`` must be a ``random.Random`` (only its ``randbytes`` is used);
    ``start_ts`` is an aware/naive-UTC ``datetime`` or epoch seconds.
    """

    def __init__(self, rng: Random, start_ts: datetime | int | float = DEFAULT_START):
        self._rng = rng
        self._p = _pools()
        self._ms = _to_epoch_ms(start_ts)
        self._sec = None
        self._prefix = ""
        self.records = 0  # records generated so far

    @property
    def last_ms(self) -> int:
        """Epoch milliseconds of the last generated record (or the start)."""
        return self._ms

    def block(self, n: int) -> bytes:
        """``n`` newline-terminated records as one bytes object."""
        if n <= 0:
            return b""
        v = array("H")
        v.frombytes(self._rng.randbytes(n * 2 * _FIELDS_PER_RECORD))
        if sys.byteorder != "little":
            v.byteswap()
        p = self._p
        ip, tail, req, mstr = p.ip, p.tail, p.req, p.ms
        strftime, gmtime = time.strftime, time.gmtime
        sec, prefix = self._sec, self._prefix
        lo = sec * 1000 if sec is not None else -1  # first ms of second `sec`
        hi = lo + 1000
        out: list[str] = []
        extend = out.extend
        # v[3::4] is spare (kept so every block stays MT-word aligned).
        ts_ms = list(accumulate(map(p.inc.__getitem__, v[2::4]), initial=self._ms))
        del ts_ms[0]
        for t, a, b in zip(ts_ms, v[0::4], v[1::4]):
            if t >= hi:
                sec = t // 1000
                lo = sec * 1000
                hi = lo + 1000
                prefix = strftime('{"ts":"%Y-%m-%dT%H:%M:%S', gmtime(sec))
            extend((prefix, mstr[t - lo], ip[a], req[b], tail[a]))
        self._ms, self._sec, self._prefix = ts_ms[-1], sec, prefix
        self.records += n
        return "".join(out).encode("ascii")

    def blocks(self, n: int, block_records: int = BLOCK_RECORDS) -> Iterator[bytes]:
        """``n`` records as a stream of blocks of at most ``block_records``."""
        while n > 0:
            k = min(n, block_records)
            yield self.block(k)
            n -= k


def generate_records(rng: Random, n: int,
                     start_ts: datetime | int | float = DEFAULT_START) -> Iterator[bytes]:
    """Yield ``n`` records, one newline-terminated JSON line (bytes) each.

    Convenience API; for speed use :class:`LogGenerator` ``.block()``/``.blocks()``,
    which produce the same bytes (for the same rng state) joined into blocks.
    """
    gen = LogGenerator(rng, start_ts)
    for blk in gen.blocks(n):
        yield from blk.splitlines(keepends=True)


# --------------------------------------------------------------------------
# Writing files
# --------------------------------------------------------------------------

@dataclass
class CorpusInfo:
    files: Sequence[Path]      # sorted (a list; for the tiny shape computed on demand)
    records: int
    bytes_uncompressed: int
    bytes_on_disk: int = 0
    shape: str = ""
    seed: int = 0


SHAPES = ("demo", "small", "big", "plain", "tiny", "one-gz", "one-zst")

# one-gz / one-zst: ONE file of >= 1 GiB decompressed at scale 1 (scaled by bytes)
ONE_FILE_BYTES = 1 << 30
ONE_BASE_RECORDS = 1 << 16      # the block generated once (~14.6 MB, ~34 minutes of log)
ONE_GZIP_LEVEL = 2              # isal's levels are 0-3: a moderate one
ONE_ZSTD_FRAME_BYTES = 4 << 20  # decompressed bytes per zstd frame, cut at any byte

TINY_FILES = 1_000_000        # at scale 1
TINY_FILES_PER_DIR = 1000
TINY_GZ_EVERY = 100           # file i is .jsonl.gz when i % 100 == 99 (1%), else .jsonl
_TINY_COUNT_SEED = 0x74696E79  # mixed with the corpus seed: records per file, 1-3


def _write_file(path: Path, gen: LogGenerator, n: int) -> int:
    """Stream ``n`` records to ``path`` (codec from the suffix); return the
    uncompressed size."""
    path.parent.mkdir(parents=True, exist_ok=True)
    total = 0
    name = path.name
    with open(path, "wb", buffering=1 << 20) as raw:
        if name.endswith(".gz"):
            sink = gzip.GzipFile(filename="", mode="wb", fileobj=raw,
                                 compresslevel=GZIP_LEVEL, mtime=0)
        elif name.endswith(".zst"):
            import zstandard
            sink = zstandard.ZstdCompressor(
                level=ZSTD_LEVEL, write_checksum=True, threads=0,
            ).stream_writer(raw, closefd=False)
        elif name.endswith(".lz4"):
            import lz4.frame
            sink = lz4.frame.LZ4FrameFile(
                raw, mode="wb", compression_level=LZ4_LEVEL,
                block_size=lz4.frame.BLOCKSIZE_MAX64KB, content_checksum=True)
        else:
            sink = None
        out = sink if sink is not None else raw
        for blk in gen.blocks(n):
            out.write(blk)
            total += len(blk)
        if sink is not None:
            sink.close()
    return total


def _plan(shape: str, scale: float) -> list[tuple[str, int]]:
    """(relative path, records) for every file of a shape, in write order."""
    def recs(n: float) -> int:
        return max(1, round(n * scale))

    if shape == "demo":
        mb = 1_000_000 / AVG_RECORD_BYTES  # records per MB (uncompressed)
        plan = [("part-00000.jsonl", recs(20 * mb)), ("part-00001.jsonl", recs(20 * mb)),
                ("part-00002.jsonl.gz", recs(10 * mb)), ("part-00003.jsonl.gz", recs(10 * mb)),
                ("part-00004.jsonl.zst", recs(5 * mb)), ("part-00005.jsonl.lz4", recs(5 * mb))]
        n_small = max(10, round(2000 * scale))
        plan += [(f"small/part-{i:05d}.jsonl" + (".gz" if i % 2 == 0 else ""), 50)
                 for i in range(n_small)]
        return plan
    if shape == "small":
        n = max(1, round(20_000 * scale))
        return [(f"dir-{i // 1000:03d}/part-{i:05d}.jsonl.gz", 50) for i in range(n)]
    if shape == "big":
        return [(f"part-{i:05d}.jsonl.gz", recs(250_000)) for i in range(8)]
    if shape == "plain":
        return [(f"part-{i:05d}.jsonl", recs(250_000)) for i in range(4)]
    if shape == "tiny":
        raise ValueError("the tiny shape is written by _write_tiny, not from a plan")
    if shape in ("one-gz", "one-zst"):
        raise ValueError(f"the {shape} shape is written by _write_one, not from a plan")
    raise ValueError(f"unknown shape {shape!r}; expected one of {', '.join(SHAPES)}")


def _tiny_dir(i: int, n: int) -> str:
    """Folder of file ``i`` of ``n``, zero-padded so that sorted paths are in write order."""
    width = max(4, len(str((n - 1) // TINY_FILES_PER_DIR)))
    return f"dir-{i // TINY_FILES_PER_DIR:0{width}d}"


def _tiny_name(i: int, n: int) -> str:
    gz = ".gz" if i % TINY_GZ_EVERY == TINY_GZ_EVERY - 1 else ""
    return f"{_tiny_dir(i, n)}/part-{i:0{max(7, len(str(n - 1)))}d}.jsonl{gz}"


class _TinyFiles(Sequence):
    """The paths of a tiny corpus, made when asked for: a million Path objects would take ~300 MB."""

    def __init__(self, out: Path, n: int):
        self._out, self._n = out, n

    def __len__(self) -> int:
        return self._n

    def __getitem__(self, i):
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(self._n))]
        if not -self._n <= i < self._n:
            raise IndexError(i)
        return self._out / _tiny_name(i % self._n, self._n)

    def __eq__(self, other) -> bool:
        return isinstance(other, Sequence) and len(other) == self._n and all(a == b for a, b in zip(self, other))


def _write_tiny(out: Path, seed: int, scale: float) -> CorpusInfo:
    """A million (x scale) files of 1-3 records, 1,000 per folder, written with bare os calls:
    per file one slice of a generated block, one os.open/os.write/os.close (and, for 1 in 100,
    one gzip compress). Records per file come from their own seeded stream, so the record stream
    (and every record's bytes) is the one LogGenerator gives for the seed."""
    n = max(1, round(TINY_FILES * scale))
    gen = LogGenerator(Random(seed))
    counts_rng = Random(seed ^ _TINY_COUNT_SEED)
    flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC | getattr(os, "O_CLOEXEC", 0)
    records = size = disk = 0
    for first in range(0, n, TINY_FILES_PER_DIR):
        last = min(n, first + TINY_FILES_PER_DIR)
        (out / _tiny_dir(first, n)).mkdir(parents=True, exist_ok=True)
        counts = [1 + b % 3 for b in counts_rng.randbytes(last - first)]
        block = gen.block(sum(counts))
        pos = list(accumulate(map(len, block.splitlines(keepends=True)), initial=0))
        rec = 0
        for i, k in zip(range(first, last), counts):
            data = block[pos[rec]:pos[rec + k]]
            rec += k
            size += len(data)
            name = _tiny_name(i, n)
            if name.endswith(".gz"):
                data = zlib.compress(data, GZIP_LEVEL, 31)  # gzip, mtime 0, as gzip.compress(mtime=0)
            fd = os.open(os.path.join(out, name), flags, 0o644)
            try:
                if os.write(fd, data) != len(data):
                    raise OSError(f"short write to {os.path.join(out, name)} (disk full?)")
            finally:
                os.close(fd)
            disk += len(data)
        records += rec
    return CorpusInfo(files=_TinyFiles(out, n), records=records, bytes_uncompressed=size,
                      bytes_on_disk=disk, shape="tiny", seed=seed)


def _one_blocks(seed: int, total: int) -> Iterator[bytes]:
    """`total` bytes (rounded up to the end of a record) of records made fast: one block of
    ONE_BASE_RECORDS records is generated once (all in the first day, from 00:00), then repeated
    with its date moved one day on per repetition (one bytes.replace), so timestamps keep
    increasing and every repetition is valid, realistic JSON."""
    gen = LogGenerator(Random(seed))
    base = gen.block(ONE_BASE_RECORDS)
    day0 = DEFAULT_START.strftime('"ts":"%Y-%m-%dT').encode()
    last = datetime.fromtimestamp(gen.last_ms / 1000, timezone.utc)
    if last.date() != DEFAULT_START.date() or base.count(day0) != ONE_BASE_RECORDS:
        raise AssertionError("the base block must lie within its first day")  # cannot happen with the pools above
    done, rep = 0, 0
    while done < total:
        day = (DEFAULT_START + timedelta(days=rep)).strftime('"ts":"%Y-%m-%dT').encode()
        blk = base if rep == 0 else base.replace(day0, day)
        rep += 1
        if done + len(blk) > total:
            blk = blk[:blk.index(b"\n", total - done - 1) + 1]
        done += len(blk)
        yield blk


def _write_one(out: Path, shape: str, seed: int, scale: float) -> CorpusInfo:
    """ONE file of about ONE_FILE_BYTES x scale decompressed (at least one record).

    * one-gz: `part-00000.jsonl.gz`, a single gzip member, written by isal (level ONE_GZIP_LEVEL,
      mtime 0, no name).
    * one-zst: `part-00000.jsonl.zst`, independent zstd frames of ONE_ZSTD_FRAME_BYTES
      decompressed each (the last one shorter), each with its content size and checksum (level
      ZSTD_LEVEL), concatenated. Frames are cut at byte positions, not at line ends: lines cross
      frame boundaries, as in pzstd's output.
    """
    total = max(1, round(ONE_FILE_BYTES * scale))
    path = out / ("part-00000.jsonl.gz" if shape == "one-gz" else "part-00000.jsonl.zst")
    records = size = 0
    with open(path, "wb", buffering=0) as raw:
        if shape == "one-gz":
            from isal import igzip
            with igzip.IGzipFile(filename="", mode="wb", fileobj=raw, compresslevel=ONE_GZIP_LEVEL, mtime=0) as gz:
                for blk in _one_blocks(seed, total):
                    gz.write(blk)
                    records += blk.count(b"\n")
                    size += len(blk)
        else:
            import zstandard
            cctx = zstandard.ZstdCompressor(level=ZSTD_LEVEL, write_content_size=True, write_checksum=True)
            pending = b""
            for blk in _one_blocks(seed, total):
                records += blk.count(b"\n")
                size += len(blk)
                pending += blk
                while len(pending) >= ONE_ZSTD_FRAME_BYTES:
                    raw.write(cctx.compress(pending[:ONE_ZSTD_FRAME_BYTES]))
                    pending = pending[ONE_ZSTD_FRAME_BYTES:]
            if pending:
                raw.write(cctx.compress(pending))
    return CorpusInfo(files=[path], records=records, bytes_uncompressed=size, bytes_on_disk=path.stat().st_size,
                      shape=shape, seed=seed)


def write_corpus(out_dir: str | os.PathLike, shape: str, *, seed: int = 7,
                 scale: float = 1.0) -> CorpusInfo:
    """Write a corpus of the given shape under ``out_dir`` (created if needed;
    existing files of the same names are overwritten, nothing is deleted).

    Shapes (``scale`` multiplies file sizes; file counts stay fixed except
    for small files):

    * ``demo``: part-00000/1.jsonl (~20 MB each), part-00002/3.jsonl.gz
      (~10 MB uncompressed each), part-00004.jsonl.zst and part-00005.jsonl.lz4
      (~5 MB each), and small/ with 2,000 files of 50 records (even: .jsonl.gz,
      odd: .jsonl; count scaled, at least 10).
    * ``small``: 20,000 .jsonl.gz files of 50 records (count scaled), 1,000
      per folder dir-000/, dir-001/, ...
    * ``big``: 8 .jsonl.gz files of 250,000 records (records scaled).
    * ``plain``: 4 .jsonl files of 250,000 records (records scaled).
    * ``tiny``: 1,000,000 files of 1-3 records (count scaled, at least 1), 1,000 per folder
      dir-0000/, dir-0001/, ...; plain .jsonl, 1 in 100 .jsonl.gz.
    * ``one-gz``: ONE single-member .jsonl.gz of 1 GiB decompressed (bytes scaled).
    * ``one-zst``: ONE .jsonl.zst of 1 GiB decompressed (bytes scaled), made of independent
      4 MiB frames cut at arbitrary bytes (see `_write_one`).

    Timestamps keep increasing across files in sorted path order.
    """
    if not scale > 0:
        raise ValueError(f"scale must be > 0, got {scale!r}")
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise TypeError(f"seed must be an int, got {seed!r}")
    out = Path(out_dir)
    if shape == "tiny":
        out.mkdir(parents=True, exist_ok=True)
        return _write_tiny(out, seed, scale)
    if shape in ("one-gz", "one-zst"):
        out.mkdir(parents=True, exist_ok=True)
        return _write_one(out, shape, seed, scale)
    plan = _plan(shape, scale)
    out.mkdir(parents=True, exist_ok=True)
    gen = LogGenerator(Random(seed))
    files: list[Path] = []
    records = size = disk = 0
    for rel, n in plan:
        path = out / rel
        size += _write_file(path, gen, n)
        disk += path.stat().st_size
        records += n
        files.append(path)
    return CorpusInfo(files=sorted(files), records=records, bytes_uncompressed=size,
                      bytes_on_disk=disk, shape=shape, seed=seed)


# --------------------------------------------------------------------------
# CLI
# --------------------------------------------------------------------------

def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="python -m bench.corpus",
        description="Write a deterministic sample corpus of JSON-lines web access logs.")
    ap.add_argument("out_dir", metavar="OUT_DIR")
    ap.add_argument("--shape", choices=SHAPES, default="demo")
    ap.add_argument("--seed", type=int, default=7)
    ap.add_argument("--scale", type=float, default=1.0)
    ap.add_argument("--force", action="store_true",
                    help="write into a non-empty directory (same-named files are overwritten)")
    args = ap.parse_args(argv)
    if not args.scale > 0:
        ap.error(f"--scale must be > 0, got {args.scale}")
    out = Path(args.out_dir)
    if out.exists() and not out.is_dir():
        print(f"error: {out} exists and is not a directory", file=sys.stderr)
        return 2
    if out.is_dir() and any(out.iterdir()) and not args.force:
        print(f"error: output directory {out} is not empty; "
              f"use --force to write into it anyway", file=sys.stderr)
        return 2
    t0 = time.perf_counter()
    info = write_corpus(out, args.shape, seed=args.seed, scale=args.scale)
    dt = time.perf_counter() - t0
    print(f"corpus {args.shape} seed={args.seed} scale={args.scale:g}: "
          f"{len(info.files)} files, {info.records:,} records, "
          f"{info.bytes_uncompressed / 1e6:.1f} MB uncompressed, "
          f"{info.bytes_on_disk / 1e6:.1f} MB on disk, {dt:.2f} s -> {out}",
          file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
