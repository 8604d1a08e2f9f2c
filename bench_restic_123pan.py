#!/usr/bin/env python3
"""The 123pan request budget of restic-123pan, measured (a benchmark, not a test).

    python3 bench_restic_123pan.py                # 5000 extra objects, about 5 minutes
    python3 bench_restic_123pan.py --objects 20000

Runs the real server (restic_123pan.py, as a process) against the 123pan emulator
of test_restic_123pan.py with the free-tier request rates enforced, and the real
restic against the server.  The repository is made by restic (init and a first
backup), then `--objects` more packs are put straight into the emulator's data/xx
folders: unreferenced packs, as an interrupted backup leaves them, which the
final prune deletes.  Per step it prints the wall time and the API calls by
endpoint, and checks them against the budget:

  cold start      an empty metadata cache (the token file kept): list calls =
                  the pages of the tree, nothing else; `restic snapshots`, started
                  at once, is answered while the data folders are still listed
  warm restart    0 list calls before serving, and none for `restic snapshots`
  backup          new data: at most one upload call per new object plus a constant
                  (token, upload domain), 0 list calls, no call for a HEAD request
  restore, check  `restic restore` and `check --read-data`: at most one
                  download_info per object read (download URLs live 5 minutes)
  forget --prune  (the first snapshot, and with it the unreferenced packs) D objects
                  deleted: about 2 * ceil(D / 100) trash and delete calls

Standard library only; needs `restic` on the PATH.  Exit status 1 if a figure
does not hold.
"""

import argparse
import hashlib
import json
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

import restic_123pan as rp                                           # noqa: E402
from test_restic_123pan import (Pan123Emulator, emulator_list_pages,   # noqa: E402
                                make_tree, manifest, read_server_url)

LIST = "/api/v2/file/list"
UPLOADS = ("/upload/v2/file/single/create", "/upload/v2/file/create",
           "/upload/v2/file/slice", "/upload/v2/file/upload_complete")
ACCESS_RE = re.compile(r'"(\w+) (\S+) HTTP/[\d.]+" (\d{3}) ')
REPO = "bench/"


class Bench(object):

    def __init__(self, objects, workdir):
        self.objects = objects
        self.tmp = workdir
        self.state = os.path.join(self.tmp, "state")
        self.access_log = os.path.join(self.tmp, "access.log")
        self.server_log = os.path.join(self.tmp, "server.log")
        self.env = dict(os.environ, RESTIC_PASSWORD="bench",
                        RESTIC_CACHE_DIR=os.path.join(self.tmp, "restic-cache"))
        self.emu = Pan123Emulator().start()       # the free tier's request rates
        self.proc = None
        self.url = None
        self.failures = []
        self.rows = []

    # -- the server and restic ---------------------------------------------------

    def start_server(self):
        self.log_offset = os.path.getsize(self.server_log) if os.path.exists(
            self.server_log) else 0
        self.started = time.monotonic()
        with open(self.server_log, "a") as log_file:
            self.proc = subprocess.Popen(
                [sys.executable, os.path.join(HERE, "restic_123pan.py"), "--listen",
                 "127.0.0.1:0", "--backend", "123pan", "--api-base", self.emu.api_base,
                 "--client-id", "emu-client", "--state-dir", self.state,
                 "--log", self.access_log],
                stdout=subprocess.PIPE, stderr=log_file, universal_newlines=True,
                env=dict(os.environ, PAN123_CLIENT_SECRET="emu-secret"))
        self.url = read_server_url(self.proc)

    def stop_server(self):
        self.proc.send_signal(signal.SIGTERM)
        if self.proc.wait(timeout=300) != 0:
            raise SystemExit("the server exited with %d" % self.proc.returncode)
        self.proc.stdout.close()

    def server_log_since_start(self):
        with open(self.server_log) as f:
            f.seek(self.log_offset)
            return f.read()

    def wait_for_warm_up(self):
        """Seconds from the start of the server to the warm-up's last line."""
        while True:
            text = self.server_log_since_start()
            m = re.search(r"warm-up done in ([0-9.]+)s", text)
            if m:
                return time.monotonic() - self.started, text
            if self.proc.poll() is not None:
                raise SystemExit("the server stopped:\n" + text[-3000:])
            time.sleep(0.2)

    def restic(self, *args):
        cmd = ["restic", "-r", "rest:" + self.url + REPO] + list(args)
        r = subprocess.run(cmd, env=self.env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                           universal_newlines=True)
        if r.returncode != 0:
            raise SystemExit("%s failed:\n%s\n%s" % (" ".join(args), r.stdout[-2000:],
                                                      r.stderr[-2000:]))
        return r.stdout

    def access_log_lines(self):
        offset = getattr(self, "access_offset", 0)
        with open(self.access_log) as f:
            f.seek(offset)
            text = f.read()
            self.access_offset = f.tell()
        return [m.groups() for m in ACCESS_RE.finditer(text)]

    # -- figures -------------------------------------------------------------------

    def begin(self):
        self.emu.reset_calls()
        self.access_log_lines()         # skip what came before
        self.t0 = time.monotonic()

    def calls(self):
        return dict(sorted((ep, n) for ep, n in self.emu.calls.items()))

    def report(self, step, wall, notes, checks):
        calls = self.calls()
        self.rows.append((step, wall, calls))
        print("\n== %s: %.1f s" % (step, wall))
        print("   123pan calls by endpoint: %s" % json.dumps(calls))
        if self.emu.rejected:
            print("   refused by 123pan: %s" % dict(self.emu.rejected))
        for note in notes:
            print("   " + note)
        for ok, text in checks:
            print("   %s %s" % ("ok  " if ok else "FAIL", text))
            if not ok:
                self.failures.append("%s: %s" % (step, text))

    def tree_pages(self):
        return emulator_list_pages(self.emu)

    # -- the steps -------------------------------------------------------------------

    def setup(self):
        src = os.path.join(self.tmp, "src")
        make_tree(src, seed=11, total_mib=8)
        self.start_server()
        self.restic("init")
        self.restic("backup", src)
        self.stop_server()
        for i in range(self.objects):
            data = b"unreferenced pack %d " % i + os.urandom(200)
            name = hashlib.sha256(data).hexdigest()
            self.emu.add_file("/restic-backup/%sdata/%s/%s" % (REPO, name[:2], name), data)
        self.total = self.emu.total_live_files()
        os.unlink(os.path.join(self.state, rp.METADATA_CACHE_FILE))     # the token stays
        print("repository: %d objects on 123pan (%d added directly), in %d list pages"
              % (self.total, self.objects, self.tree_pages()))

    def cold_start(self):
        pages = self.tree_pages()
        self.begin()
        self.start_server()
        t = time.monotonic()
        snapshots = json.loads(self.restic("snapshots", "--json", "--no-lock"))
        first_answer = time.monotonic() - t
        text = self.server_log_since_start()
        early = "warm-up done" not in text
        wall, text = self.wait_for_warm_up()
        progress = [line.split(" INFO ", 1)[-1] for line in text.splitlines()
                    if "cache warm-up" in line]
        calls = self.calls()
        others = dict((ep, n) for ep, n in calls.items()
                      if ep not in (LIST, "/api/v1/file/download_info", "/dl", "/obj"))
        self.report("cold start (empty cache, %d objects)" % self.total, wall,
                    ["warm-up log: " + line for line in progress[:2] + ["..."] + progress[-2:]]
                    + ["restic snapshots answered in %.1f s (%d snapshot), %s"
                       % (first_answer, len(snapshots),
                          "while the warm-up was still listing" if early
                          else "after the warm-up")],
                    [(calls.get(LIST, 0) == pages,
                      "list calls %d = pages %d" % (calls.get(LIST, 0), pages)),
                     (not others, "no other calls besides the snapshot's downloads %s"
                      % (others or "")),
                     (early, "restic's first command answered before the warm-up ended")])

    def warm_restart(self):
        self.stop_server()
        self.begin()
        self.start_server()
        wall, text = self.wait_for_warm_up()
        before = self.calls()
        self.restic("snapshots", "--no-lock")
        self.report("warm restart", wall,
                    [line.split(" INFO ", 1)[-1] for line in text.splitlines()
                     if "warm-up done" in line],
                    [(before == {}, "no call at all before serving: %s" % before),
                     (self.calls().get(LIST, 0) == 0, "0 list calls for restic snapshots")])

    def backup(self):
        src = os.path.join(self.tmp, "new")
        make_tree(src, seed=12, total_mib=40)
        self.begin()
        self.restic("backup", src)
        wall = time.monotonic() - self.t0
        requests = self.access_log_lines()
        stored = sum(1 for m, path, status in requests if m == "POST" and status == "200")
        heads = sum(1 for m, path, status in requests if m == "HEAD")
        calls = self.calls()
        uploads = sum(calls.get(ep, 0) for ep in UPLOADS)
        constant = sum(calls.get(ep, 0) for ep in ("/api/v1/access_token",
                                                    "/upload/v2/file/domain"))
        lookups = sum(calls.get(ep, 0) for ep in (LIST, "/api/v1/file/detail",
                                                   "/api/v1/file/infos"))
        self.report("restic backup of new data (40 MiB)", wall,
                    ["%d objects stored, %d HEAD requests, %d upload calls"
                     % (stored, heads, uploads)],
                    [(uploads <= stored, "upload calls %d <= new objects %d" % (uploads, stored)),
                     (constant <= 2, "token and domain calls: %d" % constant),
                     (calls.get(LIST, 0) == 0, "0 list calls"),
                     (lookups == 0, "0 list/detail calls, so none for %d HEAD requests"
                      % heads)])

    def restore_and_check(self):
        target = os.path.join(self.tmp, "restore")
        self.begin()
        self.restic("restore", "latest", "--target", target)
        self.restic("check", "--read-data")
        wall = time.monotonic() - self.t0
        requests = self.access_log_lines()
        objects = len(set(path for m, path, status in requests if m == "GET"
                          and not path.endswith("/")))
        restored = manifest(os.path.join(target, os.path.relpath(
            os.path.join(self.tmp, "new"), "/")))
        infos = self.calls().get("/api/v1/file/download_info", 0)
        self.report("restic restore + check --read-data", wall,
                    ["%d objects read (%d GET requests), %d download_info calls"
                     % (objects, sum(1 for m, _, _ in requests if m == "GET"), infos)],
                    [(infos <= objects, "download_info %d <= objects read %d"
                      % (infos, objects)),
                     (restored == manifest(os.path.join(self.tmp, "new")),
                      "restored bytes equal the source")])

    def prune(self):
        self.begin()
        self.restic("forget", "--keep-last", "1", "--group-by", "host", "--prune")
        answered = time.monotonic() - self.t0
        self.stop_server()              # flushes the queued remote deletes
        wall = time.monotonic() - self.t0
        requests = self.access_log_lines()
        deleted = sum(1 for m, path, status in requests if m == "DELETE" and status == "200")
        calls = self.calls()
        trash, purge = calls.get("/api/v1/file/trash", 0), calls.get("/api/v1/file/delete", 0)
        budget = 2 * int(math.ceil(deleted / 100.0))
        live = self.emu.total_live_files()
        self.report("restic forget --prune", wall,
                    ["restic done after %.1f s; %d DELETE requests; %d trash + %d delete "
                     "calls (budget about %d); %d objects left on 123pan"
                     % (answered, deleted, trash, purge, budget, live)],
                    [(trash + purge <= budget + 2, "trash + delete calls %d ~ 2*ceil(%d/100)"
                      " = %d" % (trash + purge, deleted, budget)),
                     (deleted >= self.objects, "the %d unreferenced packs were deleted"
                      % self.objects)])

    def run(self):
        print("restic-123pan benchmark: %s, emulator with the free-tier rates, %s"
              % (sys.version.split()[0], subprocess.run(
                  ["restic", "version"], stdout=subprocess.PIPE,
                  universal_newlines=True).stdout.strip()))
        self.setup()
        self.cold_start()
        self.warm_restart()
        self.backup()
        self.restore_and_check()
        self.prune()
        print("\nsummary (wall s / list calls / all 123pan calls):")
        for step, wall, calls in self.rows:
            print("  %-44s %7.1f %6d %6d" % (step, wall, calls.get(LIST, 0),
                                             sum(calls.values())))
        if self.failures:
            print("\nFIGURES NOT HELD:\n  " + "\n  ".join(self.failures))
            return 1
        print("\nevery figure held")
        return 0

    def close(self):
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
        self.emu.stop()


# ---------------------------------------------------------------------------
# --perf: the local backend against `rclone serve restic`, restic's own
# rest-server (when one is found) and restic on a plain folder, side by side in
# one run (issue 12)
# ---------------------------------------------------------------------------

def free_port():
    import socket
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


def proc_cpu_seconds(pid):
    """utime + stime of a process (and its reaped children), from /proc."""
    with open("/proc/%d/stat" % pid) as f:
        fields = f.read().rsplit(")", 1)[1].split()
    ticks = os.sysconf("SC_CLK_TCK")
    return sum(int(x) for x in fields[11:15]) / float(ticks)


def proc_rss_kib(pid, field="VmRSS"):
    try:
        with open("/proc/%d/status" % pid) as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


class RssSampler(object):
    """Samples a process's resident memory every 20 ms; peak() in MiB."""

    def __init__(self, pid):
        import threading
        self.pid = pid
        self.top = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self):
        while not self._stop.is_set():
            self.top = max(self.top, proc_rss_kib(self.pid))
            self._stop.wait(0.02)

    def peak(self):
        self._stop.set()
        self._thread.join()
        self.top = max(self.top, proc_rss_kib(self.pid))
        return self.top / 1024.0


def wait_listening(port, proc, timeout=30):
    import socket
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit("server exited with %d" % proc.returncode)
        try:
            socket.create_connection(("127.0.0.1", port), 0.5).close()
            return
        except OSError:
            time.sleep(0.05)
    raise SystemExit("server did not start listening on %d" % port)


class PeerServer(object):
    """One REST server process serving a folder: ours, rclone's or rest-server's.
    `program` is our server file (ours) or the executable (the others)."""

    def __init__(self, kind, folder, program, log_path, backend_args=None, env=None):
        self.kind = kind
        self.port = free_port()
        listen = "127.0.0.1:%d" % self.port
        if kind == "ours":
            cmd = [sys.executable, program] + (backend_args or [
                "--backend", "local", "--path", folder]) + ["--listen", listen, "--no-auth"]
        elif kind == "rest-server":
            # its defaults otherwise: append-only off, uploads' SHA-256 verified (as ours)
            cmd = [program, "--path", folder, "--listen", listen, "--no-auth"]
        else:
            cmd = [program, "serve", "restic", "--addr", listen, "--config", "/dev/null",
                   folder]
        self.log = open(log_path, "ab")
        self.proc = subprocess.Popen(cmd, stdout=self.log, stderr=self.log,
                                     env=dict(os.environ, **(env or {})))
        wait_listening(self.port, self.proc)
        self.url = "rest:http://127.0.0.1:%d/" % self.port

    def cpu(self):
        return proc_cpu_seconds(self.proc.pid)

    def rss(self):
        return proc_rss_kib(self.proc.pid) / 1024.0

    def stop(self):
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.log.close()


def make_big_tree(root, total_mib, seed=7):
    """Incompressible files of 1-24 MiB plus a few hundred small ones, about
    total_mib MiB in all (os.urandom-like bytes from a seeded generator is too
    slow for a GiB: blocks of urandom, seeded sizes)."""
    import random
    rnd = random.Random(seed)
    total, i = 0, 0
    block = 1024 * 1024
    while total < total_mib * 1024 * 1024:
        size = rnd.randint(1, 4096) if i % 4 == 0 else rnd.randint(1, 24) * block \
            + rnd.randint(0, 4095)
        folder = os.path.join(root, "d%02d" % (i % 13))
        os.makedirs(folder, exist_ok=True)
        with open(os.path.join(folder, "f%05d.bin" % i), "wb") as f:
            left = size
            while left:
                n = min(block, left)
                f.write(os.urandom(n))
                left -= n
        total += size
        i += 1
    return total


def make_pack_folder(root, packs):
    """A repository folder with `packs` small files in data/xx/ (names = ids)."""
    os.makedirs(root)
    with open(os.path.join(root, "config"), "wb") as f:
        f.write(b"x")
    for kind in ("keys", "locks", "snapshots", "index"):
        os.makedirs(os.path.join(root, kind))
    for i in range(256):
        os.makedirs(os.path.join(root, "data", "%02x" % i))
    for i in range(packs):
        name = hashlib.sha256(b"pack %d" % i).hexdigest()
        with open(os.path.join(root, "data", name[:2], name), "wb") as f:
            f.write(b"p" * (i % 7 + 1))


def fetch_listing(port, repo, v2):
    """GET <repo>/data/: (seconds, entries); a cut connection raises."""
    import http.client
    t = time.monotonic()
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=300)
    accept = "application/vnd.x.restic.rest.v2" if v2 else "application/vnd.x.restic.rest.v1"
    conn.request("GET", "/%s/data/" % repo, headers={"Accept": accept})
    resp = conn.getresponse()
    body = resp.read()
    conn.close()
    if resp.status == 400 and not v2:
        return None, None       # rclone serves only v2 listings
    if resp.status != 200:
        raise SystemExit("listing: HTTP %d %s" % (resp.status, body[:200]))
    return time.monotonic() - t, len(json.loads(body.decode()))


def median(values):
    values = sorted(v for v in values if v is not None)
    if not values:
        return None
    n = len(values)
    return values[n // 2] if n % 2 else (values[n // 2 - 1] + values[n // 2]) / 2.0


def tool_version(cmd):
    """The first line a program prints for its version flag ("" if it cannot run)."""
    try:
        out = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                             universal_newlines=True, timeout=30).stdout
    except (OSError, subprocess.TimeoutExpired):
        return ""
    return out.strip().split("\n")[0]


def find_rest_server(name):
    """(path, None) of restic's rest-server, or (None, why not).  The version
    check keeps out .ci/rest-server, which starts this server under that name."""
    path = shutil.which(name)
    if path is None:
        return None, "%s was not found" % name
    version = tool_version([path, "--version"])
    if not version.startswith("rest-server version"):
        return None, "%s is not restic's rest-server (its --version says %r)" % (path, version)
    return path, None


class PerfBench(object):
    PEERS = ("ours", "rclone", "rest-server", "folder")

    def __init__(self, args, workdir):
        self.args = args
        self.tmp = workdir
        self.product = os.path.abspath(args.product)
        self.programs = {"ours": self.product, "rclone": "rclone",
                         "rest-server": args.rest_server}
        self.peers = [p for p in self.PEERS if p == "folder" or self.programs[p]]
        self.results = {}           # (metric, peer) -> [values]
        self.copy_results = {}      # (metric, variant) -> [values]
        self.env = dict(os.environ, RESTIC_PASSWORD="bench")

    def add(self, metric, peer, value):
        self.results.setdefault((metric, peer), []).append(value)

    def restic(self, repo, *args):
        cmd = ["restic", "-r", repo, "--no-lock" if args[0] == "check" and False else "-q"] \
            + list(args)
        r = subprocess.run(cmd, env=self.env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        if r.returncode != 0:
            raise SystemExit("restic %s failed: %s" % (" ".join(args), r.stderr[-2000:]))

    def one_backup_run(self, peer, run):
        base = os.path.join(self.tmp, "%s-%d" % (peer, run))
        folder = os.path.join(base, "repo-root")
        os.makedirs(folder)
        self.env["RESTIC_CACHE_DIR"] = os.path.join(base, "cache")
        server = None
        if peer == "folder":
            repo = os.path.join(folder, "r")
        else:
            server = self.start_peer(peer, folder)
            repo = server.url + "r"
        opts = ["-o", "rest.connections=%d" % self.args.connections] if server else []
        try:
            self.restic(repo, "init", *opts)
            idle = server.rss() if server else None
            gib = self.tree_bytes / float(1 << 30)
            for step, cmd in (("backup", ["backup", "--pack-size", str(self.args.pack_size),
                                         self.src]),
                              ("check", ["check", "--read-data"]),
                              ("restore", ["restore", "latest", "--target",
                                           os.path.join(base, "restored")])):
                sampler = RssSampler(server.proc.pid) if server else None
                cpu0 = server.cpu() if server else None
                t = time.monotonic()
                self.restic(repo, *(cmd + opts))
                self.add("%s wall s" % step, peer, time.monotonic() - t)
                if server:
                    self.add("%s server CPU s/GiB" % step, peer, (server.cpu() - cpu0) / gib)
                    self.add("%s server peak MiB" % step, peer, sampler.peak())
            if server:
                self.add("idle server MiB (after init)", peer, idle)
            self.add("backup+check+restore wall s", peer,
                     sum(self.results[("%s wall s" % s, peer)][-1]
                         for s in ("backup", "check", "restore")))
        finally:
            if server:
                server.stop()
            shutil.rmtree(base, True)

    def start_peer(self, peer, folder):
        return PeerServer(peer, folder, self.programs[peer],
                          os.path.join(self.tmp, "server.log"))

    def listing_runs(self, peer):
        """Per run, two fresh servers: one answers a v2 listing (its first since
        start), the same again, a v1 listing and 8 v2 listings in parallel; the
        other answers 8 in parallel as its very first requests.  Ours keeps what
        an unchanged folder held (FolderListings), so "first since start" and
        "again" differ for it; the peers are asked the same."""
        for _ in range(self.args.runs):
            server = self.start_peer(peer, self.packs_root)
            try:
                sampler = RssSampler(server.proc.pid)
                for metric in ("listing v2 s, first since start", "listing v2 s, again"):
                    secs, n = fetch_listing(server.port, "r", True)
                    self.check_count(n)
                    self.add(metric, peer, secs)
                secs, n = fetch_listing(server.port, "r", False)
                if secs is not None:
                    self.check_count(n)
                    self.add("listing v1 s", peer, secs)
                self.add("8 parallel v2 listings s", peer, self.parallel_listings(server))
                self.add("listing server peak MiB", peer, sampler.peak())
            finally:
                server.stop()
            server = self.start_peer(peer, self.packs_root)
            try:
                sampler = RssSampler(server.proc.pid)
                self.add("8 parallel v2 listings s, first since start", peer,
                         self.parallel_listings(server))
                self.add("listing server peak MiB, 8 first", peer, sampler.peak())
            finally:
                server.stop()

    def parallel_listings(self, server):
        from concurrent.futures import ThreadPoolExecutor
        t = time.monotonic()
        with ThreadPoolExecutor(8) as pool:
            counts = list(pool.map(lambda _: fetch_listing(server.port, "r", True)[1], range(8)))
        secs = time.monotonic() - t
        for n in counts:
            self.check_count(n)
        return secs

    def cloud_run(self, backend, run):
        """Backup and restore through a cloud backend whose emulator sits behind a
        modelled link: throughput as a fraction of that link."""
        from test_restic_123pan import CloudreveEmulator, WanLink
        link = WanLink(self.args.wan_latency, self.args.wan_connection * 1e6,
                       self.args.wan_total * 1e6)
        emu = (Pan123Emulator() if backend == "123pan" else CloudreveEmulator()).start()
        emu.wan = link
        if backend == "cloudreve" and self.args.cloudreve_chunk_concurrency > 1:
            # a 4.7+ site whose local policy pre-allocates and asks for parallel chunks
            emu.chunk_concurrency = self.args.cloudreve_chunk_concurrency
            emu.pre_allocate = True
        if backend == "cloudreve":      # the default group's 1 GiB is too small for --cloud-mib 1024
            emu.quota = max(emu.quota, 4 * self.args.cloud_mib * 1024 * 1024)
        base = os.path.join(self.tmp, "%s-%d" % (backend, run))
        state = os.path.join(base, "state")
        if backend == "123pan":
            args = ["--backend", "123pan", "--api-base", emu.api_base, "--client-id",
                    "emu-client", "--state-dir", state]
            env = {"PAN123_CLIENT_SECRET": "emu-secret"}
        else:
            args = ["--backend", "cloudreve", "--cloudreve-url", emu.base_url,
                    "--cloudreve-user", "me@example.com", "--state-dir", state]
            env = {"CLOUDREVE_PASSWORD": "secret"}
        server = PeerServer("ours", None, self.product, os.path.join(self.tmp, "server.log"),
                            args, env)
        self.env["RESTIC_CACHE_DIR"] = os.path.join(base, "cache")
        repo = server.url + "r"
        try:
            self.restic(repo, "init")
            for step, cmd, direction in (
                    ("backup", ["backup", self.cloud_src], "up"),
                    ("restore", ["restore", "latest", "--target",
                                 os.path.join(base, "restored")], "down")):
                before = link.bytes[direction]
                t = time.monotonic()
                self.restic(repo, *cmd)
                end = time.monotonic()
                wall = end - t
                rate = (link.bytes[direction] - before) / wall
                self.add("%s %s MB/s" % (backend, step), "ours", rate / 1e6)
                self.add("%s %s of link" % (backend, step), "ours", rate / link.total)
                # The same, from the first pack's transfer to the end of the last:
                # without restic's own start (key, config, lock, index) and end.
                moving = link.moving_share(direction, t, end)
                if moving is not None:
                    self.add("%s %s, packs moving" % (backend, step), "ours", moving[0])
                    self.add("%s %s, s outside" % (backend, step), "ours", wall - moving[1])
        finally:
            server.stop()
            emu.stop()
            shutil.rmtree(base, True)

    COPY_VARIANTS = ("local", "123pan+copy", "123pan")

    def local_copy_run(self, run):
        """The same tree backed up and restored three ways, side by side: the local
        backend; 123pan with --local-copy (write-behind), the queue's drain timed
        after the backup; 123pan alone.  The 123pan emulator sits behind the
        modelled link and enforces the free tier's request rates."""
        from test_restic_123pan import WanLink, parse_prometheus
        for variant in self.COPY_VARIANTS:
            base = os.path.join(self.tmp, "copy-%s-%d" % (variant, run))
            os.makedirs(base)
            self.env["RESTIC_CACHE_DIR"] = os.path.join(base, "cache")
            emu = link = None
            if variant == "local":
                args, env = ["--backend", "local", "--path", os.path.join(base, "repos")], {}
            else:
                link = WanLink(self.args.wan_latency, self.args.wan_connection * 1e6,
                               self.args.wan_total * 1e6)
                emu = Pan123Emulator().start()
                emu.wan = link
                args = ["--backend", "123pan", "--api-base", emu.api_base, "--client-id",
                        "emu-client", "--state-dir", os.path.join(base, "state"),
                        "--prometheus"]
                if variant == "123pan+copy":
                    args += ["--local-copy", os.path.join(base, "copy")]
                env = {"PAN123_CLIENT_SECRET": "emu-secret"}
            server = PeerServer("ours", None, self.product, os.path.join(self.tmp, "server.log"),
                                args, env)
            repo = server.url + "r"
            try:
                self.restic(repo, "init")
                up0 = link.bytes["up"] if link else 0
                t = time.monotonic()
                self.restic(repo, "backup", self.copy_src)
                backup = time.monotonic() - t
                self.add_copy("backup wall s", variant, backup)
                if variant == "123pan+copy":
                    metrics_url = "http://127.0.0.1:%d/metrics" % server.port
                    while True:
                        with urllib.request.urlopen(metrics_url, timeout=30) as r:
                            queued = parse_prometheus(r.read().decode())[
                                ("restic123pan_local_copy_queued_objects", ())]
                        if not queued:
                            break
                        time.sleep(0.2)
                    drained = time.monotonic() - t
                    self.add_copy("backup until in the cloud s", variant, drained)
                    self.add_copy("upload MB/s (backup+drain)", variant,
                                  (link.bytes["up"] - up0) / drained / 1e6)
                    self.add_copy("upload calls/s (backup+drain)", variant,
                                  sum(emu.calls[ep] for ep in UPLOADS) / drained)
                elif emu is not None:
                    self.add_copy("backup until in the cloud s", variant, backup)
                    self.add_copy("upload MB/s (backup+drain)", variant,
                                  (link.bytes["up"] - up0) / backup / 1e6)
                    self.add_copy("upload calls/s (backup+drain)", variant,
                                  sum(emu.calls[ep] for ep in UPLOADS) / backup)
                if emu is not None:
                    emu.reset_calls()
                t = time.monotonic()
                self.restic(repo, "restore", "latest", "--target", os.path.join(base, "out"))
                self.add_copy("restore wall s", variant, time.monotonic() - t)
                if emu is not None:
                    calls = dict(emu.calls)
                    self.add_copy("restore: cloud calls", variant, sum(calls.values()))
                    self.add_copy("restore: download_info calls", variant,
                                  calls.get("/api/v1/file/download_info", 0))
                    self.add_copy("restore: MB downloaded", variant, link.bytes["down"] / 1e6)
            finally:
                server.stop()
                if emu is not None:
                    emu.stop()
                shutil.rmtree(base, True)

    def add_copy(self, metric, variant, value):
        self.copy_results.setdefault((metric, variant), []).append(value)

    def print_copy_table(self):
        print_medians(self.copy_results, self.COPY_VARIANTS,
                      "local copy tier, medians of %d run(s)" % self.args.runs,
                      [("copy/alone", "123pan+copy", "123pan")])

    def check_count(self, n):
        if n != self.args.packs:
            raise SystemExit("listing returned %d entries, not %d" % (n, self.args.packs))

    def run(self):
        print("perf benchmark: product %s, %s, %s, rclone %s, %s" % (
            self.product, sys.version.split()[0], tool_version(["restic", "version"]),
            tool_version(["rclone", "version"]) or "-",
            tool_version([self.args.rest_server, "--version"]) if self.args.rest_server
            else "rest-server -"))
        print("machine: %s" % machine_description())
        self.src = os.path.join(self.tmp, "src")
        t = time.monotonic()
        self.tree_bytes = make_big_tree(self.src, self.args.tree_mib) if self.args.tree_mib \
            else 0
        print("tree: %.2f GiB generated in %.0f s; %d run(s) per peer, %d connections, "
              "--pack-size %d" % (self.tree_bytes / float(1 << 30), time.monotonic() - t,
                                  self.args.runs, self.args.connections, self.args.pack_size))
        for run in range(self.args.runs if self.tree_bytes else 0):
            for peer in self.peers:
                self.one_backup_run(peer, run)
                print("  run %d %-11s backup+check+restore %.1f s" % (
                    run + 1, peer, self.results[("backup+check+restore wall s", peer)][-1]))
                sys.stdout.flush()
        if self.args.cloud_mib:
            self.cloud_src = os.path.join(self.tmp, "cloud-src")
            make_big_tree(self.cloud_src, self.args.cloud_mib, seed=8)
            print("cloud: %d MiB through a link of %.0f ms, %.0f MB/s per connection, %.0f MB/s "
                  "in total (restic's default connections)"
                  % (self.args.cloud_mib, self.args.wan_latency * 1000,
                     self.args.wan_connection, self.args.wan_total))
            for run in range(self.args.runs):
                for backend in ("123pan", "cloudreve"):
                    if self.args.cloud_backend in ("both", backend):
                        self.cloud_run(backend, run)
        if self.args.local_copy_mib:
            self.copy_src = os.path.join(self.tmp, "copy-src")
            make_big_tree(self.copy_src, self.args.local_copy_mib, seed=9)
            print("local copy: %d MiB; the 123pan emulator behind a link of %.0f ms, %.0f MB/s "
                  "per connection, %.0f MB/s in total" % (
                      self.args.local_copy_mib, self.args.wan_latency * 1000,
                      self.args.wan_connection, self.args.wan_total))
            for run in range(self.args.runs):
                self.local_copy_run(run)
        if self.args.packs:
            self.packs_root = os.path.join(self.tmp, "packs", "r")
            t = time.monotonic()
            make_pack_folder(self.packs_root, self.args.packs)
            self.packs_root = os.path.dirname(self.packs_root)
            print("listing: %d packs made in %.0f s" % (self.args.packs, time.monotonic() - t))
            for peer in self.peers:
                if peer != "folder":
                    self.listing_runs(peer)
        if self.results:
            self.print_table()
        if self.copy_results:
            self.print_copy_table()
        return 0

    def print_table(self):
        print_medians(self.results, self.peers, "medians of %d run(s)" % self.args.runs,
                      [("ours/%s" % p, "ours", p) for p in ("rclone", "rest-server")
                       if p in self.peers])


def print_medians(results, columns, title, ratios):
    """A table of the medians of results[(metric, column)], one row per metric in
    the order measured, and per (name, over, under) of `ratios` the ratio of
    column `over` to column `under`."""
    metrics = []
    for metric, _ in results:
        if metric not in metrics:
            metrics.append(metric)
    width = max([32] + [len(m) for m in metrics])
    widths = [max(11, len(name)) for name, _, _ in ratios]
    print("\n%-*s %s  %s" % (width + 2, title, " ".join("%11s" % c for c in columns),
                               " ".join("%*s" % (w, r[0]) for w, r in zip(widths, ratios))))
    for metric in metrics:
        vals = dict((c, median(results.get((metric, c), []))) for c in columns)
        cells = ["%11.2f" % vals[c] if vals[c] is not None else "%11s" % "-" for c in columns]
        shares = []
        for cell, (_, over, under) in zip(widths, ratios):
            ratio = vals[over] / vals[under] \
                if vals[over] is not None and vals[under] else None
            shares.append("%*s" % (cell, "%.2f" % ratio if ratio is not None else "-"))
        print("  %-*s %s  %s" % (width, metric, " ".join(cells), " ".join(shares)))


def machine_description():
    model = "?"
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    model = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return "%s, %d cores visible, %s" % (model, os.cpu_count() or 0,
                                        " ".join(os.uname()[2:3]))


def perf_main(args):
    if args.quick:
        args.tree_mib = 192 if args.tree_mib is None else args.tree_mib
        args.packs = 20000 if args.packs is None else args.packs
        args.runs = args.runs or 1
        args.cloud_mib = 48 if args.cloud_mib is None else args.cloud_mib
        args.local_copy_mib = 48 if args.local_copy_mib is None else args.local_copy_mib
    args.tree_mib = 1100 if args.tree_mib is None else args.tree_mib
    args.packs = 200000 if args.packs is None else args.packs
    args.runs = args.runs or 3
    args.cloud_mib = 160 if args.cloud_mib is None else args.cloud_mib
    args.local_copy_mib = 160 if args.local_copy_mib is None else args.local_copy_mib
    for tool in ("restic", "rclone"):
        # rclone only for the local comparison and the listing
        if not shutil.which(tool) and (tool == "restic" or args.tree_mib or args.packs):
            raise SystemExit("%s is not installed" % tool)
    args.rest_server, why_not = find_rest_server(args.rest_server)
    if args.rest_server is None:
        print("%s: no rest-server column (build restic's rest-server and pass "
              "--rest-server PATH, or put it on the PATH)" % why_not)
    workdir = tempfile.mkdtemp(prefix="bench-perf-")
    try:
        return PerfBench(args, workdir).run()
    finally:
        shutil.rmtree(workdir, True)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--objects", type=int, default=5000,
                        help="packs added straight into the emulator (default 5000)")
    parser.add_argument("--keep", action="store_true", help="keep the work folder")
    perf = parser.add_argument_group("--perf: local backend vs rclone serve restic vs "
                                     "rest-server vs a plain folder (backup/check/restore, "
                                     "200,000-pack listing)")
    perf.add_argument("--perf", action="store_true", help="run this comparison instead")
    perf.add_argument("--quick", action="store_true",
                      help="--perf with 192 MiB, 20,000 packs, one run")
    perf.add_argument("--product", default=os.path.join(HERE, "restic_123pan.py"),
                      help="the server file to measure (e.g. an older version)")
    perf.add_argument("--rest-server", default="rest-server", metavar="PATH",
                      help="restic's rest-server, a peer when found (default: rest-server "
                           "on the PATH)")
    perf.add_argument("--tree-mib", type=int, default=None,
                      help="generated tree for the local comparison (default 1100; 0: skip)")
    perf.add_argument("--packs", type=int, default=None,
                      help="packs in the listing repository (default 200000; 0: skip)")
    perf.add_argument("--runs", type=int, default=0, help="runs per peer (default 3)")
    perf.add_argument("--cloud-mib", type=int, default=None,
                      help="tree backed up through each cloud emulator (default 160; 0: skip)")
    perf.add_argument("--local-copy-mib", type=int, default=None,
                      help="tree backed up with the local backend, 123pan with --local-copy "
                           "and 123pan alone (default 160; 0: skip)")
    perf.add_argument("--wan-latency", type=float, default=0.03,
                      help="modelled link: seconds per request (default 0.03)")
    perf.add_argument("--wan-connection", type=float, default=8,
                      help="modelled link: MB/s per connection (default 8)")
    perf.add_argument("--wan-total", type=float, default=20,
                      help="modelled link: MB/s in total, each way (default 20)")
    perf.add_argument("--cloud-backend", choices=("both", "123pan", "cloudreve"),
                      default="both", help="which cloud emulators (default both)")
    perf.add_argument("--cloudreve-chunk-concurrency", type=int, default=1,
                      help="the Cloudreve emulator's chunk_concurrency, with pre-allocation "
                           "(default 1: a site that does not ask for parallel chunks)")
    perf.add_argument("--connections", type=int, default=8, help="restic rest.connections")
    perf.add_argument("--pack-size", type=int, default=64, help="restic --pack-size MiB")
    args = parser.parse_args()
    if args.perf or args.quick:
        return perf_main(args)
    if not shutil.which("restic"):
        raise SystemExit("restic is not installed")
    workdir = tempfile.mkdtemp(prefix="bench-123pan-")
    bench = Bench(args.objects, workdir)
    try:
        return bench.run()
    finally:
        bench.close()
        if args.keep:
            print("work folder: %s" % workdir)
        else:
            shutil.rmtree(workdir, True)


if __name__ == "__main__":
    sys.exit(main())
