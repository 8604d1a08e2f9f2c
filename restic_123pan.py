#!/usr/bin/env python3
"""restic-123pan: a restic REST server (protocol v1 and v2) whose storage is a local
folder, 123pan (123云盘) through its Open Platform API, or a Cloudreve 4 site.

One file, standard library only, CPython 3.8 to 3.13.  Run it with

    python3 restic_123pan.py                 # serves ./restic-data on 127.0.0.1:8000
    restic -r rest:http://127.0.0.1:8000/ init

The file reads top-down by layer:
  1. configuration and command line (parse_config, built from the backend
     registry)
  2. shared helpers (hashing spool, Range parsing, rate limiter, backoff,
     multipart body, HTTP client, metrics registry)
  3. the storage interface (ObjectRef, Storage, what a storage error means,
     the backend registry: Backend, BACKENDS)
  4. backend: local folder (LocalStorage, the listings it keeps: FolderListings)
  5. what the cloud backends share: transient failures, the batch queue,
     parts sent a few at a time (send_parts), verified and resumed
     downloads, TokenFile, the metadata cache (MetadataCache: sqlite3 in the
     state directory) and its warm-up (CacheWarmUp), CloudClient (the one
     call loop), FolderIndex and CloudStorage; the local copy tier in front
     of a cloud (LocalCopyTier: --local-copy, its durable upload queue in the
     metadata cache)
  6. backend: 123pan (Pan123Client, Pan123Index, Pan123Deletes, Pan123Storage,
     the account: Pan123Account, the --verify-cloud audit: Pan123CloudAudit)
  7. backend: Cloudreve 4 (CloudreveClient with an upload flow per storage
     policy, CloudreveIndex, CloudreveStorage)
  8. the repository service (verification, overwrite rule, usage and quota,
     blob metrics)
  9. access control (htpasswd users, rights, access log file)
 10. the REST request handler and the servers (TCP, TLS, unix socket,
     systemd); the one table from what a storage error means to its status
 11. appendix: the password hash verifiers of htpasswd files
 12. main()

Adding a backend is one new section (a Storage; for a cloud, a CloudClient and
a CloudStorage subclass) that ends with one registry line,
register_backend(Backend(...)): its name, options, detection and builder (and
a one-shot command where its options ask for one).
"""

import argparse
import array
import base64
import calendar
import collections
import contextlib
import email.utils
import errno
import gzip
import hashlib
import heapq
import hmac
import http.client
import io
import ipaddress
import itertools
import json
import logging
import os
import random
import re
import selectors
import signal
import socket
import socketserver
import stat
import struct
import sys
import tempfile
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from xml.sax.saxutils import escape as xml_escape
from urllib.parse import quote, unquote, unquote_to_bytes, urlencode, urljoin, urlsplit

# ssl and sqlite3 are imported when first needed (optional_module): a minimal
# Python (OpenWrt's python3-light has neither) still serves a local folder.
sqlite3 = None

__version__ = "0.1.0"

log = logging.getLogger("restic_123pan")

# ---------------------------------------------------------------------------
# 1. Configuration and command line
# ---------------------------------------------------------------------------

DEFAULT_LISTEN = "127.0.0.1:8000"
DEFAULT_LOCAL_PATH = "./restic-data"
DEFAULT_REPO_PATH = "/restic-backup"   # the cloud folder, from the cloud's root

# Bodies up to this size stay in memory while spooling; larger ones roll over to a
# temporary file, so memory stays bounded whatever the pack size and connection count.
SPOOL_MEMORY_LIMIT = 1024 * 1024
IO_CHUNK = 256 * 1024
# An upload body is read through one buffer of this size per request: bigger reads
# mean fewer system calls per GiB (measured: about a third less CPU than 256 KiB).
BODY_BUFFER = 1024 * 1024

# The handler's class default for socket silence; each server replaces it with its
# --io-timeout (ConnectionLimits below), and the head has its own deadline.
CLIENT_SOCKET_TIMEOUT = 300
# Limits on what one client connection may hold (see ConnectionLimits): a whole
# request head must arrive within DEFAULT_HEADER_TIMEOUT of the connection (or of the
# request's first byte); an idle keep-alive connection closes after
# DEFAULT_IDLE_TIMEOUT (above the 90 s after which restic's Go client drops idle
# connections itself, so the client, not a racing server, closes them); a body, or a client reading a response, may be silent for
# DEFAULT_IO_TIMEOUT.  Each connection is one thread: DEFAULT_MAX_CONNECTIONS keeps
# a router's memory safe, and restic's 5 connections per client fit many times.
DEFAULT_HEADER_TIMEOUT = 20
DEFAULT_IDLE_TIMEOUT = 120
DEFAULT_IO_TIMEOUT = 60
DEFAULT_MAX_CONNECTIONS = 128
# What a request head may hold: its request line, each header line, all of them.
MAX_REQUEST_LINE = 8192
MAX_HEADER_FIELDS = 100
MAX_HEAD_BYTES = 64 * 1024
# A refused connection is told to come back after this many seconds.
BUSY_RETRY_AFTER = 5
# On SIGINT/SIGTERM running requests get this long to finish.
SHUTDOWN_GRACE_SECONDS = 30


class UsageError(Exception):
    """A command-line problem: reported as one line, exit code 2."""


def optional_module(name, needed_for):
    """Import `name`, a module some Pythons lack (ssl, sqlite3), when `needed_for`
    first needs it; UsageError (one line, exit 2) when it is missing."""
    module = sys.modules.get(name)
    if module is not None:
        return module
    try:
        return __import__(name)
    except ImportError:
        raise UsageError("%s needs the Python module %s, which this Python lacks "
                         "(on OpenWrt: opkg install python3-%s)"
                         % (needed_for, name, "openssl" if name == "ssl" else name))


def parse_listen_address(text):
    """'host:port', ':port', '[v6]:port' or 'port' -> (host, port).

    An empty host means every interface, as in rest-server's ':8000'."""
    text = text.strip()
    if text.isdigit():
        host, port = "", text
    elif text.startswith("["):
        host, sep, port = text[1:].partition("]:")
        if not sep:
            raise UsageError("listen address %r: expected [ipv6]:port" % text)
    else:
        host, sep, port = text.rpartition(":")
        if not sep:
            raise UsageError("listen address %r: expected host:port" % text)
    if not port.isdigit() or int(port) > 65535:
        raise UsageError("listen address %r: bad port" % text)
    return host, int(port)


def default_listen(environ):
    """--listen default: LISTEN_ADDR (host or host:port) and LISTEN_PORT, as the Rust
    123pan server read them, else 127.0.0.1:8000."""
    addr = environ.get("LISTEN_ADDR", "").strip()
    port = environ.get("LISTEN_PORT", "").strip()
    if not addr and not port:
        return DEFAULT_LISTEN
    host, default_port = "127.0.0.1", "8000"
    if addr:
        if addr.startswith("[") or addr.count(":") == 1:
            host, default_port = parse_listen_address(addr)
            default_port = str(default_port)
        else:
            host = addr
    port = port or default_port
    return "[%s]:%s" % (host, port) if ":" in host else "%s:%s" % (host, port)


def _user_list(text):
    users = [u.strip() for u in text.split(",") if u.strip()]
    for u in users:
        if not _USER_NAME_RE.match(u):
            raise argparse.ArgumentTypeError("%r is not a valid user name" % u)
    return users


def _byte_count(text):
    """'1000000', '500M', '2G', '1T' (powers of 1024) -> bytes."""
    m = re.match(r"\A(\d+)([KMGT]?)I?B?\Z", text.strip().upper())
    if not m:
        raise argparse.ArgumentTypeError("%r is not a size (bytes, or with K/M/G/T)" % text)
    return int(m.group(1)) * 1024 ** " KMGT".index(m.group(2) or " ")


def _number_of(text, unit, below):
    try:
        value = float(text)
    except ValueError:
        value = -1
    if not 0 <= value < below:
        raise argparse.ArgumentTypeError("%r is not a number of %s" % (text, unit))
    return value


def _positive_int(text):
    if not text.strip().isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError("%r is not a whole number above 0" % text)
    return int(text)


def _seconds(text):
    return _number_of(text, "seconds", 1e9)


def _hours(text):
    return _number_of(text, "hours", 1e6)


def default_state_dir(environ):
    home = environ.get("HOME") or os.path.expanduser("~")
    base = environ.get("XDG_STATE_HOME") or os.path.join(home, ".local", "state")
    return os.path.join(base, "restic-123pan")


def read_password_file(path):
    try:
        with open(path, "r", encoding="utf-8") as f:
            password = f.readline().rstrip("\r\n")
    except (OSError, ValueError) as e:
        raise UsageError("cannot read the password file %s: %s"
                         % (path, getattr(e, "strerror", None) or type(e).__name__))
    if not password:
        raise UsageError("the password file %s is empty" % path)
    return password


class _OneLineErrorParser(argparse.ArgumentParser):
    """A bad option is one line on stderr and exit code 2, not a page of usage."""

    def error(self, message):
        self.exit(2, "%s: error: %s (see --help)\n" % (self.prog, message))


def _one_of(words):
    return ", ".join(words[:-1]) + " or " + words[-1] if len(words) > 1 else "".join(words)


def build_arg_parser():
    p = _OneLineErrorParser(
        prog="restic_123pan.py",
        description="A restic REST server (protocol v1/v2) storing repositories in %s."
        % _one_of([b.description for b in BACKENDS.values()]),
        epilog="Then: restic -r rest:http://HOST:PORT/ init",
    )
    p.add_argument("--listen", metavar="ADDR",
                   help="host:port, or unix:/path/to.sock (default %s, or LISTEN_ADDR / "
                        "LISTEN_PORT from the environment; a socket passed by systemd "
                        "wins)" % DEFAULT_LISTEN)
    p.add_argument("--backend", choices=tuple(BACKENDS),
                   help="storage backend (default: %s, else %s)" % (
                       ", ".join("%s when %s is given" % (b.name, b.detected_by)
                                 for b in BACKENDS.values() if b.detect),
                       _one_of([b.name for b in BACKENDS.values() if not b.detect])))
    p.add_argument("--state-dir", metavar="DIR",
                   help="cloud backends: token and cache files, and the default place of "
                        ".htpasswd and the TLS files (default $XDG_STATE_HOME/restic-123pan "
                        "or ~/.local/state/restic-123pan)")
    p.add_argument("--rebuild-cache", action="store_true",
                   help="cloud backends: list every folder again at start, replacing what "
                        "the metadata cache in --state-dir knew (after changes made behind "
                        "the server's back)")
    p.add_argument("--cache-refresh", metavar="SECONDS", type=_seconds, default=0,
                   help="cloud backends: list a repository's small folders (config, keys, "
                        "locks, snapshots, index) again when their listing is older than "
                        "this, and data/ folders when asked for an object they lack; finds "
                        "what another writer added (default 0: never, the server is the only "
                        "writer)")
    p.add_argument("--no-verify-upload", action="store_true",
                   help="do not check that an upload's SHA-256 equals its name")
    p.add_argument("--spool-dir", metavar="DIR",
                   help="folder for upload bodies larger than 1 MiB while they are received "
                        "(default: the system temp dir, $TMPDIR); a full disk answers 507")
    p.add_argument("--max-connections", metavar="N", type=_positive_int,
                   default=DEFAULT_MAX_CONNECTIONS,
                   help="client connections served at once; more get 503 with Retry-After "
                        "(default %d)" % DEFAULT_MAX_CONNECTIONS)
    p.add_argument("--header-timeout", metavar="SECONDS", type=_seconds,
                   default=DEFAULT_HEADER_TIMEOUT,
                   help="a request's line and headers must arrive within this, else the "
                        "connection is closed (default %d)" % DEFAULT_HEADER_TIMEOUT)
    p.add_argument("--idle-timeout", metavar="SECONDS", type=_seconds,
                   default=DEFAULT_IDLE_TIMEOUT,
                   help="close a keep-alive connection idle this long (default %d)"
                        % DEFAULT_IDLE_TIMEOUT)
    p.add_argument("--io-timeout", metavar="SECONDS", type=_seconds,
                   default=DEFAULT_IO_TIMEOUT,
                   help="an upload body silent this long is refused with 408; a client not "
                        "reading a response this long is dropped (default %d)"
                        % DEFAULT_IO_TIMEOUT)
    auth = p.add_argument_group("users and rights")
    auth.add_argument("--htpasswd-file", metavar="FILE",
                      help="users (bcrypt, apr1, {SHA}, $5$/$6$ hashes); default .htpasswd "
                           "in --path (local backend) or in --state-dir")
    auth.add_argument("--no-auth", action="store_true",
                      help="no authentication, even on a non-loopback address")
    auth.add_argument("--private-repos", action="store_true",
                      help="users may only use repositories under /<user>/")
    auth.add_argument("--append-only", action="store_true",
                      help="nobody may delete anything but locks (except --full-access-users)")
    auth.add_argument("--append-only-users", metavar="U1,U2", type=_user_list, default=[],
                      help="these users are append-only")
    auth.add_argument("--full-access-users", metavar="U1,U2", type=_user_list, default=[],
                      help="these users may delete even with --append-only")
    auth.add_argument("--max-size", metavar="BYTES", type=_byte_count, default=0,
                      help="quota per repository, e.g. 500G; 507 when full (default: none)")
    net = p.add_argument_group("transport and monitoring")
    net.add_argument("--tls", action="store_true", help="serve HTTPS")
    net.add_argument("--tls-cert", metavar="FILE",
                     help="PEM certificate (default public_key in --path / --state-dir)")
    net.add_argument("--tls-key", metavar="FILE",
                     help="PEM private key (default private_key in --path / --state-dir)")
    net.add_argument("--tls-min-ver", choices=("1.2", "1.3"), default="1.2",
                     help="lowest TLS version accepted (default 1.2)")
    net.add_argument("--prometheus", action="store_true", help="serve /metrics")
    net.add_argument("--prometheus-no-auth", action="store_true",
                     help="serve /metrics without authentication")
    net.add_argument("--log", metavar="FILE",
                     help="access log in the combined format ('-' for stdout)")
    cloud = p.add_argument_group("cloud backends")
    cloud.add_argument("--repo-path", metavar="PATH",
                       help="the cloud folder holding the repositories: %s; default %s"
                            % (", or ".join(b.repo_path_help for b in BACKENDS.values()
                                            if b.cloud), DEFAULT_REPO_PATH))
    tier = p.add_argument_group("local copy (cloud backends)")
    tier.add_argument("--local-copy", metavar="DIR",
                      help="keep every object also in DIR, laid out as a restic local "
                           "repository (restic -r DIR/<repo> opens it); reads come from "
                           "it, uploads to the cloud follow from a durable queue")
    tier.add_argument("--write-through", action="store_true",
                      help="with --local-copy: answer an upload only once the cloud has it "
                           "too (default: once DIR has it, write-behind)")
    tier.add_argument("--local-copy-max", metavar="SIZE", type=_byte_count, default=0,
                      help="with --local-copy: keep at most this much in DIR (e.g. 200G) by "
                           "removing the least recently used packs the cloud holds "
                           "(default: a full mirror)")
    tier.add_argument("--local-copy-fill", action="store_true",
                      help="with --local-copy: download once, in the background, what the "
                           "cloud holds and DIR lacks (stops at a traffic quota)")
    for backend in BACKENDS.values():
        backend.add_arguments(p)
    p.add_argument("--debug", action="store_true", help="log more detail")
    p.add_argument("--version", action="version",
                   version="restic-123pan %s" % __version__)
    return p


# Options every cloud backend takes and a backend that is not a cloud refuses.
CLOUD_OPTIONS = (("--state-dir", "state_dir"), ("--rebuild-cache", "rebuild_cache"),
                 ("--cache-refresh", "cache_refresh"), ("--repo-path", "repo_path"),
                 ("--local-copy", "local_copy"), ("--write-through", "write_through"),
                 ("--local-copy-max", "local_copy_max"),
                 ("--local-copy-fill", "local_copy_fill"))


def parse_config(argv, environ):
    """Parse argv/environment into a namespace; raises UsageError on contradictions."""
    args = build_arg_parser().parse_args(argv)
    _settle_listen_address(args, environ)
    backend = _choose_backend(args, environ)
    _settle_files(args, backend.config_dir(args, environ))
    _check_contradictions(args)
    return args


def _settle_listen_address(args, environ):
    args.listen = args.listen or default_listen(environ)
    args.unix_socket = None
    if args.listen.startswith("unix:"):
        args.unix_socket = os.path.abspath(args.listen[len("unix:"):])
        args.listen_host, args.listen_port = None, None
    else:
        args.listen_host, args.listen_port = parse_listen_address(args.listen)


def _choose_backend(args, environ):
    """--backend, else the one backend whose settings are given, else the one
    that needs none; then no option of another backend may be given."""
    if not args.backend:
        detected = [b for b in BACKENDS.values() if b.detect and b.detect(args, environ)]
        if len(detected) > 1:
            raise UsageError("both %s settings are given: choose one with --backend"
                             % " and ".join(b.label for b in detected))
        args.backend = (detected or [b for b in BACKENDS.values() if not b.detect])[0].name
    backend = BACKENDS[args.backend]
    foreign = [flag for other in BACKENDS.values() if other is not backend
               for flag, dest in other.flags if getattr(args, dest)]
    if foreign:
        raise UsageError("%s: not for the %s backend" % (", ".join(foreign), backend.name))
    if not backend.cloud:
        cloud_flags = [flag for flag, dest in CLOUD_OPTIONS if getattr(args, dest)]
        if cloud_flags:
            raise UsageError("%s: for the cloud backends; the %s backend keeps everything "
                             "in %s" % (", ".join(cloud_flags), backend.name,
                                        backend.flags[0][0]))
    return backend


def _settle_files(args, config_dir):
    """Defaults of the files kept beside the data (local) or the state (clouds)."""
    if args.spool_dir:
        args.spool_dir = os.path.abspath(args.spool_dir)
        if not os.path.isdir(args.spool_dir):
            raise UsageError("--spool-dir %s: not a folder" % args.spool_dir)
    args.default_htpasswd_file = os.path.join(config_dir, ".htpasswd")
    if (args.tls_cert or args.tls_key) and not args.tls:
        raise UsageError("--tls-cert/--tls-key given without --tls")
    args.tls_cert = args.tls_cert or os.path.join(config_dir, "public_key")
    args.tls_key = args.tls_key or os.path.join(config_dir, "private_key")


def _check_contradictions(args):
    for flag in ("header_timeout", "idle_timeout", "io_timeout"):
        if getattr(args, flag) <= 0:
            raise UsageError("--%s must be above 0" % flag.replace("_", "-"))
    if args.prometheus_no_auth and not args.prometheus:
        raise UsageError("--prometheus-no-auth needs --prometheus")
    if args.no_auth and (args.htpasswd_file or args.private_repos or args.append_only_users
                         or args.full_access_users):
        raise UsageError("--no-auth contradicts --htpasswd-file, --private-repos and "
                         "per-user rights")
    if not args.local_copy:
        needing = [flag for flag, dest in (("--write-through", "write_through"),
                                           ("--local-copy-max", "local_copy_max"),
                                           ("--local-copy-fill", "local_copy_fill"))
                   if getattr(args, dest)]
        if needing:
            raise UsageError("%s: only with --local-copy" % ", ".join(needing))
    else:
        args.local_copy = os.path.abspath(args.local_copy)
        if os.path.exists(args.local_copy) and not os.path.isdir(args.local_copy):
            raise UsageError("--local-copy %s: not a folder" % args.local_copy)
    both = set(args.append_only_users) & set(args.full_access_users)
    if both:
        raise UsageError("users both append-only and full-access: %s" % ", ".join(sorted(both)))


# ---------------------------------------------------------------------------
# 2. Shared helpers: hashing spool, Range parsing, rate limiter, backoff,
#    multipart body, HTTP client, metrics registry
# ---------------------------------------------------------------------------

class ShortBody(Exception):
    """The client sent fewer bytes than its Content-Length announced."""


class HashingSpool:
    """An upload body, read once from the client while its digests are computed in
    the same pass: SHA-256 always (verification), MD5 only when the backend asks
    for it (123pan's etag).  Small bodies stay in memory, large ones roll over to a
    temporary file.  Backends then read it back (several times if they must retry)
    with iter_range, which is safe to call from several threads."""

    def __init__(self, memory_limit=SPOOL_MEMORY_LIMIT, tmpdir=None, digests=("md5",),
                 file=None):
        self._file = file if file is not None else tempfile.SpooledTemporaryFile(
            max_size=memory_limit, dir=tmpdir)
        self._md5 = hashlib.md5() if "md5" in digests else None
        self._sha256 = hashlib.sha256()
        self._lock = threading.Lock()
        self.folder = tmpdir or tempfile.gettempdir()     # where a large body goes
        self.size = 0
        self.md5 = self.sha256 = None

    @classmethod
    def from_stream(cls, stream, length, memory_limit=SPOOL_MEMORY_LIMIT, tmpdir=None,
                    spool=None):
        """Spool exactly `length` bytes from `stream` (into `spool` if given, else a
        new one); ShortBody if it ends early.  The body goes through one reused
        buffer (readinto), not a fresh bytes object per chunk."""
        if spool is None:
            spool = cls(memory_limit, tmpdir)
        try:
            where = "upload spool in %s" % spool.folder
            copy_body(stream, length, spool.write, where)
            try:
                spool.finish()
            except OSError as e:     # a buffered write can meet the full disk here
                if not is_disk_full(e):
                    raise
                raise DiskFull("%s: %s" % (where, e.strerror or e))
        except BaseException:
            spool.close()
            raise
        return spool

    @classmethod
    def from_bytes(cls, data):
        spool = cls()
        spool.write(data)
        spool.finish()
        return spool

    def write(self, chunk):
        if self._md5 is not None:
            self._md5.update(chunk)
        self._sha256.update(chunk)
        self._write(chunk)
        self.size += len(chunk)

    def _write(self, chunk):
        self._file.write(chunk)

    def finish(self):
        self._file.flush()
        self.md5 = self._md5.hexdigest() if self._md5 is not None else None
        self.sha256 = self._sha256.hexdigest()

    @property
    def in_memory(self):
        return not getattr(self._file, "_rolled", True)

    def iter_range(self, start=0, length=None, chunk_size=IO_CHUNK):
        """Yield the bytes [start, start+length) in chunks."""
        end = self.size if length is None else min(self.size, start + length)
        pos = start
        while pos < end:
            with self._lock:
                self._file.seek(pos)
                chunk = self._file.read(min(chunk_size, end - pos))
            if not chunk:
                raise IOError("spool truncated at %d of %d bytes" % (pos, end))
            pos += len(chunk)
            yield chunk

    def read_all(self):
        return b"".join(self.iter_range())

    def close(self):
        self._file.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


class RangeNotSatisfiable(Exception):
    """No byte of the object is in the requested range (416)."""


_RANGE_SPEC_RE = re.compile(r"\A([0-9]*)-([0-9]*)\Z")
# More digits than this is beyond any object: read as "very large" instead of
# converting (Python 3.11+ refuses to convert thousands of digits at all).
_MAX_RANGE_DIGITS = 18


def _range_number(digits):
    digits = digits.lstrip("0") or "0"
    return int(digits) if len(digits) <= _MAX_RANGE_DIGITS else 10 ** _MAX_RANGE_DIGITS


def parse_range(header, size):
    """Read a Range header against an object of `size` bytes, as RFC 9110 section 14
    says a server may.

    Returns (start, length, is_partial); is_partial False means "send the whole
    object with 200": no header, a unit other than bytes, several ranges (which a
    server may ignore; restic never asks for them), or an empty object (as Go's
    ServeContent does).  Raises RangeNotSatisfiable (416) when the one byte range
    is malformed, ends before it starts, or starts at or past the end.  An end
    past the object is clamped (restic >= 0.17 then flags the short read itself)."""
    if header is None:
        return 0, size, False
    unit, sep, range_set = header.partition("=")
    if not sep or unit.strip().lower() != "bytes":
        return 0, size, False                   # not ours to understand: ignored
    specs = [spec.strip() for spec in range_set.split(",") if spec.strip()]
    if len(specs) > 1:
        return 0, size, False                   # several ranges: ignored
    m = _RANGE_SPEC_RE.match(specs[0]) if specs else None
    if not m or (not m.group(1) and not m.group(2)):
        raise RangeNotSatisfiable("malformed byte range %r" % header[:100])
    first, last = m.group(1), m.group(2)
    if size == 0:
        return 0, 0, False
    if not first:                           # suffix range: the last N bytes
        n = _range_number(last)
        if n == 0:
            raise RangeNotSatisfiable("empty suffix range")
        start = max(0, size - n)
        return start, size - start, True
    start = _range_number(first)
    if last and _range_number(last) < start:
        raise RangeNotSatisfiable("byte range ends before it starts")
    if start >= size:
        raise RangeNotSatisfiable("byte range starts past the end")
    end = size - 1 if not last else min(_range_number(last), size - 1)
    return start, end - start + 1, True


def human_bytes(nbytes):
    """A byte count for a log line: 512 bytes, 3.5 MiB, 2048.0 GiB."""
    for unit in ("bytes", "KiB", "MiB", "GiB"):
        if nbytes < 1024 or unit == "GiB":
            return ("%d %s" if unit == "bytes" else "%.1f %s") % (nbytes, unit)
        nbytes /= 1024.0


def is_disk_full(error):
    """True for an OSError that means "no room": a full disk, a quota, or a file
    size limit (RLIMIT_FSIZE, a filesystem's largest file)."""
    return isinstance(error, OSError) and error.errno in (errno.ENOSPC, errno.EDQUOT,
                                                          errno.EFBIG)


def copy_body(stream, length, write, where):
    """Read exactly `length` bytes of a request body from `stream`, handing each
    chunk to write().  ShortBody when the client stops early.  The body goes through
    one reused buffer (readinto), not a fresh bytes object per chunk, so write()
    must consume its memoryview before it returns.  When write() finds the disk
    full, the rest of the body is still read (and dropped), so the connection stays
    usable and the client surely sees the answer, then DiskFull is raised: the
    caller removes what it wrote."""
    buffer = memoryview(bytearray(min(BODY_BUFFER, length) or 1))
    readinto = getattr(stream, "readinto", None)
    remaining = length
    full = None
    while remaining:
        want = min(len(buffer), remaining)
        if readinto is not None:
            got = readinto(buffer[:want]) or 0
        else:
            data = stream.read(want)
            got = len(data)
            buffer[:got] = data
        if not got:
            raise ShortBody("body ended after %d of %d bytes" % (length - remaining, length))
        remaining -= got
        if full is None:
            try:
                write(buffer[:got])
            except OSError as e:
                if not is_disk_full(e):
                    raise
                full = e
    if full is not None:
        raise DiskFull("%s: %s" % (where, full.strerror or full))


class RateLimitTimeout(Exception):
    """No request slot of an endpoint came free before the caller's deadline."""


class _SlotWindow(object):
    """The budget of one endpoint: `slots` requests per `window` seconds.

    Each slot is held while its request is in flight and becomes usable again only
    `window` seconds after the response arrived.  Two requests on the same slot
    therefore *reach the server* at least `window` apart whatever the network
    latency (the later one is sent after the earlier one's answer came back), so no
    sliding 1 s window measured at the server ever sees more than `slots` requests.
    Stamping slots at send time instead would let latency jitter squeeze two
    requests into one server-side window and earn a 429."""

    def __init__(self, qps, margin):
        if qps >= 1:
            self.slots, self.window = int(qps), 1.0 + margin
        else:                               # 0.2 QPS: one request per 5 s
            self.slots, self.window = 1, 1.0 / qps + margin
        self._usable_at = [0.0] * self.slots   # heap: when each idle slot is usable
        self._cond = threading.Condition()

    def acquire(self, deadline):
        with self._cond:
            while True:
                now = time.monotonic()
                if self._usable_at and self._usable_at[0] <= now:
                    heapq.heappop(self._usable_at)
                    return
                if deadline is not None and now >= deadline:
                    raise RateLimitTimeout()
                # Sleep until the soonest idle slot is usable; with every slot in
                # flight, until a release.
                wait = self._usable_at[0] - now if self._usable_at else None
                if deadline is not None:
                    wait = deadline - now if wait is None else min(wait, deadline - now)
                self._cond.wait(wait)

    def release(self):
        with self._cond:
            heapq.heappush(self._usable_at, time.monotonic() + self.window)
            # Every waiter re-checks: one may have given up on its deadline, and
            # waiters without an idle slot to time their sleep sleep untimed.
            self._cond.notify_all()


class RateLimiter(object):
    """Per-endpoint request budgets shared by every thread of the process.

        with limiter.slot("/api/v2/file/list", deadline):
            ...one request...

    blocks the caller until that endpoint has a free slot (RateLimitTimeout when
    `deadline`, a time.monotonic() value, passes first).  `qps_by_endpoint` maps an
    endpoint to requests per second; others get `default_qps`."""

    def __init__(self, qps_by_endpoint, default_qps, margin=0.05):
        self._qps = dict(qps_by_endpoint)
        self._default_qps = default_qps
        self._margin = margin
        self._windows = {}
        self._lock = threading.Lock()

    def qps(self, endpoint):
        return self._qps.get(endpoint, self._default_qps)

    def _window(self, endpoint):
        with self._lock:
            window = self._windows.get(endpoint)
            if window is None:
                window = self._windows[endpoint] = _SlotWindow(self.qps(endpoint),
                                                               self._margin)
            return window

    @contextlib.contextmanager
    def slot(self, endpoint, deadline=None):
        window = self._window(endpoint)
        window.acquire(deadline)
        try:
            yield
        finally:
            window.release()


class Backoff(object):
    """Jittered exponential pauses between attempts, under a total deadline.

        backoff = Backoff(time.monotonic() + 60)
        while True:
            ...attempt; return on success...
            if not backoff.pause():
                raise ...gave up...

    Pause n lasts between half and all of min(cap, base * 2**n) ("equal jitter":
    threads that failed together do not retry together, yet nobody retries at
    once).  pause() returns False, without sleeping, when that pause would end past
    the deadline, so the deadline bounds the whole sequence."""

    def __init__(self, deadline, base=0.5, cap=8.0):
        self.deadline = deadline
        self.base, self.cap = base, cap
        self.attempts = 0

    def pause(self):
        ceiling = min(self.cap, self.base * (2 ** self.attempts))
        delay = ceiling / 2 + random.uniform(0, ceiling / 2)
        self.attempts += 1
        if time.monotonic() + delay >= self.deadline:
            return False
        time.sleep(delay)
        return True


class MultipartBody(object):
    """A multipart/form-data body built by hand: text fields, then one file part
    whose bytes are streamed from a HashingSpool range, so a 100 MiB pack never
    sits in memory.  Content-Length is exact and known before sending; iterating
    again (a retry) streams the same bytes again."""

    def __init__(self, fields, file_field, filename, spool, start=0, length=None):
        self._spool = spool
        self._start = start
        self._length = spool.size - start if length is None else length
        boundary = "restic123pan" + os.urandom(16).hex()
        head = []
        for name, value in fields:
            head.append('--%s\r\nContent-Disposition: form-data; name="%s"\r\n\r\n%s\r\n'
                        % (boundary, name, value))
        head.append('--%s\r\nContent-Disposition: form-data; name="%s"; filename="%s"\r\n'
                    "Content-Type: application/octet-stream\r\n\r\n"
                    % (boundary, file_field, _quote_form_filename(filename)))
        self._head = "".join(head).encode("utf-8")
        self._tail = ("\r\n--%s--\r\n" % boundary).encode("ascii")
        self.content_type = "multipart/form-data; boundary=" + boundary
        self.content_length = len(self._head) + self._length + len(self._tail)

    def __iter__(self):
        yield self._head
        for chunk in self._spool.iter_range(self._start, self._length):
            yield chunk
        yield self._tail


def _quote_form_filename(name):
    # Quotes and line breaks would end the header; the servers ignore this name anyway.
    return name.replace("\\", "_").replace('"', "%22").replace("\r", "").replace("\n", "")


# Errors after which a request may be retried: refused, reset or timed-out
# connections (OSError, socket.timeout and ssl errors included), truncated or
# garbled HTTP (http.client.HTTPException, IncompleteRead included).
NETWORK_ERRORS = (OSError, http.client.HTTPException)


class _NeverRaised(Exception):
    """Stands in for ssl's certificate error in a Python without ssl."""


# ...except a certificate that does not verify: retrying will not fix it.
PERMANENT_NETWORK_ERRORS = (getattr(sys.modules.get("ssl"), "SSLCertVerificationError",
                                    _NeverRaised),)

REDIRECT_STATUSES = (301, 302, 303, 307, 308)
MAX_REDIRECTS = 5
# Never forwarded across a redirect: a CDN (or anything it sends us to) gets no credentials.
CREDENTIAL_HEADERS = ("authorization", "platform", "cookie")


class HttpResponse(object):
    """One response; its connection returns to the idle pool once the body has
    been read to the end, and is closed if the body is abandoned."""

    def __init__(self, pool, key, conn, raw):
        self._pool, self._key, self._conn, self._raw = pool, key, conn, raw
        self.status = raw.status
        self.reason = raw.reason

    def header(self, name, default=None):
        return self._raw.getheader(name, default)

    @property
    def content_length(self):
        value = self._raw.getheader("Content-Length")
        return int(value) if value is not None and value.strip().isdigit() else None

    def read(self, amount):
        """Up to `amount` bytes; b"" at the end, or when the connection dropped
        before Content-Length was reached (callers count what they received)."""
        chunk = self._raw.read(amount)
        if self._raw.isclosed():
            self._release()
        return chunk

    def read_all(self, limit):
        """The whole body (at most `limit` bytes); IncompleteRead if it is short."""
        if (self.content_length or 0) > limit:
            self.close()
            raise http.client.HTTPException("response body over %d bytes" % limit)
        parts, total = [], 0
        while True:
            chunk = self.read(IO_CHUNK)
            if not chunk:
                break
            total += len(chunk)
            if total > limit:
                self.close()
                raise http.client.HTTPException("response body over %d bytes" % limit)
            parts.append(chunk)
        if self._raw.length:        # bytes still owed by Content-Length
            self.close()
            raise http.client.IncompleteRead(b"".join(parts), self._raw.length)
        return b"".join(parts)

    def discard(self):
        """Drop the body; a short one is drained so the connection can be reused."""
        try:
            if (self.content_length or 0) <= 65536:
                self.read_all(65536)
        except NETWORK_ERRORS:
            pass
        self.close()

    def _release(self):
        conn, self._conn = self._conn, None
        if conn is not None:
            if self._raw.will_close:
                conn.close()
            else:
                self._pool._checkin(self._key, conn)

    def close(self):
        """Abandon the response; harmless after the body was read to the end."""
        conn, self._conn = self._conn, None
        if conn is not None:
            conn.close()
        self._raw.close()


class HttpClient(object):
    """A small HTTP/1.1 client on http.client: TLS through the system trust
    store, a socket timeout per blocking operation, streamed request and response
    bodies, and keep-alive connections reused per host.

    Thread safety: a connection belongs to exactly one request at a time; it is
    taken out of the idle pool for the request and put back only after its
    response has been read to the end."""

    def __init__(self, timeout=60.0, ssl_context=None, max_idle_per_host=8,
                 idle_seconds=30.0):
        self.timeout = timeout
        self._ssl_context = ssl_context     # made at the first https connection
        self._max_idle = max_idle_per_host
        self._idle_seconds = idle_seconds
        self._idle = {}         # (scheme, host, port) -> [(connection, idle since)]
        self._lock = threading.Lock()
        self._user_agent = "restic-123pan/%s" % __version__

    def request(self, method, url, headers=None, body=None, follow_redirects=False):
        """Send one request and return its HttpResponse once the status line and
        headers are in.  `body` is bytes or a re-iterable of bytes chunks (give a
        Content-Length header with the latter).  With follow_redirects, 3xx answers
        are followed with GET, keeping headers such as Range but never
        credentials."""
        headers = dict(headers or {})
        headers.setdefault("User-Agent", self._user_agent)
        for _ in range(MAX_REDIRECTS + 1):
            response = self._request_once(method, url, headers, body)
            if not (follow_redirects and response.status in REDIRECT_STATUSES):
                return response
            location = response.header("Location")
            response.discard()
            if not location:
                raise http.client.HTTPException("HTTP %d redirect without Location"
                                                 % response.status)
            url = urljoin(url, location)
            method, body = "GET", None
            headers = dict((k, v) for k, v in headers.items()
                           if k.lower() not in CREDENTIAL_HEADERS)
        raise http.client.HTTPException("more than %d redirects" % MAX_REDIRECTS)

    def _request_once(self, method, url, headers, body):
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError("not an http(s) URL: %r" % url)
        key = (parts.scheme, parts.hostname,
               parts.port or (443 if parts.scheme == "https" else 80))
        target = (parts.path or "/") + ("?" + parts.query if parts.query else "")
        conn, reused = self._checkout(key)
        while True:
            try:
                conn.request(method, target, body=body, headers=headers)
                raw = conn.getresponse()
            except ConnectionError:
                conn.close()
                if not reused:
                    raise
                # The server closed the idle keep-alive connection before our request
                # arrived: resend once on a fresh one.  (If it did process it, the
                # resend is still safe: every call this server makes is idempotent.)
                conn, reused = self._connect(key), False
                continue
            except BaseException:
                conn.close()
                raise
            return HttpResponse(self, key, conn, raw)

    def _connect(self, key):
        scheme, host, port = key
        if scheme == "https":
            if self._ssl_context is None:
                try:
                    self._ssl_context = optional_module(
                        "ssl", "https").create_default_context()
                except UsageError as e:
                    raise OSError(errno.EPROTONOSUPPORT, str(e))
            return http.client.HTTPSConnection(host, port, timeout=self.timeout,
                                               context=self._ssl_context)
        return http.client.HTTPConnection(host, port, timeout=self.timeout)

    def _checkout(self, key):
        now = time.monotonic()
        stale = []
        conn = None
        with self._lock:
            idle = self._idle.get(key, [])
            while idle:
                candidate, since = idle.pop()
                if now - since < self._idle_seconds:
                    conn = candidate
                    break
                stale.append(candidate)
        for old in stale:
            old.close()
        if conn is not None:
            return conn, True
        return self._connect(key), False

    def _checkin(self, key, conn):
        with self._lock:
            idle = self._idle.setdefault(key, [])
            if len(idle) < self._max_idle:
                idle.append((conn, time.monotonic()))
                return
        conn.close()

    def close(self):
        with self._lock:
            pools, self._idle = self._idle, {}
        for idle in pools.values():
            for conn, _ in idle:
                conn.close()


class MetricsRegistry(object):
    """Counters and gauges rendered in the Prometheus text format, by hand.

    One registry per process (METRICS): the REST layer counts blobs, the cloud
    clients count API calls, retries, 429s, token refreshes and bytes moved."""

    def __init__(self):
        self._lock = threading.Lock()
        self._families = collections.OrderedDict()     # name -> (type, help)
        self._values = {}                               # (name, labels) -> value
        self._samplers = {}                             # name -> read()

    def describe(self, name, kind, text):
        self._families.setdefault(name, (kind, text))
        return self

    def _key(self, name, labels):
        if name not in self._families:
            raise KeyError("metric %s was never described" % name)
        return name, tuple(sorted(labels.items()))

    def inc(self, name, amount=1, **labels):
        key = self._key(name, labels)
        with self._lock:
            self._values[key] = self._values.get(key, 0) + amount

    def set(self, name, value, **labels):
        key = self._key(name, labels)
        with self._lock:
            self._values[key] = value

    def sample(self, name, read):
        """A gauge whose value read() gives at each render (a queue's backlog)."""
        self._key(name, {})
        with self._lock:
            self._samplers[name] = read

    def stop_sampling(self, name, read):
        """The gauge's owner is closing: render no more of it (unless another
        owner has registered its own read since)."""
        with self._lock:
            if self._samplers.get(name) is read:
                del self._samplers[name]
                self._values.pop((name, ()), None)

    def value(self, name, **labels):
        with self._lock:
            return self._values.get(self._key(name, labels), 0)

    def total(self, name, **match):
        """Sum of a family over every sample whose labels include `match`."""
        items = set(match.items())
        with self._lock:
            return sum(v for (n, labels), v in self._values.items()
                       if n == name and items.issubset(labels))

    @staticmethod
    def _escape(value):
        return str(value).replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')

    def render(self):
        with self._lock:
            samplers = list(self._samplers.items())
        for name, read in samplers:
            try:
                self.set(name, read())
            except Exception as e:     # a closed cache: the last value stays
                log.debug("metric %s: %s", name, e)
        with self._lock:
            values = sorted(self._values.items())
        lines = []
        for name, (kind, text) in self._families.items():
            lines.append("# HELP %s %s" % (name, text))
            lines.append("# TYPE %s %s" % (name, kind))
            for (n, labels), value in values:
                if n != name:
                    continue
                label_text = ",".join('%s="%s"' % (k, self._escape(v)) for k, v in labels)
                lines.append("%s%s %s" % (name, "{%s}" % label_text if label_text else "",
                                          repr(float(value)) if isinstance(value, float)
                                          else value))
        return "\n".join(lines) + "\n"


METRICS = MetricsRegistry()
for _what in ("read", "write", "delete"):
    METRICS.describe("rest_server_blob_%s_total" % _what, "counter",
                     "Total number of blobs %s" % {"read": "read", "write": "written",
                                                   "delete": "deleted"}[_what])
    METRICS.describe("rest_server_blob_%s_bytes_total" % _what, "counter",
                     "Total number of bytes %s" % {"read": "read", "write": "written",
                                                   "delete": "deleted"}[_what])
(METRICS
 .describe("restic123pan_repository_bytes", "gauge",
           "Bytes stored per repository (repositories used since start)")
 .describe("restic123pan_repository_objects", "gauge", "Objects per repository and type")
 .describe("restic123pan_repository_last_snapshot_timestamp_seconds", "gauge",
           "Unix time of the last snapshot upload per repository")
 .describe("restic123pan_cloud_api_calls_total", "counter", "Cloud API calls by endpoint")
 .describe("restic123pan_cloud_retries_total", "counter", "Cloud API calls retried, by reason")
 .describe("restic123pan_cloud_rate_limited_total", "counter",
           "Cloud answers that said 'too many requests' (429)")
 .describe("restic123pan_cloud_token_refreshes_total", "counter", "Access tokens obtained")
 .describe("restic123pan_cloud_bytes_uploaded_total", "counter", "Bytes sent to the cloud")
 .describe("restic123pan_cloud_bytes_downloaded_total", "counter",
           "Bytes received from the cloud"))


def remove_if_present(path):
    """Remove a file we made, if it is still there: cleaning up must not hide the
    error (or the success) that led to it."""
    try:
        os.unlink(path)
    except OSError:
        pass


def replace_with_temp_file(fd, tmp, final, chunks, mode="wb", encoding=None):
    """Write `chunks` into the new temporary file `tmp` (open as fd), fsync it and
    rename it over `final`; on any failure the temporary file is removed and the
    error raised."""
    try:
        with os.fdopen(fd, mode, encoding=encoding) as f:
            for chunk in chunks:
                f.write(chunk)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, final)
    except BaseException:
        remove_if_present(tmp)
        raise


class Throttle(object):
    """Lets something happen at most once per interval (on the time.monotonic()
    clock), counting from `last`; the interval is given on each call, so the
    caller's setting may change between calls."""

    def __init__(self, last=0.0):
        self.last = last

    def ready(self, now, interval):
        """True, and `now` noted as the last time, when `interval` seconds have passed."""
        if now - self.last < interval:
            return False
        self.last = now
        return True


# ---------------------------------------------------------------------------
# 3. The storage interface, what its errors mean, and the backend registry
#    (ARCHITECTURE.md, "Storage")
# ---------------------------------------------------------------------------

OBJECT_TYPES = ("data", "keys", "locks", "snapshots", "index")
ALL_KINDS = ("config",) + OBJECT_TYPES
_ID_RE = re.compile(r"\A[0-9a-f]{64}\Z")


def is_object_id(name):
    return bool(_ID_RE.match(name))


# What a storage failure means.  Backends say what happened; the HTTP layer turns
# it into a status with its one table (STATUS_OF_MEANING, section 10).
MISSING = "missing"                 # no such object (any more)
QUOTA = "quota"                     # no room left for it
UNAVAILABLE = "unavailable"         # busy, rate limited or unreachable past the retries
TIMED_OUT = "timed out"             # the storage below did not answer in time
REFUSED = "upstream refused"        # refused, or answered something unusable
CACHE_TROUBLE = "cache trouble"     # the local metadata cache failed (disk full, I/O)


class StorageError(Exception):
    """A failure of the storage below; `meaning` says what happened (one of the
    names above), for the REST layer to answer with."""
    meaning = REFUSED

    def __init__(self, message, meaning=None):
        Exception.__init__(self, message)
        if meaning is not None:
            self.meaning = meaning


class NotFound(StorageError):
    meaning = MISSING


class UpstreamError(StorageError):
    """The cloud failed after retries (or answered something we cannot use)."""


class Unavailable(UpstreamError):
    """Busy, rate limited or unreachable past the retry deadline."""
    meaning = UNAVAILABLE


class QuotaExceeded(StorageError):
    meaning = QUOTA


class DiskFull(QuotaExceeded):
    """A disk (the upload spool's or a local repository's) has no room left."""


class CacheError(StorageError):
    """The metadata cache failed (disk full, I/O error)."""
    meaning = CACHE_TROUBLE


class ObjectRef(collections.namedtuple("ObjectRef", "repo kind name")):
    """One stored object: repo is a tuple of validated path components (() for the
    root repository), kind is 'config' or one of OBJECT_TYPES, name is 'config' or
    a 64 lower-case hex id."""
    __slots__ = ()

    @classmethod
    def config(cls, repo):
        return cls(tuple(repo), "config", "config")

    @property
    def relpath(self):
        return "config" if self.kind == "config" else "%s/%s" % (self.kind, self.name)

    @property
    def content_addressed(self):
        return self.kind != "config"

    def __str__(self):
        return "/".join(self.repo + (self.relpath,))


# Characters no cloud drive here accepts in a folder name (123pan and Cloudreve
# refuse the same ones).
FORBIDDEN_IN_FOLDER_NAME = frozenset('\\:*?"<>|')


def split_folder_path(path, label):
    """'/restic-backup/x' -> ('restic-backup', 'x'); ValueError for a name no
    cloud here can hold (forbidden characters, blank, '.' or '..', over 254
    characters or 255 UTF-8 bytes: 123pan spec, Cloudreve spec 1.8)."""
    parts = tuple(p for p in path.split("/") if p)
    for part in parts:
        if set(part) & FORBIDDEN_IN_FOLDER_NAME or not part.strip() or part in (".", "..") \
                or len(part) > 254 or len(part.encode("utf-8")) > 255:
            raise ValueError("%s cannot hold a folder named %r" % (label, part))
    return parts


def object_folder(base, repo, kind, name=None):
    """The folder (a tuple of names) of a type, or of one object, in a cloud folder
    laid out as restic's local backend: <base>/<repo...>/config, keys/, locks/,
    snapshots/, index/, data/<first 2 hex of the id>/<id>."""
    path = tuple(base) + tuple(repo)
    if kind == "config":
        return path
    if kind == "data" and name is not None:
        return path + ("data", name[:2])
    return path + (kind,)


def folder_by_folder(folders, list_folder):
    """A listing over several folders, list_folder(folder) read one folder at a time
    (the cloud backends' data/xx from their cache): memory stays flat however many
    packs there are.  The first folder is read before returning, so its failure is
    still an error status and not a cut listing."""
    first = list_folder(folders[0]) if folders else []
    if len(folders) <= 1:
        return first
    return itertools.chain(first, itertools.chain.from_iterable(
        list_folder(folder) for folder in folders[1:]))


class Storage(object):
    """The one small interface every backend implements.

    Backends know nothing of HTTP; the REST layer knows nothing of backends.  All
    methods may be called from many threads at once."""

    name = "storage"
    # The digests put() needs besides SHA-256 (which verification always computes):
    # 123pan's etag is an MD5; the others need none, so none is computed for them.
    digests = ()

    def describe(self):
        """One line for the start-up log."""
        return self.name

    def new_spool(self, ref, tmpdir=None):
        """An empty spool for the upload of ref, to be filled and then given to put().
        The default spools in memory or in tmpdir; a backend may instead write
        straight to where the object will live (the local folder does)."""
        return HashingSpool(tmpdir=tmpdir, digests=self.digests)

    def create_repository(self, repo):
        """Prepare the folders of a repository; idempotent."""
        raise NotImplementedError

    def stat(self, ref):
        """Size in bytes, or None when the object does not exist."""
        raise NotImplementedError

    def list(self, repo, kind):
        """An iterable of (name, size) of one type, possibly produced lazily (the
        REST layer streams it); empty when the folder is missing."""
        raise NotImplementedError

    def list_names(self, repo, kind):
        """The names alone (a v1 listing); a backend that can skip the sizes may."""
        return (name for name, _ in self.list(repo, kind))

    def read(self, ref, start, length):
        """An iterator of byte chunks, exactly `length` bytes from `start`.  Raises
        NotFound before returning when the object does not exist."""
        raise NotImplementedError

    def put(self, ref, spool):
        """Store the spooled body under ref.  The object becomes visible only once
        complete and confirmed.  May replace an existing object: the repository
        service decides beforehand whether that is allowed."""
        raise NotImplementedError

    def delete(self, ref):
        """Remove the object; True if it existed.  Idempotent."""
        raise NotImplementedError

    def start(self, rebuild=False):
        """Begin background work (a cloud's warm-up, queued deletes) at server
        start; rebuild: forget cached knowledge first (--rebuild-cache)."""

    def flush_deletes(self):
        """Wait until deletes still queued in the background are done."""

    def close(self):
        """Flush background work before the process exits."""


class Backend(object):
    """One record of the backend registry (BACKENDS): what parse_config, --help
    and main() know of a backend.  Each backend section ends with its record.

      name, label, description   --backend value; its name in messages; in --help
      build(args, environ)       the Storage (UsageError for bad settings); no
                                 network access
      options                    [(option, argparse settings)]: its option group;
                                 those without a default are its alone (flags)
      detect(args, environ)      True when its settings are given, so that it is
                                 the default; None for the backend that needs none
      detected_by                for --help: what detect looks at
      cloud                      keeps state in --state-dir, stores under --repo-path
      repo_path_help             for --help: what --repo-path means for it
      config_dir(args, environ)  where .htpasswd and the TLS files are by default
                                 (the state directory of a cloud)
      command(args, environ)     the exit status of a one-shot job its options
                                 ask for instead of serving (123pan's
                                 --verify-cloud), or None to serve; None: none"""

    def __init__(self, name, label, description, build, options=(), detect=None,
                 detected_by="", cloud=True, repo_path_help="", config_dir=None,
                 command=None):
        self.name, self.label, self.description = name, label, description
        self.command = command
        self.build, self.options = build, list(options)
        self.detect, self.detected_by = detect, detected_by
        self.cloud, self.repo_path_help = cloud, repo_path_help
        self.config_dir = config_dir or self._state_dir
        self.flags = [(flag, flag[2:].replace("-", "_")) for flag, settings in self.options
                      if "default" not in settings]

    def add_arguments(self, parser):
        if self.options:
            group = parser.add_argument_group("%s backend" % self.label)
            for flag, settings in self.options:
                group.add_argument(flag, **settings)

    @staticmethod
    def _state_dir(args, environ):
        args.state_dir = args.state_dir or default_state_dir(environ)
        return args.state_dir


BACKENDS = collections.OrderedDict()     # name -> Backend, in the order of --help


def register_backend(backend):
    BACKENDS[backend.name] = backend


# ---------------------------------------------------------------------------
# 4. Backend: a local folder laid out like a restic local repository
# ---------------------------------------------------------------------------

def fsync_directory(path):
    """Make a rename durable.  Some filesystems cannot fsync a directory; that is
    not an error worth failing an upload for."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError as e:
        if e.errno not in (errno.EINVAL, errno.ENOTSUP, errno.EBADF, errno.EACCES):
            raise
    finally:
        os.close(fd)


class FolderSpool(HashingSpool):
    """An upload written straight into a temporary file in the object's own folder,
    SHA-256 computed on the way: LocalStorage.put then only fsyncs and renames it,
    so every byte is written once.  Closing an uncommitted spool removes the file:
    a refused, short or mismatching upload leaves nothing behind."""

    def __init__(self, folder, fd, path, on_error, digests=()):
        HashingSpool.__init__(self, digests=digests, file=os.fdopen(fd, "w+b", buffering=0))
        self.folder = folder
        self.path = path
        self._on_error = on_error
        self.committed = False

    def _write(self, chunk):
        view = memoryview(chunk)
        try:
            while view:
                view = view[self._file.write(view):]
        except OSError as e:
            if is_disk_full(e):
                raise       # copy_body drains the body first, then raises DiskFull
            raise self._on_error(e)

    def commit(self, final):
        """fsync, then rename to `final` (in the same folder)."""
        os.fsync(self._file.fileno())
        os.replace(self.path, final)
        self.committed = True

    def close(self):
        self._file.close()
        if not self.committed:
            remove_if_present(self.path)


class LocalFileChunks(object):
    """The chunks of a byte range of an open file: iterable like any storage read,
    and also offering the file itself so the REST layer can send it zero-copy."""

    def __init__(self, file, start, length):
        self.file = file
        self.start = start
        self.length = length

    def __iter__(self):
        with self.file as f:    # closed at the end, as a reader that stops early does
            f.seek(self.start)
            remaining = self.length
            while remaining > 0:
                chunk = f.read(min(IO_CHUNK, remaining))
                if not chunk:
                    raise IOError("file shrank while being read")
                remaining -= len(chunk)
                yield chunk

    def close(self):
        self.file.close()


class FolderListings(object):
    """What each object folder held when it was last scanned, so that listing an
    unchanged folder costs one stat of the folder rather than one per object
    (200,000 packs: 256 stats instead of 200,000, the kernel's share of a scan).

    Why a folder's own stat can vouch for its contents: creating, removing or
    renaming a name in a folder moves its modification and change times (POSIX,
    on every local file system; FAT at 2 s resolution).  A scan is kept only if
    the folder had been still for RACY_SECONDS when the scan began: a change in
    the same timestamp tick as the last one would leave the times as they were
    (git's "racily clean" rule).  put() and delete() also forget their folder at
    once.  Not seen: a file whose size is changed in place, which restic never
    does, and changes by another host on a network mount that caches attributes.

    While one listing scans a folder, others that want the same folder wait for
    its scan instead of making their own: eight listings started together cost
    one scan of each folder, not eight fighting over the interpreter lock.

    Kept per object: its id as 32 bytes and its size, at most MAX_OBJECTS in all
    (about 10 MB; the least recently listed folders are dropped first)."""

    RACY_SECONDS = 3
    MAX_OBJECTS = 1 << 18
    clock = staticmethod(time.time_ns)

    def __init__(self):
        self._lock = threading.Lock()
        self._kept = collections.OrderedDict()  # folder -> (stamp, ids, sizes)
        self._objects = 0
        self._scanning = {}                     # folder -> Event set when its scan ends
        self._waiting = collections.Counter()   # folder -> listings waiting for that scan

    @staticmethod
    def stamp(st):
        """What must not have moved for a kept scan to hold."""
        return (st.st_dev, st.st_ino, st.st_mtime_ns, st.st_ctime_ns)

    @classmethod
    def still_since(cls, st, began):
        return max(st.st_mtime_ns, st.st_ctime_ns) < began - cls.RACY_SECONDS * 10 ** 9

    def entries(self, folder, st, scan):
        """(name, size) pairs of the folder whose stat is st: its kept scan if that
        still holds, else the one another listing is making, else scan()'s
        (ids, sizes), kept for the next listing."""
        stamp = self.stamp(st)
        while True:
            with self._lock:
                entry = self._still_held(folder, stamp)
                if entry is not None:
                    break
                running = self._scanning.get(folder)
                if running is None:
                    self._scanning[folder] = running = threading.Event()
                    mine = True
                else:
                    self._waiting[folder] += 1
                    mine = False
            if not mine:
                running.wait()
                with self._lock:
                    self._waiting[folder] -= 1
                    if not self._waiting[folder]:
                        del self._waiting[folder]
                continue
            try:
                ids, sizes = scan()
                entry = (stamp, bytes(ids), sizes)
                self._keep(folder, entry)
            finally:
                with self._lock:
                    del self._scanning[folder]
                running.set()
            break
        return zip(self._names(entry), entry[2])

    def kept_names(self, folder, st):
        """The names of the folder's kept scan if it still holds, else None."""
        with self._lock:
            entry = self._still_held(folder, self.stamp(st))
        return None if entry is None else self._names(entry)

    def _still_held(self, folder, stamp):
        """The kept scan of folder if it was made at stamp (the lock held)."""
        entry = self._kept.get(folder)
        if entry is None or entry[0] != stamp:
            return None
        self._kept.move_to_end(folder)
        return entry

    @staticmethod
    def _names(entry):
        names = entry[1].hex()
        return (names[i:i + 64] for i in range(0, len(names), 64))

    def waiting(self, folder):
        """How many listings wait for the scan of folder under way."""
        with self._lock:
            return self._waiting[folder]

    def _keep(self, folder, entry):
        count = len(entry[2])
        if count > self.MAX_OBJECTS:
            return
        with self._lock:
            self._drop(folder)
            while self._objects + count > self.MAX_OBJECTS:
                self._drop(next(iter(self._kept)))
            self._kept[folder] = entry
            self._objects += count

    def forget(self, folder):
        with self._lock:
            self._drop(folder)

    def _drop(self, folder):
        entry = self._kept.pop(folder, None)
        if entry is not None:
            self._objects -= len(entry[2])


class LocalStorage(Storage):
    """Repositories in a folder, exactly as `restic -r /that/folder` lays them out
    (config, keys/, locks/, snapshots/, index/, data/<2 hex>/<id>), so the same
    folder can be opened by restic directly, or served as rest-server left it."""

    name = "local"
    TEMP_MARK = ".tmp-"

    def __init__(self, root, digests=()):
        self.root = os.path.abspath(root)
        self.digests = digests      # a local copy tier asks for its cloud's
        self.listings = FolderListings()

    def describe(self):
        return "local folder %s" % self.root

    def _repo_dir(self, repo):
        for part in repo:   # defence in depth: the REST layer already validated these
            if part in ("", ".", "..") or "/" in part or os.sep in part or "\0" in part:
                raise ValueError("bad repository component %r" % part)
        return os.path.join(self.root, *repo)

    def _dir_of(self, repo, kind, name=None):
        base = self._repo_dir(repo)
        if kind == "config":
            return base
        if kind == "data" and name is not None:
            return os.path.join(base, "data", name[:2])
        return os.path.join(base, kind)

    def path_of(self, ref):
        return os.path.join(self._dir_of(ref.repo, ref.kind, ref.name), ref.name)

    def create_repository(self, repo):
        base = self._repo_dir(repo)
        for kind in OBJECT_TYPES:
            os.makedirs(os.path.join(base, kind), mode=0o700, exist_ok=True)
        for i in range(256):
            os.makedirs(os.path.join(base, "data", "%02x" % i), mode=0o700, exist_ok=True)

    def stat(self, ref):
        try:
            st = os.stat(self.path_of(ref))
        except (FileNotFoundError, NotADirectoryError):
            return None
        return st.st_size

    def _scan(self, folder):
        """(name, size) of the objects in one folder: from FolderListings when the
        folder has been still for a while, else straight from a scan."""
        try:
            fd = os.open(folder, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
        except (FileNotFoundError, NotADirectoryError):
            return
        try:
            began = self.listings.clock()
            st = os.fstat(fd)
            if not FolderListings.still_since(st, began):
                for entry in self._stat_objects(fd, folder):
                    yield entry
                return
            entries = self.listings.entries(folder, st, lambda: self._compact_scan(fd, folder))
        finally:
            os.close(fd)
        for entry in entries:
            yield entry

    @staticmethod
    def _stat_objects(fd, folder):
        """(name, size) of the regular files named as object ids in the open folder
        fd, each stat relative to it (no path walk per file)."""
        names = os.listdir(fd) if os.listdir in os.supports_fd else os.listdir(folder)
        at = {"dir_fd": fd} if os.stat in os.supports_dir_fd else None
        for name in names:
            if len(name) != 64 or not is_object_id(name):
                continue
            try:
                st = os.stat(name, **at) if at else os.stat(os.path.join(folder, name))
            except FileNotFoundError:   # deleted while we listed
                continue
            if stat.S_ISREG(st.st_mode):
                yield name, st.st_size

    def _compact_scan(self, fd, folder):
        """The scan as FolderListings keeps it: ids as bytes, sizes in an array."""
        ids, sizes = bytearray(), array.array("q")
        for name, size in self._stat_objects(fd, folder):
            ids += bytes.fromhex(name)
            sizes.append(size)
        return ids, sizes

    def list(self, repo, kind):
        return self._each_folder(repo, kind, self._scan)

    def list_names(self, repo, kind):
        return self._each_folder(repo, kind, self._scan_names)

    def _each_folder(self, repo, kind, scan):
        # Only data/ has sub-folders, and only its 2-hex ones hold packs; stray
        # files in data/ are ignored as rest-server does.  One folder at a time:
        # memory stays flat.
        folder = self._dir_of(repo, kind)
        if kind != "data":
            folders = [folder]
        else:
            try:
                with os.scandir(folder) as found:
                    folders = sorted(e.path for e in found if len(e.name) == 2 and e.is_dir())
            except (FileNotFoundError, NotADirectoryError):
                return
        for sub in folders:
            for entry in scan(sub):
                yield entry

    def _scan_names(self, folder):
        """The object names in one folder, without a stat per file where the file
        system tells the type in the folder itself (what FolderListings kept, if
        it holds)."""
        try:
            st = os.stat(folder)
        except (FileNotFoundError, NotADirectoryError):
            return
        kept = self.listings.kept_names(folder, st)
        if kept is not None:
            for name in kept:
                yield name
            return
        try:
            found = os.scandir(folder)
        except (FileNotFoundError, NotADirectoryError):
            return
        with found:
            for entry in found:
                if len(entry.name) == 64 and is_object_id(entry.name):
                    try:
                        if entry.is_file():
                            yield entry.name
                    except FileNotFoundError:
                        continue

    def read(self, ref, start, length):
        try:
            f = open(self.path_of(ref), "rb")
        except (FileNotFoundError, NotADirectoryError):
            raise NotFound(str(ref))
        return LocalFileChunks(f, start, length)

    def temp_file(self, ref, folder):
        """A new temporary file in `folder` for ref: (fd, path).  The name starts with
        a dot and is never a valid id, so a listing (ours or restic's) never shows
        a partial object."""
        try:
            os.makedirs(folder, mode=0o700, exist_ok=True)
            return tempfile.mkstemp(prefix="." + ref.name[:16] + self.TEMP_MARK, dir=folder)
        except OSError as e:
            raise self._os_error(e, ref)

    def new_spool(self, ref, tmpdir=None):
        folder = self._dir_of(ref.repo, ref.kind, ref.name)
        fd, path = self.temp_file(ref, folder)
        return FolderSpool(folder, fd, path, lambda e: self._os_error(e, ref), self.digests)

    def put(self, ref, spool):
        folder = self._dir_of(ref.repo, ref.kind, ref.name)
        final = os.path.join(folder, ref.name)
        if isinstance(spool, FolderSpool) and spool.folder == folder:
            try:
                spool.commit(final)
            except OSError as e:
                raise self._os_error(e, ref)
            finally:
                self.listings.forget(folder)
            fsync_directory(folder)
            return
        fd, tmp = self.temp_file(ref, folder)
        try:
            replace_with_temp_file(fd, tmp, final, spool.iter_range())
        except OSError as e:
            raise self._os_error(e, ref)
        finally:
            self.listings.forget(folder)
        fsync_directory(folder)

    @staticmethod
    def _os_error(e, ref):
        if is_disk_full(e):
            return DiskFull("%s: %s" % (ref, e.strerror))
        return StorageError("%s: %s" % (ref, e))

    def delete(self, ref):
        path = self.path_of(ref)
        try:
            os.unlink(path)
        except (FileNotFoundError, NotADirectoryError):
            return False
        finally:
            self.listings.forget(os.path.dirname(path))
        return True


def _local_path(args, environ):
    args.path = args.path or DEFAULT_LOCAL_PATH
    return args.path


register_backend(Backend(
    "local", "local", "a local folder", lambda args, environ: LocalStorage(args.path),
    options=[("--path", dict(metavar="DIR", help="folder holding the repositories "
                                                 "(default %s)" % DEFAULT_LOCAL_PATH))],
    cloud=False, config_dir=_local_path))


# ---------------------------------------------------------------------------
# 5. What the cloud backends share: transient failures and retry counting, the
#    batch queue, verified and resumed downloads, tokens kept across restarts,
#    the metadata cache (sqlite3) with its folder index and warm-up, and the
#    CloudClient and CloudStorage bases.  Follows ARCHITECTURE.md ("Cloud
#    clients", "Metadata cache"), the listing-lag rule of spec/123pan-open-api.md
#    4.2 and RFC 3339 for timestamps.
# ---------------------------------------------------------------------------

# The data/<first 2 hex of the id> folders of restic's layout.
_DATA_FOLDER_RE = re.compile(r"\A[0-9a-f]{2}\Z")


def send_parts(parts, send, concurrency, thread_name):
    """send(*part) for each part (a tuple), up to `concurrency` at once, this
    thread taking its share; their results in the order of `parts`.  After a
    failure no new part starts; the first failure is raised once the running
    ones have ended.  With concurrency 1 the parts go one by one, in order."""
    pending = collections.deque(enumerate(parts))
    results, failures = [None] * len(parts), []
    lock = threading.Lock()

    def work():
        while True:
            with lock:
                if failures or not pending:
                    return
                number, part = pending.popleft()
            try:
                results[number] = send(*part)
            except BaseException as e:
                with lock:
                    failures.append(e)
                return

    helpers = [threading.Thread(target=work, name=thread_name, daemon=True)
               for _ in range(min(concurrency, len(parts)) - 1)]
    for helper in helpers:
        helper.start()
    work()
    for helper in helpers:
        helper.join()
    if failures:
        raise failures[0]
    return results


class _SpoolSlice(object):
    """A request body: bytes [start, start+length) of a spool, streamed, and
    streamed again for a retry."""

    def __init__(self, spool, start, length):
        self.spool, self.start, self.length = spool, start, length
        self.content_length = length

    def __iter__(self):
        return self.spool.iter_range(self.start, self.length)


class _Transient(Exception):
    """One failed attempt worth retrying: `reason` is the label of the retries
    metric, `meaning` what the failure means once retries are exhausted.
    retry_after: seconds the answer itself asks to wait before the next attempt
    (a poll), instead of the backoff; None for the backoff."""

    def __init__(self, message, reason="server_error", meaning=REFUSED, retry_after=None):
        Exception.__init__(self, message)
        self.reason, self.meaning, self.retry_after = reason, meaning, retry_after

    @classmethod
    def network(cls, error):
        timed_out = isinstance(error, (socket.timeout, TimeoutError))
        return cls("%s: %s" % (type(error).__name__, error),
                   "timeout" if timed_out else "network", TIMED_OUT if timed_out else REFUSED)

    @classmethod
    def rate_limited(cls, message):
        METRICS.inc("restic123pan_cloud_rate_limited_total")
        return cls(message, "rate_limited", UNAVAILABLE)

    @classmethod
    def gateway(cls, message, timed_out=False):
        """A gateway error or a mangled answer: another try may get through."""
        return cls(message, meaning=TIMED_OUT if timed_out else REFUSED)


def _count_retry(reason):
    METRICS.inc("restic123pan_cloud_retries_total", reason=reason)


_RFC3339_RE = re.compile(r"\A(\d{4})-(\d\d)-(\d\d)[T ](\d\d):(\d\d):(\d\d)(?:\.\d+)?"
                         r"\s*(Z|[+-]\d\d:?\d\d)?\Z", re.IGNORECASE)


def parse_rfc3339(text, zone_if_missing="Z"):
    """RFC 3339 ('2025-03-23T15:48:37+08:00', 'Z', up to 9 fraction digits) ->
    POSIX seconds; a timestamp without a zone ('YYYY-MM-DD HH:MM:SS') is read in
    `zone_if_missing`.  By hand, because 3.8's datetime.fromisoformat refuses
    'Z' and odd fraction lengths."""
    m = _RFC3339_RE.match(text.strip())
    if not m:
        raise ValueError("not a timestamp: %r" % text)
    fields = [int(g) for g in m.groups()[:6]]
    zone = (m.group(7) or zone_if_missing).upper()
    offset = 0
    if zone != "Z":
        digits = zone[1:].replace(":", "")
        offset = (int(digits[:2]) * 60 + int(digits[2:])) * 60
        if zone[0] == "-":
            offset = -offset
    return calendar.timegm(tuple(fields) + (0, 0, 0)) - offset


_CONTENT_RANGE_RE = re.compile(r"\Abytes (\d+)-(\d+)/(\d+|\*)\Z")


def _range_response_problem(response, start, length):
    """None if `response` carries exactly the bytes asked for, else why not."""
    if response.status == 206:
        m = _CONTENT_RANGE_RE.match((response.header("Content-Range") or "").strip())
        if not m or int(m.group(1)) != start or int(m.group(2)) != start + length - 1:
            return "206 with Content-Range %r for bytes %d-%d" % (
                response.header("Content-Range"), start, start + length - 1)
    elif not (response.status == 200 and start == 0):
        # 200 is fine only for a Range covering the whole object (the server may
        # then send it all); the length check below tells.
        return "HTTP %d %s" % (response.status, response.reason)
    # No Content-Length (chunked or close-delimited: nobody shows a CDN always
    # sends one) is accepted: the Content-Range is right, and resumed_download
    # counts the bytes that arrive.
    if response.content_length is not None and response.content_length != length:
        return "HTTP %d with Content-Length %s, not %d" % (
            response.status, response.content_length, length)
    return None


def resumed_download(response, start, length, reopen, resumes, label, give_up):
    """Yield bytes [start, start+length) of a ranged download, `response` first.
    When its connection drops (or the body ends early), reopen(position, rest)
    must return a response for the rest from the byte reached; after `resumes`
    of those, give_up(position, end, error) returns the exception raised.
    `label` starts the log line of each resume ("123pan: download of file 7").
    Bytes and resumes are counted in METRICS."""
    position, end = start, start + length
    resumed = 0
    try:
        while position < end:
            try:
                chunk = response.read(min(IO_CHUNK, end - position))
                if not chunk:
                    raise http.client.IncompleteRead(b"", end - position)
            except NETWORK_ERRORS as e:
                response.close()
                resumed += 1
                if resumed > resumes:
                    raise give_up(position, end, e)
                log.info("%s broke off at byte %d (%s); resuming", label, position,
                         type(e).__name__)
                METRICS.inc("restic123pan_cloud_retries_total", reason="download_resume")
                response = reopen(position, end - position)
                continue
            position += len(chunk)
            METRICS.inc("restic123pan_cloud_bytes_downloaded_total", len(chunk))
            yield chunk
    finally:
        response.close()


def write_private_file(path, text, tmp_prefix):
    """Replace `path` with `text` atomically: a temporary file named tmp_prefix...
    in the same folder (mode 0600, as mkstemp makes it), fsynced, then renamed.
    The folder is created with mode 0700 if missing.  OSError on failure."""
    folder = os.path.dirname(path)
    os.makedirs(folder, mode=0o700, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=tmp_prefix, dir=folder)
    replace_with_temp_file(fd, tmp, path, (text,), mode="w", encoding="utf-8")


class TokenFile(object):
    """A cloud token kept across restarts in the state directory: one JSON file
    per account (`<kind>-token-<hash of the identity>.json`), mode 0600, replaced
    atomically.  Secrets (client secret, password) are never written; subclasses
    say how a token becomes a record and back."""

    label = "cloud"
    kind = None     # the file name's prefix: each subclass names its own

    def __init__(self, state_dir, *identity):
        key = hashlib.sha256("\0".join(identity).encode("utf-8"))
        self.path = os.path.join(state_dir,
                                 "%s-token-%s.json" % (self.kind, key.hexdigest()[:16]))

    def from_record(self, saved):
        raise NotImplementedError

    def load(self):
        """The saved token, or None (missing, or unreadable: logged)."""
        try:
            with open(self.path, "r", encoding="utf-8") as f:
                return self.from_record(json.load(f))
        except FileNotFoundError:
            return None
        except (OSError, ValueError, KeyError, TypeError) as e:
            log.warning("%s: ignoring unreadable token file %s: %s", self.label, self.path, e)
            return None

    def save_record(self, record):
        try:
            write_private_file(self.path, json.dumps(record), ".%s-token-" % self.kind)
        except OSError as e:
            # Serving goes on with the token in memory; only a restart would need a
            # new one.
            log.warning("%s: cannot save the token to %s: %s", self.label, self.path, e)


def sha256_checked(chunks, expected, mismatch):
    """Pass a stream of byte chunks through while computing its SHA-256.  The last
    chunk is held back until the hash is known: if it is not `expected`,
    mismatch(actual hex digest) returns the exception raised instead, so a reader
    sees a failed stream rather than wrong bytes.  `chunks` is closed at the end."""
    digest = hashlib.sha256()
    held = None
    try:
        for chunk in chunks:
            if held is not None:
                yield held
            digest.update(chunk)
            held = chunk
    finally:
        chunks.close()
    if digest.hexdigest() != expected:
        raise mismatch(digest.hexdigest())
    if held is not None:
        yield held


class _QueuedItem(object):
    __slots__ = ("item", "waited_for", "done", "error", "queued_at")

    def __init__(self, item, waited_for):
        self.item, self.waited_for = item, waited_for
        self.done, self.error = False, None
        self.queued_at = time.monotonic()


class _BatchQueue(object):
    """Runs `run_batch(items)` on up to `max_batch` items at a time, one call at a
    time.  While a call is under way (waiting for its rate-limit slot included),
    new items queue up and go together in the next call.

    submit(item) waits for its item's outcome: the caller whose item finds no
    call under way makes the call itself (group commit: no extra thread).
    post(item) returns at once; a background thread drains posted items, after
    letting them gather for up to `linger` seconds (or until a batch is full),
    flush() waits until everything queued is done, and close() drains what is
    left.  run_batch returns {item: exception} for items that failed; an
    exception it raises fails the whole batch."""

    def __init__(self, label, name, run_batch, max_batch, linger=0.0):
        self.label, self.name = label, name
        self._run_batch, self._max_batch, self._linger = run_batch, max_batch, linger
        self._cond = threading.Condition()
        self._queue = collections.deque()           # of _QueuedItem
        self._busy = False              # a batch call is under way
        self._closing = False
        self._flushing = 0
        self._drainer = None

    def submit(self, item):
        queued = _QueuedItem(item, waited_for=True)
        with self._cond:
            self._queue.append(queued)
            while not queued.done:
                if self._busy:
                    self._cond.wait()
                else:
                    self._run_one_batch()
        if queued.error is not None:
            raise queued.error

    def post(self, item):
        with self._cond:
            self._queue.append(_QueuedItem(item, waited_for=False))
            if self._drainer is None:
                self._drainer = threading.Thread(target=self._drain, daemon=True,
                                                 name="%s-%s" % (self.label, self.name))
                self._drainer.start()
            self._cond.notify_all()

    def flush(self):
        """Wait until every item queued so far is done."""
        with self._cond:
            self._flushing += 1
            self._cond.notify_all()
            try:
                while self._queue or self._busy:
                    if self._busy or self._drainer is not None:
                        self._cond.wait()
                    else:
                        self._run_one_batch()
            finally:
                self._flushing -= 1

    def _run_one_batch(self):
        """With self._cond held: take a batch, run it unlocked, record outcomes."""
        batch = [self._queue.popleft()
                 for _ in range(min(self._max_batch, len(self._queue)))]
        self._busy = True
        self._cond.release()
        try:
            try:
                errors = self._run_batch([queued.item for queued in batch]) or {}
            except Exception as e:
                errors = dict((queued.item, e) for queued in batch)
        finally:
            self._cond.acquire()
            self._busy = False
        for queued in batch:
            queued.done, queued.error = True, errors.get(queued.item)
        unreported = [q.error for q in batch if q.error is not None and not q.waited_for]
        if unreported:      # nobody waits for these: the log is all that is left
            log.warning("%s %s: %d of %d queued items failed (%s)",
                        self.label, self.name, len(unreported), len(batch), unreported[-1])
        self._cond.notify_all()

    def _drain(self):
        with self._cond:
            while True:
                if self._queue and not self._busy:
                    gathering = self._queue[0].queued_at + self._linger - time.monotonic()
                    if gathering > 0 and len(self._queue) < self._max_batch \
                            and not self._closing and not self._flushing:
                        self._cond.wait(gathering)
                    else:
                        self._run_one_batch()
                elif self._closing and not self._queue:
                    return
                else:
                    self._cond.wait()

    def close(self, timeout=None):
        """Finish the queued items (posted ones included); False if that took
        longer than `timeout`."""
        with self._cond:
            self._closing = True
            self._cond.notify_all()
            drainer = self._drainer
        if drainer is not None:
            drainer.join(timeout)
            return not drainer.is_alive()
        return True


METADATA_CACHE_FILE = "metadata-cache.sqlite3"
METADATA_CACHE_SCHEMA = 1

# A listing may lag behind our own writes (123pan spec 4.2): for this long after
# we wrote an entry, a listing that does not show it, or shows an older one,
# leaves it alone.  After that, a listing from the start of a folder is the
# truth for it.
LISTING_LAG_GRACE = 600.0

_CACHE_SCHEMA_SQL = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value);
CREATE TABLE IF NOT EXISTS folders (
    ns TEXT NOT NULL, folder NOT NULL,
    complete INTEGER NOT NULL DEFAULT 0,
    cursor, listed_at REAL,
    PRIMARY KEY (ns, folder));
CREATE TABLE IF NOT EXISTS entries (
    ns TEXT NOT NULL, folder NOT NULL, is_dir INTEGER NOT NULL, name TEXT NOT NULL,
    remote_id NOT NULL, size INTEGER NOT NULL DEFAULT 0, md5 TEXT NOT NULL DEFAULT '',
    written_at REAL,
    PRIMARY KEY (ns, folder, is_dir, name));
CREATE TABLE IF NOT EXISTS pending_deletes (
    ns TEXT NOT NULL, remote_id NOT NULL, folder NOT NULL, name TEXT NOT NULL,
    stage TEXT NOT NULL, queued_at REAL NOT NULL,
    PRIMARY KEY (ns, remote_id));
CREATE TABLE IF NOT EXISTS pending_uploads (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    ns TEXT NOT NULL, repo TEXT NOT NULL, kind TEXT NOT NULL, name TEXT NOT NULL,
    size INTEGER NOT NULL, md5 TEXT, queued_at REAL NOT NULL,
    UNIQUE (ns, repo, kind, name));
"""

CacheFolder = collections.namedtuple("CacheFolder", "complete cursor listed_at")
CacheEntry = collections.namedtuple("CacheEntry", "name is_dir remote_id size md5")


class MetadataCache(object):
    """What the cloud backends know exists, in one sqlite3 file of the state
    directory, so that a restart knows a repository at once instead of after
    minutes of rate-limited listing.

    Every row carries a namespace `ns`: backend and account, such as
    "123pan|https://open-api.123pan.com|<client id>" or
    "cloudreve|https://drive.example.com|<email>".  Folder keys and remote ids
    are stored as given (their columns have no type affinity): 123pan uses its
    integer ids, Cloudreve folder URIs and file id strings.  Tables:

      meta             the schema version, and settings learnt from a cloud
                       ("<ns>|<key>": Cloudreve's storage policy id)
      folders          per folder: `complete` (listed to the end, or created by
                       us: the entries below are all there is), `cursor` (where
                       an interrupted listing continues), `listed_at`
      entries          per folder its files (is_dir 0: name -> remote id, size,
                       MD5 or content version) and sub-folders (is_dir 1: name
                       -> folder key); `written_at` is set for our own writes,
                       NULL for what a listing showed
      pending_deletes  objects deleted by restic but not yet removed remotely
                       ('trash', then 'purge' on 123pan); they survive restarts
      pending_uploads  with --local-copy: objects stored in the local copy and
                       not yet in the cloud, in restic's write order (seq); the
                       write-behind commit point with the local file

    The access token is not kept here: this file is a cache, disposable at any
    time (--rebuild-cache, or deleting it), while a token thrown away costs one
    of the 3 live tokens 123pan allows.  It stays in its own file.

    Threads: one connection guarded by one lock.  The server runs one thread per
    HTTP connection, short-lived and many, so a connection per thread would be
    opened per client connection with no hook to close it; a statement here takes
    microseconds next to cloud calls of hundreds of milliseconds, so serialising
    them costs nothing measurable, and one connection never meets SQLITE_BUSY
    from itself.  WAL mode lets other processes (sqlite3 on the command line, a
    second server on the same state directory) read while we write, and with
    synchronous=FULL a commit is on disk before restic hears "stored": a power
    cut cannot make the cache forget an upload it confirmed.

    path None: an in-memory database (tests, and backends built without a
    state directory)."""

    def __init__(self, path=None):
        global sqlite3
        try:
            sqlite3 = optional_module("sqlite3", "the metadata cache of the cloud backends")
        except UsageError as e:
            raise OSError(errno.ENOSYS, str(e))
        self.path = path
        self._lock = threading.RLock()
        self._db = None

    def open(self):
        """Open (creating) the database now; later calls do nothing.  OSError or
        sqlite3.Error when the file cannot be used at all.  A file that is not a
        database of ours is moved aside and a new one started: the cache can
        always be rebuilt from the cloud."""
        with self._lock:
            if self._db is not None:
                return self
            if self.path is None:
                self._db = self._connect(":memory:")
                return self
            folder = os.path.dirname(os.path.abspath(self.path))
            os.makedirs(folder, mode=0o700, exist_ok=True)
            try:
                self._db = self._connect(self.path)
            except sqlite3.DatabaseError as e:
                if isinstance(e, sqlite3.OperationalError) and "unable to open" in str(e):
                    raise OSError(errno.EACCES, "cannot open %s: %s" % (self.path, e))
                aside = "%s.broken-%d" % (self.path, time.time())
                log.warning("metadata cache %s is unusable (%s): moved to %s, starting an "
                            "empty one", self.path, e, aside)
                for suffix in ("", "-wal", "-shm"):
                    if os.path.exists(self.path + suffix):
                        os.replace(self.path + suffix, aside + suffix)
                self._db = self._connect(self.path)
            return self

    def _connect(self, target):
        if target != ":memory:" and not os.path.exists(target):
            # sqlite gives its -wal and -shm files the database file's mode.
            os.close(os.open(target, os.O_CREAT | os.O_RDWR, 0o600))
        db = sqlite3.connect(target, timeout=30, isolation_level=None,
                             check_same_thread=False)
        try:
            if target != ":memory:":
                mode = db.execute("PRAGMA journal_mode=WAL").fetchone()[0]
                if str(mode).lower() != "wal":
                    log.warning("metadata cache %s: WAL mode refused (%s mode); it still "
                                "works, other readers wait for writers", target, mode)
                db.execute("PRAGMA synchronous=FULL")
            db.executescript(_CACHE_SCHEMA_SQL)
            row = db.execute("SELECT value FROM meta WHERE key='schema'").fetchone()
            if row is None:
                db.execute("INSERT INTO meta VALUES ('schema', ?)", (METADATA_CACHE_SCHEMA,))
            elif row[0] != METADATA_CACHE_SCHEMA:
                raise sqlite3.DatabaseError("schema %r, expected %r"
                                            % (row[0], METADATA_CACHE_SCHEMA))
        except BaseException:
            db.close()
            raise
        return db

    def close(self):
        with self._lock:
            if self._db is not None:
                self._db.close()
                self._db = None

    @contextlib.contextmanager
    def _transaction(self):
        """The connection inside one write transaction (BEGIN IMMEDIATE ... COMMIT),
        under the lock."""
        with self._lock:
            db = self.open()._db
            try:
                db.execute("BEGIN IMMEDIATE")
                try:
                    yield db
                except BaseException:
                    if db.in_transaction:   # SQLite may have rolled back by itself
                        db.execute("ROLLBACK")
                    raise
                db.execute("COMMIT")
            except sqlite3.Error as e:
                raise CacheError("metadata cache %s: %s" % (self.path or ":memory:", e))

    def _query(self, sql, args=()):
        with self._lock:
            try:
                return self.open()._db.execute(sql, args).fetchall()
            except sqlite3.Error as e:
                raise CacheError("metadata cache %s: %s" % (self.path or ":memory:", e))

    # -- reading ---------------------------------------------------------------

    def folder(self, ns, folder):
        rows = self._query("SELECT complete, cursor, listed_at FROM folders "
                           "WHERE ns=? AND folder=?", (ns, folder))
        if not rows:
            return CacheFolder(False, None, None)
        return CacheFolder(bool(rows[0][0]), rows[0][1], rows[0][2])

    def entry(self, ns, folder, name, is_dir=False):
        """(remote id, size, md5) of one entry, or None."""
        rows = self._query("SELECT remote_id, size, md5 FROM entries "
                           "WHERE ns=? AND folder=? AND is_dir=? AND name=?",
                           (ns, folder, int(is_dir), name))
        return tuple(rows[0]) if rows else None

    def entries(self, ns, folder, is_dir=False):
        """[(name, remote id, size, md5)] of a folder's files (or sub-folders),
        by name."""
        return [tuple(r) for r in self._query(
            "SELECT name, remote_id, size, md5 FROM entries WHERE ns=? AND folder=? "
            "AND is_dir=? ORDER BY name", (ns, folder, int(is_dir)))]

    def file_count(self, ns):
        return self._query("SELECT COUNT(*) FROM entries WHERE ns=? AND is_dir=0", (ns,))[0][0]

    def dump(self, ns):
        """{folder: (complete, {(is_dir, name): (remote id, size, md5)})} of a
        namespace: for tests, benchmarks and curious operators."""
        out = dict((f, (bool(c), {})) for f, c in self._query(
            "SELECT folder, complete FROM folders WHERE ns=?", (ns,)))
        for folder, is_dir, name, remote_id, size, md5 in self._query(
                "SELECT folder, is_dir, name, remote_id, size, md5 FROM entries WHERE ns=?",
                (ns,)):
            out.setdefault(folder, (False, {}))[1][(bool(is_dir), name)] = (remote_id, size, md5)
        return out

    # -- our own writes --------------------------------------------------------

    def record(self, ns, folder, name, remote_id, size=0, md5="", is_dir=False,
               created=False):
        """We stored a file or made a folder (created=True: a new, empty folder,
        complete from now on)."""
        now = time.time()
        with self._transaction() as db:
            db.execute("INSERT OR REPLACE INTO entries VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                       (ns, folder, int(is_dir), name, remote_id, size, md5, now))
            if is_dir and created:
                db.execute("INSERT OR REPLACE INTO folders VALUES (?, ?, 1, NULL, ?)",
                           (ns, remote_id, now))

    def drop(self, ns, folder, name, remote_id=None, is_dir=False, pending_stage=None):
        """Forget an entry, if it still is `remote_id` (not a newer upload under
        the same name); True if it was there.  A folder takes what the cache knows
        below it along.  pending_stage: also queue the remote delete of the
        entry (in the same transaction: the delete is committed here)."""
        with self._transaction() as db:
            row = db.execute("SELECT remote_id FROM entries WHERE ns=? AND folder=? "
                             "AND is_dir=? AND name=?",
                             (ns, folder, int(is_dir), name)).fetchone()
            if row is not None and remote_id is not None and row[0] != remote_id:
                return False
            if row is not None:
                db.execute("DELETE FROM entries WHERE ns=? AND folder=? AND is_dir=? "
                           "AND name=?", (ns, folder, int(is_dir), name))
                if is_dir:
                    self._forget_below(db, ns, row[0])
            if row is not None and pending_stage is not None:
                db.execute("INSERT OR REPLACE INTO pending_deletes VALUES (?, ?, ?, ?, ?, ?)",
                           (ns, row[0], folder, name, pending_stage, time.time()))
            return row is not None

    @staticmethod
    def _forget_below(db, ns, folder):
        stack = [folder]
        while stack:
            current = stack.pop()
            stack.extend(r[0] for r in db.execute(
                "SELECT remote_id FROM entries WHERE ns=? AND folder=? AND is_dir=1",
                (ns, current)))
            db.execute("DELETE FROM entries WHERE ns=? AND folder=?", (ns, current))
            db.execute("DELETE FROM folders WHERE ns=? AND folder=?", (ns, current))

    # -- listings --------------------------------------------------------------

    def merge_page(self, ns, folder, rows, settled_before, next_cursor, skip=(), seen=None):
        """Merge one page of a folder's listing (CacheEntry rows, in listing order).

        A listed entry is added, or replaces what an earlier listing said, but
        never an entry we wrote after `settled_before` (own writes win over a
        lagging listing); entries named in `skip` ((is_dir, name): deleted while
        this listing ran) and remote ids with a pending delete are left out.
        next_cursor None: the last page; the folder becomes complete, and if
        `seen` is a set (the listing ran from the first page in this process,
        and collected every listed (is_dir, name) in it), what the cache holds
        and the listing did not show is dropped unless we wrote it after
        `settled_before`.  Otherwise the cursor is kept for a restart to
        continue from (for a folder not complete yet)."""
        now = time.time()
        with self._transaction() as db:
            pending = set(r[0] for r in db.execute(
                "SELECT remote_id FROM pending_deletes WHERE ns=? AND folder=?", (ns, folder)))
            for row in rows:
                key = (bool(row.is_dir), row.name)
                if key in skip or row.remote_id in pending:
                    continue
                if seen is not None:
                    seen.add(key)
                known = db.execute("SELECT written_at FROM entries WHERE ns=? AND folder=? "
                                   "AND is_dir=? AND name=?",
                                   (ns, folder, int(row.is_dir), row.name)).fetchone()
                if known is not None and known[0] is not None and known[0] >= settled_before:
                    continue
                db.execute("INSERT OR REPLACE INTO entries VALUES (?, ?, ?, ?, ?, ?, ?, NULL)",
                           (ns, folder, int(row.is_dir), row.name, row.remote_id, row.size,
                            row.md5))
            db.execute("INSERT OR IGNORE INTO folders (ns, folder) VALUES (?, ?)", (ns, folder))
            if next_cursor is not None:
                db.execute("UPDATE folders SET cursor=? WHERE ns=? AND folder=? AND complete=0",
                           (next_cursor, ns, folder))
                return
            if seen is not None:
                for is_dir, name, remote_id, written_at in db.execute(
                        "SELECT is_dir, name, remote_id, written_at FROM entries "
                        "WHERE ns=? AND folder=?", (ns, folder)).fetchall():
                    if (bool(is_dir), name) in seen or (
                            written_at is not None and written_at >= settled_before):
                        continue
                    db.execute("DELETE FROM entries WHERE ns=? AND folder=? AND is_dir=? "
                               "AND name=?", (ns, folder, is_dir, name))
                    if is_dir:
                        self._forget_below(db, ns, remote_id)
            db.execute("UPDATE folders SET complete=1, cursor=NULL, listed_at=? "
                       "WHERE ns=? AND folder=?", (now, ns, folder))

    def invalidate(self, ns):
        """--rebuild-cache: every folder is to be listed again from its start, and
        the settings learnt from the cloud asked again.  The entries stay until
        those listings replace them."""
        with self._transaction() as db:
            db.execute("UPDATE folders SET complete=0, cursor=NULL WHERE ns=?", (ns,))
            db.execute("DELETE FROM meta WHERE substr(key, 1, ?)=?", (len(ns) + 1, ns + "|"))

    # -- settings learnt from the cloud (Cloudreve's storage policy id) ------------

    def setting(self, ns, key):
        rows = self._query("SELECT value FROM meta WHERE key=?", (ns + "|" + key,))
        return rows[0][0] if rows else None

    def set_setting(self, ns, key, value):
        with self._transaction() as db:
            db.execute("INSERT OR REPLACE INTO meta VALUES (?, ?)", (ns + "|" + key, value))

    # -- deletes queued for the cloud --------------------------------------------

    def pending_deletes(self, ns):
        """[(remote id, stage)], oldest first."""
        return [tuple(r) for r in self._query(
            "SELECT remote_id, stage FROM pending_deletes WHERE ns=? ORDER BY queued_at",
            (ns,))]

    def pending_deletes_of(self, ns, folder, name):
        return [r[0] for r in self._query(
            "SELECT remote_id FROM pending_deletes WHERE ns=? AND folder=? AND name=?",
            (ns, folder, name))]

    def set_pending_stage(self, ns, remote_ids, stage):
        with self._transaction() as db:
            db.executemany("UPDATE pending_deletes SET stage=? WHERE ns=? AND remote_id=?",
                           [(stage, ns, i) for i in remote_ids])

    def clear_pending(self, ns, remote_ids):
        with self._transaction() as db:
            db.executemany("DELETE FROM pending_deletes WHERE ns=? AND remote_id=?",
                           [(ns, i) for i in remote_ids])

    # -- uploads queued for the cloud (the local copy tier) --------------------------

    @staticmethod
    def _upload_key(ref):
        return json.dumps(list(ref.repo)), ref.kind, ref.name

    def queue_upload(self, ns, ref, size, md5=None):
        """Queue the upload of ref, committed (on disk) when this returns; an entry
        already there is replaced and goes to the end.  Its sequence number."""
        with self._transaction() as db:
            db.execute("DELETE FROM pending_uploads WHERE ns=? AND repo=? AND kind=? "
                       "AND name=?", (ns,) + self._upload_key(ref))
            return db.execute("INSERT INTO pending_uploads (ns, repo, kind, name, size, md5, "
                              "queued_at) VALUES (?, ?, ?, ?, ?, ?, ?)",
                              (ns,) + self._upload_key(ref) + (size, md5, time.time())
                              ).lastrowid

    def queued_uploads(self, ns, limit=-1, repo=None, kind=None):
        """[(seq, ObjectRef, size, md5)] in write order: the first `limit`, or
        those of one repository's type."""
        where, args = "ns=?", [ns]
        if repo is not None:
            where += " AND repo=? AND kind=?"
            args += [json.dumps(list(repo)), kind]
        return [(seq, ObjectRef(tuple(json.loads(r)), k, n), size, md5)
                for seq, r, k, n, size, md5 in self._query(
                    "SELECT seq, repo, kind, name, size, md5 FROM pending_uploads WHERE %s "
                    "ORDER BY seq LIMIT ?" % where, args + [limit])]

    def upload_queued(self, ns, ref):
        """The sequence number of ref's queued upload, or None."""
        rows = self._query("SELECT seq FROM pending_uploads WHERE ns=? AND repo=? AND kind=? "
                           "AND name=?", (ns,) + self._upload_key(ref))
        return rows[0][0] if rows else None

    def unqueue_upload(self, ns, ref, seq=None):
        """Forget ref's queued upload (only if it is still entry `seq`, when given:
        not a newer one of the same name); True if there was one."""
        with self._transaction() as db:
            sql = "DELETE FROM pending_uploads WHERE ns=? AND repo=? AND kind=? AND name=?"
            args = (ns,) + self._upload_key(ref)
            if seq is not None:
                sql, args = sql + " AND seq=?", args + (seq,)
            return db.execute(sql, args).rowcount > 0

    def upload_backlog(self, ns):
        """(objects, bytes, queued_at of the oldest or None) still to upload."""
        count, nbytes, oldest = self._query(
            "SELECT COUNT(*), COALESCE(SUM(size), 0), MIN(queued_at) FROM pending_uploads "
            "WHERE ns=?", (ns,))[0]
        return count, nbytes, oldest


# Warm-up progress goes to the log at most this often.
WARM_UP_PROGRESS_INTERVAL = 10.0


class WarmUpStopped(Exception):
    """The server is stopping: a warm-up ends between two pages."""


def _duration(seconds):
    seconds = int(round(seconds))
    if seconds < 60:
        return "%ds" % seconds
    if seconds < 3600:
        return "%dm%02ds" % divmod(seconds, 60)
    return "%dh%02dm" % (seconds // 3600, seconds % 3600 // 60)


class CacheWarmUp(object):
    """Fills a cold metadata cache by walking a cloud folder tree, lowest
    priority number first: restic's small folders (the repository folder with
    config, keys, locks, snapshots, index) before data/ and its sub-folders, so
    that restic's first requests find their folders listed early.  A few
    worker threads share the backend's rate limit.

    visit(key, path, on_page) lists one folder unless the cache knows it
    complete, calling on_page(objects) after every page, and returns (objects
    in the folder, objects listed now or None when it was not listed,
    [(priority, child key, child path)]).  It raises WarmUpStopped when `stop`
    is set; what was listed stays in the cache (the backend keeps the cursor of
    a folder listed half-way) and the next run continues from there.  A folder
    whose listing fails is left to the requests that need it.  Progress goes to
    the log: objects so far, the rate, and an estimate from the folders still
    queued (their number times the average of the folders of the same priority
    listed so far)."""

    def __init__(self, label, visit, workers=2, interval=WARM_UP_PROGRESS_INTERVAL,
                 stop=None):
        self.label = label
        self._visit = visit
        self._workers = max(1, workers)
        self._interval = interval
        self._stop = stop or threading.Event()
        self._cond = threading.Condition()
        self._queue = []            # heap of (priority, sequence, key, path)
        self._sequence = 0
        self._active = 0
        self._open_objects = 0      # listed in folders not finished yet
        self._by_priority = collections.defaultdict(lambda: [0, 0])  # listed folders, objects
        self.objects = 0            # in the folders finished
        self.listed_objects = 0
        self.folders = 0
        self.listed_folders = 0
        self.pages = 0
        self.failures = 0
        self.finished = threading.Event()
        self._started = time.monotonic()
        self._progress_log = Throttle(self._started)

    def run(self, roots):
        """Walk from roots [(priority, key, path)] until done or stopped."""
        with self._cond:
            for root in roots:
                self._push(*root)
        helpers = [threading.Thread(target=self._work, daemon=True,
                                    name="%s-warm-up-%d" % (self.label, i))
                   for i in range(1, self._workers)]
        for thread in helpers:
            thread.start()
        try:
            self._work()
        finally:
            for thread in helpers:
                thread.join()
            self.finished.set()
        elapsed = time.monotonic() - self._started
        if self._stop.is_set():
            log.info("%s cache warm-up stopped after %s: %d objects known; the next start "
                     "continues where it stopped", self.label, _duration(elapsed),
                     self.objects + self._open_objects)
        else:
            log.info("%s cache warm-up done in %.1fs: %d objects in %d folders, %d folders "
                     "listed with %d list calls%s", self.label, elapsed, self.objects,
                     self.folders, self.listed_folders, self.pages,
                     ", %d failed (listed when first needed)" % self.failures
                     if self.failures else "")

    def _push(self, priority, key, path):
        heapq.heappush(self._queue, (priority, self._sequence, key, path))
        self._sequence += 1

    def _work(self):
        while True:
            with self._cond:
                while not self._queue and self._active and not self._stop.is_set():
                    self._cond.wait()
                if self._stop.is_set() or not self._queue:
                    self._cond.notify_all()
                    return
                priority, _, key, path = heapq.heappop(self._queue)
                self._active += 1
            objects, listed, children = 0, None, []
            try:
                objects, listed, children = self._visit(key, path, self.page_listed)
            except WarmUpStopped:
                pass
            except Exception as e:      # the folder is listed when a request needs it
                if not self._stop.is_set():
                    with self._cond:
                        self.failures += 1
                    log.warning("%s cache warm-up: listing /%s failed: %s", self.label,
                                "/".join(path), e)
            with self._cond:
                self._active -= 1
                if not self._stop.is_set():
                    self.objects += objects
                    self.folders += 1
                    if listed is not None:
                        self._open_objects -= listed
                        self.listed_folders += 1
                        stats = self._by_priority[priority]
                        stats[0] += 1
                        stats[1] += objects
                    for child in children:
                        self._push(*child)
                self._cond.notify_all()

    def page_listed(self, objects):
        """A page of `objects` files was listed (from visit, or from the backend
        while it finds the roots)."""
        with self._cond:
            self.pages += 1
            self.listed_objects += objects
            self._open_objects += objects
            now = time.monotonic()
            if not self._progress_log.ready(now, self._interval):
                return
            message = self.progress(now)
        log.info("%s", message)

    def progress(self, now=None):
        """One line: objects so far, rate, folders, estimate (lock held)."""
        elapsed = max(1e-6, (now or time.monotonic()) - self._started)
        rate = self.listed_objects / elapsed
        waiting = collections.Counter(item[0] for item in self._queue)
        remaining = 0.0
        for priority, count in waiting.items():
            done, objects = self._by_priority.get(priority, (0, 0))
            remaining += count * (objects / float(done) if done else 0.0)
        text = ("%s cache warm-up: %d objects so far (%.0f/s), %d folders done, %d queued"
                % (self.label, self.objects + self._open_objects, rate, self.folders,
                   len(self._queue) + self._active))
        if remaining and rate:
            text += ", about %d objects and %s to go" % (remaining, _duration(remaining / rate))
        return text


class _Listing(object):
    """One listing of a folder under way: where it started (cursor None: from
    the first page), which names it showed (a set only when it started at the
    first page), and what it has merged."""
    __slots__ = ("folder_id", "cursor", "seen", "settled_before", "pages", "objects")

    def __init__(self, folder_id, cursor, settled_before):
        self.folder_id, self.cursor, self.settled_before = folder_id, cursor, settled_before
        self.seen = set() if cursor is None else None
        self.pages = self.objects = 0

    def from_start(self):
        self.cursor, self.seen = None, set()



def json_envelope(raw):
    """The {code: int, ...} dict an API answered, or None if it is not one."""
    try:
        envelope = json.loads(raw.decode("utf-8"))
    except ValueError:
        return None
    if isinstance(envelope, dict) and isinstance(envelope.get("code"), int):
        return envelope
    return None


def cloud_repo_path(args, environ, variable, split):
    """--repo-path, else the environment variable, else DEFAULT_REPO_PATH;
    UsageError for a name the cloud refuses (split raises ValueError)."""
    repo_path = args.repo_path or environ.get(variable) or DEFAULT_REPO_PATH
    try:
        split(repo_path)
    except ValueError as e:
        raise UsageError("--repo-path: %s" % e)
    return repo_path


def check_cloud_url(url, complaint, https_needed_for, need_host=False):
    """UsageError(complaint % url) unless `url` is an http(s) address (with a host
    name, where need_host); over https the ssl module must be there."""
    if not url.startswith(("https://", "http://")) or (need_host and not urlsplit(url).hostname):
        raise UsageError(complaint % url)
    if url.startswith("https://"):
        optional_module("ssl", https_needed_for)


def cloud_storage_from_args(args, storage_type, client, repo_path, namespace, **options):
    """A CloudStorage of `storage_type` on `client`, its index on the metadata cache
    file of --state-dir (opened by start()) under `namespace`, --cache-refresh
    applied."""
    try:
        cache = MetadataCache(os.path.join(args.state_dir, METADATA_CACHE_FILE))
    except OSError as e:
        raise UsageError(str(e.strerror or e))
    return storage_type(client, repo_path, index=storage_type.index_type(cache, namespace),
                        refresh_seconds=args.cache_refresh, **options)


class CloudCall(object):
    """One API call under way: what CloudClient.call_api sends (method, path,
    endpoint label, query, JSON body or streamed payload, auth) and what its
    retry loop knows (deadline, token renewals so far, the token in use).
    Clients add the fields their hooks read (123pan: host; Cloudreve: renew_on,
    final)."""

    def __init__(self, method, path, endpoint=None, query=None, body=None, payload=None,
                 auth=True, expected=(), deadline=None, **extra):
        self.method, self.path, self.endpoint = method, path, endpoint or path
        self.query, self.body, self.payload = query, body, payload
        self.auth, self.expected, self.deadline = auth, expected, deadline
        self.renewals, self.token = 0, None
        self.__dict__.update(extra)


class CloudClient(object):
    """What every cloud API client shares: the one retry loop every API request
    goes through (call_api), one attempt's encoding, metrics and network-error
    mapping, the access token (renewed once at a time across threads, kept in a
    TokenFile), the download-link cache, and ranged downloads that resume where
    a dropped connection stopped.  A client adds its envelope, its codes and its
    upload flows through these hooks:

      _obtain_token(current, obtained_at)   a new token (log in, refresh...)
      _url(call), _headers(call)            where and with what a call goes
      _envelope(response, raw)              the decoded answer, or None
      _answer(call, response, raw)          what _classify gets (by default the
                                            envelope; without one, raises)
      _classify(call, envelope)             (action, value): OK with the data,
                                            RENEW the token, RETRY with a
                                            _Transient, RAISE with an error
      _new_download_url(key, fresh)         (url, seconds it may be reused)
      _check_download(key, start, length, response)
                                            None, a _Transient, or raises
      server_time()                         now on the cloud's clock, which
                                            its expiry times are given in

    A token is a namedtuple whose first field is its bearer value and which has
    `renew_at` (server_time() after which it is renewed before use)."""

    OK, RENEW, RETRY, RAISE = "ok", "renew token", "retry", "raise"
    label = "cloud"                 # starts log lines and error messages
    error_type = UpstreamError      # a refusal
    unavailable_type = Unavailable  # what is left after the retries
    max_response = 16 * 1024 * 1024
    retried_statuses = (408,)       # besides 429 and 5xx, for answers without an envelope
    timeout_statuses = (504,)       # of those, the ones that mean a gateway timed out
    stale_link_statuses = (403, 404, 410)
    # A connection to the download host failed: ask for another link before the
    # next attempt (a link of the CDN may lead to another node).
    new_link_after_network_error = False

    def __init__(self, http_client, timeout, call_deadline, retry_base, retry_cap,
                 download_resumes, token_file=None, limiter=None):
        if timeout >= call_deadline:
            # One attempt must leave time for another inside the deadline.
            timeout = call_deadline / 2.0
        self.http = http_client or HttpClient(timeout=timeout)
        self.call_deadline, self.download_resumes = call_deadline, download_resumes
        self.retry_base, self.retry_cap = retry_base, retry_cap
        self.limiter, self._token_file = limiter, token_file
        self._token = token_file.load() if token_file else None
        self._token_lock = threading.Lock()
        self._links = collections.OrderedDict()     # file key -> (url, usable until)
        self._links_lock = threading.Lock()

    def close(self):
        self.http.close()

    def _backoff(self, deadline):
        return Backoff(deadline, self.retry_base, self.retry_cap)

    # -- the one place every API request goes through --------------------------

    def call_api(self, call):
        """Send `call` until _classify says OK (its data is returned) or RAISE
        (that error is raised, logged unless its type is in call.expected).
        RENEW gets a fresh token and an immediate replay the first time, then
        backoff; RETRY, network failures and unusable answers back off with
        jitter (or wait the _Transient's retry_after) until call.deadline
        (default call_deadline from now), then _gave_up's error.  A _Transient
        raised while getting a token (a client that must not ask for one now)
        is retried like a failed attempt."""
        if call.deadline is None:
            call.deadline = time.monotonic() + self.call_deadline
        backoff = self._backoff(call.deadline)
        failure = None
        while True:
            try:
                call.token = self._current_token() if call.auth else None
                envelope = self._attempt(call)
            except _Transient as e:
                failure = e
            except RateLimitTimeout:
                raise self._gave_up(call, failure or _Transient(
                    "no request slot free before the deadline", meaning=UNAVAILABLE))
            else:
                action, value = self._classify(call, envelope)
                if action == self.OK:
                    return value
                if action == self.RENEW:
                    call.renewals += 1
                    try:
                        self._renew_token(stale=call.token)
                    except _Transient as e:
                        failure = e
                    else:
                        _count_retry("token")
                        if call.renewals == 1:
                            continue
                        failure = _Transient(str(value), "token")
                elif action == self.RETRY:
                    failure = value
                else:
                    if not isinstance(value, call.expected):
                        log.warning("%s", value)
                    raise value
            if failure.retry_after is not None and \
                    time.monotonic() + failure.retry_after < call.deadline:
                time.sleep(failure.retry_after)
            elif not backoff.pause():
                raise self._gave_up(call, failure)
            _count_retry(failure.reason)
            log.debug("%s %s: retrying: %s", self.label, call.endpoint, failure)

    def answer_or_refusal(self, *args, **kw):
        """call(*args, **kw) -> (data, None), or (None, the error) when the cloud
        refused; unavailable_type (nothing was decided) is raised."""
        try:
            return self.call(*args, **kw), None
        except self.unavailable_type:
            raise
        except self.error_type as e:
            return None, e

    def _gave_up(self, call, failure):
        return self.unavailable_type(
            "%s %s: giving up: %s" % (self.label, call.endpoint, failure),
            endpoint=call.endpoint, meaning=failure.meaning)

    def _attempt(self, call):
        """Send once and return the envelope; _Transient for what may be retried,
        RateLimitTimeout when no request slot came free before the deadline."""
        headers = self._headers(call)
        if call.token is not None:
            headers["Authorization"] = "Bearer " + call.token[0]
        data = call.payload
        if data is not None:
            headers["Content-Type"] = getattr(data, "content_type", "application/octet-stream")
            headers["Content-Length"] = str(data.content_length)
        elif call.body is not None:
            data = json.dumps(call.body, ensure_ascii=False).encode("utf-8")
            headers["Content-Type"] = "application/json"
        url = self._url(call) + ("?" + urlencode(call.query) if call.query else "")
        slot = self.limiter.slot(call.path, call.deadline) if self.limiter \
            else contextlib.nullcontext()
        try:
            with slot:
                METRICS.inc("restic123pan_cloud_api_calls_total", endpoint=call.endpoint)
                response = self.http.request(call.method, url, headers, data)
                if call.payload is not None:    # an answer came: the body was sent
                    METRICS.inc("restic123pan_cloud_bytes_uploaded_total",
                                call.payload.content_length)
                raw = response.read_all(self.max_response)
        except PERMANENT_NETWORK_ERRORS as e:
            raise self.error_type("%s %s: %s" % (self.label, call.endpoint, e),
                                  endpoint=call.endpoint)
        except NETWORK_ERRORS as e:
            self._network_failed(call)
            raise _Transient.network(e)
        return self._answer(call, response, raw)

    def _answer(self, call, response, raw):
        """The envelope of an answer, for _classify; an answer without one raises
        a _Transient if another try may get through, else error_type."""
        envelope = self._envelope(response, raw)
        if envelope is not None:
            return envelope
        reason = self._no_envelope_reason(response)
        if response.status == 429:
            raise _Transient.rate_limited(reason)
        if response.status >= 500 or response.status in self.retried_statuses:
            raise _Transient.gateway(reason, response.status in self.timeout_statuses)
        raise self.error_type("%s %s: %s" % (self.label, call.endpoint, reason),
                              endpoint=call.endpoint)

    def _headers(self, call):
        return {}

    def _network_failed(self, call):
        """A connection failed: forget what it may have been wrong about."""

    @staticmethod
    def _no_envelope_reason(response):
        return "HTTP %d without a JSON envelope" % response.status

    # -- the access token ------------------------------------------------------------

    def server_time(self):
        """Now on the cloud's clock, for the expiry times it hands out; the local
        clock unless a client knows better."""
        return time.time()

    def _current_token(self):
        token = self._token
        if token is not None and self.server_time() < token.renew_at:
            return token
        return self._renew_token(stale=token)

    def _renew_token(self, stale):
        """A fresh token, unless another thread already replaced `stale`: one
        renewal at a time across threads, so a burst of refusals costs one token."""
        with self._token_lock:
            current = self._token
            if current is not None and current is not stale \
                    and self.server_time() < current.renew_at:
                return current
            obtained_at = self.server_time()
            token = self._obtain_token(current, obtained_at)
            METRICS.inc("restic123pan_cloud_token_refreshes_total")
            if self._token_file is not None:
                self._token_file.save(token, obtained_at)
            self._token = token
            return token

    # -- downloads ---------------------------------------------------------------------

    def download_url(self, key, fresh=False):
        """A download link for the file `key`, reused while _new_download_url said
        it may be; fresh=True asks for a new one."""
        now = time.monotonic()
        if not fresh:
            with self._links_lock:
                cached = self._links.get(key)
                if cached is not None and cached[1] > now:
                    return cached[0]
        url, lifetime = self._new_download_url(key, fresh)
        with self._links_lock:
            self._links[key] = (url, now + lifetime)
            self._links.move_to_end(key)
            while len(self._links) > 10000:
                self._links.popitem(last=False)
        return url

    def forget_download_url(self, key):
        with self._links_lock:
            self._links.pop(key, None)

    def _describe_file(self, key):
        return str(key)

    def read_range(self, key, start, length):
        """An iterator over bytes [start, start+length) of a file (length > 0).

        The first request happens now, so a missing file or an unreachable host
        raises here rather than during iteration.  A connection that drops
        mid-body is resumed from the byte reached, up to download_resumes times."""
        what = self._describe_file(key)
        response = self._open_range(key, start, length)
        return resumed_download(
            response, start, length, lambda position, rest: self._open_range(key, position, rest),
            self.download_resumes, "%s: download of %s" % (self.label, what),
            lambda position, end, e: self.unavailable_type(
                "%s download of %s broke off at byte %d of %d-%d: %s"
                % (self.label, what, position, start, end, e)))

    def _open_range(self, key, start, length):
        backoff = self._backoff(time.monotonic() + self.call_deadline)
        headers = {"Range": "bytes=%d-%d" % (start, start + length - 1)}
        fresh = False
        while True:
            url = self.download_url(key, fresh)
            try:
                response = self.http.request("GET", url, headers, follow_redirects=True)
            except PERMANENT_NETWORK_ERRORS as e:
                raise self.error_type("%s download of %s: %s"
                                      % (self.label, self._describe_file(key), e))
            except NETWORK_ERRORS as e:
                if self.new_link_after_network_error:
                    self.forget_download_url(key)
                failure = _Transient.network(e)
            else:
                failure = self._check_download(key, start, length, response)
                if failure is None:
                    return response
                if failure.reason == "download_url":
                    # Expired or refused link: a new one, at once the first time.
                    self.forget_download_url(key)
                    if not fresh:
                        fresh = True
                        _count_retry(failure.reason)
                        continue
            if not backoff.pause():
                raise self.unavailable_type("%s download of %s: giving up: %s"
                                            % (self.label, self._describe_file(key), failure),
                                            meaning=failure.meaning)
            _count_retry(failure.reason)

    def _check_download(self, key, start, length, response):
        """None if the response carries exactly the bytes asked for; else a
        _Transient to retry (reason "download_url": with a new link), or raises
        what cannot be retried."""
        problem = _range_response_problem(response, start, length)
        if problem is None and (response.header("Content-Encoding") or "identity") != "identity":
            problem = "Content-Encoding %s" % response.header("Content-Encoding")
        if problem is None:
            return None
        response.discard()
        if response.status in self.stale_link_statuses:
            return _Transient(problem, "download_url")
        if response.status == 429:
            return _Transient.rate_limited(problem)
        if 400 <= response.status < 500 and response.status != 408:
            raise self.error_type("%s download of %s bytes %d+%d: %s" % (
                self.label, self._describe_file(key), start, length, problem))
        return _Transient(problem)


class KeyedLocks(object):
    """One lock per key, kept while someone holds or waits for it."""

    def __init__(self):
        self._locks = {}            # key -> [lock, holders and waiters]
        self._guard = threading.Lock()

    @contextlib.contextmanager
    def hold(self, key):
        with self._guard:
            entry = self._locks.setdefault(key, [threading.Lock(), 0])
            entry[1] += 1
        try:
            with entry[0]:
                yield
        finally:
            with self._guard:
                entry[1] -= 1
                if not entry[1]:
                    del self._locks[key]


CloudFile = collections.namedtuple("CloudFile", "file_id size etag")
# etag: what identifies the content version (123pan's MD5, Cloudreve's primary
# entity id); kept in the cache's md5 column.


class FolderIndex(object):
    """What this server knows exists on a cloud: per folder key its files
    (name -> CloudFile) and sub-folders (name -> folder key), and whether the
    folder was listed completely.  Kept in a MetadataCache under the namespace
    of the account: a persistent one from the state directory survives
    restarts; the default is an in-memory one.  Folder keys are what the cloud
    addresses folders by (123pan: integer ids; Cloudreve: URIs); the root is
    ROOT_ID.

    A folder is listed once, when first needed (or by the warm-up), and then kept
    current from this server's own uploads and deletes.  Our own writes always
    win over a listing: listings lag behind writes (123pan spec 4.2), and a
    listing that ran while we wrote must neither drop a file we just uploaded
    nor revive one we just deleted.  So an entry we wrote stays as it is for
    LISTING_LAG_GRACE seconds whatever a listing says, and a name we drop while
    a listing of its folder may be under way is remembered (in memory) and left
    out of that listing.  Deleted objects waiting for their remote delete are
    left out of every listing by their file id."""

    ROOT_ID = None

    def __init__(self, cache=None, namespace="cloud"):
        self.cache = cache if cache is not None else MetadataCache()
        self.ns = namespace
        self._lock = threading.Lock()
        self._dropped = collections.defaultdict(set)    # folder -> names (see above)
        self._listings = collections.Counter()          # folder -> listings under way

    def folder_state(self, folder):
        return self.cache.folder(self.ns, folder)

    def is_loaded(self, folder):
        return self.folder_state(folder).complete

    def child_folder(self, parent, name):
        known = self.cache.entry(self.ns, parent, name, is_dir=True)
        return None if known is None else known[0]

    def folders(self, folder):
        return dict((name, child) for name, child, _, _ in
                    self.cache.entries(self.ns, folder, is_dir=True))

    def file(self, folder, name):
        known = self.cache.entry(self.ns, folder, name)
        return None if known is None else CloudFile(*known)

    def files(self, folder):
        return [(name, CloudFile(file_id, size, etag))
                for name, file_id, size, etag in self.cache.entries(self.ns, folder)]

    def record_folder(self, parent, name, folder, created=False):
        """A folder exists; created=True when we just made it, so it is empty."""
        self.cache.record(self.ns, parent, name, folder, is_dir=True, created=created)

    def record_file(self, folder, name, entry):
        with self._lock:
            self.cache.record(self.ns, folder, name, entry.file_id, entry.size, entry.etag or "")
            self._dropped.get(folder, set()).discard(name)

    def drop_file(self, folder, name, file_id, delete_remotely=False):
        """Forget a file, if `name` still is that file id (not a newer upload);
        True if it was known.  delete_remotely: and queue its remote delete,
        committed together with forgetting it."""
        with self._lock:
            current = self.file(folder, name)
            if current is not None and current.file_id != file_id:
                return False
            dropped = self.cache.drop(self.ns, folder, name, file_id,
                                      pending_stage="trash" if delete_remotely else None)
            if self._listings[folder] or not self.is_loaded(folder):
                self._dropped[folder].add(name)
            return dropped

    def forget_folder(self, parent, name, folder):
        """A folder vanished behind our back: forget it and all below it."""
        self.cache.drop(self.ns, parent, name, folder, is_dir=True)

    def invalidate(self):
        self.cache.invalidate(self.ns)

    def setting(self, key):
        return self.cache.setting(self.ns, key)

    def set_setting(self, key, value):
        self.cache.set_setting(self.ns, key, value)

    # -- listings ------------------------------------------------------------------

    def begin_listing(self, folder):
        """Start (or, for a folder whose listing was interrupted, continue) a
        listing: pages go to merge_page, and end_listing follows in any case."""
        state = self.folder_state(folder)
        cursor = None if state.complete else state.cursor
        with self._lock:
            self._listings[folder] += 1
        return _Listing(folder, cursor, time.time() - LISTING_LAG_GRACE)

    def merge_page(self, listing, rows, next_cursor):
        """Merge one page of CacheEntry rows; next_cursor None after the last."""
        with self._lock:
            skip = set((False, name) for name in self._dropped.get(listing.folder_id, ()))
            self.cache.merge_page(self.ns, listing.folder_id, rows, listing.settled_before,
                                  next_cursor, skip, listing.seen)
        listing.pages += 1
        listing.objects += sum(1 for row in rows if not row.is_dir)

    def end_listing(self, listing):
        with self._lock:
            self._listings[listing.folder_id] -= 1
            if not self._listings[listing.folder_id]:
                del self._listings[listing.folder_id]
                if self.is_loaded(listing.folder_id):
                    self._dropped.pop(listing.folder_id, None)

    def merge_listing(self, folder, files, folders):
        """A whole listing at once: {name: CloudFile}, {name: folder key}."""
        listing = self.begin_listing(folder)
        try:
            self.merge_page(listing, [CacheEntry(name, False, f.file_id, f.size, f.etag or "")
                                      for name, f in files.items()] +
                            [CacheEntry(name, True, child, 0, "")
                             for name, child in folders.items()], None)
        finally:
            self.end_listing(listing)

    # -- deletes queued for the cloud ------------------------------------------------

    def pending_deletes(self):
        return self.cache.pending_deletes(self.ns)

    def pending_deletes_of(self, folder, name):
        return self.cache.pending_deletes_of(self.ns, folder, name)

    def set_pending_stage(self, file_ids, stage):
        self.cache.set_pending_stage(self.ns, file_ids, stage)

    def clear_pending(self, file_ids):
        self.cache.clear_pending(self.ns, file_ids)


class CloudStorage(Storage):
    """What the cloud backends share: repositories in a cloud folder laid out as
    restic's local backend does (<repo-path>/<repo...>/config, keys/, locks/,
    snapshots/, index/, data/<first 2 hex of the id>/<id>), HEAD, stat and list
    answered from a FolderIndex on the metadata cache, reads verified and
    resumed, and at start a warm-up that lists what the cache does not know
    yet, small folders first.

    Each folder is listed once, page by page (each page committed with the
    cursor of the next, so an interrupted listing continues where it stopped),
    then kept current from our own writes.  refresh_seconds (--cache-refresh):
    when above 0, a small folder (the repository folder, keys, locks,
    snapshots, index) whose last listing is older than that is listed again
    when next used, and so are data/ and data/<xx> when asked for an object
    they do not hold: how objects that another writer added are found.  0
    trusts the cache until --rebuild-cache.

    A backend adds: _list_page(folder, cursor) -> (CacheEntry rows, next
    cursor or None); _unlisted_child(parent, name), the key of a sub-folder
    when it can be addressed without listing its parent (else None);
    _make_folder(parent, name) for mkdir; _file_key(folder, name, entry), what
    client.read_range takes; put, delete and describe."""

    label = "cloud"
    not_found_type = NotFound       # the client's "no such file"

    def __init__(self, client, base, index, refresh_seconds=0, warm_up_workers=2,
                 progress_interval=None):
        self.client, self._base, self.index = client, base, index
        self.refresh_seconds, self.warm_up_workers = refresh_seconds, warm_up_workers
        self.progress_interval = WARM_UP_PROGRESS_INTERVAL if progress_interval is None \
            else progress_interval
        self._folder_locks = {}
        self._folder_locks_guard = threading.Lock()
        # One upload of a name at a time: restic may retry an upload while the
        # first is still running, and the second must not replace the first.
        self._name_locks = KeyedLocks()
        self._stopping = threading.Event()
        self._request_listings = 0      # listings for requests under way
        self._request_listings_cond = threading.Condition()
        self._warm_up_thread = None
        self.warm_up = None

    @property
    def base(self):
        """The cloud folder holding the repositories, as a tuple of names."""
        return self._base

    def repositories(self):
        """The repositories the index knows below the base folder (those holding a
        config), as repo tuples; listing what the index does not know yet."""
        base = self._resolve(self._base)
        stack = [((), base)] if base is not None else []
        while stack:
            repo, folder = stack.pop()
            self._ensure_listed(folder)
            if self.index.file(folder, "config") is not None:
                yield repo
            stack.extend((repo + (name,), child) for name, child in
                         sorted(self.index.folders(folder).items(), reverse=True)
                         if name not in OBJECT_TYPES)

    # -- folders ---------------------------------------------------------------

    def _folder_path(self, repo, kind, name=None):
        return object_folder(self._base, repo, kind, name)

    def _folder_lock(self, folder):
        with self._folder_locks_guard:
            return self._folder_locks.setdefault(folder, threading.RLock())

    def _max_age(self, kind):
        """How old a listing of a `kind` folder may be (None: any age)."""
        if self.refresh_seconds > 0 and kind != "data":
            return self.refresh_seconds
        return None

    def _known(self, folder, max_age):
        state = self.index.folder_state(folder)
        return state.complete and (max_age is None or
                                   (state.listed_at or 0) >= time.time() - max_age)

    def _ensure_listed(self, folder, again=False, max_age=None, on_page=None):
        """List a folder into the index unless it is known (complete, and listed
        within max_age seconds when that is given); one listing at a time per
        folder: concurrent callers wait for it.  again=True lists it anew.
        on_page: the warm-up's progress callback; the warm-up also pauses while
        requests list.  Returns the _Listing, or None when nothing was listed."""
        if not again and self._known(folder, max_age):
            return None
        with self._folder_lock(folder):
            if not again and self._known(folder, max_age):
                return None
            if on_page is not None:
                return self._list_into_index(folder, on_page)
            with self._request_listings_cond:
                self._request_listings += 1
            try:
                return self._list_into_index(folder, None)
            finally:
                with self._request_listings_cond:
                    self._request_listings -= 1
                    self._request_listings_cond.notify_all()

    def _list_into_index(self, folder, on_page):
        """Page by page, each page committed to the cache with the cursor of the
        next, so that an interrupted listing continues where it stopped."""
        listing = self.index.begin_listing(folder)
        try:
            cursor = listing.cursor
            while True:
                if on_page is not None:
                    self._yield_to_requests()
                try:
                    rows, cursor = self._list_page(folder, cursor)
                except self.client.unavailable_type:
                    raise
                except self.client.error_type as e:
                    if listing.pages or listing.cursor is None:
                        raise
                    # The cursor saved by an interrupted listing is refused (it is
                    # opaque and may not outlive a restart): list from the start.
                    log.warning("%s: the listing of folder %s cannot continue from %r "
                                "(%s); listing it from the start", self.label, folder, cursor, e)
                    listing.from_start()
                    cursor = None
                    continue
                self.index.merge_page(listing, rows, cursor)
                if on_page is not None:
                    on_page(sum(1 for row in rows if not row.is_dir))
                if cursor is None:
                    return listing
        finally:
            self.index.end_listing(listing)

    def _yield_to_requests(self):
        """Warm-up: wait while requests are listing (they share the rate limit and
        a request is waiting for each of them); WarmUpStopped when stopping."""
        with self._request_listings_cond:
            while self._request_listings and not self._stopping.is_set():
                self._request_listings_cond.wait(1.0)
        if self._stopping.is_set():
            raise WarmUpStopped()

    def _resolve(self, path, create=False, mkdir_first=False):
        """The folder key of a path from the cloud's root; None if it does not
        exist (and create is False).  See _child_folder for mkdir_first."""
        folder = self.index.ROOT_ID
        for name in path:
            folder = self._child_folder(folder, name, create, mkdir_first)
            if folder is None:
                return None
        return folder

    def _child_folder(self, parent, name, create=False, mkdir_first=False):
        """The key of folder `name` in parent, created if `create`.

        A parent not listed yet is listed to find out (unless the backend can
        address the child without that), or, with mkdir_first, mkdir is tried
        before any listing, which is right where the folder is probably new
        (create_repository: restic init on a fresh tree then costs mkdir calls
        only) and wasteful where it probably exists (uploads)."""
        child = self.index.child_folder(parent, name)
        if child is not None:
            return child
        if not create and not self.index.is_loaded(parent):
            child = self._unlisted_child(parent, name)
            if child is not None:
                return child
        # Under the parent's lock: one listing or mkdir per folder at a time.
        with self._folder_lock(parent):
            if not (create and mkdir_first):
                self._ensure_listed(parent)
            child = self.index.child_folder(parent, name)
            if child is not None or not create:
                return child
            return self._make_folder(parent, name)

    def _unlisted_child(self, parent, name):
        return None

    @staticmethod
    def _stored_meanwhile(ref, existing, spool):
        """A content-addressed object of this size stored meanwhile (by a
        concurrent upload of the same name) holds these very bytes: its name is
        their hash."""
        return existing is not None and ref.content_addressed and existing.size == spool.size

    def _make_folder(self, parent, name):
        raise NotImplementedError

    def _lookup(self, ref):
        """(folder key, CloudFile) of an object; (None, None) if its folder is
        missing, (folder key, None) if the object is.

        With refresh_seconds, a small folder listed longer ago than that is
        listed again, and so are data/ and data/<xx> when they lack the object
        (written by another server?), at most once per interval.  Without it,
        nothing here costs a call once the folders are known."""
        folder, entry = self._find(ref, self._max_age(ref.kind))
        if entry is None and ref.kind == "data" and self.refresh_seconds > 0:
            data_folder = self._resolve(self._folder_path(ref.repo, "data"))
            if data_folder is not None:
                self._ensure_listed(data_folder, max_age=self.refresh_seconds)
                folder, entry = self._find(ref, self.refresh_seconds)
        return folder, entry

    def _find(self, ref, max_age):
        folder = self._resolve(self._folder_path(ref.repo, ref.kind, ref.name))
        if folder is None:
            return None, None
        self._ensure_listed(folder, max_age=max_age)
        return folder, self.index.file(folder, ref.name)

    # -- the Storage interface -------------------------------------------------

    def stat(self, ref):
        entry = self._lookup(ref)[1]
        return None if entry is None else entry.size

    def list(self, repo, kind):
        folder = self._resolve(self._folder_path(repo, kind))
        if folder is None:
            return []
        self._ensure_listed(folder, max_age=self._max_age(kind))
        if kind == "data":
            # Packs live in data/<xx>; only the existing sub-folders are listed.
            folders = [child for name, child in sorted(self.index.folders(folder).items())
                       if _DATA_FOLDER_RE.match(name)]
        else:
            folders = [folder]
        return folder_by_folder(folders, self._listed_objects)

    def _listed_objects(self, folder):
        self._ensure_listed(folder)
        return [(name, entry.size) for name, entry in self.index.files(folder)
                if is_object_id(name)]

    def read(self, ref, start, length):
        folder, entry = self._lookup(ref)
        if entry is None:
            raise NotFound(str(ref))
        if length == 0:
            return iter(())
        try:
            chunks = self.client.read_range(self._file_key(folder, ref.name, entry),
                                            start, length)
        except self.not_found_type:
            log.warning("%s: %s (file %s) was removed behind our back; forgetting it",
                        self.label, ref, entry.file_id)
            self.index.drop_file(folder, ref.name, entry.file_id)
            raise NotFound(str(ref))
        if ref.content_addressed and start == 0 and length == entry.size:
            return self._verified(ref, entry, chunks)
        return chunks

    def _verified(self, ref, entry, chunks):
        """Pass a whole content-addressed object through, checking its SHA-256.

        123pan identifies content by MD5 and size alone and has been seen to serve
        another file's bytes for an MD5 collision (123pan spec 4.1); any cloud may
        serve something else of the right length.  On a full read we can tell:
        the last chunk is held back until the hash matches the name, and on a
        mismatch the error makes the REST layer cut the connection, so restic
        sees a failed read rather than wrong bytes under a valid name.  Partial
        reads (restic's blob reads) cannot be checked here; restic checks each
        blob's own hash."""
        def mismatch(actual):
            log.error("%s: %s (file %s, %s) came back with SHA-256 %s: the cloud served "
                      "different bytes; refusing to pass them on", self.label, ref,
                      entry.file_id, entry.etag, actual)
            return UpstreamError("%s: downloaded bytes do not match the object's name" % (ref,))
        return sha256_checked(chunks, ref.name, mismatch)

    # -- start and stop -----------------------------------------------------------

    def start(self, rebuild=False, wait=False):
        """Server start: open the metadata cache, resume background work queued
        before a restart, then warm the cache up in a background thread
        (wait=True: in this one).  rebuild: forget what every folder held first
        (--rebuild-cache)."""
        self.index.cache.open()
        if rebuild:
            log.info("%s: --rebuild-cache: every folder is listed again", self.label)
            self.index.invalidate()
        self._resume()
        self.warm_up = CacheWarmUp(self.label, self._warm_up_visit, self.warm_up_workers,
                                   self.progress_interval, self._stopping)
        if wait:
            self._warm_up_run()
        else:
            self._warm_up_thread = threading.Thread(target=self._warm_up_run, daemon=True,
                                                    name="%s-warm-up" % self.label)
            self._warm_up_thread.start()
        return self.warm_up

    def _resume(self):
        """Background work queued before a restart continues."""

    def _warm_up_root(self):
        """The key of the repository folder, its ancestors listed as warm-up
        pages where that is needed; None if it does not exist."""
        folder = self.index.ROOT_ID
        for name in self._base:
            self._ensure_listed(folder, on_page=self.warm_up.page_listed)
            folder = self.index.child_folder(folder, name)
            if folder is None:
                break
        return folder

    def _warm_up_run(self):
        try:
            root = self._warm_up_root()
        except WarmUpStopped:
            self.warm_up.finished.set()
            return
        except Exception as e:
            log.warning("%s cache warm-up: cannot reach /%s: %s; folders are listed "
                        "when first needed", self.label, "/".join(self._base), e)
            self.warm_up.finished.set()
            return
        except BaseException:
            self.warm_up.finished.set()
            raise
        self.warm_up.run([] if root is None else [(0, root, ())])

    def _warm_up_visit(self, folder, path, on_page):
        listing = self._ensure_listed(folder, on_page=on_page)
        children = []
        for name, child in self.index.folders(folder).items():
            if name == "data":
                priority = 1            # its <= 256 sub-folders: a few pages
            elif path and path[-1] == "data" and _DATA_FOLDER_RE.match(name):
                priority = 2            # the packs
            else:
                priority = 0            # repository folders, keys, locks, snapshots, index
            children.append((priority, child, path + (name,)))
        objects = len(self.index.files(folder))
        return objects, (None if listing is None else listing.objects), children

    def _stop_warm_up(self):
        self._stopping.set()
        with self._request_listings_cond:
            self._request_listings_cond.notify_all()
        if self._warm_up_thread is not None:
            self._warm_up_thread.join(30)

    def _close_cache(self):
        if self._warm_up_thread is None or not self._warm_up_thread.is_alive():
            self.index.cache.close()


# -- the local copy tier (--local-copy DIR) -------------------------------------

# Uploads from the queue to the cloud at once (restic itself uses 5 connections);
# the cloud's rate limits, enforced in CloudClient, usually set the pace.
LOCAL_COPY_UPLOADERS = 3
# How many of the oldest queued entries an uploader looks through for one to take.
LOCAL_COPY_LOOKAHEAD = 64
# Kinds that name other objects go up only once everything queued before them is
# up, so that the cloud holds at every moment a repository restic can use: no
# index before its packs, no snapshot before its index.
LOCAL_COPY_ORDERED_KINDS = ("index", "snapshots")
# A failed upload is tried again after a pause doubling up to this.
LOCAL_COPY_RETRY_MAX = 300.0
# Backlog progress goes to the log this often while there is one.
LOCAL_COPY_PROGRESS_INTERVAL = 30.0
# Evicting under --local-copy-max looks at this many of the least recently used
# packs per pass: memory stays flat whatever the repository's size.
LOCAL_COPY_EVICT_BATCH = 4096

(METRICS
 .describe("restic123pan_local_copy_queued_objects", "gauge",
           "Objects in the local copy not yet uploaded to the cloud")
 .describe("restic123pan_local_copy_queued_bytes", "gauge",
           "Bytes in the local copy not yet uploaded to the cloud")
 .describe("restic123pan_local_copy_oldest_queued_age_seconds", "gauge",
           "Age of the oldest upload still queued (0 when none is)")
 .describe("restic123pan_local_copy_uploaded_objects_total", "counter",
           "Objects uploaded from the local copy's queue")
 .describe("restic123pan_local_copy_uploaded_bytes_total", "counter",
           "Bytes uploaded from the local copy's queue")
 .describe("restic123pan_local_copy_reads_total", "counter",
           "Object reads, by where they were served from (local, cloud)")
 .describe("restic123pan_local_copy_evicted_total", "counter",
           "Packs removed from the local copy under --local-copy-max"))


def file_digests(file, digests=()):
    """(size, SHA-256, MD5 or None) of an open binary file from its start, in one
    pass through one reused buffer."""
    sha256 = hashlib.sha256()
    md5 = hashlib.md5() if "md5" in digests else None
    buffer = bytearray(BODY_BUFFER)
    view = memoryview(buffer)
    size = 0
    file.seek(0)
    while True:
        n = file.readinto(buffer)
        if not n:
            break
        sha256.update(view[:n])
        if md5 is not None:
            md5.update(view[:n])
        size += n
    return size, sha256.hexdigest(), md5.hexdigest() if md5 is not None else None


class LocalFileSpool(object):
    """A finished file of the local copy, offered to a cloud backend's put() as a
    spool: its size and digests known, any range read through a handle of its
    own (parallel slices need no shared position)."""

    def __init__(self, path, size, md5=None, sha256=None):
        self.path, self.folder = path, os.path.dirname(path)
        self.size, self.md5, self.sha256 = size, md5, sha256

    def iter_range(self, start=0, length=None):
        end = self.size if length is None else min(self.size, start + length)
        return iter(LocalFileChunks(open(self.path, "rb"), start, max(0, end - start)))

    def read_all(self):
        return b"".join(self.iter_range())

    def close(self):
        pass


class LocalCopyTier(Storage):
    """--local-copy DIR: a cloud backend with a copy of every object in a local
    folder laid out as restic's local backend (LocalStorage), so that backups run
    at disk speed, reads cost no download traffic, and the cloud is the off-site
    copy.

    put() writes the object into DIR (fsync'd file and folder) and queues its
    upload in the metadata cache (pending_uploads, committed before restic hears
    "stored"): that is the commit point.  Write-behind (the default) answers then
    and uploaders drain the queue in the background in restic's write order
    (LOCAL_COPY_ORDERED_KINDS wait for everything before them); write_through
    answers only once the cloud confirmed the object too, and on a cloud failure
    takes the local copy back, as if nothing had been stored.

    read() serves from DIR when the object is there, a whole content-addressed
    object only after its SHA-256 matched its name (a mismatch sets the local
    file aside and reads the cloud's); otherwise from the cloud, keeping a whole
    object read so.  delete() removes the cloud copy first (a refusal changes
    nothing), then the queued upload and the local file.  stat() and list() are
    the union of both: the cloud's index, the queued objects, and (when the cloud
    cannot be asked and DIR is a full mirror) DIR alone.

    In the background after the cloud's warm-up: objects found in DIR that the
    cloud lacks are queued; with fill, what the cloud holds and DIR lacks is
    downloaded once; with max_bytes, the least recently used packs the cloud
    holds are evicted (never another kind, never one still queued)."""

    def __init__(self, cloud, folder, write_through=False, max_bytes=0, fill=False,
                 uploaders=LOCAL_COPY_UPLOADERS,
                 progress_interval=LOCAL_COPY_PROGRESS_INTERVAL):
        self.cloud = cloud
        self.local = LocalStorage(folder, digests=cloud.digests)
        self.name, self.digests = cloud.name, cloud.digests
        self.write_through, self.max_bytes, self.fill = write_through, max_bytes, fill
        self.uploaders, self.progress_interval = uploaders, progress_interval
        self.cache = cloud.index.cache
        # The queue belongs to one cloud folder of one account, and to this DIR.
        self.ns = "%s|%s|local-copy|%s" % (cloud.index.ns, "/".join(cloud.base),
                                           self.local.root)
        self._locks = KeyedLocks()          # one put/upload/delete of a name at a time
        self._cond = threading.Condition()
        self._in_flight = set()             # sequence numbers being uploaded
        self._retry_at = {}                 # seq -> (failures, monotonic time)
        self._paused_until = 0.0            # the cloud is unavailable: all wait
        self._stopping = threading.Event()
        self._threads = []
        self._bytes_lock = threading.Lock()
        self._local_bytes = None            # known after the start-up scan
        self._evict_wanted = threading.Event()
        self.reconciled = threading.Event()     # the start-up comparison with the cloud ran
        self.filled = threading.Event()         # --local-copy-fill ran (or was not asked)
        self.uploaded_bytes = 0
        self._gauges = [("restic123pan_local_copy_" + gauge,
                         lambda position=position: self.backlog()[position])
                        for position, gauge in enumerate(
                            ("queued_objects", "queued_bytes", "oldest_queued_age_seconds"))]
        for name, read in self._gauges:
            METRICS.sample(name, read)

    # -- what the rest of the server sees of the cloud below ------------------------

    @property
    def warm_up(self):
        return self.cloud.warm_up

    @property
    def client(self):
        return self.cloud.client

    @property
    def index(self):
        return self.cloud.index

    def describe(self):
        mode = "write-through" if self.write_through else "write-behind"
        if self.max_bytes:
            mode += ", at most %s" % human_bytes(self.max_bytes)
        return "%s, with a local copy in %s (%s)" % (self.cloud.describe(), self.local.root,
                                                     mode)

    def backlog(self):
        """(objects, bytes, age in seconds of the oldest) still only in DIR."""
        count, nbytes, oldest = self.cache.upload_backlog(self.ns)
        return count, nbytes, (time.time() - oldest) if oldest is not None else 0.0

    # -- the Storage interface -------------------------------------------------

    def new_spool(self, ref, tmpdir=None):
        return self.local.new_spool(ref)        # written once, where it will stay

    def create_repository(self, repo):
        self.local.create_repository(repo)
        self.cloud.create_repository(repo)

    def stat(self, ref):
        size = self.local.stat(ref)
        return size if size is not None else self.cloud.stat(ref)

    def list(self, repo, kind):
        queued = dict((ref.name, size) for _, ref, size, _ in
                      self.cache.queued_uploads(self.ns, repo=repo, kind=kind))
        try:
            listed = self.cloud.list(repo, kind)
        except UpstreamError as e:
            if self.max_bytes:
                raise           # DIR holds only part: it cannot answer alone
            log.warning("local copy: the cloud cannot list %s of /%s (%s); answering from "
                        "%s, a full mirror", kind, "/".join(repo), e, self.local.root)
            return self.local.list(repo, kind)
        return itertools.chain((entry for entry in listed if entry[0] not in queued),
                               sorted(queued.items()))

    def read(self, ref, start, length):
        chunks = self._read_local(ref, start, length)
        if chunks is not None:
            METRICS.inc("restic123pan_local_copy_reads_total", source="local")
            return chunks
        size = self.cloud.stat(ref)
        chunks = self.cloud.read(ref, start, length)
        METRICS.inc("restic123pan_local_copy_reads_total", source="cloud")
        if start == 0 and length == size and not (self.max_bytes and size > self.max_bytes):
            return self._keeping(ref, chunks)
        return chunks

    def put(self, ref, spool):
        with self._locks.hold(ref):
            self.local.put(ref, spool)
            try:
                seq = self.cache.queue_upload(self.ns, ref, spool.size, spool.md5 or "")
            except BaseException:
                # Not queued, not stored: restic's retry must not find it "identical".
                self.local.delete(ref)
                raise
            self._grown(spool.size)
            if self.write_through:
                try:
                    self._upload(ref, spool.size, spool.md5 or "")
                except BaseException:
                    self.cache.unqueue_upload(self.ns, ref, seq)
                    self.local.delete(ref)
                    self._grown(-spool.size)
                    raise
                self.cache.unqueue_upload(self.ns, ref, seq)
                return
        with self._cond:
            self._cond.notify_all()

    def delete(self, ref):
        with self._locks.hold(ref):
            in_cloud = self.cloud.delete(ref)   # first: a refusal leaves both as they were
            queued = self.cache.unqueue_upload(self.ns, ref)
            size = self.local.stat(ref)
            local = self.local.delete(ref)
            if local:
                self._grown(-(size or 0))
        return in_cloud or queued or local

    def flush_deletes(self):
        self.cloud.flush_deletes()

    # -- reads -----------------------------------------------------------------

    def _read_local(self, ref, start, length):
        """The local copy's chunks of the range, or None when DIR cannot serve it
        (missing, too short, or a whole object whose bytes do not match its name)."""
        path = self.local.path_of(ref)
        try:
            f = open(path, "rb")
        except (FileNotFoundError, NotADirectoryError):
            return None
        try:
            size = os.fstat(f.fileno()).st_size
            if start + length > size:
                log.warning("local copy: %s holds %d bytes, %d asked from %d: reading the "
                            "cloud's copy", ref, size, length, start)
                f.close()
                return None
            if ref.content_addressed and start == 0 and length == size:
                actual = file_digests(f)[1]
                if actual != ref.name:
                    f.close()
                    self._set_aside(ref, path, "its SHA-256 is %s" % actual)
                    return None
            if self.max_bytes and ref.kind == "data":
                os.utime(f.fileno() if os.utime in os.supports_fd else path)   # LRU order
        except BaseException:
            f.close()
            raise
        return LocalFileChunks(f, start, length)

    def _set_aside(self, ref, path, why):
        """A local file that is not the object its name says: moved aside (kept for
        a look, never listed: the name starts with a dot), and its queued upload,
        if any, dropped: those bytes must not reach the cloud."""
        aside = os.path.join(os.path.dirname(path), ".%s.corrupt-%d" % (ref.name, time.time()))
        lost = self.cache.unqueue_upload(self.ns, ref)
        log.error("local copy: %s in %s is damaged (%s): moved to %s%s", ref,
                  self.local.root, why, aside,
                  "; it was not uploaded yet, so the cloud lacks it too: run restic check"
                  if lost else "; the cloud's copy is used")
        try:
            os.replace(path, aside)
        except OSError as e:
            log.error("local copy: cannot move %s aside: %s", path, e)

    def _keeping(self, ref, chunks):
        """Pass a whole object read from the cloud through, writing it into DIR on
        the way; it becomes a local object (fsync'd, renamed) only once every byte
        went through (the cloud's read verified them).  A local write failure
        only stops the keeping, never the read."""
        folder = os.path.dirname(self.local.path_of(ref))
        try:
            fd, tmp = self.local.temp_file(ref, folder)
            out = os.fdopen(fd, "wb")
        except (StorageError, OSError) as e:
            log.warning("local copy: cannot keep %s: %s", ref, e)
            out = None
        size = 0
        try:
            for chunk in chunks:
                if out is not None:
                    try:
                        out.write(chunk)
                    except OSError as e:
                        log.warning("local copy: cannot keep %s: %s", ref, e)
                        out.close()
                        remove_if_present(tmp)
                        out = None
                size += len(chunk)
                yield chunk
            if out is not None:
                out.flush()
                os.fsync(out.fileno())
                out.close()
                os.replace(tmp, self.local.path_of(ref))
                fsync_directory(folder)
                out = None
                self._grown(size)
        finally:
            if out is not None:
                out.close()
                remove_if_present(tmp)

    # -- the upload queue --------------------------------------------------------

    def _upload(self, ref, size, md5):
        """Upload the local copy of ref (the caller holds ref's lock).  md5 None:
        the file was found in DIR, not written through this server: it is hashed
        first, and a content-addressed one whose bytes do not match its name is
        set aside instead.  False when there was nothing to upload."""
        path = self.local.path_of(ref)
        sha256 = ref.name if ref.content_addressed else None
        if md5 is None:
            try:
                with open(path, "rb") as f:
                    size, sha256, md5 = file_digests(f, self.digests)
            except FileNotFoundError:
                md5 = ""
            if ref.content_addressed and sha256 != ref.name and os.path.exists(path):
                self._set_aside(ref, path, "its SHA-256 is %s" % sha256)
                return False
        if not os.path.exists(path):
            log.error("local copy: %s was queued for upload but is gone from %s: the cloud "
                      "does not have it; run restic check", ref, self.local.root)
            return False
        self.cloud.put(ref, LocalFileSpool(path, size, md5 or None, sha256))
        METRICS.inc("restic123pan_local_copy_uploaded_objects_total")
        METRICS.inc("restic123pan_local_copy_uploaded_bytes_total", size)
        with self._cond:
            self.uploaded_bytes += size
        return True

    def _take(self):
        """The next queued entry an uploader may take, marked in flight; None
        when stopping.  Waits for one (a put, a finished upload or a retry time
        wakes it)."""
        with self._cond:
            while not self._stopping.is_set():
                now = time.monotonic()
                wait = self._paused_until - now if self._paused_until > now else None
                if wait is None:
                    for position, entry in enumerate(
                            self.cache.queued_uploads(self.ns, LOCAL_COPY_LOOKAHEAD)):
                        seq, ref = entry[0], entry[1]
                        retry = self._retry_at.get(seq)
                        if seq in self._in_flight or (
                                position and ref.kind in LOCAL_COPY_ORDERED_KINDS):
                            continue
                        if retry is not None and retry[1] > now:
                            left = retry[1] - now
                            wait = left if wait is None else min(wait, left)
                            continue
                        self._in_flight.add(seq)
                        return entry
                self._cond.wait(wait)
        return None

    def _run_uploader(self):
        while True:
            entry = self._take()
            if entry is None:
                return
            seq, ref, size, md5 = entry
            try:
                with self._locks.hold(ref):
                    if self.cache.upload_queued(self.ns, ref) == seq:   # not deleted meanwhile
                        self._upload(ref, size, md5)
                        self.cache.unqueue_upload(self.ns, ref, seq)
                with self._cond:
                    self._retry_at.pop(seq, None)
            except Exception as e:      # StorageError, OSError: tried again later
                with self._cond:
                    failures = self._retry_at.get(seq, (0, 0))[0] + 1
                    delay = min(LOCAL_COPY_RETRY_MAX, 2.0 ** failures) * random.uniform(0.8, 1.2)
                    self._retry_at[seq] = (failures, time.monotonic() + delay)
                    if getattr(e, "meaning", None) in (UNAVAILABLE, TIMED_OUT):
                        self._paused_until = time.monotonic() + delay
                log.warning("local copy: upload of %s failed (%s); trying again in %s",
                            ref, e, _duration(delay))
            finally:
                with self._cond:
                    self._in_flight.discard(seq)
                    self._cond.notify_all()

    def _report_progress(self):
        last_bytes, last_time = 0, time.monotonic()
        while not self._stopping.wait(self.progress_interval):
            try:
                count, nbytes, age = self.backlog()
            except CacheError:
                continue
            now = time.monotonic()
            with self._cond:
                done = self.uploaded_bytes
            rate = (done - last_bytes) / max(now - last_time, 1e-6)
            last_bytes, last_time = done, now
            if count:
                log.info("local copy: %d objects (%s) only in %s so far, the oldest queued %s "
                         "ago; uploading %.1f MiB/s%s", count, human_bytes(nbytes), self.local.root,
                         _duration(age), rate / 2 ** 20,
                         ", about %s left" % _duration(nbytes / rate) if rate > 0 else "")

    def wait_uploaded(self, timeout=None):
        """Wait until the queue is empty; False if it was not within timeout."""
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._cond:
            while self.backlog()[0]:
                left = None if deadline is None else deadline - time.monotonic()
                if left is not None and left <= 0:
                    return False
                self._cond.wait(left if left is not None else 1.0)
        return True

    # -- the background: reconcile at start, fill, evict ---------------------------

    def _local_repositories(self):
        """The repositories in DIR: folders holding a config (restic's layout)."""
        for folder, subfolders, files in os.walk(self.local.root):
            subfolders[:] = sorted(d for d in subfolders
                                   if d not in OBJECT_TYPES and not d.startswith("."))
            if "config" in files:
                yield tuple(os.path.relpath(folder, self.local.root).split(os.sep)) \
                    if folder != self.local.root else ()

    def _local_objects(self, repo):
        """ObjectRef and size of every object of a repository in DIR."""
        size = self.local.stat(ObjectRef.config(repo))
        if size is not None:
            yield ObjectRef.config(repo), size
        for kind in OBJECT_TYPES:
            for name, size in self.local.list(repo, kind):
                yield ObjectRef(repo, kind, name), size

    def _grown(self, delta):
        with self._bytes_lock:
            if self._local_bytes is None:
                return
            self._local_bytes += delta
            over = self.max_bytes and self._local_bytes > self.max_bytes
        if over:
            self._evict_wanted.set()

    def _queue_what_the_cloud_lacks(self):
        """Objects in DIR that are neither in the cloud nor queued (written by a
        server killed before it queued them, or DIR is all that is left of a lost
        cloud folder) are queued.  Returns the bytes in DIR."""
        total, queued = 0, 0
        for repo in self._local_repositories():
            for ref, size in self._local_objects(repo):
                total += size
                if self._stopping.is_set():
                    return total
                with self._locks.hold(ref):
                    if self.cache.upload_queued(self.ns, ref) is None and \
                            self.cloud.stat(ref) is None and self.local.stat(ref) is not None:
                        self.cache.queue_upload(self.ns, ref, size, None)
                        queued += 1
        if queued:
            log.info("local copy: %d objects in %s that the cloud lacks are queued for upload",
                     queued, self.local.root)
            with self._cond:
                self._cond.notify_all()
        return total

    def _fill(self):
        """--local-copy-fill: download once what the cloud holds and DIR lacks,
        small kinds first, one object at a time; stops (for the next start) at
        the first refusal, such as 123pan's download traffic quota."""
        fetched, nbytes = 0, 0
        for repo in self.cloud.repositories():
            refs = [ObjectRef.config(repo)] + [
                ObjectRef(repo, kind, name) for kind in ("keys", "snapshots", "index")
                for name, _ in self.cloud.list(repo, kind)]
            for ref, size in itertools.chain(
                    ((ref, self.cloud.stat(ref)) for ref in refs),
                    ((ObjectRef(repo, "data", name), size)
                     for name, size in self.cloud.list(repo, "data"))):
                if self._stopping.is_set():
                    return
                if size is None or self.local.stat(ref) is not None:
                    continue
                with self._bytes_lock:
                    full = self.max_bytes and (self._local_bytes or 0) + size > self.max_bytes
                if full:
                    log.info("local copy: fill stopped at --local-copy-max after %d objects "
                             "(%s)", fetched, human_bytes(nbytes))
                    return
                try:
                    for _ in self._keeping(ref, self.cloud.read(ref, 0, size)):
                        pass
                except StorageError as e:
                    log.warning("local copy: fill stopped after %d objects (%s): %s; the next "
                                "start continues", fetched, human_bytes(nbytes), e)
                    return
                fetched, nbytes = fetched + 1, nbytes + size
        log.info("local copy: fill done: %d objects (%s) downloaded", fetched, human_bytes(nbytes))

    def _evict(self):
        """Remove the least recently used packs the cloud holds until DIR is within
        max_bytes (never a queued one: the cloud lacks it)."""
        while not self._stopping.is_set():
            total, packs = 0, []
            for repo in self._local_repositories():
                for ref, size in self._local_objects(repo):
                    total += size
                    if ref.kind == "data":
                        packs.append(ref)
                        if len(packs) > 4 * LOCAL_COPY_EVICT_BATCH:
                            packs = self._least_recently_used(packs)
            with self._bytes_lock:
                self._local_bytes = total
            if total <= self.max_bytes:
                return
            evicted = 0
            for mtime, ref in self._least_recently_used(packs, with_times=True):
                if total <= self.max_bytes:
                    break
                with self._locks.hold(ref):
                    size = self.local.stat(ref)
                    if size is None or self.cache.upload_queued(self.ns, ref) is not None \
                            or self.cloud.stat(ref) != size:
                        continue
                    self.local.delete(ref)
                total -= size
                evicted += 1
                METRICS.inc("restic123pan_local_copy_evicted_total")
            with self._bytes_lock:
                self._local_bytes = total
            if not evicted:
                log.warning("local copy: %s holds %s, over --local-copy-max %s, and no pack "
                            "in it can go: the cloud does not have them yet", self.local.root,
                            human_bytes(total), human_bytes(self.max_bytes))
                return

    def _least_recently_used(self, refs, with_times=False):
        def timed():
            for ref in refs:
                try:
                    yield os.stat(self.local.path_of(ref)).st_mtime, ref
                except OSError:
                    continue
        oldest = heapq.nsmallest(LOCAL_COPY_EVICT_BATCH, timed())
        return oldest if with_times else [ref for _, ref in oldest]

    def _maintain(self):
        """After the warm-up: reconcile DIR with the cloud, fill, then evict when
        DIR grows past max_bytes."""
        warm_up = self.cloud.warm_up
        while warm_up is not None and not warm_up.finished.wait(1.0):
            if self._stopping.is_set():
                self.reconciled.set()
                self.filled.set()
                return
        try:
            try:
                total = self._queue_what_the_cloud_lacks()
            finally:
                self.reconciled.set()
            with self._bytes_lock:
                self._local_bytes = total
            try:
                if self.fill:
                    self._fill()
            finally:
                self.filled.set()
            while not self._stopping.is_set():
                if self.max_bytes and (self._local_bytes or 0) > self.max_bytes:
                    self._evict()
                self._evict_wanted.wait()       # set when DIR grew past max_bytes
                self._evict_wanted.clear()
        except (StorageError, OSError) as e:
            self.filled.set()
            if not self._stopping.is_set():
                log.warning("local copy: background work stopped: %s; the next start "
                            "continues it", e)

    # -- start and stop -----------------------------------------------------------

    def start(self, rebuild=False, wait=False):
        warm_up = self.cloud.start(rebuild=rebuild, wait=wait)
        os.makedirs(self.local.root, mode=0o700, exist_ok=True)
        count, nbytes, _ = self.backlog()
        if count:
            log.info("local copy: %d objects (%s) from before the restart are still to "
                     "upload", count, human_bytes(nbytes))
        for number in range(self.uploaders):
            self._spawn(self._run_uploader, "local-copy-upload-%d" % number)
        self._spawn(self._report_progress, "local-copy-progress")
        self._spawn(self._maintain, "local-copy-maintenance")
        return warm_up

    def _spawn(self, target, name):
        thread = threading.Thread(target=target, daemon=True, name=name)
        thread.start()
        self._threads.append(thread)

    def close(self):
        """Uploads under way finish (for SHUTDOWN_GRACE_SECONDS at most); what is
        still queued is said, and uploaded at the next start."""
        self._stopping.set()
        self._evict_wanted.set()
        with self._cond:
            self._cond.notify_all()
        deadline = time.monotonic() + SHUTDOWN_GRACE_SECONDS
        for thread in self._threads:
            thread.join(max(0.0, deadline - time.monotonic()))
        try:
            count, nbytes, _ = self.backlog()
        except CacheError:
            count = None
        if count:
            log.warning("local copy: %d objects (%s) are only in %s, not yet in the cloud; "
                        "the next start uploads them", count, human_bytes(nbytes), self.local.root)
        elif count == 0:
            log.info("local copy: everything in %s is in the cloud too", self.local.root)
        for name, read in self._gauges:
            METRICS.stop_sampling(name, read)
        self.cloud.close()


def with_local_copy(args, storage):
    """The storage a backend built, behind a local copy tier when --local-copy asks."""
    if not getattr(args, "local_copy", None):
        return storage
    return LocalCopyTier(storage, args.local_copy, write_through=args.write_through,
                         max_bytes=args.local_copy_max, fill=args.local_copy_fill)


# ---------------------------------------------------------------------------
# 6. Backend: 123pan (123云盘) Open Platform, its API client beside it.  Follows
#    spec/123pan-open-api.md and spec/123pan-field-notes.md (section numbers)
# ---------------------------------------------------------------------------

PAN123_DEFAULT_API_BASE = "https://open-api.123pan.com"

PAN123_CODE_OK = 0
PAN123_CODE_GENERIC = 1             # also "folder exists" and "parent missing"
PAN123_CODE_UNAUTHORIZED = 401
PAN123_CODE_TOO_MANY_REQUESTS = 429
PAN123_CODE_FILE_NOT_FOUND = 5066
PAN123_CODE_TRAFFIC_QUOTA = 5113
PAN123_CODE_STILL_VERIFYING = 20103  # upload_complete: "not yet, ask again in 1 s"
# mkdir's code-1 message for an existing folder (该目录下已经有同名文件夹,无法进行创建).
PAN123_FOLDER_EXISTS_MARK = "同名文件夹"

# Requests per second per endpoint: (free, VIP).  The developer (client_id) table
# where it has the endpoint, else the per-uid table of third-party apps; the free
# column is the conservative default.
PAN123_QPS = {
    "/api/v1/access_token": (8, 10),
    "/api/v1/user/info": (10, 10),
    "/api/v1/file/move": (3, 10),
    "/api/v1/file/delete": (1, 10),
    "/api/v1/file/list": (0.2, 10),
    "/api/v2/file/list": (5, 10),
    "/upload/v1/file/mkdir": (5, 20),
    "/api/v1/file/trash": (5, 5),
    "/api/v1/file/infos": (10, 10),
    "/api/v1/file/download_info": (5, 5),
    "/upload/v2/file/upload_complete": (20, 20),   # the uid table's V1 figure
    # The V2 calls that carry the bytes have no published limit.  A slot is held
    # for the whole transfer and one window after it (RateLimiter), so a budget
    # of 5 is 5 uploads at once with a 1 s pause after each: with restic's 5
    # connections every pack after the first five waited about 0.7 s for a slot,
    # the link idle meanwhile (issue 12's timeline).  10 leaves restic's
    # connections (and the local copy's uploaders) a slot at once, and stays under
    # the 20 the uid table gives the V1 per-slice calls (get_upload_url,
    # upload_complete).
    "/upload/v2/file/single/create": (10, 10),
    "/upload/v2/file/slice": (10, 10),
}
# The other V2 upload calls (create, domain) and detail have no published limit:
# 5 is the lowest figure published for any upload call.
PAN123_DEFAULT_QPS = 5

PAN123_LIST_PAGE = 100              # list v2 maximum page size
PAN123_MAX_BATCH = 100              # ids per trash / delete call
PAN123_MAX_RESPONSE = 16 * 1024 * 1024
# Renew a token this long before its expiredAt (as RP and OpenList do), or after
# nine tenths of its life if it lives shorter than that.
PAN123_TOKEN_RENEW_MARGIN = 300.0


class Pan123Error(UpstreamError):
    """123pan answered with a non-zero code (or could not be reached: see
    Pan123Unavailable).  An UpstreamError, so anything not handled more
    specifically reaches restic as a 502 with this one-line reason."""

    def __init__(self, message, code=None, endpoint=None, trace_id="", meaning=None):
        UpstreamError.__init__(self, message, meaning)
        self.code, self.endpoint, self.trace_id = code, endpoint, trace_id

    @classmethod
    def from_envelope(cls, endpoint, envelope):
        code = envelope.get("code")
        message = envelope.get("message") or ""
        trace_id = envelope.get("x-traceID") or ""
        text = "123pan %s: code %s: %s" % (endpoint, code, message)
        if trace_id:
            text += " (x-traceID %s)" % trace_id
        return cls(text, code, endpoint, trace_id)


class Pan123FileNotFound(Pan123Error):
    """Code 5066: the file id does not exist (any more)."""


class Pan123QuotaExhausted(Pan123Error):
    """Code 5113: today's download traffic is used up."""
    meaning = UNAVAILABLE


class Pan123AuthError(Pan123Error):
    """Credentials refused, a fresh token refused, or too many live tokens."""


class Pan123FolderExists(Pan123Error):
    """mkdir: a folder of that name is already there."""


class Pan123StillVerifying(Pan123Error):
    """Code 20103 from upload_complete: not done yet, ask again in about 1 s."""


class Pan123Unavailable(Pan123Error, Unavailable):
    """Rate limited, unreachable or failing transiently past the retry deadline."""


_ERROR_TYPE_BY_CODE = {
    PAN123_CODE_UNAUTHORIZED: Pan123AuthError,
    PAN123_CODE_FILE_NOT_FOUND: Pan123FileNotFound,
    PAN123_CODE_TRAFFIC_QUOTA: Pan123QuotaExhausted,
    PAN123_CODE_STILL_VERIFYING: Pan123StillVerifying,
}


# -- answers the docs leave out (shared/spec/123pan-field-notes.md) ----------------
# Small pieces Pan123Client._classify and _check_download ask: what an answer
# means, what to do with it.

PAN123_TOKEN_ENDPOINT = "/api/v1/access_token"
PAN123_DOWNLOAD_INFO = "/api/v1/file/download_info"
# 401 "tokens number has exceeded the limit": too many live tokens (devices) on
# the account.  Minting another would log out one more device: wait instead.
PAN123_TOKEN_LIMIT_MARK = "exceeded the limit"
# Single-step upload refused with code 1 "该任务已成功进入秒传队列,任务队列削峰中,
# 未直接获取到文件ID,请慢一点": queued, peak shaving, slow down.  Transient.
PAN123_UPLOAD_QUEUE_MARKS = ("秒传队列", "削峰", "请慢一点")
PAN123_UPLOAD_ENDPOINTS = ("/upload/v2/file/single/create", "/upload/v2/file/create")
# At most one token renewal a minute answers 401s; a 401 on a token that worked
# is first retried this many times with the same token (a 401 can be passing).
PAN123_RENEWAL_INTERVAL = 60.0
PAN123_TOKEN_RETRIES_BEFORE_RENEWAL = 2
# One attempt's socket timeout, clearly below the 60 s deadline of a call: calls
# have been seen to stall for more than 30 s, and a stall is worth a new attempt.
PAN123_ATTEMPT_TIMEOUT = 25.0
# The single-step upload host is asked again this often (and after a failure).
PAN123_UPLOAD_DOMAIN_TTL = 600.0
# Download links are reused until their own expiry, less this margin.
PAN123_LINK_EXPIRY_MARGIN = 60.0
PAN123_LINK_MAX_REUSE = 86400.0
PAN123_LINK_EXPIRY_PARAMS = ("t", "e", "expires", "Expires")


def classify_pan123_answer(status, code, message, endpoint):
    """What one enveloped 123pan answer asks of the retry loop: (action, reason).

    action is one of
      "ok"           success;
      "renew"        401, the token refused: retry, and renew it (rarely);
      "token_limit"  401 "tokens number has exceeded the limit": never mint a
                     token for it, wait with backoff;
      "retry"        transient (429, the single-step upload queue): back off, again;
      "poll"         20103 from download_info, the file is being verified: ask
                     again about 1 s later;
      "quota"        5113, the download traffic quota: no retry, fail at once;
      "raise"        anything else: a permanent error of its code's type.
    `status` (the HTTP status) is not needed today: 123pan puts the meaning in
    the envelope whatever the status (401 and 429 come either way)."""
    message = str(message or "")
    if code == PAN123_CODE_OK:
        return "ok", ""
    if code == PAN123_CODE_UNAUTHORIZED:
        if endpoint == PAN123_TOKEN_ENDPOINT:
            return "raise", "token refused"       # wrong credentials or the token limit
        if PAN123_TOKEN_LIMIT_MARK in message:
            return "token_limit", "too many live tokens on the account (code 401)"
        return "renew", "token refused (code 401)"
    if code == PAN123_CODE_TOO_MANY_REQUESTS:
        return "retry", "rate limited (code 429)"
    if code == PAN123_CODE_GENERIC and endpoint in PAN123_UPLOAD_ENDPOINTS and \
            any(mark in message for mark in PAN123_UPLOAD_QUEUE_MARKS):
        return "retry", "upload queue throttled (code 1: %s)" % message
    if code == PAN123_CODE_STILL_VERIFYING and endpoint == PAN123_DOWNLOAD_INFO:
        return "poll", "file still being verified (code 20103)"
    if code == PAN123_CODE_TRAFFIC_QUOTA:
        return "quota", "download traffic quota used up (code 5113)"
    return "raise", ""


def is_token_limit_error(error):
    """A Pan123Error that says the account has too many live tokens."""
    return isinstance(error, Pan123Error) and error.code == PAN123_CODE_UNAUTHORIZED and \
        PAN123_TOKEN_LIMIT_MARK in str(error)


def token_limit_advice(detail):
    return ("123pan: the account has too many live logins (%s): 123pan allows 3 live "
            "tokens per account and each new one logs out a device; log out of 123pan on "
            "a device or app you do not use (or wait for old logins to expire), then "
            "start this server again" % detail)


def classify_pan123_cdn_answer(status, body):
    """What a CDN answer that is not the asked range asks of the download loop:
    "new_link" (a 403/404/410: expired, revoked, risk control code 1010, or a
    link bound to another city/IP: ask for a new link), "retry_new_link" (5xx,
    408: another link may reach another node), "retry" (429), "raise"."""
    if status in (403, 404, 410):
        return "new_link"
    if status >= 500 or status == 408:
        return "retry_new_link"
    if status == 429:
        return "retry"
    return "raise"


def describe_cdn_refusal(status, body):
    """The reason a CDN refusal gives, for the log: code 1010 (risk control), a
    region binding, or the first bytes of the body."""
    text = body.decode("utf-8", "replace").strip() if body else ""
    try:
        parsed = json.loads(text)
    except ValueError:
        parsed = None
    if isinstance(parsed, dict) and parsed.get("code") is not None:
        return "HTTP %d code %s: %s" % (status, parsed.get("code"), parsed.get("message"))
    if "realc:" in text:
        return "HTTP %d: link bound to another place (%s)" % (status, text[:120])
    return "HTTP %d %s" % (status, text[:120])


def pan123_link_expiry(url, now=None):
    """POSIX time a signed download link says it expires (a t=/e=/expires=
    parameter holding a Unix time in the future), or None."""
    now = time.time() if now is None else now
    try:
        query = urlsplit(url).query
    except ValueError:
        return None
    for part in query.split("&"):
        name, _, value = part.partition("=")
        if name in PAN123_LINK_EXPIRY_PARAMS and value.isdigit() and len(value) == 10:
            expiry = int(value)
            if expiry > now:
                return float(expiry)
    return None


def pan123_link_reuse_seconds(url, fallback, now=None):
    """How long a download link may be reused: until its own expiry (less a
    margin, at most a day) when the link says, else `fallback`."""
    now = time.time() if now is None else now
    expiry = pan123_link_expiry(url, now)
    if expiry is None:
        return fallback
    return max(0.0, min(PAN123_LINK_MAX_REUSE, expiry - now - PAN123_LINK_EXPIRY_MARGIN))


def pan123_attempt_timeout(call_deadline, timeout=None):
    """The socket timeout of one attempt: `timeout` if given, else the default,
    and in any case at most half the call deadline so that a stall is retried."""
    chosen = PAN123_ATTEMPT_TIMEOUT if timeout is None else timeout
    return min(chosen, call_deadline / 2.0)


Pan123Entry = collections.namedtuple("Pan123Entry", "file_id name is_folder size etag")
Pan123Token = collections.namedtuple("Pan123Token", "value expired_at obtained_at renew_at")


class Pan123TokenFile(TokenFile):
    """The access token kept across restarts: 123pan allows 3 live tokens per
    client id and pushes the oldest offline, so fetching one per start would log
    out the user's other devices.  One file per (API base, client id)."""

    label = "123pan"
    kind = "pan123"

    def from_record(self, saved):
        return _make_token(saved["accessToken"], saved["expiredAt"], saved["obtainedAt"])

    def save(self, token, obtained_at=None):
        self.save_record({"accessToken": token.value, "expiredAt": token.expired_at,
                          "obtainedAt": token.obtained_at})


def _make_token(value, expired_at, obtained_at):
    if not isinstance(value, str) or not value:
        raise ValueError("empty access token")
    expires = parse_pan123_time(expired_at)
    margin = min(PAN123_TOKEN_RENEW_MARGIN, max(0.0, expires - obtained_at) / 10)
    return Pan123Token(value, expired_at, obtained_at, expires - margin)


def parse_pan123_time(text):
    """An RFC 3339 timestamp, or 123pan's zoneless 'YYYY-MM-DD HH:MM:SS' (UTC+8),
    -> POSIX seconds."""
    return parse_rfc3339(text, "+08:00")


class Pan123Client(CloudClient):
    """The 123pan Open Platform API.  Every request to the API and upload hosts
    goes through call() and so CloudClient.call_api, which owns the headers, the
    token, the per-endpoint rate limit and the retries; this class adds the
    {code, message, data, x-traceID} envelope and its codes (_classify), the
    token request and the upload flows.  Downloads from the CDN use the same
    HttpClient without credentials.  Thread-safe: one client serves every
    request thread."""

    label = "123pan"
    error_type = Pan123Error
    unavailable_type = Pan123Unavailable
    max_response = PAN123_MAX_RESPONSE
    # 200s mangled on the way and gateway errors: worth another try.
    retried_statuses = (200, 408)

    # A connection to the CDN failed: another link may reach another node.
    new_link_after_network_error = True

    def __init__(self, client_id, client_secret, api_base=PAN123_DEFAULT_API_BASE,
                 state_dir=None, tier="free", http_client=None, timeout=None,
                 call_deadline=60.0, retry_base=0.5, retry_cap=8.0,
                 poll_interval=1.0, complete_deadline=240.0,
                 download_url_lifetime=300.0, download_resumes=5,
                 rate_margin=0.05, renewal_interval=PAN123_RENEWAL_INTERVAL,
                 token_retries=PAN123_TOKEN_RETRIES_BEFORE_RENEWAL):
        if not client_id or not client_secret:
            raise ValueError("123pan needs a client id and a client secret")
        self.client_id = client_id
        self._client_secret = client_secret
        self.api_base = api_base.rstrip("/")
        CloudClient.__init__(
            self, http_client, pan123_attempt_timeout(call_deadline, timeout), call_deadline,
            retry_base, retry_cap, download_resumes,
            Pan123TokenFile(state_dir, self.api_base, client_id) if state_dir else None)
        self._rate_margin = rate_margin
        self.tier = None
        self.set_tier(tier)
        self.renewal_interval, self.token_retries = renewal_interval, token_retries
        self._last_renewal = None       # monotonic time of the last 401-driven renewal
        self._token_limit_logged = False
        self._token_refusal = None      # (monotonic time, error) of a refused new token
        self.poll_interval = poll_interval
        # The whole "upload_complete says not yet" wait; with the slices before it,
        # it stays inside restic's 5-minute window for one request.
        self.complete_deadline = complete_deadline
        self.download_url_lifetime = download_url_lifetime
        self._upload_domain = None
        self._upload_domain_at = 0.0
        self._upload_domain_lock = threading.Lock()

    def __repr__(self):     # never the secret
        return "Pan123Client(%r, %r)" % (self.client_id, self.api_base)

    def set_tier(self, tier):
        """Stay within the free or the VIP request-rate table ("auto" is free
        until user/info says VIP)."""
        column = 1 if tier == "vip" else 0
        if tier == self.tier:
            return
        self.tier = tier
        self.limiter = RateLimiter(dict((path, qps[column]) for path, qps in PAN123_QPS.items()),
                                   PAN123_DEFAULT_QPS, self._rate_margin)

    # -- the envelope and its codes ------------------------------------------------

    def call(self, method, path, query=None, body=None, form=None, host=None,
             auth=True, expected=(), deadline=None, notes=None):
        """One API call; returns the envelope's `data`.

        body: JSON-serialisable (a JSON POST/PUT); form: a MultipartBody; host: the
        base URL (default the API host) or a function returning it, asked again
        before every attempt.  What each answer asks for is _classify's; 429, the
        upload queue, 5xx, unparseable answers and network failures are retried
        with jittered backoff until `deadline` (default call_deadline from now),
        then Pan123Unavailable.  Any other non-zero code raises its Pan123Error
        type at once, logged with code, message and x-traceID unless the caller
        lists that type in `expected` (an answer it handles, such as "folder
        exists").  notes, a set, receives the reason label of every retry the
        answers asked for (upload_queue...)."""
        return self.call_api(CloudCall(method, path, query=query, body=body, payload=form,
                                       auth=auth, expected=expected, deadline=deadline,
                                       host=host, notes=notes, strikes=0,
                                       strike_token=None))

    def _classify(self, call, envelope):
        """What an answer means: the one place where 123pan's answers become
        actions (classify_pan123_answer names them).  A 401 is retried with the
        same token token_retries times, then the token is renewed, at most once
        per renewal_interval (waited for with backoff within the deadline); "too
        many tokens" is waited out with backoff, never answered by minting;
        20103 from download_info is polled every poll_interval; 5113 fails at
        once, counted."""
        code = envelope["code"]
        action, reason = classify_pan123_answer(None, code, envelope.get("message"), call.path)
        if action == "ok":
            return self.OK, envelope.get("data")
        if action == "renew" and call.auth:
            return self._answer_401(call, envelope, reason)
        if action == "token_limit" and call.auth:
            return self._retry(call, self._token_limit_failure(reason))
        if action == "retry":
            return self._retry(call, _Transient.rate_limited(reason)
                               if code == PAN123_CODE_TOO_MANY_REQUESTS
                               else _Transient(reason, "upload_queue", UNAVAILABLE))
        if action == "poll" and time.monotonic() + self.poll_interval < call.deadline:
            return self._retry(call, _Transient(reason, "verifying", UNAVAILABLE,
                                                retry_after=self.poll_interval))
        if action == "quota":
            METRICS.inc("restic123pan_cloud_download_quota_refusals_total")
        return self.RAISE, self._refusal(call, envelope)

    def _refusal(self, call, envelope):
        """The Pan123Error of a refused call, of its code's type."""
        if envelope["code"] == PAN123_CODE_GENERIC and \
                PAN123_FOLDER_EXISTS_MARK in str(envelope.get("message")):
            error_type = Pan123FolderExists
        else:
            error_type = _ERROR_TYPE_BY_CODE.get(envelope["code"], Pan123Error)
        return error_type.from_envelope(call.path, envelope)

    def _retry(self, call, failure):
        if call.notes is not None:
            call.notes.add(failure.reason)
        return self.RETRY, failure

    def _answer_401(self, call, envelope, reason):
        """A 401 on a token that worked: the same token again (a 401 can be
        passing), then a renewal if none happened within renewal_interval, else
        backoff until one may; past the deadline, the refusal."""
        with self._token_lock:      # a renewal under way ends first
            renewed = call.token is not self._token
        if renewed:
            return self.RENEW, reason       # another thread renewed it: no new token
        if call.strike_token is not call.token:
            call.strikes, call.strike_token = 0, call.token
        call.strikes += 1
        if call.strikes <= self.token_retries:
            return self.RETRY, _Transient(reason, "token")
        wait = self._renewal_wait()
        if wait <= 0:
            self._last_renewal = time.monotonic()
            return self.RENEW, reason
        if time.monotonic() + wait < call.deadline:
            return self.RETRY, _Transient("%s; one renewal a minute at most" % reason, "token")
        if self._token_refusal is not None:
            return self.RAISE, self._token_limit_error(call, str(self._token_refusal[1]))
        return self.RAISE, self._refusal(call, envelope)

    def _renewal_wait(self):
        """Seconds until a 401 may renew the token again (0: now)."""
        if self._last_renewal is None:
            return 0.0
        return max(0.0, self._last_renewal + self.renewal_interval - time.monotonic())

    def _token_limit_failure(self, reason):
        if not self._token_limit_logged:
            self._token_limit_logged = True
            log.warning("123pan: %s; waiting instead of asking for another token (each new "
                        "token logs out one of the account's devices)", reason)
        return _Transient(reason, "token_limit", UNAVAILABLE)

    @staticmethod
    def _token_limit_error(call, detail):
        """The refusal that ends a call the token limit held up (call_api logs
        it when it is raised as an answer's refusal)."""
        return Pan123AuthError(token_limit_advice(detail), endpoint=call.path,
                               meaning=UNAVAILABLE)

    def _gave_up(self, call, failure):
        if failure.reason == "token_limit":
            error = self._token_limit_error(call, str(failure))
            log.error("%s", error)
            return error
        return CloudClient._gave_up(self, call, failure)

    def _url(self, call):
        host = call.host() if callable(call.host) else call.host
        call.base = host or self.api_base
        return call.base + call.path

    def _headers(self, call):
        return {"Platform": "open_platform"}

    def _network_failed(self, call):
        self._forget_upload_domain(call.base)

    @staticmethod
    def _envelope(response, raw):
        # 123pan reports errors in the envelope; accept one whatever the HTTP
        # status (401 and 429 may come either way).
        return json_envelope(raw)

    def _obtain_token(self, current, obtained_at):
        """A new token (under the token lock).  "Too many live tokens" is a
        _Transient for call_api to wait out, and is not asked again within
        renewal_interval: asking so soon would only churn."""
        refused = self._token_refusal
        if refused is not None and time.monotonic() < refused[0] + self.renewal_interval:
            raise self._token_limit_failure("a new token was refused: %s" % refused[1])
        try:
            data = self.call("POST", PAN123_TOKEN_ENDPOINT, auth=False,
                             body={"clientID": self.client_id,
                                   "clientSecret": self._client_secret})
        except Pan123AuthError as e:
            if not is_token_limit_error(e):
                raise
            self._token_refusal = (time.monotonic(), e)
            raise self._token_limit_failure("a new token was refused: %s" % e)
        try:
            token = _make_token(data["accessToken"], data["expiredAt"], obtained_at)
        except (TypeError, KeyError, ValueError) as e:
            raise Pan123Error("123pan access_token: unusable answer (%s)" % e,
                              endpoint="/api/v1/access_token")
        log.info("123pan: obtained a new access token, valid until %s", token.expired_at)
        return token

    # -- folders and listings -------------------------------------------------

    def mkdir(self, parent_id, name):
        """Create a folder; its id.  Pan123FolderExists if the name is taken."""
        data = self.call("POST", "/upload/v1/file/mkdir",
                         body={"name": name, "parentID": parent_id},
                         expected=(Pan123FolderExists,))
        return _positive_id(data, "dirID", "mkdir")

    def list_folder(self, parent_id):
        """Yield the live Pan123Entry items of a folder, every page (list v2)."""
        cursor = None
        while True:
            entries, cursor = self.list_page(parent_id, cursor)
            for entry in entries:
                yield entry
            if cursor is None:
                return

    def list_page(self, parent_id, cursor=None):
        """One page of a folder (list v2): (live entries, the cursor of the next
        page or None after the last).  cursor None starts at the beginning.

        Trashed entries (list v2 returns them) and entries rejected by content
        review (status > 100) are left out.  The cursor is passed back opaque;
        -1, an empty page or a cursor that does not move ends the listing."""
        page, next_cursor = self._list_v2(parent_id, cursor)
        entries = [Pan123Entry(item["fileId"], item["filename"], item.get("type") == 1,
                               item.get("size") or 0, (item.get("etag") or "").lower())
                   for item in page
                   if item.get("trashed") != 1 and (item.get("status") or 0) <= 100]
        if next_cursor == -1 or not page:
            return entries, None
        if next_cursor == cursor:
            raise Pan123Error("123pan list of folder %d: cursor %r does not advance"
                              % (parent_id, cursor), endpoint="/api/v2/file/list")
        return entries, next_cursor

    def _list_v2(self, parent_id, cursor):
        """One page of list v2 as 123pan sends it: (its items, lastFileId)."""
        query = {"parentFileId": parent_id, "limit": PAN123_LIST_PAGE}
        if cursor is not None:
            query["lastFileId"] = cursor
        data = self.call("GET", "/api/v2/file/list", query=query) or {}
        return data.get("fileList") or [], data.get("lastFileId", -1)

    def folder_names(self, parent_id):
        """(file id, name, trashed) of every entry list v2 returns for a folder,
        trashed ones included (list v2 returns them; list_page leaves them out)."""
        out, cursor = [], None
        while True:
            page, next_cursor = self._list_v2(parent_id, cursor)
            out.extend((item["fileId"], item["filename"], item.get("trashed") == 1)
                       for item in page)
            if next_cursor == -1 or not page or next_cursor == cursor:
                return out
            cursor = next_cursor

    # -- uploads ------------------------------------------------------------------

    def upload_domain(self):
        """The single-step upload host, asked again every PAN123_UPLOAD_DOMAIN_TTL
        seconds (the host list changes) and after a connection to it failed."""
        with self._upload_domain_lock:
            if self._upload_domain is not None and \
                    time.monotonic() - self._upload_domain_at > PAN123_UPLOAD_DOMAIN_TTL:
                self._upload_domain = None
            if self._upload_domain is None:
                hosts = self.call("GET", "/upload/v2/file/domain")
                if not isinstance(hosts, list) or not hosts or not isinstance(hosts[0], str):
                    raise Pan123Error("123pan upload domain: unusable answer %r" % (hosts,),
                                      endpoint="/upload/v2/file/domain")
                self._upload_domain = hosts[0].rstrip("/")
                self._upload_domain_at = time.monotonic()
            return self._upload_domain

    def _forget_upload_domain(self, base):
        with self._upload_domain_lock:
            if self._upload_domain == base:
                self._upload_domain = None

    def upload_single(self, parent_id, name, spool, notes=None):
        """Single-step upload of the whole spool (up to 1 GB); the new file id.
        notes (a set) gets "upload_queue" when 123pan's upload queue refused an
        attempt: the caller then makes sure only one copy is left."""
        form = MultipartBody([("parentFileID", parent_id), ("filename", name),
                              ("etag", spool.md5), ("size", spool.size),
                              ("duplicate", 2)],   # replace: objects are content-addressed
                             "file", name, spool)
        data = self.call("POST", "/upload/v2/file/single/create", form=form,
                         host=self.upload_domain, notes=notes,
                         deadline=time.monotonic() + self._transfer_deadline(spool.size))
        if not isinstance(data, dict) or data.get("completed") is not True:
            raise Pan123Error("123pan single-step upload of %s: not completed (%r)"
                              % (name, data), endpoint="/upload/v2/file/single/create")
        return _positive_id(data, "fileID", "single-step upload of %s" % name)

    def upload_chunked(self, parent_id, name, spool):
        """The V2 chunked flow: create (an instant upload may end it there), the
        slices in order, then upload_complete polled until the file exists."""
        created = self.call("POST", "/upload/v2/file/create",
                            body={"parentFileID": parent_id, "filename": name,
                                  "etag": spool.md5, "size": spool.size, "duplicate": 2})
        if not isinstance(created, dict):
            raise Pan123Error("123pan create %s: unusable answer" % name,
                              endpoint="/upload/v2/file/create")
        if created.get("reuse") and created.get("fileID"):
            log.debug("123pan: %s stored by instant upload (same MD5 and size known)", name)
            return created["fileID"]
        preupload_id = created.get("preuploadID")
        slice_size = created.get("sliceSize")
        if not preupload_id or not isinstance(slice_size, int) or slice_size <= 0:
            raise Pan123Error("123pan create %s: no preuploadID/sliceSize in %r"
                              % (name, created), endpoint="/upload/v2/file/create")
        servers = created.get("servers") or []
        host = servers[0].rstrip("/") if servers else self.upload_domain
        self._upload_slices(host, preupload_id, name, spool, [
            (number, start, min(slice_size, spool.size - start))
            for number, start in enumerate(range(0, spool.size, slice_size), 1)])
        return self._await_complete(preupload_id, name)

    # Slices in flight at once for one file: 123pan takes them in any order, and
    # OpenList's client sends 3 at a time.  Each still goes through call().
    SLICE_CONCURRENCY = 3

    def _upload_slices(self, host, preupload_id, name, spool, slices):
        """Upload (number, start, length) slices, SLICE_CONCURRENCY at a time.  After
        a failure no new slice starts; the first failure is raised once the running
        ones have ended."""
        send_parts(slices, lambda number, start, length: self._upload_slice(
            host, preupload_id, name, number, spool, start, length),
            self.SLICE_CONCURRENCY, "123pan-slice")

    def _upload_slice(self, host, preupload_id, name, number, spool, start, length):
        # sliceMD5 is a form field that precedes the bytes, so it is computed in a
        # first pass over the (local) spool range; nothing is held in memory.
        md5 = hashlib.md5()
        for chunk in spool.iter_range(start, length):
            md5.update(chunk)
        form = MultipartBody([("preuploadID", preupload_id), ("sliceNo", number),
                              ("sliceMD5", md5.hexdigest())],
                             "slice", "%s.part%d" % (name, number), spool, start, length)
        # call() retries this one slice on its own; the others stay uploaded.
        self.call("POST", "/upload/v2/file/slice", form=form, host=host,
                  deadline=time.monotonic() + self._transfer_deadline(length))

    def _await_complete(self, preupload_id, name):
        deadline = time.monotonic() + self.complete_deadline
        while True:
            try:
                data = self.call("POST", "/upload/v2/file/upload_complete",
                                 body={"preuploadID": preupload_id},
                                 expected=(Pan123StillVerifying,), deadline=deadline)
            except Pan123StillVerifying:
                data = None         # the same as completed:false
            if isinstance(data, dict) and data.get("completed") and data.get("fileID"):
                return data["fileID"]
            if time.monotonic() + self.poll_interval >= deadline:
                raise Pan123Unavailable("123pan upload of %s: not complete after %ds"
                                        % (name, self.complete_deadline),
                                        endpoint="/upload/v2/file/upload_complete",
                                        meaning=TIMED_OUT)
            time.sleep(self.poll_interval)

    def _transfer_deadline(self, size):
        # Retries of an upload may take longer than those of a small call: allow
        # for the transfer itself at a slow 1 MB/s on top of call_deadline.
        return self.call_deadline + size / 1e6

    # -- trash and delete -----------------------------------------------------------

    def file_detail(self, file_id):
        """detail of one file or folder (dict with fileID, filename, size, etag,
        trashed...); Pan123FileNotFound if the id does not exist."""
        return self.call("GET", "/api/v1/file/detail", query={"fileID": file_id},
                         expected=(Pan123FileNotFound,))

    def trash(self, file_ids):
        """Move files to the recycle bin (invisible to list v2 from then on)."""
        self._batched("/api/v1/file/trash", file_ids)

    def delete_trashed(self, file_ids):
        """Delete permanently; 123pan accepts only ids already in the trash."""
        self._batched("/api/v1/file/delete", file_ids)

    def _batched(self, path, file_ids):
        file_ids = list(file_ids)
        for i in range(0, len(file_ids), PAN123_MAX_BATCH):
            self.call("POST", path, body={"fileIDs": file_ids[i:i + PAN123_MAX_BATCH]})

    # -- downloads --------------------------------------------------------------------

    def _new_download_url(self, file_id, fresh):
        """A CDN URL for the file, reused until the expiry the signed URL carries
        (t=/e=, less a minute), else for download_url_lifetime seconds; a refused
        URL is replaced anyway.  20103 (still being verified) is polled by
        _classify."""
        # A missing file is the storage's to report (it knows which object it was).
        data = self.call("GET", "/api/v1/file/download_info", query={"fileId": file_id},
                         expected=(Pan123FileNotFound,))
        url = data.get("downloadUrl") if isinstance(data, dict) else None
        if not isinstance(url, str) or not url.startswith(("http://", "https://")):
            raise Pan123Error("123pan download_info of file %d: no usable URL" % file_id,
                              endpoint="/api/v1/file/download_info")
        return url, pan123_link_reuse_seconds(url, self.download_url_lifetime)

    def _check_download(self, file_id, start, length, response):
        """The CDN's refusals (classify_pan123_cdn_answer): a refused link (403:
        expired, risk control code 1010, bound to another place) is replaced, at
        once the first time; a 5xx also drops the link before the next attempt
        (another link may reach another node)."""
        if not 400 <= response.status < 600:
            return CloudClient._check_download(self, file_id, start, length, response)
        problem = _range_response_problem(response, start, length)
        try:
            body = response.read_all(4096)
        except NETWORK_ERRORS:
            body = b""
        response.discard()
        action = classify_pan123_cdn_answer(response.status, body)
        if action == "new_link":
            reason = describe_cdn_refusal(response.status, body)
            log.debug("123pan download of file %d refused (%s): new link", file_id, reason)
            return _Transient("CDN refused the link: %s" % reason, "download_url")
        if action == "retry_new_link":
            self.forget_download_url(file_id)
            return _Transient(problem)
        if action == "retry":
            return _Transient.rate_limited(problem)
        raise Pan123Error("123pan download of file %d bytes %d+%d: %s"
                          % (file_id, start, length, problem))

    @staticmethod
    def _describe_file(file_id):
        return "file %d" % file_id


def _positive_id(data, key, what):
    value = data.get(key) if isinstance(data, dict) else None
    if not isinstance(value, int) or value <= 0:
        raise Pan123Error("123pan %s: no %s in the answer (%r)" % (what, key, data))
    return value


Pan123File = CloudFile


def split_pan123_path(path):
    """'/restic-backup/x' -> ('restic-backup', 'x'); ValueError for names 123pan
    refuses."""
    return split_folder_path(path, "123pan")


def _run_batch_isolating(call, file_ids, refusal):
    """call(file_ids) for trash or delete; {file id: error} for the ids that failed
    (Pan123FileNotFound for ids that no longer exist).

    One id the call refuses (already trashed by a retry whose first answer was
    lost, removed by someone else) fails the whole batch, so on a refusal each id
    is tried alone.  For an id refused alone with an unspecific code,
    refusal(id, error) returns the error to report or None when the id turns out
    done: the codes for these cases are undocumented, so the caller checks the
    state rather than reading messages."""
    if len(file_ids) > 1:
        try:
            call(file_ids)
            return {}
        except Pan123Unavailable:
            raise
        except Pan123Error:
            pass
    errors = {}
    for file_id in file_ids:
        try:
            call([file_id])
        except Pan123Unavailable:
            raise
        except Pan123FileNotFound as e:
            errors[file_id] = e
        except Pan123Error as e:
            error = refusal(file_id, e)
            if error is not None:
                errors[file_id] = error
    return errors


# Objects above this size use the chunked slice flow.  restic's packs are 16 MiB
# by default (up to 128 MiB with --pack-size), and one single-step request is the
# cheapest way to store them: one call and no complete-polling, which costs about
# a second per object.  Above 64 MiB a dropped connection would cost a whole
# large pack, while the slice flow retries one 16 MiB slice; the slice flow is
# also the only one past single-step's 1 GB limit.
PAN123_DEFAULT_SINGLE_MAX = 64 * 1024 * 1024
PAN123_SINGLE_STEP_LIMIT = 1024 * 1024 * 1024
PAN123_DEFAULT_REPO_PATH = DEFAULT_REPO_PATH
# Warm-up threads: one is enough against a fast API; with 100-300 ms per call a
# second one keeps the list budget (5/s) in use.
PAN123_WARM_UP_WORKERS = 2
# Deleted objects gather this long before their trash call, so that a prune's
# deletes go 100 to a call; failed remote deletes are tried again this much later.
PAN123_DELETE_LINGER = 1.0
PAN123_DELETE_RETRY = 60.0


def pan123_cache_namespace(api_base, client_id):
    """The metadata cache rows of one 123pan account (a client id belongs to one)."""
    return "123pan|%s|%s" % (api_base.rstrip("/"), client_id)


class Pan123Index(FolderIndex):
    """The FolderIndex of a 123pan account: folders are integer ids, the root 0."""

    ROOT_ID = 0

    def __init__(self, cache=None, namespace="123pan"):
        FolderIndex.__init__(self, cache, namespace)


class Pan123Deletes(object):
    """The remote half of a 123pan DELETE, in the background: objects go to the
    trash in calls of up to 100 (trashed files vanish from listings), then are
    deleted permanently, again 100 to a call (only allowed from the trash, and
    1 call/s on free accounts).  Ids that fail are queued again after `retry`
    seconds.  The queue itself is in the metadata cache (FolderIndex pending
    deletes), so a restart continues it."""

    def __init__(self, client, index, linger=PAN123_DELETE_LINGER, retry=PAN123_DELETE_RETRY):
        self.client, self.index = client, index
        self._trash = _BatchQueue("123pan", "trash", self._trash_batch, PAN123_MAX_BATCH, linger)
        self._purge = _BatchQueue("123pan", "delete", self._purge_batch, PAN123_MAX_BATCH,
                                  linger)
        self._retry = retry
        self._retry_timers = set()
        self._stopping = threading.Event()

    def post(self, file_id, stage="trash"):
        (self._purge if stage == "purge" else self._trash).post(file_id)

    def flush_trash(self):
        self._trash.flush()

    def flush(self):
        self._trash.flush()
        self._purge.flush()

    def _trash_batch(self, file_ids):
        try:
            errors = _run_batch_isolating(self.client.trash, file_ids, self._trash_refusal)
        except Exception as e:      # unreachable past the retries: all of them later
            errors = dict((file_id, e) for file_id in file_ids)
        gone = [i for i, e in errors.items() if isinstance(e, Pan123FileNotFound)]
        if gone:
            log.info("123pan: %d deleted objects were already removed behind our back",
                     len(gone))
            self.index.clear_pending(gone)
        trashed = [i for i in file_ids if i not in errors]
        self.index.set_pending_stage(trashed, "purge")
        for file_id in trashed:
            self._purge.post(file_id)
        return self._retry_failed(self._trash, errors)

    def _trash_refusal(self, file_id, error):
        """A lone trash call refused: trashed anyway (a retry of a call whose
        answer was lost) -> None; vanished -> Pan123FileNotFound; else `error`."""
        try:
            if self.client.file_detail(file_id).get("trashed") == 1:
                return None
        except Pan123FileNotFound as gone:
            return gone
        return error

    def _purge_batch(self, file_ids):
        try:
            errors = _run_batch_isolating(self.client.delete_trashed, file_ids,
                                          lambda file_id, error: error)
        except Exception as e:
            errors = dict((file_id, e) for file_id in file_ids)
        # Already gone (the user emptied the recycle bin) is what we wanted.
        errors = dict((file_id, e) for file_id, e in errors.items()
                      if not isinstance(e, Pan123FileNotFound))
        self.index.clear_pending([i for i in file_ids if i not in errors])
        return self._retry_failed(self._purge, errors)

    def _retry_failed(self, queue, errors):
        """Queue the failed ids again after a while (they stay in the cache's
        queue meanwhile, and a restart would also pick them up)."""
        errors = dict((i, e) for i, e in errors.items() if not isinstance(e, Pan123FileNotFound))
        if errors and not self._stopping.is_set():
            log.warning("123pan %s: %d objects failed, trying again in %ds: %s",
                        queue.name, len(errors), self._retry,
                        "; ".join("file %d: %s" % (i, e) for i, e in sorted(errors.items())[:5]))

            def again():
                self._retry_timers.discard(timer)
                for file_id in errors:
                    queue.post(file_id)

            timer = threading.Timer(self._retry, again)
            timer.daemon = True
            self._retry_timers.add(timer)
            timer.start()
        return errors

    def close(self):
        """Finish what is queued; False if it took too long (what is not done
        stays queued in the cache for the next start)."""
        self._stopping.set()
        for timer in list(self._retry_timers):
            timer.cancel()
        return self._trash.close(timeout=60) and self._purge.close(timeout=120)


class Pan123Storage(CloudStorage):
    """Repositories in a 123pan folder, laid out as restic's local backend (and
    the Rust restic-123pan) does (see CloudStorage).  Folders are addressed by
    id, so a path is resolved by listing its parents (once: the index keeps
    them); data/<xx> folders are created on the first upload into them, so that
    creating a repository costs 5 mkdir calls, not 261.

    Deletes: DELETE forgets the object in the cache and queues its remote delete
    in the same transaction, then returns; it is invisible from then on.
    Pan123Deletes does the rest in the background."""
    digests = ("md5",)      # the etag of every upload call

    name = label = "123pan"
    not_found_type = Pan123FileNotFound
    index_type = Pan123Index

    def __init__(self, client, repo_path=PAN123_DEFAULT_REPO_PATH,
                 single_upload_max=PAN123_DEFAULT_SINGLE_MAX, index=None, refresh_seconds=0,
                 warm_up_workers=PAN123_WARM_UP_WORKERS,
                 progress_interval=None, delete_linger=PAN123_DELETE_LINGER,
                 delete_retry=PAN123_DELETE_RETRY):
        index = index or Pan123Index()
        CloudStorage.__init__(self, client, split_pan123_path(repo_path), index,
                              refresh_seconds, warm_up_workers, progress_interval)
        self.single_upload_max = min(single_upload_max, PAN123_SINGLE_STEP_LIMIT)
        self._deletes = Pan123Deletes(client, index, delete_linger, delete_retry)
        self.account = None             # a Pan123Account: user/info at start, then now and then
        self.audit_every = 0            # seconds between background audits (0: none)
        self.last_audit = None

    def describe(self):
        return "123pan folder /%s (client id %s, %s)" % (
            "/".join(self._base), self.client.client_id, self.client.api_base)

    # -- folders ---------------------------------------------------------------

    def _list_page(self, folder_id, cursor):
        entries, next_cursor = self.client.list_page(folder_id, cursor)
        newest = collections.OrderedDict()
        for e in entries:   # a name twice (someone used duplicate=1): the newest wins
            known = newest.get((e.is_folder, e.name))
            if known is None or known.file_id < e.file_id:
                newest[(e.is_folder, e.name)] = e
        return [CacheEntry(e.name, e.is_folder, e.file_id, e.size, e.etag)
                for e in newest.values()], next_cursor

    def _make_folder(self, parent_id, name):
        try:
            child = self.client.mkdir(parent_id, name)
        except Pan123FolderExists:
            return self._find_existing_folder(parent_id, name)
        self.index.record_folder(parent_id, name, child, created=True)
        return child

    def _find_existing_folder(self, parent_id, name):
        # mkdir says it exists; a listing right after may not show it yet (index
        # lag, spec 4.2), so look a few times before giving up.
        backoff = Backoff(time.monotonic() + 15, self.client.retry_base, self.client.retry_cap)
        while True:
            self._ensure_listed(parent_id, again=True)
            child = self.index.child_folder(parent_id, name)
            if child is not None:
                return child
            if not backoff.pause():
                raise UpstreamError("123pan: folder %r exists under folder %d according to "
                                    "mkdir but is not listed" % (name, parent_id))

    def _forget_vanished_folders(self, path):
        """After an upload into `path` failed: forget the folders of the path that
        are gone (trashed or deleted behind our back), from the innermost up.
        True if one was, so that the upload may be tried again."""
        forgot = False
        while path:
            parent_id = self._resolve(path[:-1])
            folder_id = None if parent_id is None else self.index.child_folder(parent_id,
                                                                                path[-1])
            if folder_id is None:
                if forgot:
                    return forgot
                path = path[:-1]    # never made (its mkdir failed): look at its parent
                continue
            try:
                if self.client.file_detail(folder_id).get("trashed") != 1:
                    return forgot
            except Pan123FileNotFound:
                pass
            log.warning("123pan: folder /%s (%d) was removed behind our back; forgetting it",
                        "/".join(path), folder_id)
            self.index.forget_folder(parent_id, path[-1], folder_id)
            forgot = True
            path = path[:-1]
        return forgot

    @staticmethod
    def _file_key(folder_id, name, entry):
        return entry.file_id

    # -- the Storage interface -------------------------------------------------

    def create_repository(self, repo):
        repo_id = self._resolve(self._base + tuple(repo), create=True, mkdir_first=True)
        for kind in OBJECT_TYPES:
            self._child_folder(repo_id, kind, create=True, mkdir_first=True)

    def put(self, ref, spool):
        path = self._folder_path(ref.repo, ref.kind, ref.name)
        with self._name_locks.hold(path + (ref.name,)):
            try:
                # mkdir under a vanished parent fails like an upload into one: the
                # same recovery covers both.
                self._put_into(self._resolve(path, create=True), ref, spool)
            except Pan123Unavailable:
                raise
            except Pan123Error:
                if not self._forget_vanished_folders(path):
                    raise
                self._put_into(self._resolve(path, create=True), ref, spool)

    def _put_into(self, folder_id, ref, spool):
        if self._stored_meanwhile(ref, self.index.file(folder_id, ref.name), spool):
            return
        if self.index.pending_deletes_of(folder_id, ref.name):
            # Deleted a moment ago and stored again (restic migrate's config):
            # the old file goes to the trash first, or it might take the new one.
            self._deletes.flush_trash()
        file_id = self._upload(folder_id, ref.name, spool)
        self.index.record_file(folder_id, ref.name, CloudFile(file_id, spool.size, spool.md5))

    def _upload(self, folder_id, name, spool):
        # A zero-byte object always goes single-step (single_upload_max >= 0): how
        # the slice flow numbers zero slices is not documented.
        if spool.size <= self.single_upload_max:
            notes = set()
            file_id = self.client.upload_single(folder_id, name, spool, notes=notes)
            if "upload_queue" in notes:
                self._settle_queued_upload(folder_id, name, file_id, spool)
            return file_id
        return self.client.upload_chunked(folder_id, name, spool)

    def _settle_queued_upload(self, folder_id, name, file_id, spool):
        """After 123pan's upload queue refused an attempt ("该任务已成功进入秒传
        队列...请慢一点": the task was queued, so it may have been stored all the
        same): make sure the folder holds exactly one file of that name, the one
        recorded.  The recorded id is checked by detail (a listing may lag);
        other copies, live or overwritten into the trash, are deleted."""
        detail = self.client.file_detail(file_id)
        if detail.get("trashed") == 1 or detail.get("filename") != name or \
                detail.get("size") != spool.size or \
                str(detail.get("etag") or "").lower() != spool.md5:
            raise Pan123Error("123pan: %s (file %d) is not the file uploaded after the "
                              "upload queue refused it: %r" % (name, file_id, detail))
        live, trashed = [], []
        for entry_id, entry_name, is_trashed in self.client.folder_names(folder_id):
            if entry_name == name and entry_id != file_id:
                (trashed if is_trashed else live).append(entry_id)
        if not (live or trashed):
            return
        log.info("123pan: %s: %d more copies left by the upload queue; deleting them",
                 name, len(live) + len(trashed))
        try:
            if live:
                self.client.trash(live)
            self.client.delete_trashed(live + trashed)
        except Pan123Error as e:
            log.warning("123pan: %s: could not delete the copies %s left by the upload "
                        "queue: %s", name, live + trashed, e)

    def delete(self, ref):
        folder_id, entry = self._lookup(ref)
        if entry is None:
            return False
        if not self.index.drop_file(folder_id, ref.name, entry.file_id, delete_remotely=True):
            return False        # a concurrent DELETE of the same object was first
        self._deletes.post(entry.file_id)
        return True

    def flush_deletes(self):
        """Wait until the remote deletes queued so far are done (or failed)."""
        self._deletes.flush()

    # -- start and stop -----------------------------------------------------------

    def _resume(self):
        """At start, before the warm-up: the account (its tier sets the request
        rates), read again every PAN123_ACCOUNT_INTERVAL, --verify-every's
        audits, and the deletes queued before a restart."""
        if self.account is not None:
            self.account.refresh_quietly()
            self._every(PAN123_ACCOUNT_INTERVAL, self.account.refresh_quietly, "123pan-account")
        if self.audit_every > 0:
            self._every(self.audit_every, self._background_audit, "123pan-audit")
        pending = self.index.pending_deletes()
        if pending:
            log.info("123pan: %d deletes from before the restart are still to be done",
                     len(pending))
        for file_id, stage in pending:
            self._deletes.post(file_id, stage)

    def _every(self, seconds, job, name):
        """Run job() every `seconds` in a daemon thread until close()."""
        def loop():
            while not self._stopping.wait(seconds):
                job()
        threading.Thread(target=loop, daemon=True, name=name).start()

    def _background_audit(self):
        if self.warm_up is not None and not self.warm_up.finished.is_set():
            log.info("verify-cloud: the cache warm-up is still running; audit postponed")
            return
        try:
            self.last_audit = Pan123CloudAudit(self).run()
        except (StorageError, OSError) as e:
            log.warning("verify-cloud: the audit stopped: %s", e)

    def close(self):
        self._stop_warm_up()
        drained = self._deletes.close()
        if not drained:
            log.warning("123pan: remote deletes still queued at exit; the next start "
                        "continues them")
        self.client.close()
        if drained:
            self._close_cache()


# -- the account (user/info) and the zero-traffic audit (--verify-cloud) ----------

PAN123_ACCOUNT_INTERVAL = 6 * 3600.0    # user/info again this often while serving
PAN123_DEVELOPER_WARN_DAYS = 14         # warn this long before developer access ends
PAN123_SPACE_WARN_RATIO = 0.9           # warn when this share of the space is used

# What the account, the traffic quota and the audit export (the metrics every
# backend shares are described in section 2).
for _name, _kind, _text in (
        ("download_quota_refusals_total", "counter",
         "Download links refused because the traffic quota is used up (123pan 5113)"),
        ("space_used_bytes", "gauge", "Space used on the cloud account"),
        ("space_total_bytes", "gauge", "Space of the cloud account"),
        ("vip", "gauge", "1 when the 123pan account is VIP"),
        ("developer_access_end_timestamp_seconds", "gauge",
         "Unix time the 123pan developer access (a paid package) ends"),
        ("audit_problems", "gauge", "Problems the last --verify-cloud audit found, by kind"),
        ("audit_objects", "gauge", "Objects the last audit compared"),
        ("audit_list_calls", "gauge", "List calls the last audit made"),
        ("audit_last_run_timestamp_seconds", "gauge", "Unix time the last audit ended")):
    METRICS.describe("restic123pan_cloud_" + _name, _kind, _text)

Pan123AccountInfo = collections.namedtuple(
    "Pan123AccountInfo", "uid nickname vip space_used space_total developer_end")


def _number(value):
    return value if isinstance(value, (int, float)) and not isinstance(value, bool) else None


def parse_pan123_user_info(data):
    """user/info's data -> Pan123AccountInfo.  Space total is spacePermanent +
    spaceTemp; developer_end (POSIX seconds) is None when developerInfo is
    missing, null or unreadable: then nobody can say when access ends."""
    if not isinstance(data, dict):
        raise Pan123Error("123pan user/info: unusable answer %r" % (data,),
                          endpoint="/api/v1/user/info")
    used = _number(data.get("spaceUsed"))
    total = _number(data.get("spacePermanent"))
    if total is not None:
        total += _number(data.get("spaceTemp")) or 0
    developer_end = None
    developer = data.get("developerInfo")
    if isinstance(developer, dict) and isinstance(developer.get("endTime"), str):
        try:
            developer_end = float(parse_pan123_time(developer["endTime"]))
        except ValueError:
            developer_end = None
    return Pan123AccountInfo(data.get("uid"), data.get("nickname") or "",
                             data.get("vip") is True, used, total, developer_end)


class Pan123Account(object):
    """The 123pan account as user/info shows it, read at start and every
    PAN123_ACCOUNT_INTERVAL: logged (account, space, VIP, developer access end),
    warned about (access ending within warn_days, space nearly full), exported
    as gauges, and the source of the rate table unless --pan123-tier forces one."""

    def __init__(self, client, tier="auto", warn_days=PAN123_DEVELOPER_WARN_DAYS,
                 space_warn_ratio=PAN123_SPACE_WARN_RATIO):
        self.client, self.tier = client, tier
        self.warn_days, self.space_warn_ratio = warn_days, space_warn_ratio
        self.info = None

    def refresh(self, now=None):
        now = time.time() if now is None else now
        info = parse_pan123_user_info(self.client.call("GET", "/api/v1/user/info"))
        self.info = info
        space = "unknown"
        if info.space_used is not None and info.space_total:
            space = "%s of %s used (%.0f%%)" % (
                human_bytes(info.space_used), human_bytes(info.space_total),
                100.0 * info.space_used / info.space_total)
        if info.developer_end is None:
            access = "developer access end unknown (user/info has no readable developerInfo)"
        else:
            access = "developer access until %s UTC" % time.strftime(
                "%Y-%m-%d %H:%M", time.gmtime(info.developer_end))
        log.info("123pan account %s (uid %s): %s, %s, %s", info.nickname or "?", info.uid,
                 space, "VIP" if info.vip else "not VIP", access)
        if info.developer_end is not None:
            days = (info.developer_end - now) / 86400.0
            if days <= 0:
                log.error("123pan: the developer access of this account ended on %s: every "
                          "API call will fail until it is renewed (a paid package, see "
                          "open.123pan.com)", time.strftime("%Y-%m-%d",
                                                            time.gmtime(info.developer_end)))
            elif days <= self.warn_days:
                log.warning("123pan: the developer access of this account ends in %.0f days "
                            "(%s): renew the package at open.123pan.com, or every call "
                            "fails from then on", days,
                            time.strftime("%Y-%m-%d", time.gmtime(info.developer_end)))
            METRICS.set("restic123pan_cloud_developer_access_end_timestamp_seconds",
                        info.developer_end)
        if info.space_used is not None and info.space_total:
            METRICS.set("restic123pan_cloud_space_used_bytes", info.space_used)
            METRICS.set("restic123pan_cloud_space_total_bytes", info.space_total)
            if info.space_used >= self.space_warn_ratio * info.space_total:
                log.warning("123pan: the account's space is nearly full: %s", space)
        METRICS.set("restic123pan_cloud_vip", 1 if info.vip else 0)
        if self.tier == "auto":
            tier = "vip" if info.vip else "free"
            if tier != self.client.tier:
                log.info("123pan: using the %s request-rate table (from user/info)", tier)
            self.client.set_tier(tier)
        return info

    def refresh_quietly(self):
        """refresh(), a failure logged rather than raised (the backups go on)."""
        try:
            return self.refresh()
        except (StorageError, OSError) as e:
            log.warning("123pan: cannot read the account (user/info): %s", e)
            return None


Pan123AuditResult = collections.namedtuple(
    "Pan123AuditResult", "folders objects list_calls missing changed foreign unlisted")


class Pan123CloudAudit(object):
    """--verify-cloud: every folder of the served repositories is listed (list
    calls only, at the list rate limit: nothing is downloaded) and each object's
    size and MD5 in the listing is compared with what this server recorded in
    its metadata cache when it stored or listed it.  Reported, one log line each:
    objects missing in the cloud, objects whose size or MD5 changed, and objects
    (or folders) in the cloud the server never recorded.  A missing object is
    confirmed by one detail call first (a request may have stored it while the
    folder was being listed); ids waiting for their remote delete are not foreign."""

    def __init__(self, storage, progress_interval=None):
        self.storage, self.client, self.index = storage, storage.client, storage.index
        self.progress_interval = WARM_UP_PROGRESS_INTERVAL if progress_interval is None \
            else progress_interval

    def _list(self, folder_id):
        files, folders, cursor, calls = {}, {}, None, 0
        while True:
            entries, cursor = self.client.list_page(folder_id, cursor)
            calls += 1
            for entry in entries:
                (folders if entry.is_folder else files)[entry.name] = entry
            if cursor is None:
                return files, folders, calls

    def _gone(self, recorded):
        try:
            return self.client.file_detail(recorded.file_id).get("trashed") == 1
        except Pan123FileNotFound:
            return True

    def run(self):
        started = last_progress = time.monotonic()
        base = self.storage._base
        base_id = self.storage._resolve(base)
        problems = {"missing": [], "changed": [], "foreign": [], "unlisted": []}
        folders = objects = calls = 0
        if base_id is None:
            log.error("verify-cloud: the repository folder /%s is missing", "/".join(base))
            problems["missing"].append("/" + "/".join(base))
        pending = set(file_id for file_id, _ in self.index.pending_deletes())
        stack = [] if base_id is None else [(base_id, "/" + "/".join(base))]
        while stack:
            folder_id, path = stack.pop()
            files, subfolders, n = self._list(folder_id)
            calls += n
            folders += 1
            objects += len(files)
            if not self.index.is_loaded(folder_id):
                problems["unlisted"].append(path)
                log.warning("verify-cloud: %s was never listed by this server: its %d "
                            "objects cannot be compared", path, len(files))
                continue
            recorded = dict(self.index.files(folder_id))
            for name, rec in sorted(recorded.items()):
                entry = files.get(name)
                if entry is None:
                    if self.index.file(folder_id, name) is not None and self._gone(rec):
                        problems["missing"].append(path + "/" + name)
                        log.error("verify-cloud: missing in the cloud: %s/%s (file %d, %d "
                                  "bytes)", path, name, rec.file_id, rec.size)
                elif entry.size != rec.size or entry.etag != rec.etag:
                    now = self.index.file(folder_id, name)
                    if now is not None and (now.size, now.etag) == (entry.size, entry.etag):
                        continue        # stored again meanwhile, by this server
                    problems["changed"].append(path + "/" + name)
                    log.error("verify-cloud: changed in the cloud: %s/%s: size %d -> %d, MD5 "
                              "%s -> %s (file %d -> %d)", path, name, rec.size, entry.size,
                              rec.etag, entry.etag, rec.file_id, entry.file_id)
            for name, entry in sorted(files.items()):
                if name in recorded or entry.file_id in pending or \
                        self.index.file(folder_id, name) is not None:
                    continue
                problems["foreign"].append(path + "/" + name)
                log.error("verify-cloud: not recorded by this server: %s/%s (file %d, %d bytes)",
                          path, name, entry.file_id, entry.size)
            known = self.index.folders(folder_id)
            for name, child_id in sorted(known.items()):
                if name not in subfolders:
                    lost = self.index.files(child_id)
                    problems["missing"].append(path + "/" + name + "/")
                    log.error("verify-cloud: missing in the cloud: folder %s/%s (%d objects "
                              "recorded)", path, name, len(lost))
            for name, entry in sorted(subfolders.items(), reverse=True):
                if name in known:
                    stack.append((entry.file_id, path + "/" + name))
                else:
                    problems["foreign"].append(path + "/" + name + "/")
                    log.error("verify-cloud: folder not recorded by this server: %s/%s",
                              path, name)
            if self.progress_interval and time.monotonic() - last_progress >= \
                    self.progress_interval:
                last_progress = time.monotonic()
                log.info("verify-cloud: %d folders, %d objects so far (%d list calls, %d "
                         "folders to go)", folders, objects, calls, len(stack))
        result = Pan123AuditResult(folders, objects, calls, problems["missing"],
                                   problems["changed"], problems["foreign"],
                                   problems["unlisted"])
        for kind in ("missing", "changed", "foreign", "unlisted"):
            METRICS.set("restic123pan_cloud_audit_problems", len(problems[kind]), kind=kind)
        METRICS.set("restic123pan_cloud_audit_objects", objects)
        METRICS.set("restic123pan_cloud_audit_list_calls", calls)
        METRICS.set("restic123pan_cloud_audit_last_run_timestamp_seconds", time.time())
        bad = sum(len(v) for v in problems.values())
        (log.error if bad else log.info)(
            "verify-cloud: %s: %d folders, %d objects compared with %d list calls in %s: "
            "%d missing, %d changed, %d not recorded, %d folders never listed",
            "PROBLEMS FOUND" if bad else "clean", folders, objects, calls,
            _duration(time.monotonic() - started), len(problems["missing"]),
            len(problems["changed"]), len(problems["foreign"]), len(problems["unlisted"]))
        return result


def audit_is_clean(result):
    return not (result.missing or result.changed or result.foreign or result.unlisted)


def pan123_credentials_given(args, environ):
    """True when a client id comes from the command line or the environment: parse_config
    then picks the 123pan backend by default."""
    return bool(args.client_id or environ.get("PAN123_CLIENT_ID"))


def build_pan123_storage(args, environ=None):
    """A Pan123Storage from parsed arguments (flags over environment); UsageError
    for missing credentials or unusable values.  No network access here."""
    environ = os.environ if environ is None else environ
    client_id = args.client_id or environ.get("PAN123_CLIENT_ID", "")
    client_secret = args.client_secret or environ.get("PAN123_CLIENT_SECRET", "")
    if not client_id or not client_secret:
        raise UsageError("the 123pan backend needs --client-id and --client-secret "
                         "(or PAN123_CLIENT_ID and PAN123_CLIENT_SECRET)")
    api_base = args.api_base or environ.get("PAN123_API_BASE") or PAN123_DEFAULT_API_BASE
    check_cloud_url(api_base, "--api-base %r: expected an http(s) URL",
                    "the 123pan backend (https)")
    repo_path = cloud_repo_path(args, environ, "PAN123_REPO_PATH", split_pan123_path)
    client = Pan123Client(client_id, client_secret, api_base=api_base,
                          state_dir=args.state_dir, tier=args.pan123_tier)
    storage = cloud_storage_from_args(
        args, Pan123Storage, client, repo_path, pan123_cache_namespace(client.api_base, client_id),
        single_upload_max=args.pan123_single_max)
    storage.account = Pan123Account(client, args.pan123_tier)
    storage.audit_every = (args.verify_every or 0) * 3600.0
    return storage


def run_cloud_audit(args, environ):
    """--verify-cloud: the account, then the audit; 0 when clean, 1 when not,
    2 for a usage error.  None without --verify-cloud (the server runs)."""
    if not args.verify_cloud:
        return None
    try:
        storage = build_pan123_storage(args, environ)
    except UsageError as e:
        sys.stderr.write("restic_123pan.py: error: %s\n" % e)
        return 2
    try:
        storage.index.cache.open()
        storage.account.refresh_quietly()
        result = Pan123CloudAudit(storage).run()
    except (StorageError, OSError) + ((sqlite3.Error,) if sqlite3 else ()) as e:
        sys.stderr.write("restic_123pan.py: error: the audit failed: %s\n" % e)
        return 1
    finally:
        storage.close()
    sys.stdout.write("verify-cloud: %s: %d folders, %d objects, %d list calls; %d missing, "
                     "%d changed, %d not recorded, %d folders never listed\n"
                     % ("clean" if audit_is_clean(result) else "PROBLEMS FOUND",
                        result.folders, result.objects, result.list_calls,
                        len(result.missing), len(result.changed), len(result.foreign),
                        len(result.unlisted)))
    return 0 if audit_is_clean(result) else 1


register_backend(Backend(
    "123pan", "123pan", "on 123pan", build_pan123_storage, [
        ("--client-id", dict(metavar="ID", help="123pan Open Platform client id "
                                                "(or PAN123_CLIENT_ID)")),
        ("--client-secret", dict(metavar="SECRET", help="its client secret (or "
                                 "PAN123_CLIENT_SECRET, preferable: other local users can "
                                 "read command lines)")),
        ("--api-base", dict(metavar="URL", help="Open Platform API base URL (or "
                            "PAN123_API_BASE; default %s)" % PAN123_DEFAULT_API_BASE)),
        ("--pan123-tier", dict(choices=("auto", "free", "vip"), default="auto",
                               help="request-rate table to stay within (default auto: VIP "
                                    "or free as user/info says at start)")),
        ("--pan123-single-max", dict(metavar="BYTES", type=_byte_count,
                                     default=PAN123_DEFAULT_SINGLE_MAX,
                                     help="objects larger than this use the chunked slice "
                                          "upload, e.g. 64M (default 64M; single-step "
                                          "uploads stop at 1G)")),
        ("--verify-cloud", dict(action="store_true",
                                help="audit and exit: list every folder of the repositories "
                                     "(no download traffic) and compare sizes and MD5s with "
                                     "what this server recorded; exit 1 when anything is "
                                     "missing, changed or foreign")),
        ("--verify-every", dict(metavar="HOURS", type=_hours,
                                help="while serving, run that audit every HOURS hours "
                                     "(results in the log and /metrics; default: never)"))],
    detect=pan123_credentials_given, detected_by="PAN123_CLIENT_ID or --client-id",
    repo_path_help="from the 123pan root (or PAN123_REPO_PATH)", command=run_cloud_audit))


# ---------------------------------------------------------------------------
# 7. Backend: Cloudreve 4 (a self-hosted or hosted site), its API client beside it.
#    Follows spec/cloudreve-v4-api.md and spec/cloudreve-field-notes.md
# ---------------------------------------------------------------------------

CLOUDREVE_API = "/api/v4"
CLOUDREVE_ROOT_URI = "cloudreve://my"
CLOUDREVE_DEFAULT_REPO_PATH = DEFAULT_REPO_PATH
# Metadata key of a file whose upload is still running (or was abandoned): a
# placeholder, never a complete object (spec 2.4, 3.3).
CLOUDREVE_UPLOAD_META = "sys:upload_session_id"

CLOUDREVE_CODE_OK = 0
CLOUDREVE_CODE_TWO_FACTOR = 203
CLOUDREVE_CODE_EXISTS = 40004
CLOUDREVE_CODE_SESSION_GONE = 40011
CLOUDREVE_CODE_NOT_FOUND = 40016
CLOUDREVE_CODE_CREDENTIALS = 40020
CLOUDREVE_CODE_CAPACITY = 40051
CLOUDREVE_CODE_LOCKED = 40073
CLOUDREVE_CODE_BATCH = 40081
# "This token is not (or no longer) good": 401 where an expired token made the
# caller anonymous, 40088 on later servers, 40020 for a token of the wrong type
# (spec 1.7).  Refresh and replay.
_CLOUDREVE_AUTH_CODES = frozenset((401, 40088, CLOUDREVE_CODE_CREDENTIALS))
# Busy for a moment: object conflict, lock held by a running operation, database,
# I/O, slave callback (spec 5).  Retried with backoff.
_CLOUDREVE_BUSY_CODES = frozenset((409, CLOUDREVE_CODE_LOCKED, 50001, 50004, 50007))
# What a download link answers instead of bytes when it is no longer good: HTTP
# 200 with an envelope (expired or bad signature, blob gone; spec 2.14).
_CLOUDREVE_STALE_LINK_CODES = frozenset((40005, 40071, 40077))
# Headless login cannot get past these; each gets one clear line (spec 1.7).
_CLOUDREVE_LOGIN_REFUSALS = {
    CLOUDREVE_CODE_TWO_FACTOR: "the account uses two-factor authentication, which a "
                               "headless server cannot complete: use an account without 2FA",
    40026: "the site asks for a captcha at login, which a headless server cannot solve: "
           "ask the site's admin to turn the login captcha off",
    40080: "wrong email or password",
    40017: "the account is disabled or blocked (its calls answered 50001 until the token "
           "was renewed): ask the site's admin to re-enable it",
    40018: "the account is not activated",
    40001: "the site refused the login request (the user must be an email address, the "
           "password 4 to 128 characters)",
}

CLOUDREVE_LIST_PAGE = 1000          # above restic's 256 data/ sub-folders (spec 2.4)
CLOUDREVE_MAX_BATCH = 1000          # URIs per delete call (the site's limit is 3000)
CLOUDREVE_MAX_RESPONSE = 16 * 1024 * 1024
# Renew the access token this long before it expires (as the web UI does), or
# after nine tenths of its life if it lives shorter than that.
CLOUDREVE_TOKEN_RENEW_MARGIN = 600.0
# A download link is reused until this long before its expiry.
CLOUDREVE_LINK_MARGIN = 60.0
# Uploads restarted from a new session when a chunk cannot be delivered.
CLOUDREVE_UPLOAD_ATTEMPTS = 3
# A Date header this far from the local clock means the site's clock is skewed.
CLOUDREVE_CLOCK_TOLERANCE = 5.0
# Warm-up threads: Cloudreve publishes no rate limit; two keep a slow site busy
# without crowding out restic's own requests.
CLOUDREVE_WARM_UP_WORKERS = 2


class CloudreveError(UpstreamError):
    """Cloudreve answered with a non-zero code (or could not be reached: see
    CloudreveUnavailable).  An UpstreamError, so what is not handled more
    specifically reaches restic as a 502 with this one-line reason.  For batch
    answers (40081) `items` maps each failed URI to its own code, and `code` is
    that code when every item failed the same way."""

    def __init__(self, message, code=None, endpoint=None, meaning=None, items=None):
        UpstreamError.__init__(self, message, meaning)
        self.code, self.endpoint, self.items = code, endpoint, items or {}


class CloudreveNotFound(CloudreveError):
    """40016: no such path."""


class CloudreveExists(CloudreveError):
    """40004: the name is taken."""


class CloudreveLocked(CloudreveError):
    """40073: the path is locked, by an upload in progress above all."""


class CloudreveAuthError(CloudreveError):
    """Login or refresh refused: wrong credentials, 2FA, captcha, blocked account."""


class CloudreveSessionGone(CloudreveError):
    """40011 even with a fresh token: the upload session expired or was completed."""


class CloudreveUnavailable(CloudreveError, Unavailable):
    """Unreachable, or busy and failing transiently past the retry deadline."""


class CloudreveCapacityExceeded(CloudreveError):
    """40051: the account's capacity is used up."""
    meaning = QUOTA


_CLOUDREVE_ERROR_TYPES = {
    CLOUDREVE_CODE_NOT_FOUND: CloudreveNotFound,
    CLOUDREVE_CODE_EXISTS: CloudreveExists,
    CLOUDREVE_CODE_LOCKED: CloudreveLocked,
    CLOUDREVE_CODE_SESSION_GONE: CloudreveSessionGone,
    CLOUDREVE_CODE_CREDENTIALS: CloudreveAuthError,
    CLOUDREVE_CODE_CAPACITY: CloudreveCapacityExceeded,
}


# -- storage policies: where an upload session sends the bytes (issue 11) -------
# The web client's uploader per policy type (cloudreve/frontend, core/uploader/)
# and Cloudreve 4.18's callback routes decide these.  `relay: true` on any type
# sends the bytes through the site, as for `local`.
CLOUDREVE_S3_LIKE_POLICIES = ("s3", "ks3", "cos", "oss", "obs")
# Of these, the client itself calls GET /callback/<type>/{session}/{secret}
# after CompleteMultipartUpload; OSS and OBS call the site back themselves.
CLOUDREVE_CLIENT_CALLBACK_POLICIES = ("s3", "ks3", "cos")
# OneDrive takes fragments of a multiple of 320 KiB (the last one excepted), at
# most 60 MiB each.
ONEDRIVE_FRAGMENT_UNIT = 320 * 1024
ONEDRIVE_FRAGMENT_MAX = 60 * 1024 * 1024
ONEDRIVE_DEFAULT_FRAGMENT = 32 * ONEDRIVE_FRAGMENT_UNIT       # 10 MiB
# The chunks of one session may go in parallel (issue 12) up to the policy's
# chunk_concurrency (4.7+: the web client's core/uploader/chunk.ts; the admin
# page offers it for these flows, for local and remote only with pre-allocation,
# which lets a chunk land past the written end), never more than this.  Not for
# OneDrive (Graph takes an upload session's ranges strictly in sequence) nor
# Upyun (one form).  Where the last chunk completes the upload (local, remote),
# it goes alone after all others succeeded: before 4.18 it completed whatever
# had arrived.
CLOUDREVE_PARALLEL_FLOWS = ("local", "remote", "s3", "qiniu")
CLOUDREVE_CHUNK_CONCURRENCY_CAP = 3


def cloudreve_upload_flow(policy):
    """'local', 'remote', 's3', 'onedrive', 'qiniu' or 'upyun': how bytes reach a
    session's storage policy (its `type` and `relay`); None if unknown."""
    kind = policy.get("type") if isinstance(policy, dict) else None
    if kind == "local" or (isinstance(policy, dict) and policy.get("relay")):
        return "local"
    if kind in CLOUDREVE_S3_LIKE_POLICIES:
        return "s3"
    if kind in ("remote", "onedrive", "qiniu", "upyun"):
        return kind
    return None


# Answers that are final and mean "change this on the site" (issue 11): each
# gets one line naming the setting.
_CLOUDREVE_POLICY_REFUSALS = {
    40049: "the file is larger than the storage policy's maximum file size (or the "
           "user group's): raise the policy's \"max file size\" on the site",
    40052: "the storage policy's file name filter refuses the name; restic's names have "
           "no extension, so an extension allow-list refuses every object: clear the "
           "policy's allowed extensions / name rules on the site",
    40050: "the storage policy refuses this file type: clear the policy's allowed "
           "file types on the site",
    40006: "the storage policy does not accept uploads this way (a non-relay policy "
           "fed through the site): check the policy's upload relay setting",
}
# 50001 on every call while the access token is still valid is what a disabled
# account looks like (a busy database looks the same once): _classify renews the
# token once on it, and a disabled account then fails the refresh and the
# login with a clear refusal instead of being retried as "busy" for a minute.
_CLOUDREVE_RENEW_ONCE_CODES = frozenset((50001,))


def cloudreve_renews_token_on(code):
    """For _classify: a code after which the token is renewed once before the
    answer counts as busy."""
    return code in _CLOUDREVE_RENEW_ONCE_CODES


def _redacted_url(url):
    """scheme://host/path of a provider URL: its query (a signature) never logged."""
    parts = urlsplit(url)
    return "%s://%s%s" % (parts.scheme, parts.netloc, parts.path)


def _cloudreve_chunks(size, chunk_size):
    """(index, start, length) of each chunk; one empty chunk for an empty file."""
    chunk_size = chunk_size or max(1, size)
    count = max(1, -(-size // chunk_size))
    return [(i, i * chunk_size, min(chunk_size, size - i * chunk_size)) for i in range(count)]


def cloudreve_chunk_concurrency(session):
    """How many chunks of this upload session go at once: the storage policy's
    chunk_concurrency (absent: 1) for the flows that allow it, capped."""
    policy = session.get("storage_policy") or {}
    wanted = policy.get("chunk_concurrency") if isinstance(policy, dict) else None
    if cloudreve_upload_flow(policy) not in CLOUDREVE_PARALLEL_FLOWS \
            or not isinstance(wanted, int) or isinstance(wanted, bool) or wanted < 1:
        return 1
    return min(wanted, CLOUDREVE_CHUNK_CONCURRENCY_CAP)


class CloudreveUploadIncomplete(CloudreveError):
    """Every chunk was accepted, yet the site still shows an upload placeholder:
    Cloudreve 4.18 answers a retried chunk with success after its completion
    failed, and never completes that session.  A new session is the fix."""


class _BytesPayload(object):
    """A small request body held as bytes, with what CloudClient sends of a payload."""

    def __init__(self, data, content_type="application/octet-stream"):
        self.data, self.content_length, self.content_type = data, len(data), content_type

    def __iter__(self):
        yield self.data


# What a storage provider (or slave node) answered, for the upload flow to read.
ProviderAnswer = collections.namedtuple("ProviderAnswer", "status header raw")


def cloudreve_error(endpoint, envelope):
    """The typed error of a non-zero envelope.  A batch failure (40081) takes the
    type of its items' code when they all share one (spec 1.5)."""
    code = envelope.get("code")
    text = "Cloudreve %s: code %s: %s" % (endpoint, code, envelope.get("msg") or "")
    items = {}
    aggregated = envelope.get("aggregated_error")
    if code == CLOUDREVE_CODE_BATCH and isinstance(aggregated, dict):
        items = dict((uri, item.get("code")) for uri, item in aggregated.items()
                     if isinstance(item, dict))
        text += " (%s)" % ", ".join("%s: %s" % pair for pair in sorted(items.items())[:3])
        if len(set(items.values())) == 1:
            code = next(iter(items.values()))
    if envelope.get("correlation_id"):
        text += " (correlation_id %s)" % envelope["correlation_id"]
    error_type = _CLOUDREVE_ERROR_TYPES.get(code, CloudreveError)
    return error_type(text, code, endpoint, items=items)


def _cloudreve_envelope(response, raw):
    """The {code, msg, data} dict of an answer, or None if it is not one."""
    if (response.header("Content-Encoding") or "").lower() == "gzip":
        try:
            raw = gzip.decompress(raw)
        except (OSError, EOFError):
            return None
    return json_envelope(raw)


def cloudreve_uri(parts):
    """('restic-backup', 'a b') -> 'cloudreve://my/restic-backup/a%20b'.

    Each name percent-encoded as JavaScript's encodeURIComponent does, the form
    the server itself emits: '+', '%', '?', '#' and spaces can never be misread
    (spec 1.8).  Query strings encode the whole URI once more (urlencode)."""
    uri = CLOUDREVE_ROOT_URI
    for part in parts:
        uri = cloudreve_child_uri(uri, part)
    return uri


def cloudreve_child_uri(folder_uri, name):
    return folder_uri + "/" + quote(name, safe="-_.!~*'()")


def split_cloudreve_path(path):
    """'/restic-backup/x' -> ('restic-backup', 'x'); ValueError for names
    Cloudreve refuses (spec 1.8)."""
    return split_folder_path(path, "Cloudreve")


CloudreveToken = collections.namedtuple(
    "CloudreveToken", "access refresh access_expires refresh_expires renew_at refresh_until")


def _make_cloudreve_token(data, obtained_at):
    """A CloudreveToken from a Token object ({access_token, refresh_token,
    access_expires, refresh_expires}); ValueError/KeyError/TypeError if unusable."""
    access, refresh = data["access_token"], data["refresh_token"]
    if not (isinstance(access, str) and access and isinstance(refresh, str) and refresh):
        raise ValueError("empty token")
    # Go's RFC 3339 with up to 9 fraction digits and the server's offset.
    access_expires = parse_rfc3339(data["access_expires"])
    refresh_expires = parse_rfc3339(data["refresh_expires"])
    margin = min(CLOUDREVE_TOKEN_RENEW_MARGIN, max(0.0, access_expires - obtained_at) / 10)
    return CloudreveToken(access, refresh, data["access_expires"], data["refresh_expires"],
                          access_expires - margin, refresh_expires - 60)


class CloudreveTokenFile(TokenFile):
    """The newest token pair, kept across restarts so that a restart refreshes
    rather than logs in again.  One file per (site, user)."""

    label = "Cloudreve"
    kind = "cloudreve"

    def from_record(self, saved):
        return _make_cloudreve_token(saved, saved["obtained_at"])

    def save(self, token, obtained_at):
        self.save_record({"access_token": token.access, "refresh_token": token.refresh,
                          "access_expires": token.access_expires,
                          "refresh_expires": token.refresh_expires,
                          "obtained_at": obtained_at})


CloudreveEntry = collections.namedtuple("CloudreveEntry",
                                        "file_id name is_folder size entity placeholder")
CloudreveFile = CloudFile


def _cloudreve_entry(item):
    metadata = item.get("metadata") or {}
    return CloudreveEntry(item.get("id"), item["name"], item.get("type") == 1,
                          item.get("size") or 0, item.get("primary_entity"),
                          isinstance(metadata, dict) and CLOUDREVE_UPLOAD_META in metadata)


class CloudreveClient(CloudClient):
    """The Cloudreve 4 API (/api/v4) of one site and account.  Every API request
    goes through call() and so CloudClient.call_api, which owns the
    Authorization header, the token (renewed before it expires and whenever an
    answer says it has) and the retries; this class adds the {code, msg, data}
    envelope and its codes (_classify), login and refresh, and the upload
    sessions with a flow per storage policy, whose requests to a storage
    provider go through call_api too (_provider_send).  Download links are
    fetched without credentials through the same HttpClient.  Thread-safe: one
    client serves every request thread."""

    label = "Cloudreve"
    error_type = CloudreveError
    unavailable_type = CloudreveUnavailable
    max_response = CLOUDREVE_MAX_RESPONSE
    stale_link_statuses = (401, 403, 404, 410)
    timeout_statuses = (504, 524)   # 524: Cloudflare's "a timeout occurred"

    def __init__(self, site_url, email, password, state_dir=None, http_client=None,
                 timeout=30.0, call_deadline=60.0, retry_base=0.5, retry_cap=8.0,
                 download_resumes=5, login_retry_after=300.0,
                 upload_attempts=CLOUDREVE_UPLOAD_ATTEMPTS):
        if not site_url or not email or not password:
            raise ValueError("Cloudreve needs a site URL, a user and a password")
        self.site_url = site_url.rstrip("/")
        self.email = email
        self._password = password
        CloudClient.__init__(
            self, http_client, timeout, call_deadline, retry_base, retry_cap, download_resumes,
            CloudreveTokenFile(state_dir, self.site_url, email) if state_dir else None)
        # A refused login is not tried again for this long: a site may ban an
        # address that keeps failing (spec 1.7).
        self.login_retry_after = login_retry_after
        self.upload_attempts = upload_attempts
        self._login_refusal = None          # (error, monotonic time it holds until)
        self._clock_offset = 0.0    # the site's clock minus ours, from its Date header

    def __repr__(self):     # never the password or a token
        return "CloudreveClient(%r, %r)" % (self.site_url, self.email)

    # -- the envelope and its codes ------------------------------------------------

    def call(self, method, template, path_args=None, query=None, body=None, payload=None,
             auth=True, expected=(), deadline=None, renew_on=(), final=()):
        """One API call; returns the envelope's `data`.

        template: the route under /api/v4 ('/file/upload/{session_id}/{index}'),
        filled from path_args; the metrics label is 'METHOD /api/v4<template>'.
        body: JSON; payload: a _SpoolSlice sent as raw bytes with its exact
        Content-Length.  An answer meaning "token expired" (401, 40088, 40020, a
        40081 whose items all say so, and the codes in renew_on) gets a fresh
        token and an immediate replay; if it comes again, further fresh tokens
        with backoff.  50001 gets one fresh token first (a disabled account
        answers it while its token is valid; its renewal then fails clearly).
        Busy codes (409, 40073, 50001, 50004, 50007) except those in
        `final`, 429, 5xx, answers without an envelope and network failures are
        retried with jittered backoff until `deadline` (default call_deadline from
        now), then CloudreveUnavailable.  Any other code raises its CloudreveError
        type at once, logged unless the caller lists that type in `expected`."""
        path = CLOUDREVE_API + (template.format(**path_args) if path_args else template)
        return self.call_api(CloudCall(
            method, path, "%s %s%s" % (method, CLOUDREVE_API, template), query, body, payload,
            auth, expected, deadline, renew_on=renew_on, final=final, provider=None))

    def _classify(self, call, envelope):
        """What an answer means: the one place where Cloudreve's codes (and a
        storage provider's statuses) become actions."""
        if isinstance(envelope, ProviderAnswer):
            return self._classify_provider(call, envelope)
        if envelope["code"] == CLOUDREVE_CODE_OK:
            return self.OK, envelope.get("data")
        error = cloudreve_error(call.endpoint, envelope)
        if call.auth and (error.code in _CLOUDREVE_AUTH_CODES or not call.renewals and (
                error.code in call.renew_on or cloudreve_renews_token_on(error.code))):
            return self.RENEW, error
        if error.code in _CLOUDREVE_BUSY_CODES and error.code not in call.final:
            return self.RETRY, _Transient(str(error), "server_busy")
        return self.RAISE, error

    def _classify_provider(self, call, answer):
        """A storage provider's (or slave node's) answer without an envelope:
        408, 429 and 5xx are retried, and so is S3's InternalError inside an HTTP
        200 (a late CompleteMultipartUpload failure); 6xx are a provider's own
        answers (Qiniu's 612) and, like every other status, the flow's to judge.
        A 413 is a proxy's body limit; a slave must answer with an envelope."""
        status, label = answer.status, call.provider
        if status == 429:
            return self.RETRY, _Transient.rate_limited("%s: HTTP 429" % label)
        if 500 <= status < 600 or status in self.retried_statuses:
            return self.RETRY, _Transient.gateway("%s: HTTP %d%s" % (
                label, status, " (a proxy timed out: raise its timeout)" * (status == 524)),
                status in self.timeout_statuses)
        if status == 200 and b"<Code>InternalError</Code>" in answer.raw[:4096]:
            return self.RETRY, _Transient("%s: InternalError in an HTTP 200 answer" % label)
        if status == 413:
            return self.RAISE, CloudreveError(
                "Cloudreve upload: %s: HTTP 413: a proxy in front of the storage refuses "
                "bodies this large; raise its limit (nginx client_max_body_size) above the "
                "policy's chunk size" % label)
        if call.slave:
            return self.RAISE, CloudreveError("Cloudreve upload: %s: HTTP %d without an "
                                              "envelope" % (label, status))
        return self.OK, answer

    def _url(self, call):
        return self.site_url + call.path if call.provider is None else call.path

    def _headers(self, call):
        return {} if call.provider is None else dict(call.headers)

    _envelope = staticmethod(_cloudreve_envelope)

    def _answer(self, call, response, raw):
        """The site's answers set the clock offset and are envelopes (or raise as
        CloudClient says); a provider's answer goes to _classify as it is (a
        slave's envelope as an envelope)."""
        if call.provider is None:
            self._note_server_date(response.header("Date"))
            return CloudClient._answer(self, call, response, raw)
        envelope = _cloudreve_envelope(response, raw) if call.slave else None
        return envelope if envelope is not None else ProviderAnswer(
            response.status, response.header, raw)

    # -- the site's clock ----------------------------------------------------------
    # Token and link expiries are the site's wall-clock times: compared with a
    # skewed local clock they would make every call refresh, or use dead tokens.

    def server_time(self):
        """Now, on the site's clock (the local one until the site answered)."""
        return time.time() + self._clock_offset

    def _note_server_date(self, value):
        """Take the offset from an answer's Date header; differences under the
        header's one-second resolution (plus transit) are not skew."""
        parsed = email.utils.parsedate_tz(value) if value else None
        if parsed is None:
            return
        offset = email.utils.mktime_tz(parsed) - time.time()
        self._clock_offset = offset if abs(offset) > CLOUDREVE_CLOCK_TOLERANCE else 0.0

    def _no_envelope_reason(self, response):
        # Cloudreve answers HTTP 200 for errors too (spec 1.3): the code decides.
        reason = "HTTP %d %s without a JSON envelope" % (
            response.status, response.header("Content-Type") or "")
        if response.status == 413:
            reason += (": a proxy in front of Cloudreve refuses bodies this large; its limit "
                       "(nginx client_max_body_size) must exceed the storage policy's chunk size")
        elif response.status == 524:
            reason += (": a proxy in front of Cloudreve (Cloudflare: 100 s) timed out the "
                       "request; raise the proxy's timeout or lower the storage policy's "
                       "chunk size")
        elif response.status in (200, 404):
            reason += ": is %s the address of a Cloudreve 4 site?" % self.site_url
        return reason

    # -- tokens -------------------------------------------------------------------

    def _obtain_token(self, current, obtained_at):
        """The refresh token first; a password login when it is refused or
        expired."""
        data = None
        if current is not None and obtained_at < current.refresh_until:
            data = self._refresh(current)
        if data is None:
            data = self._login()
        try:
            token = _make_cloudreve_token(data, obtained_at)
        except (TypeError, KeyError, ValueError) as e:
            raise CloudreveError("Cloudreve login of %s: unusable token in the answer (%s)"
                                 % (self.email, e))
        log.info("Cloudreve: new access token for %s, valid until %s", self.email,
                 token.access_expires)
        return token

    def _refresh(self, token):
        """The new Token object, or None when the refresh token is refused."""
        data, refusal = self.answer_or_refusal(
            "POST", "/session/token/refresh", auth=False, body={"refresh_token": token.refresh},
            expected=(CloudreveAuthError,))
        if refusal is None:
            return data
        if refusal.code not in _CLOUDREVE_AUTH_CODES:
            raise refusal
        log.info("Cloudreve: the refresh token was refused (code %s); logging in again",
                 refusal.code)
        return None

    def _login(self):
        refusal = self._login_refusal
        if refusal is not None and time.monotonic() < refusal[1]:
            raise refusal[0]
        data, refusal = self.answer_or_refusal(
            "POST", "/session/token", auth=False, expected=(CloudreveError,),
            body={"email": self.email, "password": self._password})
        if refusal is not None:
            if refusal.code is None:    # no envelope: not a refusal (a wrong address?)
                raise refusal
            reason = _CLOUDREVE_LOGIN_REFUSALS.get(refusal.code, "code %s" % refusal.code)
            error = CloudreveAuthError("Cloudreve login of %s at %s refused: %s"
                                       % (self.email, self.site_url, reason),
                                       refusal.code, refusal.endpoint)
            log.error("%s", error)
            self._login_refusal = (error, time.monotonic() + self.login_retry_after)
            raise error
        return (data or {}).get("token") if isinstance(data, dict) else None

    # -- folders and listings -------------------------------------------------

    def list_folder(self, uri):
        """(entries, storage policy id) of a folder, every page.  CloudreveNotFound
        if the folder does not exist (or is a file)."""
        entries, policy_id, cursor = [], None, None
        while True:
            page, cursor, page_policy = self.list_page(uri, cursor)
            entries.extend(page)
            policy_id = policy_id or page_policy
            if cursor is None:
                return entries, policy_id

    def list_page(self, uri, cursor=None):
        """One page of a folder: (entries, the cursor of the next page or None
        after the last, storage policy id).  cursor None starts at the beginning.
        Cursor pages until no next_token; offset pages (sites that turned cursors
        off: the cursor is then the page number) until total_items."""
        query = {"uri": uri, "page_size": CLOUDREVE_LIST_PAGE}
        if isinstance(cursor, int):
            query["page"] = cursor
        elif cursor is not None:
            query["next_page_token"] = cursor
        data = self.call("GET", "/file", query=query, expected=(CloudreveNotFound,)) or {}
        entries = [_cloudreve_entry(item) for item in data.get("files") or []]
        policy_id = (data.get("storage_policy") or {}).get("id")
        pagination = data.get("pagination") or {}
        next_cursor = pagination.get("next_token")
        if next_cursor:
            if next_cursor == cursor:
                raise CloudreveError("Cloudreve list of %s: cursor does not advance" % uri)
            return entries, next_cursor, policy_id
        if not pagination.get("is_cursor") and "total_items" in pagination:
            page = pagination.get("page", 0) + 1
            if page * (pagination.get("page_size") or CLOUDREVE_LIST_PAGE) \
                    < pagination["total_items"] and data.get("files"):
                return entries, page, policy_id
        return entries, None, policy_id

    def storage_policy(self, parts):
        """The storage policy id in the listing of folder `parts` (a path tuple), or
        of its nearest existing ancestor: what an upload session wants as
        policy_id (spec 2.7)."""
        while True:
            try:
                data = self.call("GET", "/file", expected=(CloudreveNotFound,),
                                 query={"uri": cloudreve_uri(parts), "page_size": 1})
            except CloudreveNotFound:
                if not parts:
                    raise
                parts = parts[:-1]
                continue
            policy_id = ((data or {}).get("storage_policy") or {}).get("id")
            if not policy_id:
                raise CloudreveError("Cloudreve list of %s: no storage_policy in the answer"
                                     % cloudreve_uri(parts))
            return policy_id

    def create_folder(self, uri):
        """mkdir -p; True if made now, False if it was there already."""
        try:
            self.call("POST", "/file/create", expected=(CloudreveExists,),
                      body={"uri": uri, "type": "folder", "err_on_conflict": True})
            return True
        except CloudreveExists:
            return False

    def info(self, uri):
        """The FileResponse of a path; CloudreveNotFound if it does not exist."""
        data = self.call("GET", "/file/info", query={"uri": uri},
                         expected=(CloudreveNotFound,))
        if not isinstance(data, dict):
            raise CloudreveError("Cloudreve info of %s: unusable answer" % uri)
        return data

    # -- uploads ----------------------------------------------------------------

    def upload(self, uri, spool, policy_id, replace=False):
        """Store the spool at `uri` through an upload session; its CloudreveFile.

        replace=True stages a new version of an existing file (the switch is atomic
        on completion).  A chunk that cannot be delivered cancels the session (so
        no locked placeholder stays behind) and the upload starts again from a new
        one, up to upload_attempts times.  The object counts as stored only when
        its last chunk was accepted and the site reports the full size with no
        upload in progress."""
        attempt = 0
        while True:
            attempt += 1
            session = self._create_session(uri, spool.size, policy_id, replace)
            try:
                self._send_object(session, uri, spool)
            except CloudreveUnavailable:
                self.cancel_upload(session["session_id"], uri)
                raise
            except CloudreveError as e:
                # The last chunk may have completed the upload with its answer
                # lost on the way back: its retry then finds the session gone.
                stored = self._stored_anyway(uri, spool.size)
                if stored is not None:
                    return stored
                self.cancel_upload(session["session_id"], uri)
                if attempt >= self.upload_attempts:
                    raise
                log.info("Cloudreve: upload of %s failed (%s); starting it again", uri, e)
                _count_retry("upload_restart")
                continue
            except BaseException:
                self.cancel_upload(session["session_id"], uri)
                raise
            try:
                return self._verify_upload(uri, spool.size)
            except CloudreveUnavailable:
                raise
            except CloudreveUploadIncomplete as e:
                # 4.18: a chunk retried after a failed completion answers success
                # and leaves the placeholder for good: a new session.
                self.cancel_upload(session["session_id"], uri)
                if attempt >= self.upload_attempts:
                    raise
                log.info("Cloudreve: %s; starting the upload again", e)
                _count_retry("upload_restart")
                continue
            except CloudreveError as e:
                # Completed with another size (or not at all): nothing that could be
                # listed as stored may stay behind.
                log.warning("Cloudreve: upload of %s not confirmed (%s); removing it", uri, e)
                self.cancel_upload(session["session_id"], uri)
                if not replace:
                    self._delete_quietly(uri)
                raise

    def _create_session(self, uri, size, policy_id, replace):
        body = {"uri": uri, "size": size, "policy_id": policy_id,
                "mime_type": "application/octet-stream"}
        if replace:
            body["entity_type"] = "version"
        backoff = self._backoff(time.monotonic() + self.call_deadline)
        refusals = 0
        while True:
            try:
                # A lock (40073) is not waited out here: it is most likely held by
                # an upload of this very name that will never finish.
                session = self.call("PUT", "/file/upload", body=body,
                                    final=(CLOUDREVE_CODE_LOCKED,),
                                    expected=(CloudreveExists, CloudreveLocked, CloudreveError))
                break
            except CloudreveUnavailable:
                raise
            except (CloudreveExists, CloudreveLocked) as e:
                refusals += 1
                if refusals > 1 and not backoff.pause():
                    raise
                _count_retry("upload_in_the_way")
                self._clear_the_way(uri, body, e)
            except CloudreveError as e:
                raise self._policy_refusal(uri, e)
        policy = (session or {}).get("storage_policy") or {}
        if not isinstance(session, dict) or not session.get("session_id") \
                or not isinstance(session.get("chunk_size"), int) or session["chunk_size"] < 0:
            raise CloudreveError("Cloudreve upload of %s: unusable session %r" % (uri, session))
        if cloudreve_upload_flow(policy) is None:
            self.cancel_upload(session["session_id"], uri)
            raise CloudreveError("Cloudreve upload of %s: the storage policy is of type %r, "
                                 "which this server cannot upload to; turn the policy's "
                                 "upload relay on" % (uri, policy.get("type")))
        return session

    def _clear_the_way(self, uri, body, refusal):
        """After an upload session was refused because the name is taken or
        locked: a placeholder or staged version of an upload that never finished
        (a crash, or our own call whose answer was lost and that a retry then
        found) is cancelled with its own session id; a complete file we did not
        know of gets replaced (a new version)."""
        try:
            existing = self.info(uri)
        except CloudreveNotFound:
            return                          # gone meanwhile: just try again
        if existing.get("type") != 0:
            raise refusal                   # a folder has that name
        stale = (existing.get("metadata") or {}).get(CLOUDREVE_UPLOAD_META)
        if stale:
            log.info("Cloudreve: cancelling an unfinished upload of %s", uri)
            self.cancel_upload(stale, uri)
        elif isinstance(refusal, CloudreveExists):
            body["entity_type"] = "version"

    # -- upload flows per storage policy (chosen from the session's answer) ------

    def _send_object(self, session, uri, spool):
        """Deliver the spool the way the session's storage policy takes it; on
        return the site has been told the upload is complete (upload() then
        checks that it says so)."""
        flow = cloudreve_upload_flow(session.get("storage_policy"))
        if flow == "local":
            return self._send_chunks(session, spool)
        urls = session.get("upload_urls")
        if not isinstance(urls, list) or not urls \
                or not all(isinstance(u, str) and u.startswith(("http://", "https://"))
                           for u in urls):
            raise CloudreveError("Cloudreve upload of %s: the %s session has no usable "
                                 "upload_urls" % (uri, flow))
        return getattr(self, "_send_" + flow)(session, uri, spool)

    def _provider_send(self, method, url, what, headers=None, payload=None, slave=False):
        """One request to a storage provider (slave=True: a slave node, which
        answers with the site's envelope) through call_api, so it is retried
        alone after network failures, 408, 429 and 5xx (_classify_provider)
        until call_deadline plus a second per MB from now.  Returns the
        ProviderAnswer (status, header getter, body) for the flow to judge.  The
        metrics label is the kind of request; nothing of the URL's query or of
        the headers (signatures, credentials) reaches a log line."""
        length = payload.content_length if payload is not None else 0
        return self.call_api(CloudCall(
            method, url, "provider " + what.rstrip("0123456789 "), payload=payload,
            auth=False, expected=(CloudreveError,),
            deadline=time.monotonic() + self.call_deadline + length / 1e6,
            provider="%s %s" % (what, _redacted_url(url)), headers=headers or {},
            slave=slave, renew_on=(), final=()))

    @staticmethod
    def _provider_refusal(uri, what, status, raw):
        """A provider's 4xx as a one-line error: its error code, never the request."""
        text = raw[:2000].decode("utf-8", "replace")
        code = re.search(r"<Code>([^<]{1,64})</Code>", text) or \
            re.search(r'"(?:code|error)"\s*:\s*"?([A-Za-z0-9_.-]{1,64})', text)
        return CloudreveError("Cloudreve upload of %s: %s refused with HTTP %d%s"
                              % (uri, what, status, " (%s)" % code.group(1) if code else ""))

    def _send_remote(self, session, uri, spool):
        """A slave node: each chunk POSTed to upload_urls[0]?chunk=N with the
        session's credential as Authorization; the slave completes the upload
        with the master after the last one."""
        url, credential = session["upload_urls"][0], session.get("credential")
        if not isinstance(credential, str) or not credential:
            raise CloudreveError("Cloudreve upload of %s: the remote session has no "
                                 "credential" % uri)
        joiner = "&" if "?" in url else "?"

        def send(index, start, length):
            self._provider_send("POST", "%s%schunk=%d" % (url, joiner, index),
                                "slave chunk", {"Authorization": credential},
                                _SpoolSlice(spool, start, length), slave=True)
        self._send_last_alone(session, spool, send)

    def _send_s3(self, session, uri, spool):
        """S3-style multipart (s3, ks3, cos, oss, obs): each part PUT to its
        presigned URL (its ETag kept), then CompleteMultipartUpload at
        completeURL, then, for s3, ks3 and cos, Cloudreve's callback."""
        policy_type = session["storage_policy"]["type"]
        urls, complete_url = session["upload_urls"], session.get("completeURL")
        chunks = _cloudreve_chunks(spool.size, session["chunk_size"])
        if len(urls) != len(chunks) or not isinstance(complete_url, str):
            raise CloudreveError("Cloudreve upload of %s: the %s session offers %d part URLs "
                                 "for %d parts" % (uri, policy_type, len(urls), len(chunks)))

        def send(index, start, length, url):
            status, header, raw = self._provider_send(
                "PUT", url, "%s part %d" % (policy_type, index + 1),
                payload=_SpoolSlice(spool, start, length))
            etag = header("ETag")
            if status != 200 or not etag:
                raise self._provider_refusal(uri, "%s part %d" % (policy_type, index + 1),
                                             status, raw)
            return etag
        # parts in any order: the completion lists them
        etags = send_parts([chunk + (url,) for chunk, url in zip(chunks, urls)], send,
                           cloudreve_chunk_concurrency(session), "cloudreve-part")
        headers = {}
        if policy_type == "oss":
            # OSS lists the parts itself; an XML body would be refused with that header
            body = b""
            headers.update({"x-oss-forbid-overwrite": "true", "x-oss-complete-all": "yes"})
        else:
            body = ("<CompleteMultipartUpload>%s</CompleteMultipartUpload>" % "".join(
                "<Part><PartNumber>%d</PartNumber><ETag>%s</ETag></Part>"
                % (number, xml_escape(etag)) for number, etag in enumerate(etags, 1))
            ).encode("utf-8")
            if policy_type == "cos":
                headers["x-cos-forbid-overwrite"] = "true"
        self._complete_multipart(uri, policy_type, complete_url, headers, body)
        if policy_type in CLOUDREVE_CLIENT_CALLBACK_POLICIES:
            self._callback(session, "GET")

    def _complete_multipart(self, uri, policy_type, url, headers, body):
        """POST the completion.  NoSuchUpload means an earlier attempt (a retry
        after a lost answer) completed it: the callback, or the size check of
        upload(), tells whether the object is really there."""
        status, _, raw = self._provider_send("POST", url, "%s complete" % policy_type,
                                             headers, _BytesPayload(body))
        # S3 may answer 200 with an <Error> body when completion fails late
        if status == 200 and b"<Error>" not in raw[:4096]:
            return
        if status == 404 and b"NoSuchUpload" in raw:
            return
        raise self._provider_refusal(uri, "%s CompleteMultipartUpload" % policy_type,
                                     status, raw)

    def _callback(self, session, method):
        """Cloudreve's upload callback for this policy: it checks the object at the
        provider and completes the file.  The secret is a path segment of the
        route template, never in a log line."""
        self.call(method, "/callback/{policy}/{session_id}/{key}",
                  {"policy": session["storage_policy"]["type"],
                   "session_id": session["session_id"],
                   "key": session.get("callback_secret") or ""},
                  auth=False, expected=(CloudreveError,))

    def _send_onedrive(self, session, uri, spool):
        """OneDrive: byte ranges PUT to the upload URL with Content-Range, each a
        multiple of 320 KiB but the last; then Cloudreve's OneDrive callback."""
        if spool.size == 0:
            raise CloudreveError("Cloudreve upload of %s: OneDrive cannot take an empty "
                                 "file through an upload session" % uri)
        url = session["upload_urls"][0]
        fragment = session["chunk_size"]
        if not (0 < fragment <= ONEDRIVE_FRAGMENT_MAX and fragment % ONEDRIVE_FRAGMENT_UNIT == 0):
            fragment = ONEDRIVE_DEFAULT_FRAGMENT
        start = 0
        while start < spool.size:
            length = min(fragment, spool.size - start)
            status, _, raw = self._provider_send(
                "PUT", url, "onedrive range",
                {"Content-Range": "bytes %d-%d/%d" % (start, start + length - 1, spool.size)},
                _SpoolSlice(spool, start, length))
            if status in (200, 201, 202):
                start += length
                continue
            if status == 416:
                # an earlier attempt of this range arrived with its answer lost
                expected = self._onedrive_next(uri, url, spool.size)
                if start < expected <= start + length:
                    start = expected
                    continue
            raise self._provider_refusal(uri, "OneDrive range %d+%d" % (start, length),
                                         status, raw)
        self._callback(session, "POST")

    def _onedrive_next(self, uri, url, size):
        """Where the OneDrive session wants the next byte (size when it is done)."""
        status, _, raw = self._provider_send("GET", url, "onedrive status")
        if status == 404:
            return size             # finished: the item exists, the session is gone
        try:
            ranges = json.loads(raw.decode("utf-8")).get("nextExpectedRanges") or []
            return int(ranges[0].split("-")[0]) if ranges else size
        except (ValueError, AttributeError, IndexError):
            raise self._provider_refusal(uri, "OneDrive status", status, raw)

    def _send_qiniu(self, session, uri, spool):
        """Qiniu multipart v2: parts PUT to upload_urls[0]/N with the up-token,
        then the part list POSTed to upload_urls[0]; Qiniu calls the site back."""
        url, token = session["upload_urls"][0].rstrip("/"), session.get("credential") or ""
        auth = {"Authorization": "UpToken " + token}

        def send(index, start, length):
            status, _, raw = self._provider_send("PUT", "%s/%d" % (url, index + 1),
                                                 "qiniu part %d" % (index + 1), auth,
                                                 _SpoolSlice(spool, start, length))
            try:
                etag = json.loads(raw.decode("utf-8"))["etag"] if status == 200 else None
            except (ValueError, KeyError, TypeError):
                etag = None
            if not isinstance(etag, str):
                raise self._provider_refusal(uri, "qiniu part %d" % (index + 1), status, raw)
            return {"etag": etag, "partNumber": index + 1}
        parts = send_parts(_cloudreve_chunks(spool.size, session["chunk_size"]), send,
                           cloudreve_chunk_concurrency(session), "cloudreve-part")
        body = json.dumps({"parts": parts, "mimeType": session.get("mime_type")
                           or "application/octet-stream"}).encode("utf-8")
        status, _, raw = self._provider_send("POST", url, "qiniu complete", auth,
                                             _BytesPayload(body, "application/json"))
        if status == 612:
            return                  # completed by an attempt whose answer was lost (upload() checks)
        if status != 200:
            raise self._provider_refusal(uri, "qiniu completion", status, raw)

    def _send_upyun(self, session, uri, spool):
        """Upyun form upload: the policy and credential from the session, then the
        whole file, in one multipart POST; Upyun calls the site back."""
        fields = [("policy", session.get("upload_policy") or ""),
                  ("authorization", session.get("credential") or ""),
                  ("content-type", session.get("mime_type") or "application/octet-stream")]
        body = MultipartBody(fields, "file", uri.rsplit("/", 1)[-1], spool)
        status, _, raw = self._provider_send("POST", session["upload_urls"][0],
                                             "upyun form", payload=body)
        if status != 200:
            raise self._provider_refusal(uri, "upyun form upload", status, raw)

    def _send_chunks(self, session, spool):
        """Chunks of the session's chunk_size (the whole body if 0), in order, as
        many at once as the policy allows (spec 2.8, _send_last_alone); the last
        one completes the upload."""
        def send(index, start, length):
            # 40011 is what an expired token looks like here (spec 1.7): one fresh
            # token; if it persists, the session is gone.  "Lock expired" (40073)
            # on the last chunk is final for this session.  upload() decides what
            # a refusal means (and logs it).
            self.call("POST", "/file/upload/{session_id}/{index}",
                      {"session_id": session["session_id"], "index": index},
                      payload=_SpoolSlice(spool, start, length), expected=(CloudreveError,),
                      renew_on=(CLOUDREVE_CODE_SESSION_GONE,), final=(CLOUDREVE_CODE_LOCKED,),
                      deadline=time.monotonic() + self.call_deadline + length / 1e6)
        self._send_last_alone(session, spool, send)

    def _send_last_alone(self, session, spool, send):
        """send(index, start, length) for every chunk, started in order: with the
        policy's chunk concurrency (1: strictly one after the other), except the
        last, which completes the upload and so goes only after all others
        succeeded (before 4.18 it completed whatever had arrived)."""
        chunks = _cloudreve_chunks(spool.size, session["chunk_size"])
        send_parts(chunks[:-1], send, cloudreve_chunk_concurrency(session), "cloudreve-chunk")
        send(*chunks[-1])

    def _stored_anyway(self, uri, size):
        """After a failed chunk: the CloudreveFile if the upload did complete
        after all, else None."""
        try:
            return self._verify_upload(uri, size)
        except CloudreveError:
            return None

    def _policy_refusal(self, uri, error):
        """The error to raise for a refused upload session: one clear line for
        the policy filters (logged), the error itself otherwise."""
        reason = _CLOUDREVE_POLICY_REFUSALS.get(error.code)
        if reason is None:
            log.warning("%s", error)
            return error
        refusal = CloudreveError("Cloudreve refused the upload of %s (code %s): %s"
                                 % (uri, error.code, reason), error.code, error.endpoint)
        log.error("%s", refusal)
        return refusal

    def _verify_upload(self, uri, size):
        info = self.info(uri)
        uploading = CLOUDREVE_UPLOAD_META in (info.get("metadata") or {})
        if uploading:
            raise CloudreveUploadIncomplete(
                "Cloudreve upload of %s: every chunk was accepted but the site still shows "
                "an unfinished upload" % uri)
        if info.get("size") != size:
            raise CloudreveError("Cloudreve upload of %s: the site reports %s bytes, not %d"
                                 % (uri, info.get("size"), size))
        return CloudreveFile(info.get("id"), size, info.get("primary_entity"))

    def cancel_upload(self, session_id, uri):
        """Delete an upload session and its placeholder; failures only logged."""
        try:
            self.call("DELETE", "/file/upload", body={"id": session_id, "uri": uri},
                      expected=(CloudreveNotFound,),
                      deadline=time.monotonic() + min(15.0, self.call_deadline))
        except CloudreveNotFound:
            pass            # the placeholder is gone already
        except CloudreveError as e:
            log.warning("Cloudreve: could not cancel the upload session of %s: %s", uri, e)

    # -- deletes ---------------------------------------------------------------------

    def _delete_quietly(self, uri):
        try:
            self.delete([uri])
        except CloudreveNotFound:
            pass
        except CloudreveError as e:
            log.warning("Cloudreve: could not delete %s: %s", uri, e)

    def delete(self, uris):
        """Delete for good (no trash), up to CLOUDREVE_MAX_BATCH at a time.  A
        CloudreveError whose `items` name the URIs that failed (40016: gone
        already) when only some did."""
        self.call("DELETE", "/file", body={"uris": list(uris), "skip_soft_delete": True,
                                           "unlink": False},
                  expected=(CloudreveError,))

    # -- downloads -----------------------------------------------------------------

    def _new_download_url(self, uri, fresh):
        """A download link, reused until CLOUDREVE_LINK_MARGIN before its expiry;
        fresh=True asks the site for a new one."""
        data = self.call("POST", "/file/url", body={"uris": [uri], "no_cache": fresh},
                         expected=(CloudreveNotFound,))
        try:
            url = data["urls"][0]["url"]
            lifetime = parse_rfc3339(data["expires"]) - self.server_time()
        except (TypeError, KeyError, IndexError, ValueError, AttributeError):
            url, lifetime = None, 0
        if not isinstance(url, str) or not url.startswith(("http://", "https://")):
            raise CloudreveError("Cloudreve download link of %s: unusable answer" % uri)
        return self._on_site(url), lifetime - CLOUDREVE_LINK_MARGIN

    def _on_site(self, url):
        """A link to the site's own content route is fetched from the configured
        site address: only its path is signed (spec 2.14), and a site whose
        public URL setting is wrong hands out links to a host we cannot reach."""
        parts = urlsplit(url)
        if parts.path.startswith(CLOUDREVE_API + "/file/content/"):
            return self.site_url + parts.path + ("?" + parts.query if parts.query else "")
        return url

    def _check_download(self, uri, start, length, response):
        """An expired link answers HTTP 200 with a JSON envelope instead of the
        bytes (spec 2.14): that must never reach restic as data."""
        if not (response.header("Content-Type") or "").startswith("application/json"):
            return CloudClient._check_download(self, uri, start, length, response)
        try:
            envelope = _cloudreve_envelope(response, response.read_all(65536))
        except NETWORK_ERRORS as e:
            return _Transient.network(e)
        if envelope is None:
            return _Transient("HTTP %d with JSON that is not an envelope" % response.status)
        code = envelope["code"]
        reason = "the link answered code %s instead of the bytes" % code
        if code in _CLOUDREVE_STALE_LINK_CODES or code in _CLOUDREVE_AUTH_CODES:
            return _Transient(reason, "download_url")
        if code in _CLOUDREVE_BUSY_CODES:
            return _Transient(reason, "server_busy")
        raise CloudreveError("Cloudreve download of %s: %s" % (uri, reason), code)


class CloudreveIndex(FolderIndex):
    """The FolderIndex of a Cloudreve account: folders are keyed by their URI,
    the root is cloudreve://my."""

    ROOT_ID = CLOUDREVE_ROOT_URI

    def __init__(self, cache=None, namespace="cloudreve"):
        FolderIndex.__init__(self, cache, namespace)


def cloudreve_cache_namespace(site_url, email):
    """The metadata cache rows of one Cloudreve account."""
    return "cloudreve|%s|%s" % (site_url.rstrip("/"), email)


class CloudreveStorage(CloudStorage):
    """Repositories in a folder of a Cloudreve 4 site, laid out as restic's
    local backend does (see CloudStorage), under cloudreve://my/<repo-path>.

    Objects are addressed by URI, so no folder ids are needed: a folder whose
    parent was not listed is listed itself when first needed (a missing one
    holds nothing), and one whose listed parent lacks it is known to be empty
    without asking.  data/<xx> folders are created by the upload sessions
    themselves (they make missing parents).  Deletes skip the trash and are
    batched.  The storage policy id that upload sessions need is kept in the
    metadata cache beside the folders."""

    name = "cloudreve"
    label = "Cloudreve"
    not_found_type = CloudreveNotFound
    index_type = CloudreveIndex

    def __init__(self, client, repo_path=CLOUDREVE_DEFAULT_REPO_PATH, index=None,
                 refresh_seconds=0, warm_up_workers=CLOUDREVE_WARM_UP_WORKERS,
                 progress_interval=None):
        CloudStorage.__init__(self, client, split_cloudreve_path(repo_path),
                              index or CloudreveIndex(), refresh_seconds, warm_up_workers,
                              progress_interval)
        self._policy_id = None
        self._policy_lock = threading.Lock()
        self._deletes = _BatchQueue("Cloudreve", "delete", self._delete_batch,
                                    CLOUDREVE_MAX_BATCH)

    def describe(self):
        return "Cloudreve folder %s (%s at %s)" % (
            cloudreve_uri(self._base), self.client.email, self.client.site_url)

    # -- folders ---------------------------------------------------------------

    def _list_page(self, folder, cursor):
        try:
            entries, next_cursor, policy_id = self.client.list_page(folder, cursor)
        except CloudreveNotFound:
            return [], None             # a folder that does not exist holds nothing
        if policy_id and self._policy_id is None:
            self._remember_policy(policy_id)
        rows = [CacheEntry(e.name, True, cloudreve_child_uri(folder, e.name), 0, "")
                if e.is_folder else CacheEntry(e.name, False, e.file_id, e.size, e.entity or "")
                for e in entries if e.is_folder or not e.placeholder]
        return rows, next_cursor        # (a placeholder: an upload not (yet) complete)

    @staticmethod
    def _unlisted_child(parent, name):
        return cloudreve_child_uri(parent, name)

    def _warm_up_root(self):
        return self._resolve(self._base)    # addressable: no listing of its parents

    def _record_made_folders(self, path):
        """After an upload session or mkdir -p made the folders of `path` where
        they were missing: record those the index lacks (complete, that is
        empty but for what we add, where their listed parent did not have
        them).  The key of the last one."""
        folder = self.index.ROOT_ID
        for name in path:
            child = self.index.child_folder(folder, name)
            if child is None:
                child = cloudreve_child_uri(folder, name)
                self.index.record_folder(folder, name, child,
                                         created=self.index.is_loaded(folder))
            folder = child
        return folder

    @staticmethod
    def _file_key(folder, name, entry):
        return cloudreve_child_uri(folder, name)

    def _policy(self):
        if self._policy_id is None:
            with self._policy_lock:
                if self._policy_id is None:
                    self._remember_policy(self.index.setting("policy")
                                          or self.client.storage_policy(self._base))
        return self._policy_id

    def _remember_policy(self, policy_id):
        self._policy_id = policy_id
        if self.index.setting("policy") != policy_id:
            self.index.set_setting("policy", policy_id)

    # -- the Storage interface -------------------------------------------------

    def create_repository(self, repo):
        for kind in OBJECT_TYPES:
            path = self._base + tuple(repo) + (kind,)
            created = self.client.create_folder(cloudreve_uri(path))
            parent = self._record_made_folders(path[:-1])
            if self.index.child_folder(parent, kind) is None:
                self.index.record_folder(parent, kind, cloudreve_uri(path), created=created)

    def put(self, ref, spool):
        path = self._folder_path(ref.repo, ref.kind, ref.name)
        uri = cloudreve_uri(path + (ref.name,))
        with self._name_locks.hold(path + (ref.name,)):    # (else 40004 for the second)
            folder = self._resolve(path)
            existing = None
            if folder is not None:
                self._ensure_listed(folder)
                existing = self.index.file(folder, ref.name)
            if self._stored_meanwhile(ref, existing, spool):
                return
            entry = self.client.upload(uri, spool, self._policy(), replace=existing is not None)
            self.client.forget_download_url(uri)
            self.index.record_file(self._record_made_folders(path), ref.name, entry)

    def delete(self, ref):
        """True when the object was known to exist: gone already at the site (a
        retried call whose first answer was lost, or someone else) counts as
        deleted too."""
        folder, entry = self._lookup(ref)
        if entry is None:
            return False
        uri = cloudreve_child_uri(folder, ref.name)
        try:
            self._deletes.submit(uri)
        except CloudreveNotFound:
            log.info("Cloudreve: %s was already gone", ref)
        self.index.drop_file(folder, ref.name, entry.file_id)
        self.client.forget_download_url(uri)
        return True

    def _delete_batch(self, uris):
        """One delete call for queued URIs; {uri: error} of those that failed
        (CloudreveNotFound for the ones already gone)."""
        try:
            self.client.delete(uris)
            return {}
        except CloudreveError as e:
            failed = dict((unquote(uri), code) for uri, code in e.items.items())
            ours = dict((unquote(uri), uri) for uri in uris)
            if not failed or not set(failed) <= set(ours):
                raise           # the whole call failed (or an answer we cannot map)
            errors = {}
            for plain, code in failed.items():
                error_type = CloudreveNotFound if code == CLOUDREVE_CODE_NOT_FOUND \
                    else CloudreveError
                errors[ours[plain]] = error_type("Cloudreve delete of %s: code %s"
                                                 % (ours[plain], code), code)
            return errors

    def close(self):
        self._stop_warm_up()
        self._deletes.close()
        self.client.close()
        self._close_cache()


def cloudreve_site_given(args, environ):
    """True when a Cloudreve site comes from the command line or the environment:
    parse_config then picks the Cloudreve backend by default."""
    return bool(args.cloudreve_url or environ.get("CLOUDREVE_URL"))


def cloudreve_password(args, environ):
    """The password: --cloudreve-password, --cloudreve-password-file,
    CLOUDREVE_PASSWORD, CLOUDREVE_PASSWORD_FILE, the first one given; '' if none."""
    if args.cloudreve_password and args.cloudreve_password_file:
        raise UsageError("give --cloudreve-password or --cloudreve-password-file, not both")
    if args.cloudreve_password:
        return args.cloudreve_password
    if args.cloudreve_password_file:
        return read_password_file(args.cloudreve_password_file)
    if environ.get("CLOUDREVE_PASSWORD"):
        return environ["CLOUDREVE_PASSWORD"]
    if environ.get("CLOUDREVE_PASSWORD_FILE"):
        return read_password_file(environ["CLOUDREVE_PASSWORD_FILE"])
    return ""


def build_cloudreve_storage(args, environ=None):
    """A CloudreveStorage from parsed arguments (flags over environment);
    UsageError for missing settings or unusable values, never showing the
    password.  No network access here: the first request logs in."""
    environ = os.environ if environ is None else environ
    url = (args.cloudreve_url or environ.get("CLOUDREVE_URL", "")).strip().rstrip("/")
    if url.endswith(CLOUDREVE_API):     # the API address pasted instead of the site's
        url = url[:-len(CLOUDREVE_API)]
    user = args.cloudreve_user or environ.get("CLOUDREVE_USER", "")
    password = cloudreve_password(args, environ)
    missing = [what for what, value in (("--cloudreve-url (CLOUDREVE_URL)", url),
                                        ("--cloudreve-user (CLOUDREVE_USER)", user),
                                        ("a password (--cloudreve-password, "
                                         "--cloudreve-password-file, CLOUDREVE_PASSWORD or "
                                         "CLOUDREVE_PASSWORD_FILE)", password)) if not value]
    if missing:
        raise UsageError("the Cloudreve backend needs %s" % ", ".join(missing))
    check_cloud_url(url, "--cloudreve-url %r: expected the site's http(s) address",
                    "a Cloudreve site over https", need_host=True)
    repo_path = cloud_repo_path(args, environ, "CLOUDREVE_REPO_PATH", split_cloudreve_path)
    client = CloudreveClient(url, user, password, state_dir=args.state_dir)
    return cloud_storage_from_args(args, CloudreveStorage, client, repo_path,
                                   cloudreve_cache_namespace(client.site_url, user))


register_backend(Backend(
    "cloudreve", "Cloudreve", "on a Cloudreve 4 site", build_cloudreve_storage, [
        ("--cloudreve-url", dict(metavar="URL", help="the site's address, e.g. "
                                 "https://drive.example.com (or CLOUDREVE_URL)")),
        ("--cloudreve-user", dict(metavar="EMAIL", help="the account's email address "
                                                        "(or CLOUDREVE_USER)")),
        ("--cloudreve-password", dict(metavar="PASSWORD", help="its password (or "
                                      "CLOUDREVE_PASSWORD, preferable: other local users "
                                      "can read command lines)")),
        ("--cloudreve-password-file", dict(metavar="FILE", help="read the password from "
                                           "the first line of FILE (or "
                                           "CLOUDREVE_PASSWORD_FILE)"))],
    detect=cloudreve_site_given, detected_by="CLOUDREVE_URL or --cloudreve-url",
    repo_path_help="under cloudreve://my/ (or CLOUDREVE_REPO_PATH)"))


# ---------------------------------------------------------------------------
# 8. The repository service: what restic may do, independent of HTTP and storage
# ---------------------------------------------------------------------------

class RequestError(Exception):
    """A request the client must be told is wrong (status 4xx)."""

    def __init__(self, status, message, headers=None):
        Exception.__init__(self, message)
        self.status = status
        self.headers = headers or {}


class RepositoryUsage(object):
    """Bytes and object counts per repository, for --max-size and /metrics.

    A repository is counted from the storage (one listing per type) the first
    time it is touched, then kept up to date by this server's own writes and
    deletes; what others change behind the server's back is seen at the next
    start.  Uploads reserve their Content-Length before the body is read, so
    concurrent uploads cannot pass the quota check together."""

    def __init__(self, storage, max_size=0):
        self.storage = storage
        self.max_size = max_size
        self._lock = threading.Lock()
        self._bytes = {}        # repo -> bytes stored
        self._objects = {}      # repo -> {kind: count}
        self._reserved = collections.Counter()

    def _ensure(self, repo):
        with self._lock:
            if repo in self._bytes:
                return
        counts, total = {}, 0
        for kind in OBJECT_TYPES:
            count = 0
            for _, size in self.storage.list(repo, kind):
                count += 1
                total += size
            counts[kind] = count
        config_size = self.storage.stat(ObjectRef.config(repo))
        counts["config"] = int(config_size is not None)
        total += config_size or 0
        with self._lock:
            if repo not in self._bytes:     # another thread may have counted meanwhile
                self._bytes[repo], self._objects[repo] = total, counts

    def reserve(self, repo, nbytes):
        """Claim room for an upload; QuotaExceeded (507) when it cannot fit."""
        if not self.max_size:
            return
        self._ensure(repo)
        with self._lock:
            used = self._bytes[repo] + self._reserved[repo]
            if used + nbytes > self.max_size:
                raise QuotaExceeded("repository /%s: %d of %d bytes used, upload of %d refused"
                                    % ("/".join(repo), used, self.max_size, nbytes))
            self._reserved[repo] += nbytes

    def release(self, repo, nbytes):
        if self.max_size:
            with self._lock:
                self._reserved[repo] -= nbytes

    def changed(self, ref, size_delta, count_delta):
        with self._lock:
            if ref.repo in self._bytes:
                self._bytes[ref.repo] += size_delta
                kinds = self._objects[ref.repo]
                kinds[ref.kind] = kinds.get(ref.kind, 0) + count_delta

    def tracked(self):
        """{repo: (bytes, {kind: objects})} of the repositories counted so far."""
        with self._lock:
            return dict((r, (b, dict(self._objects[r]))) for r, b in self._bytes.items())

    def count(self, repo):
        self._ensure(repo)


class RepositoryService(object):
    """The repository view between the HTTP layer and the storage: what the
    handler reads and writes goes through here (stat, list, read, save,
    delete), with upload verification, the rule that an existing object is
    never silently replaced, the per-repository usage that quota and metrics
    read, and the blob and snapshot metrics."""

    def __init__(self, storage, verify_uploads=True, max_size=0, track_usage=False):
        self.storage = storage
        self.verify_uploads = verify_uploads
        self.usage = RepositoryUsage(storage, max_size)
        self.track_usage = track_usage or bool(max_size)

    def create_repository(self, repo):
        self.storage.create_repository(repo)
        if self.track_usage:
            self.usage.count(repo)

    def size_of(self, ref):
        """The size of an object; RequestError 404 when there is none."""
        size = self.storage.stat(ref)
        if size is None:
            raise RequestError(404, "%s not found" % (ref,))
        return size

    def list(self, repo, kind):
        """(name, size) of the objects of a type."""
        return self.storage.list(repo, kind)

    def list_names(self, repo, kind):
        """The names of the objects of a type."""
        return self.storage.list_names(repo, kind)

    def read(self, ref, start, length):
        """An iterator of byte chunks; count_read once they were all sent."""
        return self.storage.read(ref, start, length)

    def new_spool(self, ref, spool_dir=None):
        """An empty spool for an upload of ref, to be filled and then given to put()."""
        return self.storage.new_spool(ref, spool_dir)

    def count_read(self, ref, nbytes, user=None):
        self._count_blob("read", ref, nbytes, user)

    def metrics_text(self):
        """/metrics: the registry, with the usage of the repositories counted so far."""
        for repo, (nbytes, kinds) in self.usage.tracked().items():
            name = "/".join(repo)
            METRICS.set("restic123pan_repository_bytes", nbytes, repo=name)
            for kind, count in kinds.items():
                METRICS.set("restic123pan_repository_objects", count, repo=name, type=kind)
        return METRICS.render()

    @staticmethod
    def _count_blob(what, ref, nbytes, user):
        labels = {"user": user or "", "repo": "/".join(ref.repo), "type": ref.kind}
        METRICS.inc("rest_server_blob_%s_total" % what, 1, **labels)
        METRICS.inc("rest_server_blob_%s_bytes_total" % what, nbytes, **labels)

    def admit_upload(self, repo, nbytes):
        """Check the quota before a body is read; pair with finish_upload."""
        self.usage.reserve(repo, nbytes)

    def finish_upload(self, repo, nbytes):
        self.usage.release(repo, nbytes)

    def save(self, ref, spool, user=None):
        """Store a spooled upload.  Returns 'stored' or 'identical' (the same bytes
        were already there: restic's retry after a lost response)."""
        if ref.content_addressed and self.verify_uploads and spool.sha256 != ref.name:
            raise RequestError(400, "SHA-256 of the body is %s, not the name"
                               % spool.sha256)
        existing = self.storage.stat(ref)
        if existing is not None:
            if self._same_content(ref, existing, spool):
                return "identical"
            raise RequestError(403, "%s exists with different content" % (ref,))
        if self.track_usage:
            self.usage.count(ref.repo)
        self.storage.put(ref, spool)
        self.usage.changed(ref, spool.size, 1)
        self._count_blob("write", ref, spool.size, user)
        if ref.kind == "snapshots":
            METRICS.set("restic123pan_repository_last_snapshot_timestamp_seconds",
                        time.time(), repo="/".join(ref.repo))
        return "stored"

    def delete(self, ref, user=None):
        """Remove an object (idempotent); its size if it existed, else None."""
        size = self.storage.stat(ref)
        if not self.storage.delete(ref):
            return None
        self.usage.changed(ref, -(size or 0), -1)
        self._count_blob("delete", ref, size or 0, user)
        return size or 0

    def _same_content(self, ref, existing_size, spool):
        if existing_size != spool.size:
            return False
        if ref.content_addressed and self.verify_uploads:
            # The body hashes to the name and so, by restic's naming, did whatever
            # was stored there: no need to download it again.
            return True
        h = hashlib.sha256()
        for chunk in self.storage.read(ref, 0, existing_size):
            h.update(chunk)
        return h.hexdigest() == spool.sha256


# ---------------------------------------------------------------------------
# 9. Access control: users (htpasswd), rights, the access log file
# ---------------------------------------------------------------------------

class HtpasswdFile(object):
    """Users from an htpasswd file (`user:hash` lines, `#` comments).

    The file is re-read when its size, mtime or inode change (looked at, at most
    once a second, when someone logs in) and on SIGHUP; a file that cannot be
    re-read keeps the old users.  A verified login is remembered for a few
    minutes as a keyed digest of user, password and hash (never the password),
    so a slow bcrypt is paid once, not on every request restic makes."""

    CHECK_INTERVAL = 1.0
    REMEMBER_SECONDS = 300
    MAX_REMEMBERED = 10000

    def __init__(self, path):
        self.path = path
        self._lock = threading.Lock()
        self._users = {}
        self._signature = None
        self._check = Throttle()
        self._verified = {}
        self._key = os.urandom(32)
        self.reload()           # an unreadable file at start is the caller's error

    def reload(self):
        """Re-read the file if it changed; True if it did."""
        st = os.stat(self.path)
        signature = (st.st_size, st.st_mtime_ns, st.st_ino)
        if signature == self._signature:
            return False
        users = {}
        with open(self.path, encoding="utf-8", errors="replace") as f:
            for lineno, line in enumerate(f, 1):
                line = line.strip()
                if not line or line.startswith("#"):
                    continue
                user, sep, hashed = line.partition(":")
                if not sep or not _USER_NAME_RE.match(user):
                    log.warning("%s:%d: skipped: not a valid 'user:hash' line", self.path, lineno)
                    continue
                users[user] = hashed.strip()
                cost = re.match(r"\$2[aby]\$(\d\d)\$", hashed.strip())
                if cost and int(cost.group(1)) >= 10:
                    log.warning("%s:%d: bcrypt cost %s for %r takes seconds per login in pure "
                                "Python (remembered for %ds after that); cost 5 is htpasswd -B's "
                                "default", self.path, lineno, cost.group(1), user,
                                self.REMEMBER_SECONDS)
        with self._lock:
            self._users, self._signature = users, signature
            self._verified.clear()
        log.info("htpasswd %s: %d users", self.path, len(users))
        return True

    def _reload_if_changed(self):
        if not self._check.ready(time.monotonic(), self.CHECK_INTERVAL):
            return
        try:
            self.reload()
        except OSError as e:
            log.warning("htpasswd %s: cannot re-read it, keeping %d users: %s",
                        self.path, len(self._users), e)

    def check(self, user, password):
        """None when the password is right, else the reason (for the log only)."""
        self._reload_if_changed()
        with self._lock:
            hashed = self._users.get(user)
        if hashed is None:
            return "unknown user"
        digest = hmac.new(self._key, ("%s\0%s\0%s" % (user, password, hashed)).encode("utf-8"),
                          hashlib.sha256).digest()
        now = time.monotonic()
        with self._lock:
            if self._verified.get(digest, 0) > now:
                return None
        try:
            if not verify_password(password, hashed):
                return "wrong password"
        except UnsupportedHash:
            return "unsupported hash (%s)" % hashed[:6]
        with self._lock:
            if len(self._verified) >= self.MAX_REMEMBERED:
                self._verified.clear()
            self._verified[digest] = now + self.REMEMBER_SECONDS
        return None


class AccessRules(object):
    """What an authenticated user may do.

    --private-repos: a user may only use repositories under /<user>/.
    --append-only: nobody may delete anything but locks, except the users named in
    --full-access-users (say, a maintenance identity that runs forget --prune);
    --append-only-users marks single users append-only when the rest are not."""

    def __init__(self, private_repos=False, append_only=False, append_only_users=(),
                 full_access_users=()):
        self.private_repos = private_repos
        self.append_only = append_only
        self.append_only_users = frozenset(append_only_users)
        self.full_access_users = frozenset(full_access_users)

    def is_append_only(self, user):
        if user in self.full_access_users:
            return False
        return self.append_only or user in self.append_only_users

    def may_use(self, user, repo):
        return not self.private_repos or (bool(repo) and repo[0] == user)

    def may_delete(self, user, kind):
        return kind == "locks" or not self.is_append_only(user)


class AccessLogFile(object):
    """--log: one line per request in the Apache combined format."""

    def __init__(self, path):
        self._own = path != "-"
        self._file = open(path, "a", buffering=1, encoding="utf-8") if self._own else sys.stdout
        self._lock = threading.Lock()

    def write(self, host, user, request_line, status, size, referer, agent):
        stamp = time.strftime("%d/%b/%Y:%H:%M:%S %z")
        line = '%s - %s [%s] "%s" %s %d "%s" "%s"\n' % (
            host, user or "-", stamp, request_line.replace('"', "%22"), status, size,
            (referer or "-").replace('"', "%22"), (agent or "-").replace('"', "%22"))
        with self._lock:
            self._file.write(line)
            self._file.flush()

    def close(self):
        if self._own:
            self._file.close()


# ---------------------------------------------------------------------------
# 10. The REST request handler and the servers (TCP, TLS, unix socket, systemd).
#     Follows spec/restic-rest-protocol.md
# ---------------------------------------------------------------------------

MEDIA_V1 = "application/vnd.x.restic.rest.v1"
MEDIA_V2 = "application/vnd.x.restic.rest.v2"
MAX_REPO_DEPTH = 8
# Repository names no backend could hold "cannot exist": a 404 like any other
# impossible name.
_FORBIDDEN_IN_REPO_NAME = FORBIDDEN_IN_FOLDER_NAME
_PERCENT_RE = re.compile(r"%(?![0-9A-Fa-f]{2})")

Route = collections.namedtuple("Route", "repo kind name")
# kind None: the repository itself; name None: the collection of a type.

# The one place where what a storage failure means (section 3) becomes a status.
STATUS_OF_MEANING = {MISSING: 404, QUOTA: 507, UNAVAILABLE: 503, TIMED_OUT: 504,
                     REFUSED: 502, CACHE_TROUBLE: 500}


def storage_error_status(error):
    return STATUS_OF_MEANING.get(error.meaning, 502)


def parse_route(raw_target):
    """Turn the request target into a Route.

    Encoding tricks (dot segments, encoded slashes, NUL and control characters,
    bad escapes or UTF-8) are refused with 400 before anything else; a well-formed
    path naming something that cannot exist is 404, as in rest-server.  What
    authorisation and storage see is exactly this decoded, validated tuple."""
    path = raw_target.split("?", 1)[0]
    if not path.startswith("/"):
        raise RequestError(400, "request target must be an absolute path")
    if _PERCENT_RE.search(path):
        raise RequestError(400, "malformed percent-escape in path")
    segments = []
    raw_segments = path[1:].split("/")
    for i, raw in enumerate(raw_segments):
        try:
            seg = unquote_to_bytes(raw).decode("utf-8")
        except UnicodeDecodeError:
            raise RequestError(400, "path is not UTF-8")
        if seg == "" and i != len(raw_segments) - 1:
            raise RequestError(400, "empty path segment")
        if seg in (".", "..") or "/" in seg or "\\" in seg \
                or any(ord(c) < 0x20 or ord(c) == 0x7f for c in seg):
            raise RequestError(400, "forbidden path segment %r" % seg)
        segments.append(seg)
    trailing_slash = bool(segments) and segments[-1] == ""
    if trailing_slash:
        segments.pop()

    repo = []
    while segments and segments[0] not in ALL_KINDS:
        part = segments.pop(0)
        if part.startswith(".") or _FORBIDDEN_IN_REPO_NAME.intersection(part) \
                or len(part) > 200:
            raise RequestError(404, "impossible repository name %r" % part)
        repo.append(part)
    if len(repo) > MAX_REPO_DEPTH:
        raise RequestError(404, "repository path deeper than %d" % MAX_REPO_DEPTH)
    repo = tuple(repo)
    if not segments:
        return Route(repo, None, None)
    kind = segments.pop(0)
    if kind == "config":
        if segments or trailing_slash:
            raise RequestError(404, "no such path")
        return Route(repo, "config", "config")
    if not segments:
        if not trailing_slash:
            raise RequestError(404, "no such path (a listing ends with /)")
        return Route(repo, kind, None)
    name = segments.pop(0)
    if segments or trailing_slash or not is_object_id(name):
        raise RequestError(404, "not an object name")
    return Route(repo, kind, name)


class ConnectionLimits(collections.namedtuple(
        "ConnectionLimits", "header_timeout idle_timeout io_timeout max_connections",
        defaults=(DEFAULT_HEADER_TIMEOUT, DEFAULT_IDLE_TIMEOUT, DEFAULT_IO_TIMEOUT,
                  DEFAULT_MAX_CONNECTIONS))):
    """How long and how many: see DEFAULT_HEADER_TIMEOUT and its neighbours."""
    __slots__ = ()


class ConnectionSlots(object):
    """Counts open client connections (each one holds a thread) against the cap."""

    def __init__(self, maximum):
        self.maximum = maximum
        self._lock = threading.Lock()
        self.open = 0

    def take(self):
        with self._lock:
            if self.open >= self.maximum:
                return False
            self.open += 1
            return True

    def give_back(self):
        with self._lock:
            self.open -= 1


class DeadlineReader(io.RawIOBase):
    """The reading side of a client socket.  Each receive waits at most io_timeout
    seconds, and none may go on past `deadline` (time.monotonic(), or None): a
    per-receive timeout alone lets a client trickle a byte at a time forever.
    socket.timeout when either runs out.  Sends keep the io_timeout."""

    def __init__(self, sock, io_timeout):
        io.RawIOBase.__init__(self)
        self._sock = sock
        self.io_timeout = io_timeout
        self.deadline = None

    def readable(self):
        return True

    def readinto(self, buffer):
        timeout = self.io_timeout
        if self.deadline is not None:
            timeout = min(timeout, self.deadline - time.monotonic())
            if timeout <= 0:
                raise socket.timeout("request head not received in time")
        self._sock.settimeout(timeout)
        try:
            return self._sock.recv_into(buffer)
        finally:
            self._sock.settimeout(self.io_timeout)


def tls_handshake(sock, deadline):
    """Run the server side of a TLS handshake, done by `deadline` (monotonic) or
    socket.timeout, however slowly the client sends its part."""
    ssl = optional_module("ssl", "--tls")   # imported already: the socket is a TLS one
    sock.setblocking(False)
    try:
        with selectors.DefaultSelector() as selector:
            selector.register(sock, selectors.EVENT_READ)
            while True:
                try:
                    sock.do_handshake()
                    return
                except ssl.SSLWantReadError:
                    selector.modify(sock, selectors.EVENT_READ)
                except ssl.SSLWantWriteError:
                    selector.modify(sock, selectors.EVENT_WRITE)
                left = deadline - time.monotonic()
                if left <= 0 or not selector.select(left):
                    raise socket.timeout("TLS handshake not done in time")
    finally:
        sock.setblocking(True)


class MalformedHead(Exception):
    """A request head that must be refused with 400 and the connection closed."""


_FIELD_NAME_RE = re.compile(rb"\A[!#$%&'*+\-.^_`|~0-9A-Za-z]+\Z")


def read_request_head(stream, max_line=MAX_REQUEST_LINE, max_fields=MAX_HEADER_FIELDS,
                      max_bytes=MAX_HEAD_BYTES):
    """Read one request head (request line, header lines, empty line) from a
    buffered binary stream -> (request line, header block), or None when the
    connection ends before a request starts.  MalformedHead for a line or head
    over the limits, obsolete line folding, or a header line that is not
    `name: value`; ConnectionError when the client hangs up halfway."""
    line = stream.readline(max_line + 1)
    while line in (b"\r\n", b"\n"):           # RFC 9112 2.2: blank lines before a request
        line = stream.readline(max_line + 1)
    if not line:
        return None
    if len(line) > max_line:
        raise MalformedHead("request line longer than %d bytes" % max_line)
    if not line.endswith(b"\n"):
        raise ConnectionError("connection closed within the request line")
    if len(line.split()) != 3:      # method, target, version: no HTTP/0.9, no spaces
        raise MalformedHead("malformed request line %r" % line[:60])
    fields, total = [], len(line)
    while True:
        field = stream.readline(max_line + 1)
        total += len(field)
        if len(field) > max_line:
            raise MalformedHead("header line longer than %d bytes" % max_line)
        if total > max_bytes:
            raise MalformedHead("request head larger than %d bytes" % max_bytes)
        if not field.endswith(b"\n"):
            raise ConnectionError("connection closed within the request head")
        if field in (b"\r\n", b"\n"):
            break
        if field[:1] in (b" ", b"\t"):
            raise MalformedHead("obsolete line folding in the request head")
        name, colon, _ = field.partition(b":")
        if not colon or not _FIELD_NAME_RE.match(name):
            raise MalformedHead("malformed header line %r" % field[:60])
        if len(fields) >= max_fields:
            raise MalformedHead("more than %d header lines" % max_fields)
        fields.append(field)
    return line, b"".join(fields) + b"\r\n"


_DIGITS_RE = re.compile(r"\A[0-9]+\Z")


def framing_problem(headers):
    """Why a parsed request head cannot be framed safely (RFC 9112 6.3), or None:
    a proxy in front might read the body's length differently, and what it took
    for the next request would then be smuggled past it."""
    lengths = [v.strip() for field in headers.get_all("Content-Length") or []
               for v in field.split(",")]
    if lengths and "Transfer-Encoding" in headers:
        return "Content-Length together with Transfer-Encoding"
    if len(set(lengths)) > 1:
        return "conflicting Content-Length headers"
    if lengths and not _DIGITS_RE.match(lengths[0]):
        return "bad Content-Length %r" % lengths[0][:40]
    if len(headers.get_all("Host") or []) > 1:
        return "several Host headers"
    return None


def plain_response(status, message, headers=()):
    """A whole short text response that closes the connection, as bytes: for
    answers given before (or instead of) the request handler."""
    body = (message + "\n").encode("utf-8")
    reason = BaseHTTPRequestHandler.responses.get(status, ("",))[0]
    lines = ["HTTP/1.1 %d %s" % (status, reason), "Content-Type: text/plain; charset=utf-8",
             "Content-Length: %d" % len(body), "Connection: close"]
    lines.extend("%s: %s" % kv for kv in headers)
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body


LINGER_BYTES = 1024 * 1024
LINGER_SECONDS = 2.0


def linger_close(sock, io_timeout):
    """Before closing after an error answer: stop sending, then read and drop what
    the client still sends (at most LINGER_BYTES, LINGER_SECONDS), so the close
    does not reset the connection before the client has read the answer."""
    deadline = time.monotonic() + min(LINGER_SECONDS, io_timeout)
    dropped = 0
    try:
        socket.socket.shutdown(sock, socket.SHUT_WR)
        while dropped < LINGER_BYTES:
            left = deadline - time.monotonic()
            if left <= 0:
                break
            sock.settimeout(left)
            chunk = socket.socket.recv(sock, 65536)     # raw bytes, TLS or not
            if not chunk:
                break
            dropped += len(chunk)
    except OSError:
        pass


def turn_away(sock, tls):
    """Over --max-connections: a quick 503 with Retry-After, sent without blocking
    the accept loop (a TLS connection, whose handshake would block, is only
    closed).  What the client already sent is read first, so closing does not
    reset the connection under the answer."""
    if tls:
        return
    try:
        sock.setblocking(False)
        try:
            sock.recv(65536)
        except OSError:
            pass
        sock.send(plain_response(503, "too many connections; retry later",
                                 [("Retry-After", str(BUSY_RETRY_AFTER))]))
    except OSError:
        pass


class ResticHandler(BaseHTTPRequestHandler):
    """Speaks the restic REST protocol: parses, authenticates, applies the access
    rules and streams bodies.  Everything below is the service's business."""

    protocol_version = "HTTP/1.1"
    server_version = "restic-123pan/" + __version__
    sys_version = ""
    timeout = CLIENT_SOCKET_TIMEOUT

    # -- plumbing ----------------------------------------------------------

    def do_GET(self):
        self._dispatch()

    do_HEAD = do_POST = do_DELETE = do_PUT = do_PATCH = do_OPTIONS = do_TRACE = do_GET

    def log_request(self, code="-", size="-"):
        pass    # one access-log line per request is written by _dispatch

    def log_message(self, fmt, *args):
        log.debug("%s %s", self.address_string(), fmt % args)

    def address_string(self):
        addr = self.client_address
        return addr[0] if isinstance(addr, tuple) and addr else "unix"

    @property
    def service(self):
        return self.server.service

    def setup(self):
        # ResticServer.process_request counted this connection as busy at accept
        # time, so a shutdown that starts now still waits for its first request.
        self._busy = True
        limits = self.server.limits
        self.timeout = limits.io_timeout
        self._accepted = time.monotonic()
        self._requests = 0
        if self.server.tls_context is not None:
            # The handshake runs here, in the connection's own thread, so a slow
            # or hostile client cannot hold up the accept loop; it counts against
            # the header timeout.
            try:
                tls_handshake(self.request, self._accepted + limits.header_timeout)
            except (OSError, ValueError) as e:
                log.info("%s: TLS handshake failed: %s", self.address_string(), e)
                self._mark_idle()
                raise
        BaseHTTPRequestHandler.setup(self)
        self.rfile.close()          # the plain socket file: reads go through the deadline
        self._reader = DeadlineReader(self.connection, limits.io_timeout)
        self.rfile = io.BufferedReader(self._reader)

    def handle_one_request(self):
        """BaseHTTPRequestHandler's, with limits: the whole head must arrive in time
        (--header-timeout from the connection, or from the first byte of a later
        request; --idle-timeout in between) and be strictly framed, else the
        connection is closed (after a 400 for a malformed head)."""
        limits = self.server.limits
        reader = self._reader
        try:
            if self._requests:
                reader.deadline = time.monotonic() + limits.idle_timeout
                if not self.rfile.peek(1):
                    self.close_connection = True
                    return
                reader.deadline = time.monotonic() + limits.header_timeout
            else:
                reader.deadline = self._accepted + limits.header_timeout
            head = read_request_head(self.rfile)
        except MalformedHead as e:
            return self._refuse_head(400, str(e))
        except OSError as e:        # timeouts, resets, a client gone halfway
            log.debug("%s: connection closed before a whole request: %s",
                      self.address_string(), e)
            self.close_connection = True
            return
        finally:
            reader.deadline = None
        if head is None:
            self.close_connection = True
            return
        self._requests += 1
        self.raw_requestline, block = head
        try:
            problem = framing_problem(http.client.parse_headers(io.BytesIO(block)))
        except http.client.HTTPException as e:
            problem = "unreadable request head: %s" % e
        if problem:
            return self._refuse_head(400, problem)
        stream, self.rfile = self.rfile, io.BytesIO(block)
        try:
            parsed = self.parse_request()       # answers errors itself
        finally:
            self.rfile = stream
        if not parsed:
            self.close_connection = True
            return
        method = getattr(self, "do_" + self.command, None)
        if method is None:
            self.send_error(501, "unsupported method %r" % self.command)
            return
        method()
        self.wfile.flush()

    def _refuse_head(self, status, message):
        self.close_connection = True
        log.warning("%s: %d %s", self.address_string(), status, message)
        try:
            self.wfile.write(plain_response(status, message))
        except OSError:
            return
        linger_close(self.connection, self.server.limits.io_timeout)

    def finish(self):
        self._mark_idle()
        BaseHTTPRequestHandler.finish(self)

    def _mark_idle(self):
        if self._busy:
            self._busy = False
            self.server.tracker.leave()

    def _dispatch(self):
        started = time.monotonic()
        if not self._busy:
            self._busy = True
            self.server.tracker.enter()
        self._status = 0
        self._sent = 0
        self._user = None
        self._body_pending = ("Transfer-Encoding" in self.headers
                              or self.headers.get("Content-Length", "0").strip() not in ("", "0"))
        try:
            try:
                self._handle()
            except RequestError as e:
                self._fail(e.status, str(e), e.headers)
            except StorageError as e:
                log.warning("%s %s: storage: %s", self.command, self.path, e)
                self._fail(storage_error_status(e), "storage error: %s" % e)
            except (ConnectionError, socket.timeout) as e:
                self.close_connection = True
                log.info("%s %s: client connection lost: %s", self.command, self.path, e)
            except Exception:
                log.exception("%s %s: internal error", self.command, self.path)
                self._fail(500, "internal error")
            if self._body_pending:
                # The body was not consumed; the connection cannot carry another request.
                self.close_connection = True
            log.info('%s "%s %s" %s %d %dms', self.address_string(), self.command, self.path,
                     self._status or "-", self._sent, (time.monotonic() - started) * 1000)
            if self.server.access_log:
                self.server.access_log.write(
                    self.address_string(), self._user, self.requestline, self._status or "-",
                    self._sent, self.headers.get("Referer"), self.headers.get("User-Agent"))
        finally:
            # Busy until the log line is written, so a shutdown never closes the
            # log under a request that is still finishing.
            self._mark_idle()

    def _fail(self, status, message, headers=None):
        if self._status:
            # Headers already went out: the only honest signal left is to cut the
            # connection so the client sees a short body.
            self.close_connection = True
            log.warning("%s %s: failed after response started: %s",
                        self.command, self.path, message)
            return
        if status >= 500 or status in (400, 507):
            log.warning("%s %s: %d %s", self.command, self.path, status, message)
        else:
            log.debug("%s %s: %d %s", self.command, self.path, status, message)
        self._respond(status, (message + "\n").encode("utf-8"), "text/plain; charset=utf-8",
                      headers)

    def _start(self, status, length, content_type=None, headers=None):
        self._status = status
        self.send_response(status)
        if content_type:
            self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(length))
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        if self.close_connection or self._body_pending:
            self.send_header("Connection", "close")
        self.end_headers()

    def _respond(self, status, body=b"", content_type=None, headers=None):
        self._start(status, len(body), content_type, headers)
        if body and self.command != "HEAD":
            self.wfile.write(body)
            self._sent += len(body)

    # -- authentication and routing -----------------------------------------

    def _authenticate(self):
        """The user name, or None when authentication is off."""
        users = self.server.htpasswd
        if users is None:
            return None
        scheme, _, credentials = self.headers.get("Authorization", "").partition(" ")
        user, reason = None, "no Basic credentials"
        if scheme.lower() == "basic":
            try:
                # surrogateescape keeps a non-UTF-8 password's exact bytes for the hash
                decoded = base64.b64decode(credentials.strip(), validate=True).decode(
                    "utf-8", "surrogateescape")
            except ValueError:
                reason = "malformed Basic credentials"
            else:
                user, sep, password = decoded.partition(":")
                reason = users.check(user, password) if sep else "malformed Basic credentials"
        if reason:
            log.warning("%s: login failed for user %r: %s", self.address_string(), user, reason)
            raise RequestError(401, "authentication required",
                               {"WWW-Authenticate": 'Basic realm="restic"'})
        return user

    def _handle(self):
        options = self.server.options
        target = self.path.split("?", 1)[0]
        if options.prometheus and target == "/metrics":
            if not options.prometheus_no_auth:
                self._user = self._authenticate()
                if options.private_repos and self._user not in (None, "metrics"):
                    raise RequestError(403, "with --private-repos only user 'metrics' "
                                            "may read /metrics")
            return self._metrics()
        self._user = self._authenticate()
        route = parse_route(self.path)
        rules = self.server.rules
        if not rules.may_use(self._user, route.repo):
            raise RequestError(403, "user %r may not use repository /%s"
                               % (self._user, "/".join(route.repo)))
        method = self.command
        if route.kind is None:
            if method != "POST":
                raise RequestError(405, "only POST ?create=true on a repository",
                                   {"Allow": "POST"})
            return self._create_repository(route.repo)
        if route.name is None:
            if method != "GET":
                raise RequestError(405, "only GET on a listing", {"Allow": "GET"})
            return self._list(route.repo, route.kind)
        if method not in ("HEAD", "GET", "POST", "DELETE"):
            raise RequestError(405, "method not allowed",
                               {"Allow": "HEAD, GET, POST, DELETE"})
        if method == "DELETE" and not rules.may_delete(self._user, route.kind):
            raise RequestError(403, "append-only: %s may not be deleted" % route.kind)
        ref = ObjectRef(route.repo, route.kind, route.name)
        return getattr(self, "_object_" + method.lower())(ref)

    def _query(self):
        query = self.path.partition("?")[2]
        return dict(p.partition("=")[::2] for p in query.split("&") if p)

    # -- endpoints ------------------------------------------------------------

    def _create_repository(self, repo):
        if self._query().get("create") != "true":
            raise RequestError(400, "POST on a repository needs ?create=true")
        self._discard_body()
        self.service.create_repository(repo)
        self._respond(200)

    def _list(self, repo, kind):
        if self.headers.get("Accept", "").strip() == MEDIA_V2:
            self._send_listing(self.service.list(repo, kind), True)
        else:
            self._send_listing(self.service.list_names(repo, kind), False)

    LISTING_BATCH = 2048

    def _send_listing(self, entries, v2):
        """The JSON listing of (name, size) pairs (v2) or of names (v1), produced
        as the storage yields them: one batch of entries at a time, so memory
        stays flat whatever the repository size.  A listing that fits one batch
        goes out with a Content-Length; a longer one chunked (HTTP/1.1) or
        close-delimited (HTTP/1.0).  A failure after the first batch cuts the
        connection (see _fail): the client sees a broken response, never a
        complete but shorter list."""
        quote_name = json.encoder.encode_basestring
        if v2:
            entries = ('{"name":%s,"size":%d}' % (quote_name(name), size)
                       for name, size in entries)
        else:
            entries = map(quote_name, entries)

        def batch():
            return list(itertools.islice(entries, self.LISTING_BATCH))

        media = MEDIA_V2 if v2 else MEDIA_V1
        first = batch()     # failures so far still get an honest error status
        if len(first) < self.LISTING_BATCH:
            return self._respond(200, ("[%s]" % ",".join(first)).encode(), media)
        chunked = self.request_version == "HTTP/1.1"
        self._status = 200
        self.send_response(200)
        self.send_header("Content-Type", media)
        if chunked:
            self.send_header("Transfer-Encoding", "chunked")
        else:
            self.close_connection = True
        if self.close_connection or self._body_pending:
            self.send_header("Connection", "close")
        self.end_headers()
        piece, lead = first, "["
        while piece:
            data = (lead + ",".join(piece)).encode()
            lead = ","
            piece = batch()
            if not piece:
                data += b"]"
            self.wfile.write(b"%x\r\n%s\r\n" % (len(data), data) if chunked else data)
            self._sent += len(data)
        if chunked:
            self.wfile.write(b"0\r\n\r\n")

    def _object_head(self, ref):
        self._start(200, self.service.size_of(ref), "application/octet-stream")

    def _object_get(self, ref):
        size = self.service.size_of(ref)
        try:
            start, length, partial = parse_range(self.headers.get("Range"), size)
        except RangeNotSatisfiable:
            raise RequestError(416, "range outside the object",
                               {"Content-Range": "bytes */%d" % size})
        except ValueError as e:
            raise RequestError(400, str(e))
        chunks = self.service.read(ref, start, length)
        headers = {"Accept-Ranges": "bytes"}
        if partial:
            headers["Content-Range"] = "bytes %d-%d/%d" % (start, start + length - 1, size)
        try:
            self._start(206 if partial else 200, length, "application/octet-stream", headers)
            if not self._send_file(chunks, length):
                for chunk in chunks:
                    self.wfile.write(chunk)
                    self._sent += len(chunk)
        finally:
            close = getattr(chunks, "close", None)
            if close:
                close()
        if self._sent != length:
            self.close_connection = True
            raise StorageError("sent %d of %d bytes" % (self._sent, length))
        self.service.count_read(ref, length, self._user)

    def _send_file(self, chunks, length):
        """Send a local file's range zero-copy (os.sendfile) when the storage offers
        the file and the connection is a plain socket (not TLS); False otherwise,
        and the caller copies the chunks."""
        source = getattr(chunks, "file", None)
        if source is None or length == 0 or self.server.tls_context is not None \
                or not hasattr(os, "sendfile"):
            return False
        self._sent += self.connection.sendfile(source, chunks.start, length)
        return True

    def _object_post(self, ref):
        length = self._content_length()
        self.service.admit_upload(ref.repo, length)
        try:
            spool = self._read_body(length, ref)
            try:
                outcome = self.service.save(ref, spool, self._user)
            finally:
                spool.close()
        finally:
            self.service.finish_upload(ref.repo, length)
        if outcome == "identical":
            log.info("%s: identical re-upload accepted", ref)
        self._respond(200)

    def _object_delete(self, ref):
        self._discard_body()
        self.service.delete(ref, self._user)
        self._respond(200)

    def _metrics(self):
        if self.command not in ("GET", "HEAD"):
            raise RequestError(405, "only GET on /metrics", {"Allow": "GET"})
        self._respond(200, self.service.metrics_text().encode("utf-8"),
                      "text/plain; version=0.0.4")

    # -- bodies --------------------------------------------------------------

    def _content_length(self):
        if "Transfer-Encoding" in self.headers:
            raise RequestError(411, "chunked uploads are not supported; send Content-Length")
        text = self.headers.get("Content-Length")
        if text is None:
            raise RequestError(411, "Content-Length required")
        if not text.strip().isdigit():
            raise RequestError(400, "bad Content-Length %r" % text)
        return int(text)

    def _read_body(self, length, ref):
        spool = self.service.new_spool(ref, self.server.spool_dir)
        try:
            HashingSpool.from_stream(self.rfile, length, spool=spool)
        except ShortBody as e:
            raise RequestError(400, "upload incomplete: %s" % e)
        except DiskFull:
            self._body_pending = False      # copy_body read it all
            raise
        except socket.timeout:
            raise RequestError(408, "client stopped sending the body")
        self._body_pending = False
        return spool

    def _discard_body(self):
        length = int(self.headers.get("Content-Length") or 0)
        if length > 64 * 1024:
            return      # leave _body_pending set: the connection gets closed instead
        if length:
            self.rfile.read(length)
        self._body_pending = False


class RequestTracker(object):
    """Counts connections that are busy with a request (or accepted and not yet
    through their first one) so a shutdown can wait for them; idle keep-alive
    connections are not counted."""

    def __init__(self):
        self._cond = threading.Condition()
        self.active = 0

    def enter(self):
        with self._cond:
            self.active += 1

    def leave(self):
        with self._cond:
            self.active -= 1
            self._cond.notify_all()

    def wait_idle(self, timeout):
        deadline = time.monotonic() + timeout
        with self._cond:
            while self.active:
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._cond.wait(left)
        return True


def make_tls_context(cert_file, key_file, min_version="1.2"):
    ssl = optional_module("ssl", "--tls")
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3 if min_version == "1.3" else ssl.TLSVersion.TLSv1_2
    ctx.load_cert_chain(cert_file, key_file)
    return ctx


class ServerOptions(object):
    """What the handler needs to know of the command line; defaults = open server."""

    def __init__(self, **kw):
        self.prometheus = kw.get("prometheus", False)
        self.prometheus_no_auth = kw.get("prometheus_no_auth", False)
        self.private_repos = kw.get("private_repos", False)


class _ResticServerMixin(object):
    """What the TCP and unix-socket servers share: the service, users and rules,
    TLS wrapping, the busy-connection tracker and SIGHUP reloads."""

    daemon_threads = True       # idle keep-alive connections must not block exit
    # A burst of connections waits in the kernel (no thread) until the accept loop
    # takes it: admitted, or turned away with a 503 at once.
    request_queue_size = 1024

    def init_restic(self, service, htpasswd=None, rules=None, options=None, tls=None,
                    access_log=None, spool_dir=None, limits=None):
        self.service = service
        self.htpasswd = htpasswd
        self.rules = rules or AccessRules()
        self.options = options or ServerOptions()
        self.tls = tls              # (cert_file, key_file, min_version) or None
        self.tls_context = make_tls_context(*tls) if tls else None
        self.access_log = access_log
        self.spool_dir = spool_dir
        self.tracker = RequestTracker()
        self.limits = limits or ConnectionLimits()
        self.slots = ConnectionSlots(self.limits.max_connections)

    def get_request(self):
        sock, addr = self.socket.accept()
        ctx = self.tls_context
        if ctx is not None:
            sock = ctx.wrap_socket(sock, server_side=True, do_handshake_on_connect=False)
        return sock, addr

    def verify_request(self, request, client_address):
        """Over --max-connections a connection is turned away at once, in the accept
        loop, without a thread: threads never grow with an attack."""
        if self.slots.take():
            return True
        log.warning("%s: over --max-connections %d: answered 503", client_address,
                    self.slots.maximum)
        turn_away(request, self.tls_context is not None)
        return False

    def process_request(self, request, client_address):
        self.tracker.enter()    # released by the handler (see ResticHandler.setup)
        try:
            super(_ResticServerMixin, self).process_request(request, client_address)
        except BaseException:   # no thread started: nobody else gives these back
            self.tracker.leave()
            self.slots.give_back()
            raise

    def process_request_thread(self, request, client_address):
        try:
            super(_ResticServerMixin, self).process_request_thread(request, client_address)
        finally:
            self.slots.give_back()

    def handle_error(self, request, client_address):
        log.debug("connection from %s ended with an error", client_address, exc_info=True)

    def reload(self):
        """SIGHUP: re-read the htpasswd file and the TLS certificate."""
        if self.htpasswd is not None:
            try:
                self.htpasswd.reload()
            except OSError as e:
                log.warning("SIGHUP: htpasswd %s: %s (keeping the old users)",
                            self.htpasswd.path, e)
        if self.tls:
            try:
                self.tls_context = make_tls_context(*self.tls)
                log.info("SIGHUP: TLS certificate %s reloaded", self.tls[0])
            except OSError as e:    # ssl.SSLError included
                log.warning("SIGHUP: TLS certificate not reloaded: %s", e)


class ResticServer(_ResticServerMixin, ThreadingHTTPServer):
    """The server on a TCP address (plain HTTP or TLS)."""

    def __init__(self, address, service, bind_and_activate=True, **kw):
        if ":" in address[0]:
            self.address_family = socket.AF_INET6
        ThreadingHTTPServer.__init__(self, address, ResticHandler, bind_and_activate)
        self.init_restic(service, **kw)

    def base_url(self):
        host, port = self.server_address[:2]
        if host in ("0.0.0.0", "::", ""):
            host = "127.0.0.1"
        if ":" in host:
            host = "[%s]" % host
        return "%s://%s:%d/" % ("https" if self.tls else "http", host, port)


class ResticUnixServer(_ResticServerMixin, socketserver.ThreadingMixIn,
                       socketserver.UnixStreamServer):
    """The server on a unix socket (restic >= 0.17: rest:http+unix:///path:/)."""

    def __init__(self, path, service, bind_and_activate=True, **kw):
        self.owns_socket_file = bind_and_activate
        if bind_and_activate and os.path.exists(path):
            if not stat.S_ISSOCK(os.stat(path).st_mode):
                raise OSError(errno.EEXIST, "exists and is not a socket", path)
            os.unlink(path)     # left behind by a previous run
        socketserver.UnixStreamServer.__init__(self, path, ResticHandler, bind_and_activate)
        self.init_restic(service, **kw)

    def server_close(self):
        socketserver.UnixStreamServer.server_close(self)
        if self.owns_socket_file:
            remove_if_present(self.server_address)

    def base_url(self):
        return "http+unix://%s:/" % self.server_address


def systemd_socket(environ):
    """The listening socket systemd passed (LISTEN_FDS), or None."""
    if environ.get("LISTEN_PID", str(os.getpid())) != str(os.getpid()):
        return None
    count = int(environ.get("LISTEN_FDS", "0") or 0)
    if count == 0:
        return None
    if count != 1:
        raise UsageError("systemd passed %d sockets; exactly one is supported" % count)
    return socket.socket(fileno=3)     # SD_LISTEN_FDS_START


def make_server(args, service, environ, **kw):
    """The server for --listen (host:port or unix:/path) or the systemd socket."""
    inherited = systemd_socket(environ)
    if inherited is not None:
        if inherited.family == socket.AF_UNIX:
            server = ResticUnixServer(inherited.getsockname(), service, False, **kw)
        else:
            server = ResticServer(inherited.getsockname()[:2], service, False, **kw)
        server.socket.close()
        server.socket = inherited
        server.server_address = inherited.getsockname()
        return server
    if args.unix_socket:
        return ResticUnixServer(args.unix_socket, service, **kw)
    return ResticServer((args.listen_host, args.listen_port), service, **kw)


def tune_memory(trim=False):
    """glibc only, and only where ctypes exists (both optional: musl, python3-light):
    make large buffers come from mmap and go back to the system when freed, keep
    the threads to two malloc arenas, and with trim=True hand back what start-up
    freed (compiling this file alone leaves several MiB behind).  Measured: idle
    RSS about 8 MiB lower."""
    try:
        import ctypes
        libc = ctypes.CDLL(None)
        if trim:
            libc.malloc_trim(0)
        else:
            libc.mallopt(-3, IO_CHUNK // 2)     # M_MMAP_THRESHOLD: fixed, not adaptive
            libc.mallopt(-8, 2)                 # M_ARENA_MAX
    except (ImportError, OSError, AttributeError):
        pass


def is_local_address(address):
    """True for loopback TCP addresses and unix sockets (not reachable from others)."""
    if not isinstance(address, tuple):
        return True
    host = address[0]
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.split("%")[0]).is_loopback
    except ValueError:
        return False


# ---------------------------------------------------------------------------
# 11. Appendix: the password hash verifiers of htpasswd files (section 9 uses
#     verify_password); bcrypt per OpenBSD's bcrypt.c, apr1 / MD5-crypt per
#     Apache's apr_md5.c, SHA-crypt per Ulrich Drepper's specification
# ---------------------------------------------------------------------------

# Password hashes of htpasswd files: bcrypt, Apache MD5 (apr1) and MD5-crypt,
# SHA-256/512-crypt and {SHA}, in pure Python (the crypt module is gone in 3.13),
# so bcrypt's Blowfish is written out.  Every verifier compares with
# hmac.compare_digest; a stored value that cannot be checked raises UnsupportedHash,
# whose message never repeats it (it may be a plain-text password).

class UnsupportedHash(ValueError):
    """The stored hash has a format we do not verify (plain text, DES crypt, ...)
    or is malformed."""


_CRYPT_ALPHABET = "./0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"
_BCRYPT_ALPHABET = "./ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789"
_STANDARD_BASE64_ALPHABET = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/"
# bcrypt's radix-64 packs bits exactly like standard base64 and only renames the digits,
# so the C-speed base64 codec does the work after a translation.
_BCRYPT_TO_STANDARD = str.maketrans(_BCRYPT_ALPHABET, _STANDARD_BASE64_ALPHABET)
_STANDARD_TO_BCRYPT = bytes.maketrans(_STANDARD_BASE64_ALPHABET.encode(),
                                      _BCRYPT_ALPHABET.encode())

_WORD_MASK = 0xFFFFFFFF
_blowfish_pi_words = None


def _blowfish_initial_words():
    """Blowfish's initial P-array (18 words) then S-boxes (4 x 256 words): the first 8336 hex
    digits of pi's fractional part. Computed once (~60 ms) instead of embedding 8 KB of hex."""
    global _blowfish_pi_words
    if _blowfish_pi_words is None:
        count = 18 + 4 * 256
        guard_bits = 64  # absorbs the rounding error of the truncated series terms
        bits = 32 * count + guard_bits
        one = 1 << bits

        def arctan_of_inverse(x):  # arctan(1/x) * 2**bits by its Taylor series
            x_squared, term, total, divisor, sign = x * x, one // x, one // x, 1, 1
            while term:
                term //= x_squared
                divisor += 2
                sign = -sign
                total += sign * (term // divisor)
            return total

        pi = 16 * arctan_of_inverse(5) - 4 * arctan_of_inverse(239)  # Machin's formula
        fraction = (pi - (3 << bits)) >> guard_bits
        _blowfish_pi_words = struct.unpack(">%dI" % count, fraction.to_bytes(4 * count, "big"))
    return _blowfish_pi_words


# Blowfish state layout, chosen for the speed of the round function in CPython:
#  * F's input is never masked to 32 bits inside the 16 rounds; the sums there carry at most
#    two bits beyond bit 31, so the top-byte index reaches 1023 and S0 is stored four times
#    over (1024 entries). Values are masked once per block instead of once per round.
#  * S2 is a sparse 65536-entry list indexed by (x & 0xFF00), which saves a shift per round.
#  * S1 and S3 are plain 256-entry lists, P an 18-entry list.
def _blowfish_encrypt(left, right, p, s0, s1, s2, s3):
    left ^= p[0]
    for i in range(1, 17, 2):
        right ^= (s0[left >> 24] + s1[left >> 16 & 255] ^ s2[left & 0xFF00]) \
            + s3[left & 255] ^ p[i]
        left ^= (s0[right >> 24] + s1[right >> 16 & 255] ^ s2[right & 0xFF00]) \
            + s3[right & 255] ^ p[i + 1]
    return (right ^ p[17]) & _WORD_MASK, left & _WORD_MASK


def _eksblowfish_expand(state, key_words, salt_words):
    """ExpandKey(state, salt, key): XOR the 18 key words into P, then replace P and the S-boxes,
    in order, with successive encryptions, each block first XORed with the next salt pair
    (salt_words is None for the unsalted expansions of the cost loop)."""
    p, s0, s1, s2, s3 = state
    for i in range(18):
        p[i] ^= key_words[i]
    left = right = 0
    salt_index = 0  # the 16-byte salt is used as two alternating 64-bit halves
    for i in range(0, 18, 2):
        if salt_words:
            left ^= salt_words[salt_index]
            right ^= salt_words[salt_index + 1]
            salt_index ^= 2
        left, right = _blowfish_encrypt(left, right, p, s0, s1, s2, s3)
        p[i], p[i + 1] = left, right
    # P is fixed from here on: hold it in locals and unroll the 16 rounds (this loop is
    # where all the time goes: 512 blocks per expansion, 2**(cost+1) expansions).
    p0, p1, p2, p3, p4, p5, p6, p7, p8, p9, p10, p11, p12, p13, p14, p15, p16, p17 = p
    for box in range(4):
        for i in range(0, 256, 2):
            if salt_words:
                left ^= salt_words[salt_index]
                right ^= salt_words[salt_index + 1]
                salt_index ^= 2
            left ^= p0
            right ^= (s0[left >> 24] + s1[left >> 16 & 255] ^ s2[left & 0xFF00]) \
                + s3[left & 255] ^ p1
            left ^= (s0[right >> 24] + s1[right >> 16 & 255] ^ s2[right & 0xFF00]) \
                + s3[right & 255] ^ p2
            right ^= (s0[left >> 24] + s1[left >> 16 & 255] ^ s2[left & 0xFF00]) \
                + s3[left & 255] ^ p3
            left ^= (s0[right >> 24] + s1[right >> 16 & 255] ^ s2[right & 0xFF00]) \
                + s3[right & 255] ^ p4
            right ^= (s0[left >> 24] + s1[left >> 16 & 255] ^ s2[left & 0xFF00]) \
                + s3[left & 255] ^ p5
            left ^= (s0[right >> 24] + s1[right >> 16 & 255] ^ s2[right & 0xFF00]) \
                + s3[right & 255] ^ p6
            right ^= (s0[left >> 24] + s1[left >> 16 & 255] ^ s2[left & 0xFF00]) \
                + s3[left & 255] ^ p7
            left ^= (s0[right >> 24] + s1[right >> 16 & 255] ^ s2[right & 0xFF00]) \
                + s3[right & 255] ^ p8
            right ^= (s0[left >> 24] + s1[left >> 16 & 255] ^ s2[left & 0xFF00]) \
                + s3[left & 255] ^ p9
            left ^= (s0[right >> 24] + s1[right >> 16 & 255] ^ s2[right & 0xFF00]) \
                + s3[right & 255] ^ p10
            right ^= (s0[left >> 24] + s1[left >> 16 & 255] ^ s2[left & 0xFF00]) \
                + s3[left & 255] ^ p11
            left ^= (s0[right >> 24] + s1[right >> 16 & 255] ^ s2[right & 0xFF00]) \
                + s3[right & 255] ^ p12
            right ^= (s0[left >> 24] + s1[left >> 16 & 255] ^ s2[left & 0xFF00]) \
                + s3[left & 255] ^ p13
            left ^= (s0[right >> 24] + s1[right >> 16 & 255] ^ s2[right & 0xFF00]) \
                + s3[right & 255] ^ p14
            right ^= (s0[left >> 24] + s1[left >> 16 & 255] ^ s2[left & 0xFF00]) \
                + s3[left & 255] ^ p15
            left ^= (s0[right >> 24] + s1[right >> 16 & 255] ^ s2[right & 0xFF00]) \
                + s3[right & 255] ^ p16
            left, right = (right ^ p17) & _WORD_MASK, left & _WORD_MASK
            if box == 0:
                s0[i] = s0[i + 256] = s0[i + 512] = s0[i + 768] = left
                s0[i + 1] = s0[i + 257] = s0[i + 513] = s0[i + 769] = right
            elif box == 1:
                s1[i], s1[i + 1] = left, right
            elif box == 2:
                s2[i << 8], s2[(i + 1) << 8] = left, right
            else:
                s3[i], s3[i + 1] = left, right


def _bcrypt_digest(key, salt, cost):
    """The 23 bytes bcrypt encodes: EksBlowfishSetup(cost, salt, key), then
    "OrpheanBeholderScryDoubt" encrypted 64 times."""
    initial = _blowfish_initial_words()
    s2 = [0] * 65536
    s2[::256] = initial[530:786]
    state = (list(initial[:18]), list(initial[18:274]) * 4, list(initial[274:530]), s2,
             list(initial[786:]))
    key_words = struct.unpack(">18I", (key * (72 // len(key) + 1))[:72])  # key cycled to 72 bytes
    salt_words = struct.unpack(">4I", salt)
    salt_as_key_words = (salt_words * 5)[:18]
    _eksblowfish_expand(state, key_words, salt_words)
    for _ in range(1 << cost):
        _eksblowfish_expand(state, key_words, None)
        _eksblowfish_expand(state, salt_as_key_words, None)
    text = list(struct.unpack(">6I", b"OrpheanBeholderScryDoubt"))
    for i in (0, 2, 4):
        left, right = text[i], text[i + 1]
        for _ in range(64):
            left, right = _blowfish_encrypt(left, right, *state)
        text[i], text[i + 1] = left, right
    return struct.pack(">6I", *text)[:23]


_BCRYPT_RE = re.compile(r"\$2[aby]\$([0-9]{2})\$([./A-Za-z0-9]{22})([./A-Za-z0-9]{31})")


def bcrypt_verify(password, hashed):
    """Check bytes against a $2a$/$2b$/$2y$ hash (cost 4..31).

    The key is the password plus its NUL terminator, cut to 72 bytes. $2a$, $2b$ and $2y$ are
    computed alike, as Go's x/crypto/bcrypt (rest-server) and OpenWall's $2b$/$2y$ do. Two
    historical $2a$ variants are not emulated: OpenBSD before 2014 wrapped the length of
    passwords of 255+ bytes modulo 256 (the reason for $2b$), and OpenWall's $2a$ alters the
    key for passwords with a 0xFF byte before a high byte in a 4-byte group (never valid
    UTF-8). A NUL inside the password is kept, as Go does, rather than ending it as C would."""
    match = _BCRYPT_RE.fullmatch(hashed)
    if not match or not 4 <= int(match.group(1)) <= 31:
        raise UnsupportedHash("malformed bcrypt hash")
    # 22 radix-64 digits carry 132 bits; the 16-byte salt is the first 128.
    salt = base64.b64decode(match.group(2).translate(_BCRYPT_TO_STANDARD) + "==")
    digest = _bcrypt_digest((password + b"\0")[:72], salt, int(match.group(1)))
    computed = base64.b64encode(digest)[:31].translate(_STANDARD_TO_BCRYPT)
    return hmac.compare_digest(computed, match.group(3).encode("ascii"))


def _crypt_base64(digest, byte_order):
    """The radix-64 of the MD5/SHA crypt family: digest bytes taken in byte_order, three at a
    time as a big-endian number, written least significant 6 bits first."""
    chars = []
    for start in range(0, len(byte_order), 3):
        group = byte_order[start:start + 3]
        value = 0
        for index in group:
            value = value << 8 | digest[index]
        for _ in range(len(group) + 1):
            chars.append(_CRYPT_ALPHABET[value & 63])
            value >>= 6
    return "".join(chars)


# Byte orders fixed by the MD5-crypt code and by Drepper's SHA-crypt specification.
_MD5_CRYPT_BYTE_ORDER = (0, 6, 12, 1, 7, 13, 2, 8, 14, 3, 9, 15, 4, 10, 5, 11)
_SHA256_CRYPT_BYTE_ORDER = (0, 10, 20, 21, 1, 11, 12, 22, 2, 3, 13, 23, 24, 4, 14, 15, 25, 5,
                            6, 16, 26, 27, 7, 17, 18, 28, 8, 9, 19, 29, 31, 30)
_SHA512_CRYPT_BYTE_ORDER = (0, 21, 42, 22, 43, 1, 44, 2, 23, 3, 24, 45, 25, 46, 4, 47, 5, 26,
                            6, 27, 48, 28, 49, 7, 50, 8, 29, 9, 30, 51, 31, 52, 10, 53, 11, 32,
                            12, 33, 54, 34, 55, 13, 56, 14, 35, 15, 36, 57, 37, 58, 16, 59, 17, 38,
                            18, 39, 60, 40, 61, 19, 62, 20, 41, 63)
_MD5_CRYPT_RE = re.compile(r"\$(1|apr1)\$([^$]{0,8})\$([./0-9A-Za-z]{22})")


def _alternating_rounds(new_hash, password, salt, digest, rounds):
    """The stretching loop MD5-crypt introduced and SHA-crypt kept: each round
    hashes password and previous digest in an order set by i modulo 2, adding
    the salt unless i is a multiple of 3 and the password unless of 7."""
    for i in range(rounds):
        context = new_hash(password if i & 1 else digest)
        if i % 3:
            context.update(salt)
        if i % 7:
            context.update(password)
        context.update(digest if i & 1 else password)
        digest = context.digest()
    return digest


def _per_length_bit(context, length, for_one, for_zero):
    """The MD5- and SHA-crypt step that walks the password length bit by bit (lowest
    first), adding for_one or for_zero to the hash context; its digest."""
    while length:
        context.update(for_one if length & 1 else for_zero)
        length >>= 1
    return context.digest()


def _crypt_digest_matches(digest, byte_order, encoded):
    """Whether the final digest, in crypt's base64 and byte order, is `encoded`
    (compared in constant time)."""
    computed = _crypt_base64(digest, byte_order).encode("ascii")
    return hmac.compare_digest(computed, encoded.encode("ascii"))


def apr1_verify(password, hashed):
    """Check bytes against Apache's $apr1$ or its origin, FreeBSD's MD5-crypt $1$: the same
    algorithm, with the magic string mixed into the first digest."""
    match = _MD5_CRYPT_RE.fullmatch(hashed)
    if not match:
        raise UnsupportedHash("malformed MD5-crypt hash")
    magic = ("$%s$" % match.group(1)).encode("ascii")
    salt = match.group(2).encode("utf-8")
    alternate = hashlib.md5(password + salt + password).digest()
    context = hashlib.md5(password + magic + salt
                          + (alternate * (len(password) // 16 + 1))[:len(password)])
    # one byte per bit of the length: NUL for a 1 bit, the first password byte for 0
    digest = _per_length_bit(context, len(password), b"\0", password[:1])
    digest = _alternating_rounds(hashlib.md5, password, salt, digest, 1000)
    return _crypt_digest_matches(digest, _MD5_CRYPT_BYTE_ORDER, match.group(3))


_SHA_CRYPT_RE = re.compile(r"\$([56])\$(?:rounds=([0-9]{1,12})\$)?([^$]{0,16})\$([./0-9A-Za-z]+)")


def sha_crypt_verify(password, hashed):
    """Check bytes against $5$ (SHA-256-crypt) or $6$ (SHA-512-crypt), optional rounds=N$
    (default 5000, clamped to 1000..999999999 as the specification says)."""
    match = _SHA_CRYPT_RE.fullmatch(hashed)
    is_sha256 = match is not None and match.group(1) == "5"
    if not match or len(match.group(4)) != (43 if is_sha256 else 86):
        raise UnsupportedHash("malformed SHA-crypt hash")
    hash_function = hashlib.sha256 if is_sha256 else hashlib.sha512
    rounds = 5000 if match.group(2) is None else min(max(int(match.group(2)), 1000), 999999999)
    salt = match.group(3).encode("utf-8")

    def repeated(block, length):  # block repeated, then cut, to length bytes
        return (block * (length // len(block) + 1))[:length]

    alternate = hash_function(password + salt + password).digest()
    context = hash_function(password + salt + repeated(alternate, len(password)))
    # one addition per bit of the length: the alternate digest for 1, password for 0
    digest = _per_length_bit(context, len(password), alternate, password)
    password_bytes = repeated(hash_function(password * len(password)).digest(), len(password))
    salt_bytes = repeated(hash_function(salt * (16 + digest[0])).digest(), len(salt))
    digest = _alternating_rounds(hash_function, password_bytes, salt_bytes, digest, rounds)
    byte_order = _SHA256_CRYPT_BYTE_ORDER if is_sha256 else _SHA512_CRYPT_BYTE_ORDER
    return _crypt_digest_matches(digest, byte_order, match.group(4))


_SHA1_RE = re.compile(r"\{SHA\}([A-Za-z0-9+/]{27}=)")


def sha1_verify(password, hashed):
    """Check bytes against {SHA}: base64 of the unsalted SHA-1 of the password."""
    match = _SHA1_RE.fullmatch(hashed)
    if not match:
        raise UnsupportedHash("malformed {SHA} hash")
    computed = base64.b64encode(hashlib.sha1(password).digest())
    return hmac.compare_digest(computed, match.group(1).encode("ascii"))


_HASH_KINDS_BY_PREFIX = (
    ("$2a$", "bcrypt"), ("$2b$", "bcrypt"), ("$2y$", "bcrypt"), ("$apr1$", "apr1"),
    ("$1$", "md5-crypt"), ("$5$", "sha256-crypt"), ("$6$", "sha512-crypt"), ("{SHA}", "sha1"),
)
_VERIFIERS_BY_KIND = {
    "bcrypt": bcrypt_verify, "apr1": apr1_verify, "md5-crypt": apr1_verify,
    "sha256-crypt": sha_crypt_verify, "sha512-crypt": sha_crypt_verify, "sha1": sha1_verify,
}


def hash_kind(hashed):
    """Name the format of a stored hash, or raise UnsupportedHash (plain text, DES
    crypt, $2x$...)."""
    for prefix, kind in _HASH_KINDS_BY_PREFIX:
        if hashed.startswith(prefix):
            return kind
    raise UnsupportedHash("unsupported hash format")


def verify_password(password, hashed):
    """True if password (str, checked as its UTF-8 bytes; or bytes) matches the stored htpasswd
    hash. Raises UnsupportedHash for a format we cannot check or a malformed entry."""
    if isinstance(password, str):
        # surrogateescape gives back the exact bytes of a header decoded with that handler
        password = password.encode("utf-8", "surrogateescape")
    return _VERIFIERS_BY_KIND[hash_kind(hashed)](password, hashed)


# User names as rest-server accepts them: letters, digits, '@', '.', '_', '-'.
# Anything else (a '/' above all) could escape --private-repos.
_USER_NAME_RE = re.compile(r"\A[\w@.\-]+\Z")


# ---------------------------------------------------------------------------
# 12. main()
# ---------------------------------------------------------------------------

def load_users(args, listen_address):
    """The htpasswd users, or None when authentication is off.  Refuses an open
    server on an address others can reach."""
    if args.no_auth:
        return None
    path = args.htpasswd_file or args.default_htpasswd_file
    try:
        return HtpasswdFile(path)
    except OSError as e:
        if args.htpasswd_file or not isinstance(e, FileNotFoundError):
            raise UsageError("cannot read htpasswd file %s: %s" % (path, e.strerror or e))
    if args.private_repos or args.append_only_users or args.full_access_users:
        raise UsageError("--private-repos and per-user rights need users: create %s "
                         "(htpasswd -B) or name one with --htpasswd-file" % path)
    if not is_local_address(listen_address):
        raise UsageError("refusing to serve %s without authentication: create %s "
                         "(htpasswd -B -c %s USER) or pass --no-auth"
                         % (listen_address[0] or "every interface", path, path))
    log.info("no htpasswd file at %s: authentication is off (local address only)", path)
    return None


def main(argv=None, environ=None):
    """Parse, build, start, serve until SIGINT/SIGTERM, drain; the exit status."""
    environ = os.environ if environ is None else environ
    try:
        args = parse_config(sys.argv[1:] if argv is None else argv, environ)
    except UsageError as e:
        sys.stderr.write("restic_123pan.py: error: %s\n" % e)
        return 2
    logging.basicConfig(level=logging.DEBUG if args.debug else logging.INFO,
                        format="%(asctime)s %(levelname)s %(message)s", stream=sys.stderr)
    command = BACKENDS[args.backend].command
    status = command(args, environ) if command else None
    if status is not None:      # a one-shot job instead of serving (--verify-cloud)
        return status
    tune_memory()
    storage = server = None
    try:
        storage = with_local_copy(args, BACKENDS[args.backend].build(args, environ))
        server = _build_server(args, storage, environ)
    except (UsageError, OSError) as e:      # ssl.SSLError is an OSError
        if server is not None:
            server.server_close()
        if isinstance(e, UsageError):
            sys.stderr.write("restic_123pan.py: error: %s\n" % e)
            return 2
        sys.stderr.write("restic_123pan.py: error: cannot serve on %s: %s\n"
                         % (args.listen, getattr(e, "strerror", None) or e))
        return 1
    try:    # a cloud backend: its metadata cache opens, the warm-up starts
        storage.start(rebuild=args.rebuild_cache)
    except (OSError, StorageError, getattr(sqlite3, "Error", OSError)) as e:
        server.server_close()
        sys.stderr.write("restic_123pan.py: error: cannot start the %s backend: %s\n"
                         % (storage.name, e))
        return 1
    _install_signal_handlers(server)
    tune_memory(trim=True)
    _announce(server, storage)
    _serve_until_stopped(server, storage)
    log.info("stopped")
    return 0


# `python3 restic_123pan.py` keeps the syntax tree of this whole file alive for as
# long as the script runs (CPython frees it only when the script's module code
# returns): about 10 MiB of a server's idle memory.  So a direct run replaces
# itself, once, with a Python that compiles this file through runpy, where the
# tree is freed at once (and which is not a direct run: no loop).  Same process
# id, descriptors (systemd's socket), environment and arguments; costs one more
# compilation at start.

def exec_without_syntax_tree(script, argv):
    if not sys.executable:
        return
    boot = ("import runpy, sys; sys.argv = sys.argv[1:]; "
            "runpy.run_path(sys.argv[0], run_name='__main__')")
    try:
        import subprocess   # only for the interpreter's own flags (-X, -W, -B ...)
        flags = subprocess._args_from_interpreter_flags()
    except (ImportError, AttributeError):
        flags = []
    try:
        os.execv(sys.executable, [sys.executable] + flags + ["-c", boot, script] + argv)
    except OSError:
        pass            # run on as we are, tree and all


def _build_server(args, storage, environ):
    """The repository service on `storage` and the server that serves it."""
    service = RepositoryService(storage, verify_uploads=not args.no_verify_upload,
                                max_size=args.max_size, track_usage=args.prometheus)
    tls = (args.tls_cert, args.tls_key, args.tls_min_ver) if args.tls else None
    server = make_server(
        args, service, environ, tls=tls, spool_dir=args.spool_dir,
        limits=ConnectionLimits(args.header_timeout, args.idle_timeout, args.io_timeout,
                                args.max_connections),
        access_log=AccessLogFile(args.log) if args.log else None,
        rules=AccessRules(args.private_repos, args.append_only,
                          args.append_only_users, args.full_access_users),
        options=ServerOptions(prometheus=args.prometheus,
                              prometheus_no_auth=args.prometheus_no_auth,
                              private_repos=args.private_repos))
    try:
        server.htpasswd = load_users(args, server.server_address)
    except BaseException:
        server.server_close()
        raise
    return server


def _install_signal_handlers(server):
    """SIGINT/SIGTERM: no new connections, running requests finish; SIGHUP
    reloads the users."""
    stopping = threading.Event()

    def request_stop(signum, frame):
        if not stopping.is_set():
            stopping.set()
            log.info("signal %d: no new connections; finishing running requests", signum)
            # shutdown() waits for serve_forever() to return, which runs in this
            # (the main) thread: call it from another one.
            threading.Thread(target=server.shutdown, daemon=True).start()

    signal.signal(signal.SIGINT, request_stop)
    signal.signal(signal.SIGTERM, request_stop)
    if hasattr(signal, "SIGHUP"):
        signal.signal(signal.SIGHUP, lambda signum, frame: server.reload())


def _announce(server, storage):
    url = server.base_url()
    log.info("restic-123pan %s serving %s on %s (authentication %s)", __version__,
             storage.describe(), url, "on" if server.htpasswd else "off")
    sys.stdout.write("Serving %s\nUse: restic -r rest:%s init\n" % (storage.describe(), url))
    sys.stdout.flush()
    # rest-server's start line, which tools (restic's own REST backend tests among
    # them) wait for on stderr to learn the address of --listen :0
    address = server.server_address
    if isinstance(address, tuple):
        address = ("[%s]:%d" if ":" in address[0] else "%s:%d") % address[:2]
    sys.stderr.write("start server on %s\n" % address)
    sys.stderr.flush()


def _serve_until_stopped(server, storage):
    try:
        server.serve_forever(poll_interval=0.5)
    finally:
        server.server_close()
        if not server.tracker.wait_idle(SHUTDOWN_GRACE_SECONDS):
            log.warning("%d requests still running after %ds; exiting anyway",
                        server.tracker.active, SHUTDOWN_GRACE_SECONDS)
        storage.close()
        if server.access_log:
            server.access_log.close()


if __name__ == "__main__":
    if sys._getframe(0).f_back is None:     # run directly, not through runpy or -m
        exec_without_syntax_tree(os.path.abspath(__file__), sys.argv[1:])
    sys.exit(main())
