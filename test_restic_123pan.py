"""Tests for restic_123pan.py.

Run everything (unit, HTTP and end-to-end with the real restic):

    python3 test_restic_123pan.py            # or: python3 -m unittest -v test_restic_123pan

Environment switches (used by .ci/run):
  RESTIC_123PAN_REQUIRE_E2E=1  a missing restic binary is a failure, not a skip
  RESTIC_123PAN_UNIT_ONLY=1    skip the end-to-end tests (other interpreters in CI)
"""

import hashlib
import http.client
import io
import json
import logging
import os
import random
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import unittest
import warnings

import restic_123pan as rp

if os.environ.get("RESTIC_123PAN_TEST_DEBUG") != "1":
    # The server logs every refused request; the tests provoke hundreds on purpose.
    logging.getLogger("restic_123pan").setLevel(logging.CRITICAL)

HERE = os.path.dirname(os.path.abspath(__file__))
SERVER_SCRIPT = os.path.join(HERE, "restic_123pan.py")
REQUIRE_E2E = os.environ.get("RESTIC_123PAN_REQUIRE_E2E") == "1"
UNIT_ONLY = os.environ.get("RESTIC_123PAN_UNIT_ONLY") == "1"
V2 = rp.MEDIA_V2


def sha256_hex(data):
    return hashlib.sha256(data).hexdigest()


# ---------------------------------------------------------------------------
# Unit tests: routing, names, Range, spool, configuration
# ---------------------------------------------------------------------------

class ParseRouteTest(unittest.TestCase):
    ID = "ab" * 32

    def status_of(self, target):
        try:
            rp.parse_route(target)
        except rp.RequestError as e:
            return e.status
        return 200

    def test_valid_routes(self):
        R = rp.Route
        self.assertEqual(rp.parse_route("/"), R((), None, None))
        self.assertEqual(rp.parse_route("/?create=true"), R((), None, None))
        self.assertEqual(rp.parse_route("/alice/laptop/"), R(("alice", "laptop"), None, None))
        self.assertEqual(rp.parse_route("/alice/laptop"), R(("alice", "laptop"), None, None))
        self.assertEqual(rp.parse_route("/config"), R((), "config", "config"))
        self.assertEqual(rp.parse_route("/a/config"), R(("a",), "config", "config"))
        for kind in rp.OBJECT_TYPES:
            self.assertEqual(rp.parse_route("/%s/" % kind), R((), kind, None))
            self.assertEqual(rp.parse_route("/u/%s/%s" % (kind, self.ID)), R(("u",), kind, self.ID))
        # percent-escapes of ordinary characters decode to the same route
        self.assertEqual(rp.parse_route("/%61lice/config"), R(("alice",), "config", "config"))
        self.assertEqual(rp.parse_route("/h%C3%A9/keys/"), R(("h\u00e9",), "keys", None))

    def test_impossible_names_are_404(self):
        for target in ["/data/" + self.ID.upper(), "/data/" + self.ID[:-1], "/data/" + self.ID + "0",
                       "/data/foobar", "/data", "/keys", "/config/", "/data/%s/" % self.ID,
                       "/data/%s/x" % self.ID, "/config/x", "/a/b/c/d/e/f/g/h/i/config",
                       "/.hidden/config", "/a:b/config", "/a*b/", "/a%3Fb/config", "/a%7Cb/"]:
            self.assertEqual(self.status_of(target), 404, target)

    def test_traversal_and_encoding_tricks_are_400(self):
        for target in ["/../config", "/a/../config", "/%2e%2e/config", "/%2E%2E/%2e%2e/config",
                       "/a%2fb/config", "/a%2Fb/config", "/..%2fconfig", "/a%5cb/config",
                       "/a%00/config", "/a\x00/config", "/%0a/config", "/a%zz/config", "/a%/config",
                       "/%ff/config", "//config", "/a//config", "/./config", "/a/./keys/",
                       "config", "http://evil/config"]:
            self.assertEqual(self.status_of(target), 400, repr(target))


class ParseRangeTest(unittest.TestCase):
    def test_ranges(self):
        f = rp.parse_range
        self.assertEqual(f(None, 100), (0, 100, False))
        self.assertEqual(f("bytes=0-", 100), (0, 100, True))
        self.assertEqual(f("bytes=10-19", 100), (10, 10, True))
        self.assertEqual(f("bytes=90-200", 100), (90, 10, True))     # clamped
        self.assertEqual(f("bytes=-30", 100), (70, 30, True))
        self.assertEqual(f("bytes=-300", 100), (0, 100, True))
        self.assertEqual(f("bytes=99-99", 100), (99, 1, True))
        self.assertEqual(f("bytes=0-", 0), (0, 0, False))            # empty object: plain 200

    def test_unsatisfiable(self):
        for h in ["bytes=100-", "bytes=100-200", "bytes=-0"]:
            self.assertRaises(rp.RangeNotSatisfiable, rp.parse_range, h, 100)

    def test_malformed(self):
        for h in ["bytes=", "bytes=-", "bytes=5-3", "items=0-1", "bytes=0-1,5-6", "bytes=a-b", "0-1"]:
            self.assertRaises(ValueError, rp.parse_range, h, 100)


class HashingSpoolTest(unittest.TestCase):
    def test_small_body_stays_in_memory(self):
        data = os.urandom(1000)
        with rp.HashingSpool.from_stream(io.BytesIO(data), len(data)) as s:
            self.assertTrue(s.in_memory)
            self.assertEqual((s.size, s.md5, s.sha256),
                             (1000, hashlib.md5(data).hexdigest(), sha256_hex(data)))
            self.assertEqual(s.read_all(), data)
            self.assertEqual(b"".join(s.iter_range(10, 20)), data[10:30])

    def test_large_body_rolls_to_disk_and_reads_back_in_ranges(self):
        data = os.urandom(3 * rp.SPOOL_MEMORY_LIMIT + 17)
        with rp.HashingSpool.from_stream(io.BytesIO(data), len(data)) as s:
            self.assertFalse(s.in_memory)
            self.assertEqual(s.sha256, sha256_hex(data))
            self.assertEqual(b"".join(s.iter_range(rp.SPOOL_MEMORY_LIMIT - 5, 1000, chunk_size=7)),
                             data[rp.SPOOL_MEMORY_LIMIT - 5:rp.SPOOL_MEMORY_LIMIT + 995])
            self.assertEqual(b"".join(s.iter_range(len(data) - 3)), data[-3:])

    def test_only_the_announced_length_is_read(self):
        stream = io.BytesIO(b"abcdefXYZ")
        with rp.HashingSpool.from_stream(stream, 6) as s:
            self.assertEqual(s.read_all(), b"abcdef")
        self.assertEqual(stream.read(), b"XYZ")

    def test_short_body(self):
        self.assertRaises(rp.ShortBody, rp.HashingSpool.from_stream, io.BytesIO(b"abc"), 4)


class ConfigTest(unittest.TestCase):
    def test_listen_addresses(self):
        f = rp.parse_listen_address
        self.assertEqual(f("127.0.0.1:8000"), ("127.0.0.1", 8000))
        self.assertEqual(f(":9000"), ("", 9000))
        self.assertEqual(f("[::1]:8000"), ("::1", 8000))
        self.assertEqual(f("8080"), ("", 8080))
        for bad in ["localhost", "host:port", "1.2.3.4:99999", "[::1]8000"]:
            self.assertRaises(rp.UsageError, f, bad)

    def test_listen_environment(self):
        f = rp.default_listen
        self.assertEqual(f({}), "127.0.0.1:8000")
        self.assertEqual(f({"LISTEN_ADDR": "0.0.0.0:9000"}), "0.0.0.0:9000")
        self.assertEqual(f({"LISTEN_ADDR": "0.0.0.0"}), "0.0.0.0:8000")
        self.assertEqual(f({"LISTEN_PORT": "9001"}), "127.0.0.1:9001")
        self.assertEqual(f({"LISTEN_ADDR": "10.0.0.1", "LISTEN_PORT": "81"}), "10.0.0.1:81")
        self.assertEqual(f({"LISTEN_ADDR": "::1", "LISTEN_PORT": "81"}), "[::1]:81")
        args = rp.parse_config([], {"LISTEN_PORT": "9002"})
        self.assertEqual((args.listen_host, args.listen_port, args.backend, args.path),
                         ("127.0.0.1", 9002, "local", rp.DEFAULT_LOCAL_PATH))
        args = rp.parse_config(["--listen", ":1234", "--path", "/x"], {"LISTEN_PORT": "9002"})
        self.assertEqual((args.listen_host, args.listen_port, args.path), ("", 1234, "/x"))

    def run_cli(self, *argv):
        return subprocess.run([sys.executable, SERVER_SCRIPT] + list(argv), stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, universal_newlines=True, timeout=60)

    def test_command_line_errors_exit_2_with_one_line(self):
        for argv in (["--bogus"], ["--listen", "nonsense"], ["--backend", "ftp"], ["positional"]):
            r = self.run_cli(*argv)
            self.assertEqual(r.returncode, 2, argv)
            self.assertIn("error:", r.stderr.strip().splitlines()[-1], argv)

    def test_help_and_version(self):
        r = self.run_cli("--help")
        self.assertEqual(r.returncode, 0)
        for flag in ("--listen", "--path", "--backend", "--no-verify-upload", "--debug"):
            self.assertIn(flag, r.stdout)
        r = self.run_cli("--version")
        self.assertEqual((r.returncode, r.stdout.strip()), (0, "restic-123pan " + rp.__version__))


# ---------------------------------------------------------------------------
# htpasswd hashes: published vectors always, freshly generated ones from htpasswd
# (apache2-utils) and openssl passwd
# ---------------------------------------------------------------------------

def require_tool(name, package):
    """Skip without the tool, except in CI (RESTIC_123PAN_REQUIRE_E2E=1), where it is a failure."""
    if not shutil.which(name):
        if REQUIRE_E2E:
            raise AssertionError("%s is missing (apt-get install -y %s)" % (name, package))
        raise unittest.SkipTest("%s not installed (apt-get install -y %s)" % (name, package))


def wrong_password(password):
    """A different password that no truncation rule can fold back onto the right one."""
    return bytes([password[0] ^ 1]) + password[1:] if password else b"x"


# OpenWall crypt_blowfish wrapper.c vectors (also in PHP's crypt_blowfish.phpt), all cost 5.
BCRYPT_VECTORS = [
    (b"U*U", "$2a$05$CCCCCCCCCCCCCCCCCCCCC.E5YPO9kmyuRGyh0XouQYb4YMJKvyOeW"),
    (b"U*U*", "$2a$05$CCCCCCCCCCCCCCCCCCCCC.VGOzA784oUp/Z0DY336zx7pLYAy0lwK"),
    (b"U*U*U", "$2a$05$XXXXXXXXXXXXXXXXXXXXXOAcXxm9kjPGEMsLznoKqmqw7tc8WCx4a"),
    (b"0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789chars after 72 are ignored",
     "$2a$05$abcdefghijklmnopqrstuu5s2v8.iXieOjg/.AySBTTZIIVFJeBui"),
    (b"\xff\xff\xa3", "$2y$05$/OK.fbVrR/bpIqNJ5ianF.CE5elHaaO4EbggVDjb8P19RukzXSM3e"),
    (b"\xff\xff\xa3", "$2b$05$/OK.fbVrR/bpIqNJ5ianF.CE5elHaaO4EbggVDjb8P19RukzXSM3e"),
    (b"\xa3", "$2y$05$/OK.fbVrR/bpIqNJ5ianF.Sa7shbm4.OzKpvFnX1pQLmQW96oUlCq"),
    (b"\xa3", "$2a$05$/OK.fbVrR/bpIqNJ5ianF.Sa7shbm4.OzKpvFnX1pQLmQW96oUlCq"),
    (b"\xff\xa3345", "$2a$05$/OK.fbVrR/bpIqNJ5ianF.nRht2l/HRhr6zmCp9vYUvvsqynflf9e"),
    (b"\xff\xa334\xff\xff\xff\xa3345", "$2y$05$/OK.fbVrR/bpIqNJ5ianF.o./n25XVfn6oAPaUvHe.Csk4zRfsYPi"),
    (b"\xa3ab", "$2y$05$/OK.fbVrR/bpIqNJ5ianF.6IflQkJytoRVc1yuaNtHfiuq.FRlSIS"),
    (b"\xaa" * 72 + b"chars after 72 are ignored as usual",
     "$2a$05$/OK.fbVrR/bpIqNJ5ianF.swQOIzjOiJ9GHEPuhEkvqrUyvWhEMx6"),
    (b"\xaa\x55" * 36, "$2a$05$/OK.fbVrR/bpIqNJ5ianF.R9xrDjiycxMbQE2bp.vgqlYpW5wx2yy"),
    (b"\x55\xaa\xff" * 24, "$2a$05$/OK.fbVrR/bpIqNJ5ianF.9tQZzcJfm3uj2NvJ/n5xkhpqLrMpWCe"),
    (b"", "$2a$05$CCCCCCCCCCCCCCCCCCCCC.7uG0VCzI2bS7j6ymqJi9CdcdxiRTWNy"),
]

# Apache apr1 vectors published with third-party implementations (whitehat101/apr1-md5,
# the htpasswd-verify crate); MD5-crypt $1$ vectors from musl's and FreeBSD's crypt tests.
MD5_CRYPT_VECTORS = [
    (b"WhiteHat101", "$apr1$HIcWIbgX$G9YqNkCVGlFAN63bClpoT/"),
    (b"apache", "$apr1$rOioh4Wh$bVD3DRwksETubcpEH90ww0"),
    (b"ChangeMe1", "$apr1$PVWlTz/5$SNkIVyogockgH65nMLn.W1"),
    (b"password", "$apr1$lZL6V/ci$eIMz/iKDkbtys/uU7LEK00"),
    (b"password", "$apr1$RandSalt$PgCXHRrkpSt4cbyC2C6bm/"),
    (b"Xy01@#\x01\x02\x80\x7f\xff\r\n\x81\t !", "$1$abcd0123$9Qcg8DyviekV3tDGMZynJ1"),
    (b"", "$1$$qRPK7m23GJusamGpoGLby/"),
    (b"", "$1$salt$UsdFqFVB.FsuinRDK5eE.."),
    (b"Aa@\xaa 0123456789", "$1$salt1234$.pylIeU8A8nhxsVrZNOP.."),
    (b"a" * 20, "$1$aaaaaaaa$zqksdEYCs/p2VrrMTPU0x0"),
    (b"0.s0.l33t", "$1$deadbeef$0Huu6KHrKLVWfqa4WljDE0"),
]

# Ulrich Drepper's SHA-crypt specification test vectors (salts already cut to 16, rounds
# already clamped, as the specification's expected output shows them), plus libxcrypt's
# explicit rounds=5000 and PHP's empty salt.
SHA_CRYPT_VECTORS = [
    (b"Hello world!", "$5$saltstring$5B8vYYiY.CVt1RlTTf8KbXBH3hsxY/GNooZaBBGWEc5"),
    (b"Hello world!", "$5$rounds=10000$saltstringsaltst$3xv.VbSHBb41AL9AvLeujZkZRBAwqFMz2.opqey6IcA"),
    (b"This is just a test", "$5$rounds=5000$toolongsaltstrin$Un/5jzAHMgOGZ5.mWJpuVolil07guHPvOW8mGRcvxa5"),
    (b"a very much longer text to encrypt.  This one even stretches over morethan one line.",
     "$5$rounds=1400$anotherlongsalts$Rx.j8H.h8HjEDGomFU8bDkXm3XIUnzyxf12oP84Bnq1"),
    (b"we have a short salt string but not a short password",
     "$5$rounds=77777$short$JiO1O3ZpDAxGJeaDIuqCoEFysAe1mZNJRs3pw0KQRd/"),
    (b"a short string", "$5$rounds=123456$asaltof16chars..$gP3VQ/6X7UUEW3HkBn2w1/Ptq2jxPyzV/cZKmF/wJvD"),
    (b"the minimum number is still observed",
     "$5$rounds=1000$roundstoolow$yfvwcWrQ8l/K0DAWyuPMDNHpIVlTQebY9l/gL972bIC"),
    (b"Hello world!", "$6$saltstring$svn8UoSVapNtMuq1ukKS4tPQd8iKwSMHWjl/O817G3uBnIFNjnQJuesI68u4OTLiBFdcbYEdFCoEOfaS35inz1"),
    (b"Hello world!", "$6$rounds=5000$saltstring$svn8UoSVapNtMuq1ukKS4tPQd8iKwSMHWjl/O817G3uBnIFNjnQJuesI68u4OTLiBFdcbYEdFCoEOfaS35inz1"),
    (b"Hello world!", "$6$rounds=10000$saltstringsaltst$OW1/O6BYHV6BcXZu8QVeXbDWra3Oeqh0sbHbbMCVNSnCM/UrjmM0Dp8vOuZeHBy/YTBmSK6H9qs/y3RnOaw5v."),
    (b"This is just a test", "$6$rounds=5000$toolongsaltstrin$lQ8jolhgVRVhY4b5pZKaysCLi0QBxGoNeKQzQ3glMhwllF7oGDZxUhx1yxdYcz/e1JSbq3y6JMxxl8audkUEm0"),
    (b"a very much longer text to encrypt.  This one even stretches over morethan one line.",
     "$6$rounds=1400$anotherlongsalts$POfYwTEok97VWcjxIiSOjiykti.o/pQs.wPvMxQ6Fm7I6IoYN3CmLs66x9t0oSwbtEW7o7UmJEiDwGqd8p4ur1"),
    (b"we have a short salt string but not a short password",
     "$6$rounds=77777$short$WuQyW2YR.hBNpjjRhpYD/ifIw05xdfeEyQoMxIXbkvr0gge1a1x3yRULJ5CCaUeOxFmtlcGZelFl5CxtgfiAc0"),
    (b"a short string", "$6$rounds=123456$asaltof16chars..$BtCwjqMJGx5hrJhZywWvt0RLE8uZ4oPwcelCjmw2kSYu.Ec6ycULevoBK25fs2xXgMNrCzIMVcgEJAstJeonj1"),
    (b"the minimum number is still observed",
     "$6$rounds=1000$roundstoolow$kUMsbe306n21p9R.FRkW3IGn.S9NPN0x50YhH1xhLsPuWGsUSklZt58jaTfF4ZEQpyUNGc0dqbpBYYBaHHrsX."),
    (b"foo", "$6$$QMXjqd7rHQZPQ1yHsXkQqC1FBzDiVfTHXL.LaeDAeVV.IzMaV9VU4MQ8kPuZa2SOP1A0RPm772EaFYjpEJtdu."),
]

SHA1_VECTORS = [  # base64 of the well-known SHA-1 digests of "password" and "test"
    (b"password", "{SHA}W6ph5Mm5Pz8GgiULbPgzG37mj9g="),
    (b"test", "{SHA}qUqP5cyxm6YcTAhz05Hph5gvu9M="),
]


class FixedVectorTest(unittest.TestCase):
    def check_vectors(self, verify, vectors):
        for password, hashed in vectors:
            with self.subTest(hashed=hashed):
                self.assertTrue(verify(password, hashed))
                self.assertFalse(verify(wrong_password(password), hashed))

    def test_bcrypt(self):
        self.check_vectors(rp.bcrypt_verify, BCRYPT_VECTORS)

    def test_md5_crypt_and_apr1(self):
        self.check_vectors(rp.apr1_verify, MD5_CRYPT_VECTORS)

    def test_sha_crypt(self):
        self.check_vectors(rp.sha_crypt_verify, SHA_CRYPT_VECTORS)

    def test_sha1(self):
        self.check_vectors(rp.sha1_verify, SHA1_VECTORS)

    def test_verify_password_dispatches_every_format_on_utf8(self):
        for password, hashed in [BCRYPT_VECTORS[0], MD5_CRYPT_VECTORS[1], MD5_CRYPT_VECTORS[10],
                                 SHA_CRYPT_VECTORS[0], SHA_CRYPT_VECTORS[7], SHA1_VECTORS[0]]:
            with self.subTest(hashed=hashed):
                self.assertTrue(rp.verify_password(password.decode("utf-8"), hashed))
                self.assertFalse(rp.verify_password(password.decode("utf-8") + "!", hashed))

    def test_verify_password_keeps_raw_bytes_decoded_with_surrogateescape(self):
        password, hashed = MD5_CRYPT_VECTORS[5]  # not valid UTF-8
        self.assertTrue(rp.verify_password(password.decode("utf-8", "surrogateescape"), hashed))

    def test_bcrypt_uses_only_the_first_72_bytes(self):
        password, hashed = BCRYPT_VECTORS[3]
        self.assertTrue(rp.bcrypt_verify(password[:72], hashed))
        self.assertTrue(rp.bcrypt_verify(password[:72] + b"something else", hashed))
        self.assertFalse(rp.bcrypt_verify(password[:71], hashed))

    def test_bcrypt_variants_agree_and_openwall_2a_quirk_is_not_emulated(self):
        # $2a$, $2b$ and $2y$ are one computation, as in Go's x/crypto/bcrypt (rest-server).
        self.assertTrue(rp.bcrypt_verify(b"\xff\xff\xa3", "$2a$05$/OK.fbVrR/bpIqNJ5ianF.CE5elHaaO4EbggVDjb8P19RukzXSM3e"))
        # OpenWall's own $2a$ result for this non-UTF-8 password (its sign-extension safety
        # measure) is therefore refused; no UTF-8 password can trigger that measure.
        self.assertFalse(rp.bcrypt_verify(b"\xff\xff\xa3", "$2a$05$/OK.fbVrR/bpIqNJ5ianF.nqd1wy.pTMdcvrRWxyiGL2eMz.2a85."))

    def test_hash_kind(self):
        expected = {
            "$2a$05$x": "bcrypt", "$2b$05$x": "bcrypt", "$2y$05$x": "bcrypt", "$apr1$x": "apr1",
            "$1$x": "md5-crypt", "$5$x": "sha256-crypt", "$6$x": "sha512-crypt", "{SHA}x": "sha1",
        }
        for hashed, kind in expected.items():
            self.assertEqual(rp.hash_kind(hashed), kind)

    def test_unsupported_formats_raise(self):
        for hashed in ["secret", "", "abJnggxhB/yWI", "_J9..CCCCXBrJUJV154M",  # plain, DES, BSDi
                       "$2x$05$/OK.fbVrR/bpIqNJ5ianF.CE5elHaaO4EbggVDjb8P19RukzXSM3e", "$2$05$abc",
                       "$3$abc", "$md5$abc", "{SSHA}abc", "{sha}W6ph5Mm5Pz8GgiULbPgzG37mj9g="]:
            with self.subTest(hashed=hashed):
                self.assertRaises(rp.UnsupportedHash, rp.hash_kind, hashed)
                self.assertRaises(rp.UnsupportedHash, rp.verify_password, "secret", hashed)
        self.assertTrue(issubclass(rp.UnsupportedHash, ValueError))

    def test_malformed_entries_of_known_formats_raise(self):
        for hashed in [
            "$2a$03$CCCCCCCCCCCCCCCCCCCCC.E5YPO9kmyuRGyh0XouQYb4YMJKvyOeW",  # cost below 4
            "$2a$32$CCCCCCCCCCCCCCCCCCCCC.E5YPO9kmyuRGyh0XouQYb4YMJKvyOeW",  # cost above 31
            "$2a$05$CCCCCCCCCCCCCCCCCCCCC.E5YPO9kmyuRGyh0XouQYb4YMJKvyOe",   # one char short
            "$2a$05$CCCCCCCCCCCCCCCCCCCCC.E5YPO9kmyuRGyh0XouQYb4YMJKvyOeW\n",
            "$2a$\u0665\u0665$CCCCCCCCCCCCCCCCCCCCC.E5YPO9kmyuRGyh0XouQYb4YMJKvyOeW",  # non-ASCII digits
            "$apr1$rOioh4Wh$bVD3DRwksETubcpEH90ww", "$apr1$toolongsalt$bVD3DRwksETubcpEH90ww0",
            "$5$saltstring$5B8vYYiY.CVt1RlTTf8KbXBH3hsxY/GNooZaBBGWEc", "$5$saltstring",
            "$6$saltstring$5B8vYYiY.CVt1RlTTf8KbXBH3hsxY/GNooZaBBGWEc5",  # SHA-256 length under $6$
            "{SHA}W6ph5Mm5Pz8GgiULbPgzG37mj9g", "{SHA}W6ph5Mm5Pz8GgiULbPgzG37mj9\u00e9=",
        ]:
            with self.subTest(hashed=hashed):
                self.assertRaises(rp.UnsupportedHash, rp.verify_password, "password", hashed)


def run_tool(argv):
    """Run a hashing tool with byte arguments; return its stdout text, or None if it refused."""
    result = subprocess.run(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    return result.stdout.decode("ascii").strip() if result.returncode == 0 else None


PASSWORDS = ["secret", "correct horse battery staple", "p\u00e4ss:w\u00f6rd \u20ac$", "x" * 80]


class HtpasswdGeneratedTest(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        require_tool("htpasswd", "apache2-utils")

    def check_flag(self, flags, kind):
        for password in PASSWORDS:
            with self.subTest(flags=flags, password=password):
                line = run_tool(["htpasswd", "-nb"] + flags + ["user", password.encode("utf-8")])
                if line is None:
                    self.skipTest("this htpasswd does not support %s" % " ".join(flags))
                hashed = line.split(":", 1)[1]
                self.assertEqual(rp.hash_kind(hashed), kind)
                self.assertTrue(rp.verify_password(password, hashed))
                self.assertFalse(rp.verify_password("?" + password[1:], hashed))

    def test_bcrypt_cost_4(self):
        self.check_flag(["-B", "-C", "4"], "bcrypt")

    def test_bcrypt_cost_5(self):
        self.check_flag(["-B", "-C", "5"], "bcrypt")

    def test_apr1(self):
        self.check_flag(["-m"], "apr1")

    def test_sha1(self):
        self.check_flag(["-s"], "sha1")

    def test_sha256_crypt(self):
        self.check_flag(["-2"], "sha256-crypt")
        self.check_flag(["-2", "-r", "1234"], "sha256-crypt")

    def test_sha512_crypt(self):
        self.check_flag(["-5"], "sha512-crypt")
        self.check_flag(["-5", "-r", "20000"], "sha512-crypt")


class OpensslGeneratedTest(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        require_tool("openssl", "openssl")

    def check_option(self, option, kind, salt=None):
        for password in PASSWORDS:
            with self.subTest(option=option, salt=salt, password=password):
                argv = ["openssl", "passwd", option] + (["-salt", salt] if salt else [])
                hashed = run_tool(argv + [password.encode("utf-8")])
                if hashed is None:
                    self.skipTest("this openssl passwd does not support %s" % option)
                self.assertEqual(rp.hash_kind(hashed), kind)
                self.assertTrue(rp.verify_password(password, hashed))
                self.assertFalse(rp.verify_password("?" + password[1:], hashed))

    def test_md5_crypt(self):
        self.check_option("-1", "md5-crypt")

    def test_apr1(self):
        self.check_option("-apr1", "apr1")

    def test_sha256_crypt(self):
        self.check_option("-5", "sha256-crypt")
        self.check_option("-5", "sha256-crypt", salt="rounds=1500$abc")

    def test_sha512_crypt(self):
        self.check_option("-6", "sha512-crypt")
        self.check_option("-6", "sha512-crypt", salt="rounds=999$short")  # clamped to 1000


# ---------------------------------------------------------------------------
# Local storage
# ---------------------------------------------------------------------------

class FailingSpool(object):
    """Looks like a spool but breaks half-way, like a disk error during a write."""
    size = 10

    def iter_range(self, start=0, length=None):
        yield b"12345"
        raise OSError(5, "simulated I/O error")


class LocalStorageTest(unittest.TestCase):
    def setUp(self):
        self.tmp = tempfile.mkdtemp(prefix="r123-local-")
        self.addCleanup(shutil.rmtree, self.tmp)
        self.st = rp.LocalStorage(self.tmp)

    def put(self, kind, data, repo=()):
        ref = rp.ObjectRef(repo, kind, sha256_hex(data)) if kind != "config" else rp.ObjectRef.config(repo)
        with rp.HashingSpool.from_bytes(data) as s:
            self.st.put(ref, s)
        return ref

    def test_layout_matches_restic_local_repository(self):
        self.st.create_repository(("alice", "laptop"))
        base = os.path.join(self.tmp, "alice", "laptop")
        for kind in rp.OBJECT_TYPES:
            self.assertTrue(os.path.isdir(os.path.join(base, kind)))
        self.assertEqual(len(os.listdir(os.path.join(base, "data"))), 256)
        ref = self.put("data", b"pack", ("alice", "laptop"))
        self.assertTrue(os.path.isfile(os.path.join(base, "data", ref.name[:2], ref.name)))
        ref = self.put("keys", b"key", ("alice", "laptop"))
        self.assertTrue(os.path.isfile(os.path.join(base, "keys", ref.name)))
        self.put("config", b"cfg", ("alice", "laptop"))
        with open(os.path.join(base, "config"), "rb") as f:
            self.assertEqual(f.read(), b"cfg")

    def test_stat_list_read_delete(self):
        a = self.put("data", b"a" * 10)
        b = self.put("data", b"b" * 20)
        self.assertEqual(self.st.stat(a), 10)
        self.assertEqual(sorted(self.st.list((), "data")), sorted([(a.name, 10), (b.name, 20)]))
        self.assertEqual(self.st.list((), "index"), [])
        self.assertEqual(self.st.list(("nope",), "data"), [])
        self.assertEqual(b"".join(self.st.read(b, 5, 3)), b"bbb")
        self.assertTrue(self.st.delete(a))
        self.assertFalse(self.st.delete(a))
        self.assertIsNone(self.st.stat(a))
        self.assertRaises(rp.NotFound, self.st.read, a, 0, 1)

    def test_listing_skips_temporary_and_foreign_files(self):
        self.st.create_repository(())
        ref = self.put("index", b"idx")
        for junk in ("README", "." + ref.name, ref.name + ".rest-server-temp123", ref.name.upper()):
            open(os.path.join(self.tmp, "index", junk), "w").close()
        open(os.path.join(self.tmp, "data", "stray-file"), "w").close()
        os.mkdir(os.path.join(self.tmp, "index", "a" * 64))     # a folder is not an object
        self.assertEqual(self.st.list((), "index"), [(ref.name, 3)])
        self.assertEqual(self.st.list((), "data"), [])

    def test_failed_write_leaves_nothing_behind(self):
        ref = rp.ObjectRef((), "data", "cd" * 32)
        self.assertRaises(rp.StorageError, self.st.put, ref, FailingSpool())
        folder = os.path.join(self.tmp, "data", "cd")
        self.assertEqual(os.listdir(folder), [])
        self.assertIsNone(self.st.stat(ref))

    def test_write_goes_through_a_temporary_file_and_rename(self):
        ref = rp.ObjectRef((), "data", "ef" * 32)
        final = self.st.path_of(ref)
        seen = []
        real_replace = os.replace

        def spying_replace(src, dst):
            # at the moment of the rename the final name must not exist yet and the
            # temporary file must already hold every byte
            seen.append((os.path.exists(dst), os.path.getsize(src), os.path.basename(src)))
            return real_replace(src, dst)

        os.replace = spying_replace
        try:
            with rp.HashingSpool.from_bytes(b"x" * 5000) as s:
                self.st.put(ref, s)
        finally:
            os.replace = real_replace
        self.assertEqual(len(seen), 1)
        exists_before, tmp_size, tmp_name = seen[0]
        self.assertFalse(exists_before)
        self.assertEqual(tmp_size, 5000)
        self.assertFalse(rp.is_object_id(tmp_name))
        self.assertEqual(os.path.getsize(final), 5000)

    def test_disk_full_is_507(self):
        ref = rp.ObjectRef((), "data", "01" * 32)

        class FullSpool(FailingSpool):
            def iter_range(self, start=0, length=None):
                raise OSError(28, "No space left on device")
                yield b""

        with self.assertRaises(rp.QuotaExceeded) as cm:
            self.st.put(ref, FullSpool())
        self.assertEqual(cm.exception.status, 507)


# ---------------------------------------------------------------------------
# The REST protocol over real HTTP
# ---------------------------------------------------------------------------

class ServerThread(object):
    """A ResticServer on an ephemeral loopback port, in this process."""

    def __init__(self, storage, server_args=None, **service_args):
        self.service = rp.RepositoryService(storage, **service_args)
        self.server = rp.ResticServer(("127.0.0.1", 0), self.service, **(server_args or {}))
        self.port = self.server.server_address[1]
        self.thread = threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.05})
        self.thread.daemon = True
        self.thread.start()

    def stop(self):
        self.server.shutdown()
        self.server.server_close()
        self.thread.join()

    def request(self, method, path, body=None, headers=None):
        conn = self.connection()
        try:
            conn.request(method, path, body=body, headers=headers or {})
            resp = conn.getresponse()
            return resp.status, dict((k.lower(), v) for k, v in resp.getheaders()), resp.read()
        finally:
            conn.close()

    def connection(self):
        return http.client.HTTPConnection("127.0.0.1", self.port, timeout=30)

    def raw(self, data):
        """Send raw bytes (one request, or several on one connection) and read until
        the server closes; the last request should say Connection: close."""
        s = socket.create_connection(("127.0.0.1", self.port), timeout=30)
        try:
            s.sendall(data)
            chunks = []
            while True:
                c = s.recv(65536)
                if not c:
                    break
                chunks.append(c)
        finally:
            s.close()
        return b"".join(chunks)


class RestProtocolTest(unittest.TestCase):
    def setUp(self):
        self.tmp = tempfile.mkdtemp(prefix="r123-http-")
        self.addCleanup(shutil.rmtree, self.tmp)
        self.root = os.path.join(self.tmp, "repos")
        self.srv = ServerThread(rp.LocalStorage(self.root))
        self.addCleanup(self.srv.stop)
        self.req = self.srv.request

    def upload(self, path, data):
        return self.req("POST", path, data, {"Content-Type": "application/octet-stream"})[0]

    def test_repository_creation_is_idempotent(self):
        self.assertEqual(self.req("POST", "/r/?create=true")[0], 200)
        self.assertEqual(self.req("POST", "/r/?create=true")[0], 200)
        self.assertEqual(len(os.listdir(os.path.join(self.root, "r", "data"))), 256)
        self.assertEqual(self.req("POST", "/r/")[0], 400)
        status, headers, _ = self.req("GET", "/r/")
        self.assertEqual((status, headers["allow"]), (405, "POST"))
        self.assertEqual(self.req("DELETE", "/r/")[0], 405)

    def test_config_lifecycle(self):
        self.assertEqual(self.req("HEAD", "/config")[0], 404)
        self.assertEqual(self.req("GET", "/config")[0], 404)
        self.assertEqual(self.upload("/config", b"CONFIG"), 200)
        status, headers, body = self.req("HEAD", "/config")
        self.assertEqual((status, headers["content-length"], body), (200, "6", b""))
        self.assertEqual(self.req("GET", "/config")[2], b"CONFIG")
        self.assertEqual(self.upload("/config", b"CONFIG"), 200)      # same bytes: a retry
        self.assertEqual(self.upload("/config", b"OTHER!"), 403)      # never replaced silently
        self.assertEqual(self.req("GET", "/config")[2], b"CONFIG")
        self.assertEqual(self.req("DELETE", "/config")[0], 200)
        self.assertEqual(self.req("DELETE", "/config")[0], 200)
        self.assertEqual(self.upload("/config", b"OTHER!"), 200)      # delete + post = migration
        self.assertEqual(self.req("GET", "/config")[2], b"OTHER!")

    def test_listing_v1_v2_and_missing_folder(self):
        for kind in rp.OBJECT_TYPES:
            status, headers, body = self.req("GET", "/fresh/%s/" % kind, headers={"Accept": V2})
            self.assertEqual((status, body), (200, b"[]"))
            self.assertEqual(headers["content-type"], V2)
        blobs = [os.urandom(n) for n in (1, 100, 5000)]
        for b in blobs:
            self.assertEqual(self.upload("/data/" + sha256_hex(b), b), 200)
        status, headers, body = self.req("GET", "/data/", headers={"Accept": V2})
        self.assertEqual(headers["content-type"], V2)
        self.assertEqual(sorted((e["name"], e["size"]) for e in json.loads(body.decode())),
                         sorted((sha256_hex(b), len(b)) for b in blobs))
        status, headers, body = self.req("GET", "/data/")
        self.assertEqual(headers["content-type"], rp.MEDIA_V1)
        self.assertEqual(sorted(json.loads(body.decode())), sorted(sha256_hex(b) for b in blobs))
        self.assertEqual(self.req("POST", "/data/")[0], 405)

    def test_object_lifecycle_and_ranges(self):
        data = os.urandom(10000)
        path = "/u/h/snapshots/" + sha256_hex(data)
        self.assertEqual(self.req("HEAD", path)[0], 404)
        self.assertEqual(self.upload(path, data), 200)
        status, headers, _ = self.req("HEAD", path)
        self.assertEqual((status, headers["content-length"]), (200, "10000"))
        status, headers, body = self.req("GET", path)
        self.assertEqual((status, body), (200, data))
        status, headers, body = self.req("GET", path, headers={"Range": "bytes=100-199"})
        self.assertEqual((status, body, headers["content-range"], headers["content-length"]),
                         (206, data[100:200], "bytes 100-199/10000", "100"))
        status, headers, body = self.req("GET", path, headers={"Range": "bytes=9990-"})
        self.assertEqual((status, body), (206, data[9990:]))
        status, headers, _ = self.req("GET", path, headers={"Range": "bytes=10000-"})
        self.assertEqual((status, headers["content-range"]), (416, "bytes */10000"))
        self.assertEqual(self.req("GET", path, headers={"Range": "bytes=1-2,4-5"})[0], 400)
        self.assertEqual(self.req("GET", path, headers={"Range": "lines=1-2"})[0], 400)
        self.assertEqual(self.req("DELETE", path)[0], 200)
        self.assertEqual(self.req("DELETE", path)[0], 200)          # idempotent
        self.assertEqual(self.req("GET", path)[0], 404)
        self.assertEqual(self.req("PUT", path, b"x")[0], 405)

    def test_empty_object(self):
        path = "/locks/" + sha256_hex(b"")
        self.assertEqual(self.upload(path, b""), 200)
        status, headers, body = self.req("GET", path, headers={"Range": "bytes=0-"})
        self.assertEqual((status, body, headers["content-length"]), (200, b"", "0"))

    def test_upload_verification(self):
        data = b"some bytes"
        wrong = "/keys/" + sha256_hex(b"other bytes")
        self.assertEqual(self.upload(wrong, data), 400)
        self.assertEqual(self.req("HEAD", wrong)[0], 404)
        right = "/keys/" + sha256_hex(data)
        self.assertEqual(self.upload(right, data), 200)
        self.assertEqual(self.upload(right, data), 200)              # retry after a lost answer

    def test_existing_object_is_never_replaced_silently(self):
        st = rp.LocalStorage(os.path.join(self.tmp, "noverify"))
        srv = ServerThread(st, verify_uploads=False)
        self.addCleanup(srv.stop)
        path = "/data/" + "ab" * 32
        self.assertEqual(srv.request("POST", path, b"first")[0], 200)
        self.assertEqual(srv.request("POST", path, b"first")[0], 200)
        self.assertEqual(srv.request("POST", path, b"other")[0], 403)
        self.assertEqual(srv.request("POST", path, b"longer body")[0], 403)
        self.assertEqual(srv.request("GET", path)[2], b"first")

    def test_content_length_rules(self):
        path = "/data/" + sha256_hex(b"abc")
        reply = self.srv.raw(b"POST " + path.encode() + b" HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        self.assertTrue(reply.startswith(b"HTTP/1.1 411"), reply[:40])
        reply = self.srv.raw(b"POST " + path.encode() + b" HTTP/1.1\r\nHost: x\r\nContent-Length: 3x\r\n"
                             b"Connection: close\r\n\r\nabc")
        self.assertTrue(reply.startswith(b"HTTP/1.1 400"), reply[:40])
        reply = self.srv.raw(b"POST " + path.encode() + b" HTTP/1.1\r\nHost: x\r\n"
                             b"Transfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n")
        self.assertTrue(reply.startswith(b"HTTP/1.1 411"), reply[:40])
        self.assertEqual(self.req("HEAD", path)[0], 404)

    def test_short_body_stores_nothing(self):
        data = os.urandom(2000)
        path = "/data/" + sha256_hex(data)
        s = socket.create_connection(("127.0.0.1", self.srv.port), timeout=30)
        s.sendall(("POST %s HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n" % (path, len(data))).encode()
                  + data[:1500])
        s.shutdown(socket.SHUT_WR)      # the client gives up half-way
        reply = s.recv(1000)
        s.close()
        self.assertTrue(reply.startswith(b"HTTP/1.1 400"), reply[:60])
        self.assertEqual(self.req("HEAD", path)[0], 404)
        folder = os.path.join(self.root, "data", path[6:8])
        self.assertEqual(os.listdir(folder) if os.path.isdir(folder) else [], [])

    def test_long_body_is_refused(self):
        data = b"exact"
        path = "/data/" + sha256_hex(data)
        # Only the announced bytes are the body; they do not hash to the name, so the
        # upload is refused and the extra byte is never taken for part of it.
        reply = self.srv.raw(("POST %s HTTP/1.1\r\nHost: x\r\nContent-Length: 4\r\n"
                              "Connection: close\r\n\r\n" % path).encode() + data)
        self.assertTrue(reply.startswith(b"HTTP/1.1 400"), reply[:40])
        self.assertEqual(self.req("HEAD", path)[0], 404)

    def test_traversal_attempts_never_leave_the_root(self):
        # A file next to the served folder that a traversal would reach.
        secret = os.path.join(self.tmp, "config")
        with open(secret, "wb") as f:
            f.write(b"SECRET")
        os.makedirs(self.root)
        targets = [b"/../config", b"/%2e%2e/config", b"/..%2fconfig", b"/%2e%2e%2fconfig",
                   b"/repos/../../config", b"/./../config", b"/a/%2E%2E/%2E%2E/config",
                   b"/..\\config", b"/%5c..%5cconfig", b"/a%00/../config", b"/%c0%ae%c0%ae/config",
                   b"/\x00/config", b"/..;/config"]
        for target in targets:
            for method in (b"GET", b"HEAD", b"POST", b"DELETE"):
                body = b"" if method != b"POST" else b"PWNED"
                reply = self.srv.raw(method + b" " + target + b" HTTP/1.1\r\nHost: x\r\nConnection: close\r\n"
                                     b"Content-Length: %d\r\n\r\n" % len(body) + body)
                status = int(reply.split(b" ", 2)[1])
                self.assertIn(status, (400, 404), (method, target, reply[:80]))
                self.assertNotIn(b"SECRET", reply)
        with open(secret, "rb") as f:
            self.assertEqual(f.read(), b"SECRET")
        for dirpath, _, files in os.walk(self.tmp):
            if dirpath.startswith(self.root):
                continue
            for name in files:
                with open(os.path.join(dirpath, name), "rb") as f:
                    self.assertNotEqual(f.read(), b"PWNED", os.path.join(dirpath, name))

    def test_keep_alive_serves_many_requests_on_one_connection(self):
        conn = http.client.HTTPConnection("127.0.0.1", self.srv.port, timeout=30)
        self.addCleanup(conn.close)
        for i in range(20):
            data = ("object %d" % i).encode()
            conn.request("POST", "/data/" + sha256_hex(data), body=data)
            r = conn.getresponse()
            r.read()
            self.assertEqual(r.status, 200)
            conn.request("GET", "/data/", headers={"Accept": V2})
            r = conn.getresponse()
            self.assertEqual(len(json.loads(r.read().decode())), i + 1)
        conn.request("GET", "/data/" + "00" * 32)
        r = conn.getresponse()
        self.assertEqual((r.status, r.getheader("Content-Length")), (404, str(len(r.read()))))

    def test_storage_failure_is_5xx_not_404(self):
        class BrokenStorage(rp.LocalStorage):
            def list(self, repo, kind):
                raise rp.UpstreamError("cloud is down", status=503)

        srv = ServerThread(BrokenStorage(self.root))
        self.addCleanup(srv.stop)
        self.assertEqual(srv.request("GET", "/data/")[0], 503)


# ---------------------------------------------------------------------------
# Access control, quota, metrics, TLS, unix sockets, systemd (over real HTTP)
# ---------------------------------------------------------------------------

def sha1_htpasswd(password):
    import base64
    return "{SHA}" + base64.b64encode(hashlib.sha1(password.encode()).digest()).decode()


def basic(user, password):
    import base64
    return {"Authorization": "Basic " + base64.b64encode(("%s:%s" % (user, password)).encode()).decode()}


class AccessControlTest(unittest.TestCase):
    def setUp(self):
        self.tmp = tempfile.mkdtemp(prefix="r123-auth-")
        self.addCleanup(shutil.rmtree, self.tmp)
        self.htpasswd_path = os.path.join(self.tmp, "htpasswd")
        self.write_users({"alice": "wonderland", "bob": "builder", "maint": "tenance",
                          "metrics": "scrape"})
        self.users = rp.HtpasswdFile(self.htpasswd_path)
        self.users.CHECK_INTERVAL = 0       # look at the file on every login

    def write_users(self, users, extra=""):
        with open(self.htpasswd_path, "w") as f:
            f.write("# users\n" + extra)
            for user, password in users.items():
                f.write("%s:%s\n" % (user, sha1_htpasswd(password)))

    def serve(self, rules=None, options=None, **service_args):
        srv = ServerThread(rp.LocalStorage(os.path.join(self.tmp, "repos")),
                           dict(htpasswd=self.users, rules=rules, options=options), **service_args)
        self.addCleanup(srv.stop)
        return srv

    def test_login_required_and_reasons_logged(self):
        srv = self.serve()
        status, headers, _ = srv.request("GET", "/keys/")
        self.assertEqual(status, 401)
        self.assertEqual(headers["www-authenticate"], 'Basic realm="restic"')
        with self.assertLogs("restic_123pan", "WARNING") as logs:
            self.assertEqual(srv.request("GET", "/keys/", headers=basic("alice", "wrong"))[0], 401)
            self.assertEqual(srv.request("GET", "/keys/", headers=basic("nobody", "x"))[0], 401)
            self.assertEqual(srv.request("GET", "/keys/", headers={"Authorization": "Basic !!"})[0], 401)
        text = "\n".join(logs.output)
        self.assertIn("'alice': wrong password", text)
        self.assertIn("'nobody': unknown user", text)
        self.assertIn("malformed Basic credentials", text)
        self.assertNotIn("wrong\n", text)
        self.assertEqual(srv.request("GET", "/keys/", headers=basic("alice", "wonderland"))[0], 200)

    def test_every_hash_format_over_http(self):
        """One user per format, from the published vectors: the right password gets
        in, a wrong one gets 401."""
        vectors = [BCRYPT_VECTORS[0], MD5_CRYPT_VECTORS[0], MD5_CRYPT_VECTORS[-1],
                   SHA_CRYPT_VECTORS[0], SHA_CRYPT_VECTORS[-1], SHA1_VECTORS[0]]
        users = {}
        with open(self.htpasswd_path, "w") as f:
            for i, (password, hashed) in enumerate(vectors):
                f.write("user%d:%s\n" % (i, hashed))
                users["user%d" % i] = (password.decode("utf-8"), rp.hash_kind(hashed))
        self.assertEqual(sorted(set(kind for _, kind in users.values())),
                         ["apr1", "bcrypt", "md5-crypt", "sha1", "sha256-crypt", "sha512-crypt"])
        srv = self.serve()
        for user, (password, kind) in sorted(users.items()):
            self.assertEqual(srv.request("GET", "/keys/", headers=basic(user, password))[0], 200, kind)
            self.assertEqual(srv.request("GET", "/keys/", headers=basic(user, password + "x"))[0], 401, kind)

    def test_unsupported_hash_is_logged_as_such(self):
        self.write_users({}, extra="plain:secret\n")
        srv = self.serve()
        with self.assertLogs("restic_123pan", "WARNING") as logs:
            self.assertEqual(srv.request("GET", "/keys/", headers=basic("plain", "secret"))[0], 401)
        self.assertIn("unsupported hash", "\n".join(logs.output))

    def test_file_changes_are_picked_up_and_bad_lines_skipped(self):
        srv = self.serve()
        self.assertEqual(srv.request("GET", "/keys/", headers=basic("carol", "c"))[0], 401)
        self.write_users({"carol": "c"}, extra="bad/name:{SHA}x\nno-colon-line\n")
        os.utime(self.htpasswd_path, (time.time() + 5, time.time() + 5))
        self.assertEqual(srv.request("GET", "/keys/", headers=basic("carol", "c"))[0], 200)
        self.assertEqual(srv.request("GET", "/keys/", headers=basic("alice", "wonderland"))[0], 401)
        # a file that disappears keeps the users that were loaded
        os.unlink(self.htpasswd_path)
        self.assertEqual(srv.request("GET", "/keys/", headers=basic("carol", "c"))[0], 200)
        # SIGHUP reload (what the signal handler calls)
        self.write_users({"dave": "d"})
        srv.server.reload()
        self.assertEqual(srv.request("GET", "/keys/", headers=basic("dave", "d"))[0], 200)

    def test_verified_logins_are_remembered_without_the_password(self):
        calls = []
        real = rp.verify_password

        def counting(password, hashed):
            calls.append(1)
            return real(password, hashed)

        rp.verify_password = counting
        try:
            srv = self.serve()
            for _ in range(5):
                self.assertEqual(srv.request("GET", "/keys/", headers=basic("bob", "builder"))[0], 200)
        finally:
            rp.verify_password = real
        self.assertEqual(len(calls), 1)
        self.assertNotIn(b"builder", repr(self.users._verified).encode())

    def test_private_repos(self):
        srv = self.serve(rules=rp.AccessRules(private_repos=True))
        alice = basic("alice", "wonderland")
        self.assertEqual(srv.request("POST", "/alice/laptop/?create=true", headers=alice)[0], 200)
        self.assertEqual(srv.request("GET", "/alice/laptop/keys/", headers=alice)[0], 200)
        for path in ("/bob/keys/", "/keys/", "/alicex/keys/", "/bob/alice/keys/"):
            self.assertEqual(srv.request("GET", path, headers=alice)[0], 403, path)
        self.assertEqual(srv.request("POST", "/bob/?create=true", headers=alice)[0], 403)
        # the check is made on the decoded path, the same one storage uses
        self.assertEqual(srv.request("GET", "/%62ob/keys/", headers=alice)[0], 403)
        self.assertEqual(srv.request("GET", "/alice/../bob/keys/", headers=alice)[0], 400)

    def test_append_only_and_per_user_rights(self):
        rules = rp.AccessRules(append_only=True, full_access_users=["maint"])
        srv = self.serve(rules=rules)
        alice, maint = basic("alice", "wonderland"), basic("maint", "tenance")
        data = os.urandom(3000)
        path = "/data/" + sha256_hex(data)
        lock = b"a lock"
        lock_path = "/locks/" + sha256_hex(lock)
        self.assertEqual(srv.request("POST", "/config", b"cfg", alice)[0], 200)
        self.assertEqual(srv.request("POST", path, data, alice)[0], 200)
        self.assertEqual(srv.request("POST", path, data, alice)[0], 200)     # same-bytes retry
        self.assertEqual(srv.request("POST", "/config", b"cfg", alice)[0], 200)
        self.assertEqual(srv.request("POST", "/config", b"new", alice)[0], 403)
        self.assertEqual(srv.request("POST", lock_path, lock, alice)[0], 200)
        for p in (path, "/config", "/keys/" + "0" * 64, "/index/" + "0" * 64, "/snapshots/" + "0" * 64):
            self.assertEqual(srv.request("DELETE", p, headers=alice)[0], 403, p)
        self.assertEqual(srv.request("DELETE", lock_path, headers=alice)[0], 200)
        self.assertEqual(srv.request("GET", path, headers=alice)[2], data)
        self.assertEqual(srv.request("DELETE", path, headers=maint)[0], 200)
        self.assertEqual(srv.request("HEAD", path, headers=maint)[0], 404)
        # the other way round: only bob is append-only
        rules = rp.AccessRules(append_only_users=["bob"])
        self.assertTrue(rules.is_append_only("bob"))
        self.assertFalse(rules.is_append_only("alice"))
        self.assertTrue(rules.may_delete("bob", "locks"))
        self.assertFalse(rules.may_delete("bob", "snapshots"))

    def test_quota_per_repository(self):
        srv = self.serve(max_size=10000)
        alice = basic("alice", "wonderland")
        blobs = [os.urandom(4000) for _ in range(3)]
        self.assertEqual(srv.request("POST", "/r1/data/" + sha256_hex(blobs[0]), blobs[0], alice)[0], 200)
        self.assertEqual(srv.request("POST", "/r1/data/" + sha256_hex(blobs[1]), blobs[1], alice)[0], 200)
        status, _, body = srv.request("POST", "/r1/data/" + sha256_hex(blobs[2]), blobs[2], alice)
        self.assertEqual(status, 507, body)
        self.assertEqual(srv.request("HEAD", "/r1/data/" + sha256_hex(blobs[2]), headers=alice)[0], 404)
        # another repository has its own quota
        self.assertEqual(srv.request("POST", "/r2/data/" + sha256_hex(blobs[2]), blobs[2], alice)[0], 200)
        # deleting gives the room back
        self.assertEqual(srv.request("DELETE", "/r1/data/" + sha256_hex(blobs[0]), headers=alice)[0], 200)
        self.assertEqual(srv.request("POST", "/r1/data/" + sha256_hex(blobs[2]), blobs[2], alice)[0], 200)

    def test_quota_counts_what_is_already_stored(self):
        st = rp.LocalStorage(os.path.join(self.tmp, "repos"))
        big = os.urandom(9000)
        with rp.HashingSpool.from_bytes(big) as s:
            st.put(rp.ObjectRef(("r",), "data", sha256_hex(big)), s)
        srv = self.serve(max_size=10000)
        small = os.urandom(2000)
        status = srv.request("POST", "/r/data/" + sha256_hex(small), small, basic("bob", "builder"))[0]
        self.assertEqual(status, 507)

    def test_metrics(self):
        opts = rp.ServerOptions(prometheus=True)
        srv = self.serve(options=opts, track_usage=True)
        alice = basic("alice", "wonderland")
        self.assertEqual(srv.request("GET", "/metrics")[0], 401)
        before = rp.METRICS.value("rest_server_blob_write_total", user="alice", repo="m", type="snapshots")
        snap = b"snapshot bytes"
        self.assertEqual(srv.request("POST", "/m/?create=true", headers=alice)[0], 200)
        self.assertEqual(srv.request("POST", "/m/snapshots/" + sha256_hex(snap), snap, alice)[0], 200)
        self.assertEqual(srv.request("GET", "/m/snapshots/" + sha256_hex(snap), headers=alice)[0], 200)
        status, headers, body = srv.request("GET", "/metrics", headers=alice)
        self.assertEqual(status, 200)
        samples = parse_prometheus(body.decode())
        key = ('rest_server_blob_write_total', (("repo", "m"), ("type", "snapshots"), ("user", "alice")))
        self.assertEqual(samples[key], before + 1)
        self.assertEqual(samples[("restic123pan_repository_bytes", (("repo", "m"),))], len(snap))
        self.assertEqual(samples[("restic123pan_repository_objects", (("repo", "m"), ("type", "snapshots")))], 1)
        self.assertIn(("restic123pan_repository_last_snapshot_timestamp_seconds", (("repo", "m"),)), samples)
        # with --private-repos only the user "metrics" may read it
        srv2 = self.serve(rules=rp.AccessRules(private_repos=True),
                          options=rp.ServerOptions(prometheus=True, private_repos=True))
        self.assertEqual(srv2.request("GET", "/metrics", headers=alice)[0], 403)
        self.assertEqual(srv2.request("GET", "/metrics", headers=basic("metrics", "scrape"))[0], 200)
        srv3 = self.serve(options=rp.ServerOptions(prometheus=True, prometheus_no_auth=True))
        self.assertEqual(srv3.request("GET", "/metrics")[0], 200)
        # without --prometheus, /metrics is just a repository called "metrics"
        srv4 = self.serve()
        self.assertEqual(srv4.request("GET", "/metrics", headers=alice)[0], 405)


def parse_prometheus(text):
    """{(name, sorted label pairs): value}; fails on any malformed line."""
    samples = {}
    line_re = re.compile(r'\A([a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(.*)\})? (\S+)\Z')
    label_re = re.compile(r'([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\]|\\.)*)"(?:,|\Z)')
    for line in text.splitlines():
        if not line or line.startswith("#"):
            if line.startswith("# TYPE"):
                assert line.split()[3] in ("counter", "gauge"), line
            continue
        m = line_re.match(line)
        assert m, "bad metrics line %r" % line
        labels = tuple(sorted(label_re.findall(m.group(2) or "")))
        samples[(m.group(1), labels)] = float(m.group(3))
    return samples


def make_certificate(folder):
    """A self-signed certificate for 127.0.0.1 made with the openssl command."""
    require_tool("openssl", "openssl")
    openssl = shutil.which("openssl")
    cert, key = os.path.join(folder, "cert.pem"), os.path.join(folder, "key.pem")
    subprocess.run([openssl, "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2",
                    "-subj", "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1,DNS:localhost",
                    "-keyout", key, "-out", cert], check=True, stdout=subprocess.DEVNULL,
                   stderr=subprocess.DEVNULL, timeout=120)
    return cert, key


class TransportTest(unittest.TestCase):
    def setUp(self):
        self.tmp = tempfile.mkdtemp(prefix="r123-net-")
        self.addCleanup(shutil.rmtree, self.tmp)

    def test_tls_minimum_version_and_certificate_reload(self):
        import ssl
        cert, key = make_certificate(self.tmp)
        srv = ServerThread(rp.LocalStorage(os.path.join(self.tmp, "repos")),
                           dict(tls=(cert, key, "1.2")))
        self.addCleanup(srv.stop)
        ctx = ssl.create_default_context(cafile=cert)
        conn = http.client.HTTPSConnection("127.0.0.1", srv.port, context=ctx, timeout=30)
        conn.request("GET", "/keys/")
        self.assertEqual(conn.getresponse().status, 200)
        conn.close()
        self.assertEqual(srv.server.base_url()[:8], "https://")
        # plain HTTP on the TLS port gets nowhere
        reply = srv.raw(b"GET /keys/ HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        self.assertNotIn(b"200 OK", reply)
        old = ssl.create_default_context(cafile=cert)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            old.maximum_version = ssl.TLSVersion.TLSv1_1
            old.minimum_version = ssl.TLSVersion.MINIMUM_SUPPORTED
        conn = http.client.HTTPSConnection("127.0.0.1", srv.port, context=old, timeout=30)
        self.assertRaises((ssl.SSLError, OSError), conn.request, "GET", "/keys/")
        conn.close()
        # SIGHUP loads a new certificate for new connections
        new_dir = os.path.join(self.tmp, "new")
        os.mkdir(new_dir)
        cert2, key2 = make_certificate(new_dir)
        shutil.copy(cert2, cert)
        shutil.copy(key2, key)
        srv.server.reload()
        ctx2 = ssl.create_default_context(cafile=cert2)
        conn = http.client.HTTPSConnection("127.0.0.1", srv.port, context=ctx2, timeout=30)
        conn.request("GET", "/keys/")
        self.assertEqual(conn.getresponse().status, 200)
        conn.close()

    def test_unix_socket(self):
        path = os.path.join(self.tmp, "restic.sock")
        service = rp.RepositoryService(rp.LocalStorage(os.path.join(self.tmp, "repos")))
        server = rp.ResticUnixServer(path, service)
        thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05})
        thread.start()
        try:
            data = b"over a unix socket"
            conn = UnixHTTPConnection(path)
            conn.request("POST", "/u/keys/" + sha256_hex(data), body=data)
            self.assertEqual(conn.getresponse().status, 200)
            conn.close()
            conn = UnixHTTPConnection(path)
            conn.request("GET", "/u/keys/" + sha256_hex(data))
            self.assertEqual(conn.getresponse().read(), data)
            conn.close()
            self.assertEqual(server.base_url(), "http+unix://%s:/" % path)
        finally:
            server.shutdown()
            server.server_close()
            thread.join()
        self.assertFalse(os.path.exists(path))

    def test_systemd_socket_activation(self):
        listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        listener.bind(("127.0.0.1", 0))
        listener.listen(16)
        port = listener.getsockname()[1]
        fd = listener.fileno()
        env = dict(os.environ, LISTEN_FDS="1")
        env.pop("LISTEN_PID", None)
        proc = subprocess.Popen([sys.executable, SERVER_SCRIPT, "--path", os.path.join(self.tmp, "r"),
                                 "--listen", "127.0.0.1:1"],   # ignored: the passed socket wins
                                env=env, pass_fds=(fd,), preexec_fn=lambda: os.dup2(fd, 3),
                                stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, universal_newlines=True)
        self.addCleanup(lambda: proc.poll() is None and proc.kill())
        listener.close()
        self.assertIn(":%d/" % port, read_server_url(proc))
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
        conn.request("GET", "/keys/")
        self.assertEqual(conn.getresponse().status, 200)
        conn.close()
        proc.send_signal(signal.SIGTERM)
        self.assertEqual(proc.wait(timeout=60), 0)
        proc.stdout.close()

    def test_refuses_open_server_on_public_address(self):
        r = subprocess.run([sys.executable, SERVER_SCRIPT, "--listen", "0.0.0.0:0", "--path", self.tmp],
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, universal_newlines=True,
                           timeout=60)
        self.assertEqual(r.returncode, 2)
        self.assertIn("refusing to serve", r.stderr)
        self.assertIn("--no-auth", r.stderr)
        proc = subprocess.Popen([sys.executable, SERVER_SCRIPT, "--listen", "0.0.0.0:0", "--path", self.tmp,
                                 "--no-auth"], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                                universal_newlines=True)
        self.addCleanup(lambda: proc.poll() is None and proc.kill())
        read_server_url(proc)
        proc.send_signal(signal.SIGTERM)
        self.assertEqual(proc.wait(timeout=60), 0)
        proc.stdout.close()

    def test_contradictory_options(self):
        for argv in (["--no-auth", "--private-repos"], ["--tls-cert", "x"],
                     ["--prometheus-no-auth"], ["--append-only-users", "a", "--full-access-users", "a"],
                     ["--max-size", "lots"], ["--append-only-users", "a/b"],
                     ["--htpasswd-file", os.path.join(self.tmp, "missing")],
                     ["--private-repos", "--path", self.tmp]):
            r = subprocess.run([sys.executable, SERVER_SCRIPT, "--listen", "127.0.0.1:0"] + argv,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, universal_newlines=True,
                               timeout=60)
            self.assertEqual(r.returncode, 2, (argv, r.stderr))
            self.assertEqual(len(r.stderr.strip().splitlines()) if "usage:" not in r.stderr else 1, 1,
                             (argv, r.stderr))

    def test_access_log_file_in_combined_format(self):
        log_path = os.path.join(self.tmp, "access.log")
        access_log = rp.AccessLogFile(log_path)
        srv = ServerThread(rp.LocalStorage(os.path.join(self.tmp, "repos")), dict(access_log=access_log))
        self.addCleanup(srv.stop)
        srv.request("GET", "/keys/", headers={"User-Agent": "restic/0.14.0", "Referer": "x"})
        srv.request("HEAD", "/config")
        # the client may read the answer before the server wrote its log line
        self.assertTrue(srv.server.tracker.wait_idle(30))
        access_log.close()
        with open(log_path) as f:
            lines = f.read().splitlines()
        combined = re.compile(r'\A127\.0\.0\.1 - - \[\d\d/\w{3}/\d{4}:\d\d:\d\d:\d\d [+-]\d{4}\] '
                              r'"(\S+) (\S+) HTTP/1\.1" (\d{3}) (\d+) "([^"]*)" "([^"]*)"\Z')
        m = [combined.match(l) for l in lines]
        self.assertTrue(all(m), lines)
        self.assertEqual([x.groups() for x in m],
                         [("GET", "/keys/", "200", "2", "x", "restic/0.14.0"),
                          ("HEAD", "/config", "404", "0", "-", "-")])

    def test_byte_counts(self):
        self.assertEqual(rp._byte_count("1000"), 1000)
        self.assertEqual(rp._byte_count("2K"), 2048)
        self.assertEqual(rp._byte_count("500M"), 500 * 1024 ** 2)
        self.assertEqual(rp._byte_count("1GiB"), 1024 ** 3)
        self.assertEqual(rp._byte_count("3t"), 3 * 1024 ** 4)


class UnixHTTPConnection(http.client.HTTPConnection):
    def __init__(self, path):
        http.client.HTTPConnection.__init__(self, "localhost", timeout=30)
        self.unix_path = path

    def connect(self):
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(30)
        self.sock.connect(self.unix_path)


class GracefulShutdownTest(unittest.TestCase):
    def test_sigterm_lets_a_running_upload_finish_then_exits_0(self):
        tmp = tempfile.mkdtemp(prefix="r123-stop-")
        self.addCleanup(shutil.rmtree, tmp)
        proc = subprocess.Popen([sys.executable, SERVER_SCRIPT, "--listen", "127.0.0.1:0",
                                 "--path", tmp], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                universal_newlines=True)
        self.addCleanup(lambda: proc.poll() is None and proc.kill())
        url = read_server_url(proc)
        port = int(url.rsplit(":", 1)[1].strip("/"))
        data = os.urandom(100000)
        path = "/data/" + sha256_hex(data)
        s = socket.create_connection(("127.0.0.1", port), timeout=30)
        s.sendall(("POST %s HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n" % (path, len(data))).encode()
                  + data[:50000])
        # The kernel hands connections to accept() in the order they were made, so
        # once a second connection has been answered the first one was accepted.
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
        conn.request("GET", "/keys/")
        conn.getresponse().read()
        conn.close()
        proc.send_signal(signal.SIGTERM)
        wait_for_line(proc.stderr, "no new connections")
        s.sendall(data[50000:])
        reply = s.recv(1000)
        s.close()
        self.assertTrue(reply.startswith(b"HTTP/1.1 200"), reply[:60])
        self.assertEqual(proc.wait(timeout=60), 0)
        with open(os.path.join(tmp, "data", path[6:8], path[6:]), "rb") as f:
            self.assertEqual(f.read(), data)


def wait_for_line(stream, needle):
    for line in stream:
        if needle in line:
            return line
    raise AssertionError("stream ended before %r" % needle)


def read_server_url(proc):
    line = wait_for_line(proc.stdout, "restic -r rest:")
    return re.search(r"rest:(\S+)", line).group(1)


# ---------------------------------------------------------------------------
# End to end with the real restic
# ---------------------------------------------------------------------------

def make_tree(root, seed, total_mib=52):
    """Deterministic tree: many small files, some medium, a few of several MiB, and
    empty ones; at least `total_mib` MiB in all."""
    rnd = random.Random(seed)
    sizes = [0] * 5 + [rnd.randint(1, 4096) for _ in range(400)] \
        + [rnd.randint(10000, 900000) for _ in range(30)]
    while sum(sizes) < total_mib * 1024 * 1024:
        sizes.append(rnd.randint(3, 9) * 1024 * 1024 + rnd.randint(0, 4095))
    for i, size in enumerate(sizes):
        folder = os.path.join(root, "d%02d" % (i % 17), "s%d" % (i % 3))
        os.makedirs(folder, exist_ok=True)
        with open(os.path.join(folder, "f%04d.bin" % i), "wb") as f:
            f.write(rnd.getrandbits(8 * size).to_bytes(size, "little") if size else b"")


def change_tree(root, seed):
    """Add, rewrite and remove some files, as a second day of work would."""
    rnd = random.Random(seed)
    files = sorted(os.path.join(d, n) for d, _, ns in os.walk(root) for n in ns)
    for path in rnd.sample(files, 20):
        os.unlink(path)
    for path in rnd.sample([p for p in files if os.path.exists(p)], 10):
        with open(path, "ab") as f:
            f.write(b"changed %d" % rnd.getrandbits(32))
    os.makedirs(os.path.join(root, "new"), exist_ok=True)
    for i in range(30):
        size = rnd.choice([0, 10, 5000, 300000, 2 * 1024 * 1024])
        with open(os.path.join(root, "new", "n%02d" % i), "wb") as f:
            f.write(rnd.getrandbits(8 * size).to_bytes(size, "little") if size else b"")


def manifest(root):
    out = {}
    for d, _, names in os.walk(root):
        for n in names:
            p = os.path.join(d, n)
            with open(p, "rb") as f:
                out[os.path.relpath(p, root)] = hashlib.sha256(f.read()).hexdigest()
    return out


class ResticEndToEndBase(unittest.TestCase):
    """Runs the real restic against a server process started from the command line."""

    @classmethod
    def setUpClass(cls):
        if UNIT_ONLY:
            raise unittest.SkipTest("RESTIC_123PAN_UNIT_ONLY=1")
        cls.restic = shutil.which("restic")
        if not cls.restic:
            if REQUIRE_E2E:
                raise AssertionError("restic is not installed but RESTIC_123PAN_REQUIRE_E2E=1")
            raise unittest.SkipTest("restic not installed (apt-get install -y restic)")

    def setUp(self):
        self.tmp = tempfile.mkdtemp(prefix="r123-e2e-")
        self.addCleanup(shutil.rmtree, self.tmp, True)
        self.env = dict(os.environ, RESTIC_PASSWORD="correct horse battery staple",
                        RESTIC_CACHE_DIR=os.path.join(self.tmp, "cache"))

    def start_server(self, *argv):
        log_path = os.path.join(self.tmp, "server.log")
        self.server_log = open(log_path, "w+")
        self.addCleanup(self.server_log.close)
        proc = subprocess.Popen([sys.executable, SERVER_SCRIPT, "--listen", "127.0.0.1:0"] + list(argv),
                                stdout=subprocess.PIPE, stderr=self.server_log, universal_newlines=True)
        self.addCleanup(self.stop_server, proc)
        self.server_proc = proc
        return read_server_url(proc)

    def stop_server(self, proc):
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            self.assertEqual(proc.wait(timeout=60), 0)
        proc.stdout.close()

    def server_log_text(self):
        self.server_log.flush()
        with open(self.server_log.name) as f:
            return f.read()

    def restic_run(self, repo, *args, **kw):
        cmd = [self.restic, "-r", repo] + list(kw.get("options", [])) + list(args)
        r = subprocess.run(cmd, env=self.env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                           universal_newlines=True, timeout=kw.get("timeout", 900))
        if kw.get("expect_failure"):
            self.assertNotEqual(r.returncode, 0, "%s should have failed" % " ".join(args))
            return r.stderr
        if r.returncode != 0:
            self.fail("%s failed (%d):\n%s\n%s\n--- server log tail ---\n%s"
                      % (" ".join(args), r.returncode, r.stdout[-3000:], r.stderr[-3000:],
                         self.server_log_text()[-4000:]))
        return r.stdout

    def snapshot_ids(self, repo, options):
        snaps = json.loads(self.restic_run(repo, "snapshots", "--json", options=options))
        return [s["id"] for s in sorted(snaps, key=lambda s: s["time"])]

    def run_scenario(self, repo, options=(), direct_path=None):
        """init, backup, change, backup, check --read-data, restore both snapshots and
        compare bytes, forget --keep-last 1 --prune, check again."""
        options = list(options)
        src = os.path.join(self.tmp, "src")
        make_tree(src, seed=1)
        first = manifest(src)
        total = sum(os.path.getsize(os.path.join(d, n)) for d, _, ns in os.walk(src) for n in ns)
        self.assertGreaterEqual(total, 50 * 1024 * 1024)
        self.restic_run(repo, "init", options=options)
        self.restic_run(repo, "backup", src, options=options)
        change_tree(src, seed=2)
        second = manifest(src)
        self.assertNotEqual(first, second)
        self.restic_run(repo, "backup", src, options=options)
        snaps = self.snapshot_ids(repo, options)
        self.assertEqual(len(snaps), 2)
        self.restic_run(repo, "check", "--read-data", options=options)
        for snap, expected in ((snaps[0], first), (snaps[1], second)):
            target = os.path.join(self.tmp, "restore-" + snap)
            self.restic_run(repo, "restore", snap, "--target", target, options=options)
            restored = manifest(os.path.join(target, os.path.relpath(src, "/")))
            self.assertEqual(restored, expected, "restored tree of %s differs" % snap)
        self.restic_run(repo, "forget", "--keep-last", "1", "--prune", options=options)
        self.assertEqual(self.snapshot_ids(repo, options), [snaps[1]])
        self.restic_run(repo, "check", "--read-data", options=options)
        if direct_path:
            # the server's folder is a plain restic repository
            self.restic_run(direct_path, "check", options=[])
            self.assertEqual(self.snapshot_ids(direct_path, []), [snaps[1]])
        log_text = self.server_log_text()
        self.assertNotIn("Traceback", log_text)
        self.assertNotRegex(log_text, r'" 5\d\d ')


class LocalEndToEndTest(ResticEndToEndBase):
    def test_local_backend_default_connections(self):
        data = os.path.join(self.tmp, "repos")
        url = self.start_server("--path", data)
        self.run_scenario("rest:" + url + "alice/laptop/",
                          direct_path=os.path.join(data, "alice", "laptop"))

    def test_local_backend_eight_connections_root_repository(self):
        data = os.path.join(self.tmp, "repos")
        url = self.start_server("--path", data)
        self.run_scenario("rest:" + url, options=["-o", "rest.connections=8"], direct_path=data)


class AccessEndToEndTest(ResticEndToEndBase):
    def test_tls_users_and_append_only_with_real_restic(self):
        cert, key = make_certificate(self.tmp)
        data = os.path.join(self.tmp, "repos")
        os.makedirs(data)
        require_tool("htpasswd", "apache2-utils")
        alice_line = subprocess.run(["htpasswd", "-nbB", "-C", "5", "alice", "wonderland"],
                                    stdout=subprocess.PIPE, universal_newlines=True, check=True).stdout
        with open(os.path.join(data, ".htpasswd"), "w") as f:      # the default location
            f.write("%s\nmaint:%s\n" % (alice_line.strip(), sha1_htpasswd("tenance")))
        url = self.start_server("--path", data, "--tls", "--tls-cert", cert, "--tls-key", key,
                                "--append-only", "--full-access-users", "maint")
        self.assertTrue(url.startswith("https://127.0.0.1:"), url)
        hostport = url[len("https://"):].rstrip("/")
        alice = "rest:https://alice:wonderland@%s/home/" % hostport
        maint = "rest:https://maint:tenance@%s/home/" % hostport
        opts = ["--cacert", cert]
        src = os.path.join(self.tmp, "src")
        make_tree(src, seed=3, total_mib=3)
        self.restic_run(alice, "init", options=opts)
        self.restic_run(alice, "backup", src, options=opts)
        change_tree(src, seed=4)
        self.restic_run(alice, "backup", src, options=opts)
        self.assertEqual(len(self.snapshot_ids(alice, opts)), 2)
        # a wrong password and an unknown CA are refused
        self.restic_run("rest:https://alice:nope@%s/home/" % hostport, "snapshots", options=opts,
                        expect_failure=True)
        self.restic_run(alice, "snapshots", expect_failure=True)
        # append-only: the backup client cannot forget ...
        self.restic_run(alice, "forget", "--keep-last", "1", options=opts, expect_failure=True)
        self.assertEqual(len(self.snapshot_ids(alice, opts)), 2)
        # ... the maintenance identity can, and prunes
        self.restic_run(maint, "forget", "--keep-last", "1", "--prune", options=opts)
        self.assertEqual(len(self.snapshot_ids(alice, opts)), 1)
        self.restic_run(alice, "check", "--read-data", options=opts)
        restored = os.path.join(self.tmp, "restored")
        self.restic_run(alice, "restore", "latest", "--target", restored, options=opts)
        self.assertEqual(manifest(os.path.join(restored, os.path.relpath(src, "/"))), manifest(src))


# ---------------------------------------------------------------------------
# A runner whose last line says "N passed, N failed", for CI logs
# ---------------------------------------------------------------------------

def run_all():
    suite = unittest.defaultTestLoader.loadTestsFromModule(sys.modules[__name__])
    result = unittest.TextTestRunner(verbosity=2).run(suite)
    failed = len(result.failures) + len(result.errors) + len(result.unexpectedSuccesses)
    skipped = len(result.skipped)
    passed = result.testsRun - failed - skipped
    print("%d passed, %d failed, %d skipped" % (passed, failed, skipped))
    return 0 if result.wasSuccessful() else 1


if __name__ == "__main__":
    sys.modules.setdefault("test_restic_123pan", sys.modules[__name__])
    sys.exit(run_all())
