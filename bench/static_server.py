"""A static file server that is not the bottleneck: nginx (Debian's nginx-light) serving the
bench's files under the hub's URL shape, `/<repo>/resolve/<revision>/<path>`.

Why not the tests' file server (tests/support/file_server.py): it is Python's threaded server,
about 0.26 ms of CPU per request under one GIL, so `curl --parallel` fetching 500 small files from
it takes 0.13 to 0.26 s, bound by the server, where nginx serves them in about 0.03 s. A baseline
measured against it flattered every client that is slower than curl. The tests' server stays for
what only it does: counting the bytes it sent, rate limits, refusals (the resume row uses it).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from bench.cluster import free_port
from bench.servers import wait_http

PACKAGE = "nginx-light"

CONFIG = """
daemon off;
master_process off;
worker_processes 1;
{user}
pid {tmp}/nginx.pid;
error_log {tmp}/error.log;
events {{ worker_connections 512; }}
http {{
    access_log off;
    client_body_temp_path {tmp}/body;
    proxy_temp_path {tmp}/proxy;
    fastcgi_temp_path {tmp}/fastcgi;
    uwsgi_temp_path {tmp}/uwsgi;
    scgi_temp_path {tmp}/scgi;
    sendfile on;
    tcp_nodelay on;
    keepalive_requests 100000;
    default_type application/octet-stream;
    server {{
        listen 127.0.0.1:{port};
        location = /-/ready {{ return 200; }}
        location ~ ^/(.+)/resolve/([^/]+)/(.+)$ {{ alias {served}/$1/$2/$3; }}
    }}
}}
"""


def nginx_binary() -> str:
    """nginx, installed from Debian (apt-get install nginx-light) when missing and this runs as
    root or with sudo, as .ci/run installs what the tests need."""
    found = shutil.which("nginx") or ("/usr/sbin/nginx" if os.path.exists("/usr/sbin/nginx") else None)
    if found:
        return found
    sudo = [] if os.geteuid() == 0 else (["sudo"] if shutil.which("sudo") else None)
    if sudo is None:
        raise RuntimeError(f"the executor bench needs nginx: install Debian's {PACKAGE} (apt-get install {PACKAGE})")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    subprocess.run([*sudo, "apt-get", "update", "-qq"], check=True, env=env)
    subprocess.run([*sudo, "apt-get", "install", "-y", "-qq", PACKAGE], check=True, env=env)
    return "/usr/sbin/nginx"


@contextmanager
def nginx_static(served: Path) -> Iterator[tuple[str, int]]:
    """nginx serving `served` (laid out <repo>/<revision>/<path>) as the hub resolves files, on a
    free loopback port; yields (base URL, pid) and stops it after."""
    binary = nginx_binary()
    with tempfile.TemporaryDirectory(prefix="dlw-bench-nginx-") as tmp:
        port = free_port()
        conf = Path(tmp) / "nginx.conf"
        # As root, nginx would read the files as "nobody": the bench's directories are private.
        user = "user root root;" if os.geteuid() == 0 else ""
        conf.write_text(CONFIG.format(user=user, tmp=tmp, port=port, served=served.resolve()))
        proc = subprocess.Popen([binary, "-p", tmp, "-c", str(conf), "-e", f"{tmp}/error.log"])
        url = f"http://127.0.0.1:{port}"
        try:
            try:
                wait_http(proc, f"{url}/-/ready", timeout=30)
            except RuntimeError as exc:
                raise RuntimeError(f"nginx: {exc}\n{(Path(tmp) / 'error.log').read_text()[-3000:]}") from None
            yield url, proc.pid
        finally:
            proc.terminate()
            proc.wait(timeout=30)
