#!/usr/bin/env python3
"""restic-123pan: a restic REST server (protocol v1 and v2) whose storage is a local
folder, 123pan (123云盘) through its Open Platform API, or (later) Cloudreve 4.

One file, standard library only, CPython 3.8 to 3.13.  Run it with

    python3 restic_123pan.py                 # serves ./restic-data on 127.0.0.1:8000
    restic -r rest:http://127.0.0.1:8000/ init

The file reads top-down by layer:
  1. configuration and command line
  2. shared helpers (hashing spool, Range parsing)
  3. the storage interface (ObjectRef, Storage, errors)
  4. backends: LocalStorage
  5. the repository service (policy: verification, overwrite rules)
  6. the REST request handler and server
  7. main()
"""

import argparse
import collections
import errno
import hashlib
import json
import logging
import os
import re
import signal
import socket
import sys
import tempfile
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import unquote_to_bytes

__version__ = "0.1.0"

log = logging.getLogger("restic_123pan")

# ---------------------------------------------------------------------------
# 1. Configuration and command line
# ---------------------------------------------------------------------------

DEFAULT_LISTEN = "127.0.0.1:8000"
DEFAULT_LOCAL_PATH = "./restic-data"

# Bodies up to this size stay in memory while spooling; larger ones roll over to a
# temporary file, so memory stays bounded whatever the pack size and connection count.
SPOOL_MEMORY_LIMIT = 1024 * 1024
IO_CHUNK = 256 * 1024

# A stalled client may hold a worker thread no longer than this (seconds of socket
# silence); restic's own stall watchdog uses 5 minutes, so stay at that.
CLIENT_SOCKET_TIMEOUT = 300
# On SIGINT/SIGTERM running requests get this long to finish.
SHUTDOWN_GRACE_SECONDS = 30


class UsageError(Exception):
    """A command-line problem: reported as one line, exit code 2."""


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


def build_arg_parser():
    p = argparse.ArgumentParser(
        prog="restic_123pan.py",
        description="A restic REST server (protocol v1/v2) storing repositories in a "
        "local folder or on 123pan.",
        epilog="Then: restic -r rest:http://HOST:PORT/ init",
    )
    p.add_argument("--listen", metavar="ADDR",
                   help="address to listen on, host:port (default %s, or "
                        "LISTEN_ADDR / LISTEN_PORT from the environment)" % DEFAULT_LISTEN)
    p.add_argument("--backend", choices=("local",),
                   help="storage backend (default: local)")
    p.add_argument("--path", metavar="DIR",
                   help="local backend: folder holding the repositories (default %s)"
                        % DEFAULT_LOCAL_PATH)
    p.add_argument("--no-verify-upload", action="store_true",
                   help="do not check that an upload's SHA-256 equals its name")
    p.add_argument("--debug", action="store_true", help="log more detail")
    p.add_argument("--version", action="version",
                   version="restic-123pan %s" % __version__)
    return p


def parse_config(argv, environ):
    """Parse argv/environment into a namespace; raises UsageError on contradictions."""
    parser = build_arg_parser()
    args = parser.parse_args(argv)
    args.listen = args.listen or default_listen(environ)
    args.listen_host, args.listen_port = parse_listen_address(args.listen)
    args.backend = args.backend or "local"
    if args.backend == "local":
        args.path = args.path or DEFAULT_LOCAL_PATH
    return args


# ---------------------------------------------------------------------------
# 2. Shared helpers: hashing spool, Range parsing
# ---------------------------------------------------------------------------

class ShortBody(Exception):
    """The client sent fewer bytes than its Content-Length announced."""


class HashingSpool:
    """An upload body, read once from the client while MD5 and SHA-256 are computed
    in the same pass.  Small bodies stay in memory, large ones roll over to a
    temporary file.  Backends then read it back (several times if they must retry)
    with iter_range, which is safe to call from several threads."""

    def __init__(self, memory_limit=SPOOL_MEMORY_LIMIT, tmpdir=None):
        self._file = tempfile.SpooledTemporaryFile(max_size=memory_limit, dir=tmpdir)
        self._md5 = hashlib.md5()
        self._sha256 = hashlib.sha256()
        self._lock = threading.Lock()
        self.size = 0
        self.md5 = self.sha256 = None

    @classmethod
    def from_stream(cls, stream, length, memory_limit=SPOOL_MEMORY_LIMIT, tmpdir=None):
        """Spool exactly `length` bytes from `stream`; ShortBody if it ends early."""
        spool = cls(memory_limit, tmpdir)
        try:
            remaining = length
            while remaining:
                chunk = stream.read(min(IO_CHUNK, remaining))
                if not chunk:
                    raise ShortBody("body ended after %d of %d bytes"
                                    % (length - remaining, length))
                spool.write(chunk)
                remaining -= len(chunk)
            spool.finish()
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
        self._md5.update(chunk)
        self._sha256.update(chunk)
        self._file.write(chunk)
        self.size += len(chunk)

    def finish(self):
        self._file.flush()
        self.md5 = self._md5.hexdigest()
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
    pass


_RANGE_RE = re.compile(r"\Abytes=(\d*)-(\d*)\Z")


def parse_range(header, size):
    """Parse a single-range Range header against an object of `size` bytes.

    Returns (start, length, is_partial).  No header -> the whole object.  Raises
    ValueError for a malformed or multi-range header and RangeNotSatisfiable when
    the range starts at or past the end.  An end past the object is clamped (HTTP
    semantics; restic >= 0.17 then flags the short read itself)."""
    if header is None:
        return 0, size, False
    m = _RANGE_RE.match(header.strip())
    if not m or (not m.group(1) and not m.group(2)):
        raise ValueError("unsupported Range header %r" % header)
    first, last = m.group(1), m.group(2)
    if size == 0:
        # Like Go's ServeContent: a client that ranges every request gets the empty
        # body with 200 rather than a 416 for an empty object.
        return 0, 0, False
    if not first:                           # suffix range: the last N bytes
        n = int(last)
        if n == 0:
            raise RangeNotSatisfiable()
        start = max(0, size - n)
        return start, size - start, True
    start = int(first)
    if start >= size:
        raise RangeNotSatisfiable()
    end = size - 1 if not last else min(int(last), size - 1)
    if end < start:
        raise ValueError("Range end before start: %r" % header)
    return start, end - start + 1, True


# ---------------------------------------------------------------------------
# 3. The storage interface
# ---------------------------------------------------------------------------

OBJECT_TYPES = ("data", "keys", "locks", "snapshots", "index")
ALL_KINDS = ("config",) + OBJECT_TYPES
_ID_RE = re.compile(r"\A[0-9a-f]{64}\Z")


def is_object_id(name):
    return bool(_ID_RE.match(name))


class StorageError(Exception):
    """A failure of the storage below; `status` is what the REST layer answers."""
    status = 502


class NotFound(StorageError):
    status = 404


class UpstreamError(StorageError):
    """The cloud failed after retries (or answered something we cannot use)."""

    def __init__(self, message, status=502):
        StorageError.__init__(self, message)
        self.status = status


class QuotaExceeded(StorageError):
    status = 507


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


class Storage(object):
    """The one small interface every backend implements.

    Backends know nothing of HTTP; the REST layer knows nothing of backends.  All
    methods may be called from many threads at once."""

    name = "storage"

    def describe(self):
        """One line for the start-up log."""
        return self.name

    def create_repository(self, repo):
        """Prepare the folders of a repository; idempotent."""
        raise NotImplementedError

    def stat(self, ref):
        """Size in bytes, or None when the object does not exist."""
        raise NotImplementedError

    def list(self, repo, kind):
        """[(name, size)] of one type; [] when the folder is missing."""
        raise NotImplementedError

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

    def close(self):
        """Flush background work before the process exits."""


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


class LocalStorage(Storage):
    """Repositories in a folder, exactly as `restic -r /that/folder` lays them out
    (config, keys/, locks/, snapshots/, index/, data/<2 hex>/<id>), so the same
    folder can be opened by restic directly, or served as rest-server left it."""

    name = "local"
    TEMP_MARK = ".tmp-"

    def __init__(self, root):
        self.root = os.path.abspath(root)

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
        try:
            entries = list(os.scandir(folder))
        except (FileNotFoundError, NotADirectoryError):
            return []
        out = []
        for e in entries:
            if is_object_id(e.name) and e.is_file():
                try:
                    out.append((e.name, e.stat().st_size))
                except FileNotFoundError:   # deleted while we listed
                    pass
        return out

    def list(self, repo, kind):
        folder = self._dir_of(repo, kind)
        if kind != "data":
            return self._scan(folder)
        # Only the 2-hex sub-folders hold packs; stray files in data/ are ignored
        # as rest-server does.
        try:
            subdirs = [e.path for e in os.scandir(folder)
                       if len(e.name) == 2 and e.is_dir()]
        except (FileNotFoundError, NotADirectoryError):
            return []
        out = []
        for sub in sorted(subdirs):
            out.extend(self._scan(sub))
        return out

    def read(self, ref, start, length):
        try:
            f = open(self.path_of(ref), "rb")
        except (FileNotFoundError, NotADirectoryError):
            raise NotFound(str(ref))
        return self._iter_file(f, start, length)

    @staticmethod
    def _iter_file(f, start, length):
        with f:
            f.seek(start)
            remaining = length
            while remaining > 0:
                chunk = f.read(min(IO_CHUNK, remaining))
                if not chunk:
                    raise IOError("file shrank while being read")
                remaining -= len(chunk)
                yield chunk

    def put(self, ref, spool):
        folder = self._dir_of(ref.repo, ref.kind, ref.name)
        final = os.path.join(folder, ref.name)
        try:
            os.makedirs(folder, mode=0o700, exist_ok=True)
            # The temporary name starts with a dot and is never a valid id, so a
            # listing (ours or restic's) never shows a partial object.
            fd, tmp = tempfile.mkstemp(prefix="." + ref.name[:16] + self.TEMP_MARK,
                                       dir=folder)
        except OSError as e:
            raise self._os_error(e, ref)
        try:
            with os.fdopen(fd, "wb") as f:
                for chunk in spool.iter_range():
                    f.write(chunk)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, final)
        except BaseException as e:
            try:
                os.unlink(tmp)
            except OSError:
                pass
            if isinstance(e, OSError):
                raise self._os_error(e, ref)
            raise
        fsync_directory(folder)

    @staticmethod
    def _os_error(e, ref):
        if e.errno in (errno.ENOSPC, errno.EDQUOT):
            return QuotaExceeded("%s: %s" % (ref, e.strerror))
        return StorageError("%s: %s" % (ref, e))

    def delete(self, ref):
        try:
            os.unlink(self.path_of(ref))
        except (FileNotFoundError, NotADirectoryError):
            return False
        return True


# ---------------------------------------------------------------------------
# 5. The repository service: what restic may do, independent of HTTP and storage
# ---------------------------------------------------------------------------

class RequestError(Exception):
    """A request the client must be told is wrong (status 4xx)."""

    def __init__(self, status, message, headers=None):
        Exception.__init__(self, message)
        self.status = status
        self.headers = headers or {}


class RepositoryService(object):
    """Policy between the HTTP layer and the storage: upload verification and the
    rule that an existing object is never silently replaced."""

    def __init__(self, storage, verify_uploads=True):
        self.storage = storage
        self.verify_uploads = verify_uploads

    def save(self, ref, spool):
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
        self.storage.put(ref, spool)
        return "stored"

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
# 6. The REST request handler and server
# ---------------------------------------------------------------------------

MEDIA_V1 = "application/vnd.x.restic.rest.v1"
MEDIA_V2 = "application/vnd.x.restic.rest.v2"
MAX_REPO_DEPTH = 8
# Characters no cloud drive here accepts in a folder name; such repositories
# "cannot exist", which is a 404 like any other impossible name.
_FORBIDDEN_IN_REPO_NAME = set('\\:*?"<>|')
_PERCENT_RE = re.compile(r"%(?![0-9A-Fa-f]{2})")

Route = collections.namedtuple("Route", "repo kind name")
# kind None: the repository itself; name None: the collection of a type.


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


class ResticHandler(BaseHTTPRequestHandler):
    """Speaks the restic REST protocol; everything below is the service's business."""

    protocol_version = "HTTP/1.1"
    server_version = "restic-123pan/" + __version__
    sys_version = ""
    timeout = CLIENT_SOCKET_TIMEOUT

    # -- plumbing ----------------------------------------------------------

    def do_GET(self):
        self._dispatch()

    do_HEAD = do_POST = do_DELETE = do_GET

    def do_PUT(self):
        self._dispatch()

    do_PATCH = do_OPTIONS = do_TRACE = do_PUT

    def log_request(self, code="-", size="-"):
        pass    # one access-log line per request is written by _dispatch

    def log_message(self, fmt, *args):
        log.debug("%s %s", self.address_string(), fmt % args)

    @property
    def service(self):
        return self.server.service

    def setup(self):
        BaseHTTPRequestHandler.setup(self)
        # ResticServer.process_request counted this connection as busy at accept
        # time, so a shutdown that starts now still waits for its first request.
        self._busy = True

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
        self._body_pending = ("Transfer-Encoding" in self.headers
                              or self.headers.get("Content-Length", "0").strip() not in ("", "0"))
        try:
            try:
                self._handle()
            except RequestError as e:
                self._fail(e.status, str(e), e.headers)
            except StorageError as e:
                log.warning("%s %s: storage: %s", self.command, self.path, e)
                self._fail(e.status, "storage error: %s" % e)
            except (ConnectionError, socket.timeout) as e:
                self.close_connection = True
                log.info("%s %s: client connection lost: %s", self.command, self.path, e)
            except Exception:
                log.exception("%s %s: internal error", self.command, self.path)
                self._fail(500, "internal error")
        finally:
            self._mark_idle()
        if self._body_pending:
            # The body was not consumed; the connection cannot carry another request.
            self.close_connection = True
        log.info('%s "%s %s" %s %d %dms', self.client_address[0] if self.client_address else "-",
                 self.command, self.path, self._status or "-", self._sent,
                 (time.monotonic() - started) * 1000)

    def _fail(self, status, message, headers=None):
        if self._status:
            # Headers already went out: the only honest signal left is to cut the
            # connection so the client sees a short body.
            self.close_connection = True
            log.warning("%s %s: failed after response started: %s",
                        self.command, self.path, message)
            return
        if status >= 500 or status == 400:
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

    # -- routing -----------------------------------------------------------

    def _handle(self):
        route = parse_route(self.path)
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
        ref = ObjectRef(route.repo, route.kind, route.name)
        return getattr(self, "_object_" + method.lower())(ref)

    def _query(self):
        query = self.path.partition("?")[2]
        return dict(p.partition("=")[::2] for p in query.split("&") if p)

    def _create_repository(self, repo):
        if self._query().get("create") != "true":
            raise RequestError(400, "POST on a repository needs ?create=true")
        self._discard_body()
        self.service.storage.create_repository(repo)
        self._respond(200)

    def _list(self, repo, kind):
        entries = self.service.storage.list(repo, kind)
        if self.headers.get("Accept", "").strip() == MEDIA_V2:
            media, payload = MEDIA_V2, [{"name": n, "size": s} for n, s in entries]
        else:
            media, payload = MEDIA_V1, [n for n, _ in entries]
        self._respond(200, json.dumps(payload, separators=(",", ":")).encode(), media)

    def _object_head(self, ref):
        size = self.service.storage.stat(ref)
        if size is None:
            raise RequestError(404, "%s not found" % (ref,))
        self._start(200, size, "application/octet-stream")

    def _object_get(self, ref):
        size = self.service.storage.stat(ref)
        if size is None:
            raise RequestError(404, "%s not found" % (ref,))
        try:
            start, length, partial = parse_range(self.headers.get("Range"), size)
        except RangeNotSatisfiable:
            raise RequestError(416, "range outside the object",
                               {"Content-Range": "bytes */%d" % size})
        except ValueError as e:
            raise RequestError(400, str(e))
        chunks = self.service.storage.read(ref, start, length)
        headers = {"Accept-Ranges": "bytes"}
        if partial:
            headers["Content-Range"] = "bytes %d-%d/%d" % (start, start + length - 1, size)
        try:
            self._start(206 if partial else 200, length, "application/octet-stream", headers)
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

    def _object_post(self, ref):
        spool = self._read_body()
        try:
            outcome = self.service.save(ref, spool)
        finally:
            spool.close()
        if outcome == "identical":
            log.info("%s: identical re-upload accepted", ref)
        self._respond(200)

    def _object_delete(self, ref):
        self._discard_body()
        self.service.storage.delete(ref)
        self._respond(200)

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

    def _read_body(self):
        length = self._content_length()
        try:
            spool = HashingSpool.from_stream(self.rfile, length,
                                             tmpdir=self.server.spool_dir)
        except ShortBody as e:
            raise RequestError(400, "upload incomplete: %s" % e)
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


class ResticServer(ThreadingHTTPServer):
    daemon_threads = True       # idle keep-alive connections must not block exit
    request_queue_size = 64

    def __init__(self, address, service, spool_dir=None):
        if ":" in address[0]:
            self.address_family = socket.AF_INET6
        ThreadingHTTPServer.__init__(self, address, ResticHandler)
        self.service = service
        self.spool_dir = spool_dir
        self.tracker = RequestTracker()

    def process_request(self, request, client_address):
        self.tracker.enter()    # released by the handler (see ResticHandler.setup)
        ThreadingHTTPServer.process_request(self, request, client_address)

    def base_url(self):
        host, port = self.server_address[:2]
        if host in ("0.0.0.0", "::", ""):
            host = "127.0.0.1"
        if ":" in host:
            host = "[%s]" % host
        return "http://%s:%d/" % (host, port)


# ---------------------------------------------------------------------------
# 7. main()
# ---------------------------------------------------------------------------

def build_storage(args):
    if args.backend == "local":
        return LocalStorage(args.path)
    raise UsageError("unknown backend %r" % args.backend)


def main(argv=None, environ=None):
    environ = os.environ if environ is None else environ
    try:
        args = parse_config(sys.argv[1:] if argv is None else argv, environ)
    except UsageError as e:
        sys.stderr.write("restic_123pan.py: error: %s\n" % e)
        return 2
    logging.basicConfig(level=logging.DEBUG if args.debug else logging.INFO,
                        format="%(asctime)s %(levelname)s %(message)s", stream=sys.stderr)
    try:
        storage = build_storage(args)
    except UsageError as e:
        sys.stderr.write("restic_123pan.py: error: %s\n" % e)
        return 2
    service = RepositoryService(storage, verify_uploads=not args.no_verify_upload)
    try:
        server = ResticServer((args.listen_host, args.listen_port), service)
    except OSError as e:
        sys.stderr.write("restic_123pan.py: error: cannot listen on %s: %s\n"
                         % (args.listen, e.strerror or e))
        return 1

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

    url = server.base_url()
    log.info("restic-123pan %s serving %s on %s", __version__, storage.describe(), url)
    sys.stdout.write("Serving %s\nUse: restic -r rest:%s init\n" % (storage.describe(), url))
    sys.stdout.flush()
    try:
        server.serve_forever(poll_interval=0.5)
    finally:
        server.server_close()
        if not server.tracker.wait_idle(SHUTDOWN_GRACE_SECONDS):
            log.warning("%d requests still running after %ds; exiting anyway",
                        server.tracker.active, SHUTDOWN_GRACE_SECONDS)
        storage.close()
    log.info("stopped")
    return 0


if __name__ == "__main__":
    sys.exit(main())
