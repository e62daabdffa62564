"""Start a Flower federation on loopback, run a fedsb experiment on it, stop everything.

    python -m fedsb.flower.launch --nodes 2 --out results/flower-demo [--tls] [--auth]
        [--config configs/x.toml] [--run-config round-timeout=60 ...]
        [--node-data parties/a --node-data parties/b ...]   # node-data mode: one folder per node

One `flower-superlink` and N `flower-supernode` processes (node K holds `partition-id=K`), a
private `FLWR_HOME` with a SuperLink connection for the `flwr` CLI, and `flwr run` of this
repository's app. `--tls` generates a throw-away CA and a server certificate for 127.0.0.1
(cryptography, no openssl needed); `--auth` also generates an EC P-384 key pair per SuperNode,
registers the public keys with `flwr supernode register` and starts the SuperLink with
`--enable-supernode-auth`, as Flower documents it. Every process is stopped by pid, children
first, whatever happens (tests use `LocalFederation` as a context manager).
"""

from __future__ import annotations

import argparse
import datetime
import ipaddress
import json
import os
import signal
import socket
import subprocess
import sys
import time
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fedsb.rundir import pid_alive

REPO_ROOT = Path(__file__).resolve().parents[3]
BIN = Path(sys.executable).parent


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


# --- processes: started and stopped by pid ---------------------------------------------------


def descendants(pid: int) -> list[int]:
    """All live descendants of `pid` (children first in breadth order), read from /proc."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        children.setdefault(ppid, []).append(int(entry.name))
    out: list[int] = []
    frontier = [pid]
    while frontier:
        nxt = []
        for p in frontier:
            for c in children.get(p, []):
                out.append(c)
                nxt.append(c)
        frontier = nxt
    return out


def stop_tree(proc: subprocess.Popen[bytes], grace: float = 5.0) -> None:
    """SIGTERM the process and every descendant (by pid), then SIGKILL what is left."""
    pids = descendants(proc.pid) + [proc.pid]
    for pid in pids:
        try:
            os.kill(pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
    deadline = time.monotonic() + grace
    while time.monotonic() < deadline and any(pid_alive(p) for p in pids):
        proc.poll()
        time.sleep(0.1)
    for pid in pids + [d for d in descendants(proc.pid)]:
        if pid_alive(pid):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
    try:
        proc.wait(timeout=grace)
    except subprocess.TimeoutExpired:
        pass


# --- TLS and SuperNode keys ----------------------------------------------------------------


def make_tls(folder: Path) -> dict[str, Path]:
    """A self-signed CA and a server certificate for 127.0.0.1 / localhost, as PEM files."""
    from cryptography import x509  # optional dependency (cryptography, via flwr): only --tls
    from cryptography.hazmat.primitives import hashes, serialization  # only --tls
    from cryptography.hazmat.primitives.asymmetric import ec  # only --tls
    from cryptography.x509.oid import NameOID  # only --tls

    folder.mkdir(parents=True, exist_ok=True)
    now = datetime.datetime.now(datetime.timezone.utc)
    ca_key = ec.generate_private_key(ec.SECP384R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "fedsb local CA")])
    ca_cert = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=2))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(x509.KeyUsage(True, False, False, False, False, True, True, False, False), critical=True)
        .sign(ca_key, hashes.SHA384())
    )
    key = ec.generate_private_key(ec.SECP384R1())
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")]))
        .issuer_name(ca_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=2))
        .add_extension(
            x509.SubjectAlternativeName([x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
            critical=False,
        )
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .sign(ca_key, hashes.SHA384())
    )
    paths = {"ca": folder / "ca.crt", "cert": folder / "server.pem", "key": folder / "server.key"}
    paths["ca"].write_bytes(ca_cert.public_bytes(serialization.Encoding.PEM))
    paths["cert"].write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    paths["key"].write_bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    paths["key"].chmod(0o600)
    return paths


def make_node_keys(folder: Path, index: int) -> tuple[Path, Path]:
    """An EC P-384 key pair in OpenSSH format (what `ssh-keygen -t ecdsa -b 384` writes)."""
    from cryptography.hazmat.primitives import serialization  # optional dependency (cryptography, via flwr): only --auth
    from cryptography.hazmat.primitives.asymmetric import ec  # only --auth

    folder.mkdir(parents=True, exist_ok=True)
    key = ec.generate_private_key(ec.SECP384R1())
    priv, pub = folder / f"supernode{index}", folder / f"supernode{index}.pub"
    priv.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH, serialization.NoEncryption()))
    priv.chmod(0o600)
    pub.write_bytes(key.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH) + b"\n")
    return priv, pub


# --- the federation --------------------------------------------------------------------------


@dataclass
class LocalFederation:
    """A SuperLink and `num_nodes` SuperNodes on 127.0.0.1, driven through the `flwr` CLI."""

    workdir: Path
    num_nodes: int = 2
    tls: bool = False
    auth: bool = False
    app_dir: Path = REPO_ROOT
    threads: int | None = None  # OMP/torch threads per node process (None: inherit)
    partition_ids: list[int] | None = None
    # node-data mode: each node's own folder (node K gets data_paths[K]), added to its node config
    data_paths: list[str] | None = None
    server_env: dict[str, str] = field(default_factory=dict)  # extra environment of the SuperLink (and so the ServerApp)
    simulation: bool = False  # Flower's simulation runtime (virtual SuperNodes; needs ray)
    procs: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)
    port: int = 0
    runtime_ports: list[int] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.workdir = Path(self.workdir).resolve()
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.logs = self.workdir / "logs"
        self.logs.mkdir(exist_ok=True)
        self.flwr_home = self.workdir / "flwr-home"
        self.flwr_home.mkdir(exist_ok=True)
        if self.auth and not self.tls:
            raise ValueError("SuperNode authentication needs TLS (Flower refuses it on insecure connections)")

    # --- environment and CLI ---

    def env(self, node: bool = False) -> dict[str, str]:
        env = dict(os.environ)
        env.update(
            {
                "FLWR_HOME": str(self.flwr_home),
                "HF_HUB_OFFLINE": "1",
                "TOKENIZERS_PARALLELISM": "false",
                "FLWR_DISABLE_UPDATE_CHECK": "1",
                "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
                "PATH": f"{BIN}{os.pathsep}{env.get('PATH', '')}",
            }
        )
        if node and self.threads:
            env["OMP_NUM_THREADS"] = env["MKL_NUM_THREADS"] = str(self.threads)
        return env

    def _spawn(self, name: str, cmd: list[str], node: bool = False) -> subprocess.Popen[bytes]:
        log = open(self.logs / f"{name}.log", "ab")
        env = self.env(node) if node else {**self.env(), **self.server_env}
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=self.workdir)
        log.close()
        self.procs[name] = proc
        return proc

    def flwr(self, *args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
        return subprocess.run([str(BIN / "flwr"), *args], env=self.env(), cwd=self.workdir, capture_output=True, text=True, timeout=timeout)

    def _write_connection(self) -> None:
        lines = ["[superlink]", 'default = "local"', "", "[superlink.local]", f'address = "127.0.0.1:{self.port}"']
        if self.tls:
            lines.append(f'root-certificates = "{self.certs["ca"]}"')
        else:
            lines.append("insecure = true")
        (self.flwr_home / "config.toml").write_text("\n".join(lines) + "\n")

    # --- lifecycle ---

    def start(self, wait: float = 60.0) -> LocalFederation:
        self.port = self.port or free_port()
        cmd = [str(BIN / "flower-superlink"), "--host", "127.0.0.1", "--port", str(self.port), "--disable-runtime-dependency-installation"]
        if self.tls:
            self.certs = make_tls(self.workdir / "certs")
            cmd += ["--ssl-ca-certfile", str(self.certs["ca"]), "--ssl-certfile", str(self.certs["cert"]), "--ssl-keyfile", str(self.certs["key"])]
        else:
            cmd += ["--insecure"]
        if self.auth:
            cmd += ["--enable-supernode-auth"]
        if self.simulation:
            cmd += ["--simulation"]
        self._write_connection()
        self._spawn("superlink", cmd)
        self._wait_superlink(wait)
        self.node_keys = [make_node_keys(self.workdir / "keys", i) for i in range(self.num_nodes)] if self.auth else []
        for i, (_, pub) in enumerate(self.node_keys):
            res = self.flwr("supernode", "register", str(pub), "local")
            if res.returncode != 0:
                raise RuntimeError(f"registering SuperNode {i} failed: {res.stdout}{res.stderr}")
        for i in range(0 if self.simulation else self.num_nodes):
            self.start_node(i)
        return self

    def _wait_superlink(self, wait: float) -> None:
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline:
            if self.procs["superlink"].poll() is not None:
                raise RuntimeError(f"flower-superlink exited; see {self.logs / 'superlink.log'}")
            res = self.flwr("ls", "local", "--format", "json", timeout=30)
            if res.returncode == 0:
                return
            time.sleep(0.5)
        raise TimeoutError(f"SuperLink not ready after {wait:.0f} s; see {self.logs / 'superlink.log'}")

    def start_node(self, index: int) -> subprocess.Popen[bytes]:
        pid = self.partition_ids[index] if self.partition_ids else index
        cache = self.workdir / f"node{index}-cache"
        node_config = f'partition-id={pid} num-partitions={self.num_nodes} cache-dir="{cache}"'
        if self.data_paths:  # its own data: only this node is told the folder
            node_config += f" data-path={json.dumps(str(Path(self.data_paths[index]).resolve()))}"
        runtime_port = free_port()
        self.runtime_ports.append(runtime_port)
        cmd = [str(BIN / "flower-supernode"), "--superlink", f"127.0.0.1:{self.port}", "--port", str(runtime_port), "--node-config", node_config]
        if self.tls:
            cmd += ["--root-certificates", str(self.certs["ca"])]
        else:
            cmd += ["--insecure"]
        if self.auth:
            cmd += ["--auth-supernode-private-key", str(self.node_keys[index][0])]
        return self._spawn(f"supernode{index}", cmd, node=True)

    def kill_node(self, index: int) -> None:
        """Disconnect a party abruptly: SIGKILL its SuperNode and everything under it."""
        proc = self.procs[f"supernode{index}"]
        for pid in descendants(proc.pid) + [proc.pid]:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        proc.wait(timeout=10)

    def serverapp_pids(self) -> list[int]:
        """Pids of running ServerApp processes (flwr-serverapp under the SuperLink)."""
        out = []
        for pid in descendants(self.procs["superlink"].pid):
            try:
                cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
            except OSError:
                continue
            if any(part.endswith(b"flwr-serverapp") for part in cmdline[:2]) and pid_alive(pid):
                out.append(pid)
        return out

    def stop(self) -> None:
        for name in sorted(self.procs, key=lambda n: n == "superlink"):  # nodes first, SuperLink last
            stop_tree(self.procs[name])
        self.procs.clear()
        for pid in self._orphans():  # an app process whose parent died first (e.g. on Ctrl-C)
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass

    def _orphans(self) -> list[int]:
        """Pids of Flower processes still serving this federation's ports (ours alone: the
        ports were picked free for this federation and appear in their command lines)."""
        ports = [f"127.0.0.1:{p}".encode() for p in [self.port, *self.runtime_ports] if p]
        out = []
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit():
                continue
            try:
                args = (entry / "cmdline").read_bytes().split(b"\0")
            except OSError:
                continue
            if any(a.endswith((b"flwr-serverapp", b"flwr-clientapp", b"flower-superexec", b"flwr-simulation")) for a in args[:2]) and any(a in ports for a in args):
                out.append(int(entry.name))
        return out

    def __enter__(self) -> LocalFederation:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # --- runs ---

    def submit(self, run_config: dict[str, Any]) -> int:
        """`flwr run` this repository's app; return the run id."""
        args = ["run", str(self.app_dir), "local", "--format", "json"]
        if self.simulation:
            args += ["--federation-config", f"num-supernodes={self.num_nodes}"]
        for key, value in run_config.items():
            args += ["--run-config", f"{key}={_toml_value(value)}"]
        res = self.flwr(*args)
        if res.returncode != 0:
            raise RuntimeError(f"flwr run failed: {res.stdout}{res.stderr}")
        reply = json.loads(res.stdout[res.stdout.index("{") :])
        if not reply.get("success"):
            raise RuntimeError(f"flwr run refused the app: {reply.get('error-message')}")
        return int(reply["run-id"])

    def status(self, run_id: int) -> dict[str, Any]:
        res = self.flwr("ls", "local", "--run-id", str(run_id), "--format", "json", timeout=30)
        text = res.stdout[res.stdout.index("{") :] if "{" in res.stdout else "{}"
        runs = json.loads(text).get("runs", [])
        return runs[0] if runs else {}

    def wait(self, run_id: int, timeout: float) -> dict[str, Any]:
        """Block until the run finishes; return Flower's record of it (status, traffic)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                info = self.status(run_id)
            except subprocess.TimeoutExpired:  # a slow `flwr ls` on a loaded machine: ask again
                continue
            if str(info.get("status", "")).startswith("finished"):
                return info
            time.sleep(1.0)
        raise TimeoutError(f"run {run_id} did not finish within {timeout:.0f} s; logs in {self.logs}")

    def run(self, run_config: dict[str, Any], timeout: float = 600) -> dict[str, Any]:
        return self.wait(self.submit(run_config), timeout)


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    return json.dumps(str(value))  # a TOML basic string


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--nodes", type=int, default=2)
    p.add_argument("--out", default="results/flower-local")
    p.add_argument("--config", default="", help="experiment TOML (default: the built-in tiny demo)")
    p.add_argument("--rounds", type=int, default=0)
    p.add_argument("--tls", action="store_true")
    p.add_argument("--auth", action="store_true", help="SuperNode authentication (implies --tls)")
    p.add_argument("--simulation", action="store_true", help="Flower's simulation runtime instead of SuperNodes (needs flwr[simulation])")
    p.add_argument("--run-config", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--node-data", action="append", default=[], metavar="FOLDER", help="a party's own folder (train.jsonl, eval.jsonl), once per node in partition order; sets node-data = true (node-data mode: the ServerApp reads no client data)")
    p.add_argument("--timeout", type=float, default=1800)
    args = p.parse_args(argv)
    out = Path(args.out).resolve()
    run_config: dict[str, Any] = {"out-dir": str(out), "num-server-rounds": args.rounds, "min-nodes": args.nodes}
    if args.config:
        run_config["config-path"] = str(Path(args.config).resolve())
    for item in args.run_config:
        key, _, raw = item.partition("=")
        run_config[key] = tomllib.loads(f"v = {raw}")["v"] if raw else ""
    if args.node_data:
        if len(args.node_data) != args.nodes:
            p.error(f"--node-data given {len(args.node_data)} times for --nodes {args.nodes}: one folder per node")
        run_config["node-data"] = True
    with LocalFederation(out / "flower-workdir", num_nodes=args.nodes, tls=args.tls or args.auth, auth=args.auth, simulation=args.simulation, data_paths=args.node_data or None) as fed:
        info = fed.run(run_config, timeout=args.timeout)
    print(json.dumps({"status": info.get("status"), "network-traffic": info.get("network-traffic"), "out": str(out)}, indent=2))
    return 0 if info.get("status") == "finished:completed" else 1


if __name__ == "__main__":
    raise SystemExit(main())
