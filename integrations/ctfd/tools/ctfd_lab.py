#!/usr/bin/env python3
"""A throwaway CTFd with the tidegate plugin, for tests and demos.

    ctfd_lab.py start --dir DIR --port P [--plugin PATH] [--env K=V ...]
                      [--user-mode] [--admin-name N] [--admin-password P]
                      [--with-playwright] [--archive CTFd-3.8.7.tar.gz]
    ctfd_lab.py stop --dir DIR

`start` unpacks CTFd into DIR, makes a virtualenv in DIR/venv (pip's cache
makes a second one fast), copies the plugin into CTFd/plugins/tidegate,
starts gunicorn on 127.0.0.1:P in a process group of its own, completes
CTFd's /setup, creates an admin API token and writes DIR/state.json:
{url, admin_name, admin_password, admin_token, pgid, pid, dir, ...}.
It prints that JSON on stdout; progress goes to stderr. On failure it stops
what it started, removes DIR and exits non-zero.

`stop` ends the process group (SIGTERM, SIGKILL after 10 s), checks that no
process of DIR is left, and removes DIR (venv, database, logs: everything).

Standard library only; runs with any python3 >= 3.8 (the virtualenv is made
with the same interpreter unless --python says otherwise).
"""

import argparse
import http.cookiejar
import json
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tarfile
import time
import urllib.error
import urllib.parse
import urllib.request

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.abspath(os.path.join(HERE, "..", "..", ".."))
DEFAULT_PLUGIN = os.path.join(HERE, "..", "tidegate")
MARKER = ".ctfd_lab"
STATE = "state.json"


class LabError(Exception):
    pass


def say(msg):
    print("ctfd_lab: " + msg, file=sys.stderr, flush=True)


ARCHIVE_NAME = os.path.join("shared", "ctfd", "CTFd-3.8.7.tar.gz")


def default_archive():
    """$TIDEGATE_CTFD_ARCHIVE, else `shared/ctfd/` beside the checkout or
    beside any folder above it (a clone may sit deeper than the working
    copy), else /work/shared/ctfd/ (where these machines keep it)."""
    env = os.environ.get("TIDEGATE_CTFD_ARCHIVE")
    if env:
        return env
    here = os.path.abspath(REPO)
    candidates = []
    while True:
        candidates.append(os.path.join(os.path.dirname(here), ARCHIVE_NAME))
        parent = os.path.dirname(here)
        if parent == here:
            break
        here = parent
    candidates.append(os.path.join("/work", ARCHIVE_NAME))
    for c in candidates:
        if os.path.isfile(c):
            return c
    return candidates[0]


# --- unpacking ---------------------------------------------------------------


def safe_extract(archive, dest):
    """Extracts `archive` into `dest`, refusing members that would land
    outside it; returns the CTFd checkout's path (the folder holding CTFd/)."""
    dest_real = os.path.realpath(dest)
    try:
        tar = tarfile.open(archive, "r:*")
    except (OSError, tarfile.TarError) as e:
        raise LabError("cannot open the CTFd archive %s: %s" % (archive, e))
    with tar:
        members = []
        for m in tar.getmembers():
            target = os.path.realpath(os.path.join(dest, m.name))
            if not (target == dest_real or target.startswith(dest_real + os.sep)):
                raise LabError("archive member %r leaves the directory" % m.name)
            if m.issym() or m.islnk():
                link = os.path.realpath(
                    os.path.join(os.path.dirname(target), m.linkname)
                )
                if not link.startswith(dest_real + os.sep):
                    raise LabError("archive link %r leaves the directory" % m.name)
            if m.isdev():
                continue
            members.append(m)
        if hasattr(tarfile, "data_filter"):
            tar.extractall(dest, members=members, filter="data")
        else:
            tar.extractall(dest, members=members)
    for name in sorted(os.listdir(dest)):
        if os.path.isdir(os.path.join(dest, name, "CTFd")) and os.path.isfile(
            os.path.join(dest, name, "requirements.txt")
        ):
            return os.path.join(dest, name)
    raise LabError("no CTFd checkout (a folder with CTFd/ and requirements.txt) in " + archive)


# --- processes -----------------------------------------------------------------


def _proc_stat(pid):
    """(state, pgrp) of a process, or None when it is gone."""
    try:
        with open("/proc/%d/stat" % pid) as f:
            data = f.read()
    except OSError:
        return None
    # comm may hold spaces and parentheses: split after the last ')'.
    rest = data[data.rindex(")") + 2 :].split()
    return rest[0], int(rest[2])


def _cmdline(pid):
    try:
        with open("/proc/%d/cmdline" % pid, "rb") as f:
            return f.read().replace(b"\0", b" ").decode("utf-8", "replace")
    except OSError:
        return ""


def _argv(pid):
    try:
        with open("/proc/%d/cmdline" % pid, "rb") as f:
            return [a.decode("utf-8", "replace") for a in f.read().split(b"\0") if a]
    except OSError:
        return []


def _cwd(pid):
    try:
        return os.readlink("/proc/%d/cwd" % pid)
    except OSError:
        return ""


def _pids():
    for name in os.listdir("/proc"):
        if name.isdigit():
            yield int(name)


def group_members(pgid):
    """Live (non-zombie) processes of the process group."""
    out = []
    for pid in _pids():
        st = _proc_stat(pid)
        if st and st[1] == pgid and st[0] != "Z":
            out.append(pid)
    return out


def processes_of(directory):
    """Live processes run from `directory` (their program or script is in it)
    or working in it."""
    names = {os.path.abspath(directory), os.path.realpath(directory)}
    out = []
    for pid in _pids():
        if pid == os.getpid():
            continue
        st = _proc_stat(pid)
        if not st or st[0] == "Z":
            continue
        argv = _argv(pid)[:2]
        cwd = _cwd(pid)
        for d in names:
            inside = [a for a in argv if a.startswith(d + os.sep)]
            if inside or cwd == d or cwd.startswith(d + os.sep):
                out.append(pid)
                break
    return out


def stop_group(pgid, directory, grace=10.0):
    """SIGTERM the group, SIGKILL what is left after `grace` seconds. Only a
    group with a process of `directory` is signalled (a recycled id is not
    ours)."""
    members = group_members(pgid)
    if not members:
        return
    ours = set(processes_of(directory))
    if not ours.intersection(members):
        say("process group %d has no process of %s: not touching it" % (pgid, directory))
        return
    try:
        os.killpg(pgid, signal.SIGTERM)
    except ProcessLookupError:
        return
    deadline = time.time() + grace
    while time.time() < deadline:
        if not group_members(pgid):
            return
        time.sleep(0.2)
    say("process group %d still up after %.0f s: SIGKILL" % (pgid, grace))
    try:
        os.killpg(pgid, signal.SIGKILL)
    except ProcessLookupError:
        return
    deadline = time.time() + 5
    while time.time() < deadline and group_members(pgid):
        time.sleep(0.1)


# --- HTTP ------------------------------------------------------------------------


class Browser:
    """A cookie-keeping HTTP client for CTFd's forms and API."""

    def __init__(self, base):
        self.base = base
        self.jar = http.cookiejar.CookieJar()
        self.opener = urllib.request.build_opener(
            urllib.request.HTTPCookieProcessor(self.jar)
        )

    def request(self, method, path, data=None, headers=None, timeout=30):
        req = urllib.request.Request(
            self.base + path, data=data, method=method, headers=headers or {}
        )
        try:
            with self.opener.open(req, timeout=timeout) as resp:
                return resp.status, resp.read().decode("utf-8", "replace"), resp.geturl()
        except urllib.error.HTTPError as e:
            return e.code, e.read().decode("utf-8", "replace"), e.geturl()

    def get(self, path):
        return self.request("GET", path)

    def post_form(self, path, fields):
        body = urllib.parse.urlencode(fields).encode()
        return self.request(
            "POST", path, body, {"Content-Type": "application/x-www-form-urlencoded"}
        )

    def post_json(self, path, obj, headers=None):
        h = {"Content-Type": "application/json", "Accept": "application/json"}
        h.update(headers or {})
        return self.request("POST", path, json.dumps(obj).encode(), h)


def form_nonce(html):
    for tag in re.findall(r"<input[^>]*>", html):
        if re.search(r'name=["\']nonce["\']', tag):
            m = re.search(r'value=["\']([^"\']*)["\']', tag)
            if m:
                return m.group(1)
    return None


def csrf_nonce(html):
    m = re.search(r"['\"]csrfNonce['\"]\s*:\s*\"([^\"]*)\"", html)
    return m.group(1) if m else None


def check_port_free(port):
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    # As gunicorn binds: connections in TIME_WAIT do not count.
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        s.bind(("127.0.0.1", port))
        s.listen(1)
    except OSError as e:
        raise LabError("port %d on 127.0.0.1 is in use (%s)" % (port, e.strerror))
    finally:
        s.close()


def wait_http(url, proc, timeout, log_path):
    deadline = time.time() + timeout
    last = None
    while time.time() < deadline:
        if proc.poll() is not None:
            raise LabError(
                "CTFd exited with code %s while starting:\n%s" % (proc.returncode, tail(log_path))
            )
        try:
            with urllib.request.urlopen(url + "/setup", timeout=5) as resp:
                if resp.status < 500 and proc.poll() is None:
                    return
        except urllib.error.HTTPError as e:
            if e.code < 500 and proc.poll() is None:
                return
            last = "HTTP %d" % e.code
        except (urllib.error.URLError, OSError) as e:
            last = str(e)
        time.sleep(0.5)
    raise LabError(
        "CTFd did not answer on %s within %d s (%s):\n%s" % (url, timeout, last, tail(log_path))
    )


def tail(path, lines=40):
    try:
        with open(path, "rb") as f:
            data = f.read().decode("utf-8", "replace").splitlines()
    except OSError:
        return "(no log at %s)" % path
    return "\n".join(data[-lines:])


# --- start -----------------------------------------------------------------------


def run_logged(cmd, log_path, what, cwd=None, env=None):
    with open(log_path, "ab") as log:
        log.write(("\n$ " + " ".join(cmd) + "\n").encode())
        log.flush()
        rc = subprocess.call(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=cwd, env=env)
    if rc != 0:
        raise LabError("%s failed (exit %d):\n%s" % (what, rc, tail(log_path)))


def make_venv(args, ctfd_root, directory):
    venv = os.path.join(directory, "venv")
    log_path = os.path.join(directory, "pip.log")
    t0 = time.time()
    say("making a virtualenv in %s (pip log: %s)" % (venv, log_path))
    run_logged([args.python, "-m", "venv", venv], log_path, "python -m venv")
    pip = os.path.join(venv, "bin", "pip")
    env = dict(os.environ, PIP_DISABLE_PIP_VERSION_CHECK="1")
    run_logged(
        # No byte-compiling of every module at install: Python compiles what
        # CTFd imports when it first imports it.
        [pip, "install", "-q", "--no-compile", "-r", os.path.join(ctfd_root, "requirements.txt")],
        log_path,
        "pip install -r requirements.txt",
        env=env,
    )
    if args.with_playwright:
        run_logged(
            [pip, "install", "-q", "--no-compile", "playwright"],
            log_path,
            "pip install playwright",
            env=env,
        )
    say("virtualenv ready in %.1f s" % (time.time() - t0))
    return venv


def install_plugin(plugin, ctfd_root):
    plugin = os.path.abspath(plugin)
    if not os.path.isfile(os.path.join(plugin, "__init__.py")):
        raise LabError("%s is not the plugin package (no __init__.py)" % plugin)
    dest = os.path.join(ctfd_root, "CTFd", "plugins", "tidegate")
    if os.path.exists(dest):
        shutil.rmtree(dest)
    shutil.copytree(plugin, dest, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))


def start_ctfd(args, venv, ctfd_root, directory, extra_env):
    log_path = os.path.join(directory, "ctfd.log")
    env = dict(os.environ)
    for k in list(env):
        # A tidegate setting of the calling shell must not leak in unasked.
        if k.startswith("TIDEGATE_") and k != "TIDEGATE_CTFD_ARCHIVE":
            del env[k]
    env.update(
        {
            "SECRET_KEY": secrets.token_hex(32),
            "DATABASE_URL": "sqlite:///" + os.path.join(directory, "ctfd.db"),
            "UPDATE_CHECK": "false",
            "LOG_FOLDER": os.path.join(directory, "logs"),
            "UPLOAD_FOLDER": os.path.join(directory, "uploads"),
            "PYTHONDONTWRITEBYTECODE": "1",
        }
    )
    env.update(extra_env)
    cmd = [
        os.path.join(venv, "bin", "gunicorn"),
        "CTFd:create_app()",
        "--bind",
        "127.0.0.1:%d" % args.port,
        "--workers",
        "1",
        "--worker-class",
        args.worker_class,
        "--timeout",
        "120",
        "--access-logfile",
        "-",
    ]
    log = open(log_path, "ab")
    try:
        proc = subprocess.Popen(
            cmd,
            cwd=ctfd_root,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    finally:
        log.close()
    return proc, log_path


def setup_ctfd(url, args):
    b = Browser(url)
    status, html, _ = b.get("/setup")
    nonce = form_nonce(html)
    if status != 200 or not nonce:
        raise LabError("GET /setup answered %d without the setup form" % status)
    fields = {
        "ctf_name": args.ctf_name,
        "ctf_description": "tidegate lab",
        "user_mode": "users" if args.user_mode else "teams",
        "challenge_visibility": "private",
        "account_visibility": "public",
        "score_visibility": "public",
        "registration_visibility": "public",
        "team_size": "",
        "ctf_theme": "core",
        "start": "",
        "end": "",
        "name": args.admin_name,
        "email": args.admin_email,
        "password": args.admin_password,
        "nonce": nonce,
        "_submit": "Finish",
    }
    status, html, final = b.post_form("/setup", fields)
    if status >= 400 or final.rstrip("/").endswith("/setup"):
        errors = re.findall(r'class="alert[^"]*"[^>]*>(.*?)<', html, re.S)
        raise LabError(
            "POST /setup answered %d (%s): %s"
            % (status, final, "; ".join(e.strip() for e in errors if e.strip()) or "no message")
        )
    status, html, final = b.get("/admin/statistics")
    nonce = csrf_nonce(html)
    if status != 200 or "/login" in final or not nonce:
        raise LabError("not logged in as the admin after /setup (GET /admin/statistics: %d %s)" % (status, final))
    status, body, _ = b.post_json(
        "/api/v1/tokens", {"description": "ctfd_lab"}, {"CSRF-Token": nonce}
    )
    try:
        token = json.loads(body)["data"]["value"]
    except (ValueError, KeyError, TypeError):
        raise LabError("POST /api/v1/tokens answered %d: %s" % (status, body[:300]))
    return token


def import_challenge(url, token, name):
    """Makes tidegate challenge `name` a visible CTFd challenge of type
    tidegate (same name, static 100 points)."""
    if not re.match(r"^[a-z0-9-]{1,63}$", name):
        raise LabError("--tidegate-challenge %r: not a tidegate challenge name" % name)
    status, body, _ = Browser(url).post_json(
        "/api/v1/challenges",
        {
            "name": name, "category": "tidegate", "value": 100, "type": "tidegate",
            "tidegate_challenge": name, "state": "visible", "function": "static",
            "description": "Start your team's own instance below; its flag is yours alone.",
        },
        {"Authorization": "Token " + token},
    )
    if status != 200:
        raise LabError("importing challenge %s: POST /api/v1/challenges answered %d: %s" % (name, status, body[:300]))
    say("challenge %s imported" % name)


def parse_env(pairs):
    out = {}
    for p in pairs or []:
        if "=" not in p:
            raise LabError("--env takes K=V, not %r" % p)
        k, v = p.split("=", 1)
        if not k:
            raise LabError("--env takes K=V, not %r" % p)
        out[k] = v
    return out


def cmd_start(args):
    directory = os.path.abspath(args.dir)
    if os.path.exists(directory) and os.listdir(directory):
        raise LabError("%s exists and is not empty (stop it first, or pick another --dir)" % directory)
    archive = os.path.abspath(args.archive or default_archive())
    if not os.path.isfile(archive):
        raise LabError("no CTFd archive at %s (--archive or TIDEGATE_CTFD_ARCHIVE)" % archive)
    extra_env = parse_env(args.env)
    check_port_free(args.port)
    if not args.admin_password:
        args.admin_password = secrets.token_urlsafe(12)
    os.makedirs(directory, exist_ok=True)
    marker = os.path.join(directory, MARKER)
    with open(marker, "w") as f:
        json.dump({"dir": directory, "pgid": None}, f)
    proc = None
    try:
        t0 = time.time()
        say("unpacking %s" % archive)
        ctfd_root = safe_extract(archive, directory)
        venv = make_venv(args, ctfd_root, directory)
        install_plugin(args.plugin, ctfd_root)
        check_port_free(args.port)
        proc, log_path = start_ctfd(args, venv, ctfd_root, directory, extra_env)
        with open(marker, "w") as f:
            json.dump({"dir": directory, "pgid": proc.pid, "pid": proc.pid}, f)
        url = "http://127.0.0.1:%d" % args.port
        say("gunicorn pid %d on %s (log: %s)" % (proc.pid, url, log_path))
        wait_http(url, proc, args.wait, log_path)
        token = setup_ctfd(url, args)
        for name in args.tidegate_challenge or []:
            import_challenge(url, token, name)
        state = {
            "url": url,
            "admin_name": args.admin_name,
            "admin_email": args.admin_email,
            "admin_password": args.admin_password,
            "admin_token": token,
            "user_mode": "users" if args.user_mode else "teams",
            "pgid": proc.pid,
            "pid": proc.pid,
            "dir": directory,
            "ctfd_root": ctfd_root,
            "log": log_path,
            "venv": venv,
        }
        tmp = os.path.join(directory, STATE + ".tmp")
        with open(tmp, "w") as f:
            json.dump(state, f, indent=2)
        os.replace(tmp, os.path.join(directory, STATE))
        say("ready in %.1f s: %s (admin %s)" % (time.time() - t0, url, args.admin_name))
        print(json.dumps(state), flush=True)
    except BaseException as e:
        if proc is not None:
            stop_group(proc.pid, directory)
            try:
                proc.wait(timeout=1)
            except subprocess.TimeoutExpired:
                pass
        if isinstance(e, LabError):
            say("start failed: %s" % e)
        elif isinstance(e, KeyboardInterrupt):
            say("interrupted")
        else:
            say("start failed: %r" % e)
        if args.keep_on_failure:
            say("kept %s" % directory)
        else:
            shutil.rmtree(directory, ignore_errors=True)
        return 1
    return 0


# --- stop ----------------------------------------------------------------------------


def cmd_stop(args):
    directory = os.path.abspath(args.dir)
    if not os.path.isdir(directory):
        say("%s does not exist: nothing to stop" % directory)
        return 0
    info = None
    for name in (STATE, MARKER):
        try:
            with open(os.path.join(directory, name)) as f:
                info = json.load(f)
            break
        except (OSError, ValueError):
            continue
    if info is None:
        raise LabError("%s holds no %s or %s: not a ctfd_lab directory, not removing it" % (directory, STATE, MARKER))
    pgid = info.get("pgid")
    if isinstance(pgid, int) and pgid > 1:
        stop_group(pgid, directory, grace=args.grace)
    left = processes_of(directory)
    if left:
        details = ", ".join("%d (%s)" % (p, _cmdline(p)[:80]) for p in left)
        raise LabError("processes of %s are still running: %s" % (directory, details))
    shutil.rmtree(directory)
    if os.path.exists(directory):
        raise LabError("could not remove %s" % directory)
    say("stopped and removed %s" % directory)
    return 0


def main(argv=None):
    p = argparse.ArgumentParser(description="A throwaway CTFd with the tidegate plugin.")
    sub = p.add_subparsers(dest="command", required=True)

    s = sub.add_parser("start", help="unpack, install, start and set up CTFd")
    s.add_argument("--dir", required=True, help="a new (or empty) directory for everything")
    s.add_argument("--port", type=int, required=True, help="port on 127.0.0.1")
    s.add_argument("--plugin", default=DEFAULT_PLUGIN, help="the plugin package (default: the repository's)")
    s.add_argument("--archive", default=None, help="CTFd-3.8.7.tar.gz (default: $TIDEGATE_CTFD_ARCHIVE or <repo>/../shared/ctfd/CTFd-3.8.7.tar.gz)")
    s.add_argument("--env", action="append", metavar="K=V", help="environment for CTFd (repeatable), e.g. TIDEGATE_API_URL=http://127.0.0.1:7700")
    s.add_argument("--user-mode", action="store_true", help="user mode (default: teams)")
    s.add_argument("--admin-name", default="admin")
    s.add_argument("--admin-email", default="admin@example.org")
    s.add_argument("--admin-password", default=None, help="default: generated")
    s.add_argument("--ctf-name", default="tidegate lab")
    s.add_argument("--tidegate-challenge", action="append", metavar="NAME", help="import tidegate challenge NAME as a CTFd challenge (repeatable)")
    s.add_argument("--with-playwright", action="store_true", help="also pip install playwright in the venv")
    s.add_argument("--python", default=sys.executable, help="interpreter for the venv (default: this one)")
    s.add_argument("--worker-class", default="gevent", choices=["gevent", "sync"], help="gunicorn worker class (default: gevent, as CTFd's image)")
    s.add_argument("--wait", type=int, default=120, help="seconds to wait for CTFd to answer")
    s.add_argument("--keep-on-failure", action="store_true", help="keep DIR when start fails (for its logs)")

    t = sub.add_parser("stop", help="stop CTFd and remove its directory")
    t.add_argument("--dir", required=True)
    t.add_argument("--grace", type=float, default=10.0, help="seconds between SIGTERM and SIGKILL")

    args = p.parse_args(argv)
    if args.command == "start" and not (0 < args.port < 65536):
        p.error("--port: 1-65535")
    try:
        return cmd_start(args) if args.command == "start" else cmd_stop(args)
    except LabError as e:
        say("error: %s" % e)
        return 1


if __name__ == "__main__":
    sys.exit(main())
