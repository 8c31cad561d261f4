"""A real etcd + kube-apiserver on loopback for the integration tests.

Mocks of the Kubernetes API hide exactly what operators get wrong (RBAC,
validation, CRD schemas, resourceVersion conflicts), so integration tests
talk to the genuine kube-apiserver, with RBAC on, backed by a genuine etcd.
`hack/install-test-deps.sh` builds the binaries; this module only finds and
runs them. It depends on nothing but the standard library, PyYAML and the
`openssl` command-line tool (for the throw-away PKI), and knows nothing about
pytest.

    with KubeTestEnv() as env:
        env.kubectl("create", "namespace", "demo")
        sa_config = env.serviceaccount_kubeconfig("demo", "operator", path)

What runs is only etcd and kube-apiserver. There is no kube-controller-manager,
kube-scheduler or kubelet, so anything those do does not happen:

* Deleting a namespace leaves it ``Terminating`` forever (the namespace
  controller empties and finalizes it); delete the objects themselves.
* No garbage collection: ``ownerReferences`` never cascade.
* Workload controllers do nothing: Deployments get no ReplicaSets, Jobs no
  Pods; Pods are never scheduled and stay ``Pending``; Services get a
  ClusterIP but no Endpoints/EndpointSlices.
* New namespaces get no ``default`` ServiceAccount and no
  ``kube-root-ca.crt`` ConfigMap. The ServiceAccount admission plugin is
  therefore disabled (it would reject every Pod for lack of that account),
  so Pods are not given a ``serviceAccountName`` or token volume.
* ResourceQuota status is never computed; CSRs are never signed.

What does work: every built-in and CRD API with validation, defaulting and
admission (including ValidatingAdmissionPolicy), RBAC, CRDs becoming
``Established``, watches, server-side apply, the TokenRequest API, and the
bootstrap namespaces ``default``, ``kube-system`` and ``kube-public``.
"""

from __future__ import annotations

import base64
import ctypes
import functools
import os
import shutil
import signal
import socket
import ssl
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Sequence
from pathlib import Path
from types import TracebackType
from typing import IO, Any

import yaml

REPO_ROOT = Path(__file__).resolve().parents[2]
KUBE_BUILD_GO_MOD = REPO_ROOT / "hack" / "kube-build" / "go.mod"
BINARIES = ("etcd", "kube-apiserver", "kubectl")
SERVICE_ACCOUNT_ISSUER = "https://kubernetes.default.svc.cluster.local"
LOG_TAIL_LINES = 40


class BinariesNotFoundError(FileNotFoundError):
    """etcd / kube-apiserver / kubectl are not installed where we look."""


class KubeEnvError(RuntimeError):
    """The test control plane failed to start or to answer."""


class KubectlError(subprocess.CalledProcessError):
    """A kubectl call failed; unlike the base class, str() shows its stderr."""

    def __str__(self) -> str:
        return f"{super().__str__()}\nstderr:\n{self.stderr}"


# --------------------------------------------------------------------------
# Finding the binaries (mirrors hack/install-test-deps.sh)
# --------------------------------------------------------------------------


def kube_version() -> str:
    """The Kubernetes version pinned in hack/kube-build/go.mod."""
    for line in KUBE_BUILD_GO_MOD.read_text().splitlines():
        fields = line.split()
        if len(fields) >= 2 and fields[0] == "k8s.io/kubernetes" and fields[1][:2] == "v1":
            return fields[1]
    raise KubeEnvError(f"no k8s.io/kubernetes requirement in {KUBE_BUILD_GO_MOD}")


def cache_bin_dir() -> Path:
    """Where hack/install-test-deps.sh puts the binaries it builds."""
    root = os.environ.get("AIFACTORY_CACHE") or str(Path.home() / ".cache" / "aifactory")
    return Path(root) / "k8s" / kube_version() / "bin"


def _has_binaries(directory: Path) -> bool:
    return all(os.access(directory / name, os.X_OK) for name in BINARIES)


def binaries_dir() -> Path:
    """The directory holding etcd, kube-apiserver and kubectl.

    ``$KUBEBUILDER_ASSETS`` wins when it holds all three, then the build cache.
    Raises BinariesNotFoundError saying how to install them otherwise.
    """
    candidates = []
    assets = os.environ.get("KUBEBUILDER_ASSETS")
    if assets:
        candidates.append(Path(assets))
    candidates.append(cache_bin_dir())
    for candidate in candidates:
        if _has_binaries(candidate):
            return candidate
    looked = ", ".join(str(c) for c in candidates)
    raise BinariesNotFoundError(
        f"{'/'.join(BINARIES)} not found (looked in {looked}); "
        "run hack/install-test-deps.sh to build them"
    )


# --------------------------------------------------------------------------
# Small helpers: ports, PKI, processes, HTTP polling
# --------------------------------------------------------------------------


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


_OPENSSL_CONFIG = """\
[req]
distinguished_name = dn
prompt = no
[dn]
CN = unused
[ca_ext]
basicConstraints = critical, CA:TRUE
keyUsage = critical, keyCertSign, cRLSign
subjectKeyIdentifier = hash
[server_ext]
basicConstraints = critical, CA:FALSE
keyUsage = critical, digitalSignature
extendedKeyUsage = serverAuth
subjectAltName = IP:127.0.0.1, DNS:localhost
subjectKeyIdentifier = hash
authorityKeyIdentifier = keyid
[client_ext]
basicConstraints = critical, CA:FALSE
keyUsage = critical, digitalSignature
extendedKeyUsage = clientAuth
subjectKeyIdentifier = hash
authorityKeyIdentifier = keyid
"""


def _openssl(*args: str, cwd: Path) -> None:
    if shutil.which("openssl") is None:
        raise KubeEnvError("the openssl command is needed to make the test PKI")
    result = subprocess.run(
        ["openssl", *args], cwd=cwd, capture_output=True, text=True, timeout=60, check=False
    )
    if result.returncode != 0:
        raise KubeEnvError(f"openssl {' '.join(args)} failed:\n{result.stderr}")


class TestPKI:
    """A throw-away CA, a serving cert, an admin client cert and an SA key."""

    __test__ = False  # not a pytest test class, whatever its name says

    def __init__(self, directory: Path) -> None:
        self.dir = directory
        self.dir.mkdir(parents=True, exist_ok=True)
        (self.dir / "openssl.cnf").write_text(_OPENSSL_CONFIG)
        self.ca_cert, self.ca_key = self.dir / "ca.crt", self.dir / "ca.key"
        self.serving_cert, self.serving_key = self.dir / "serving.crt", self.dir / "serving.key"
        self.admin_cert, self.admin_key = self.dir / "admin.crt", self.dir / "admin.key"
        self.sa_key, self.sa_pub = self.dir / "sa.key", self.dir / "sa.pub"

    def create(self) -> TestPKI:
        self._ec_key(self.ca_key)
        _openssl(
            "req", "-x509", "-new", "-key", self.ca_key.name, "-out", self.ca_cert.name,
            "-days", "7", "-subj", "/CN=aifactory-test-ca", "-config", "openssl.cnf",
            "-extensions", "ca_ext", cwd=self.dir,
        )  # fmt: skip
        self._signed_cert(self.serving_key, self.serving_cert, "/CN=kube-apiserver", "server_ext")
        # O=system:masters is the superuser group: the admin bypasses RBAC.
        self._signed_cert(
            self.admin_key, self.admin_cert, "/O=system:masters/CN=aifactory-admin", "client_ext"
        )
        _openssl("genpkey", "-algorithm", "RSA", "-pkeyopt", "rsa_keygen_bits:2048",
                 "-out", self.sa_key.name, cwd=self.dir)  # fmt: skip
        _openssl("pkey", "-in", self.sa_key.name, "-pubout", "-out", self.sa_pub.name, cwd=self.dir)
        return self

    def _ec_key(self, path: Path) -> None:
        _openssl("genpkey", "-algorithm", "EC", "-pkeyopt", "ec_paramgen_curve:P-256",
                 "-out", path.name, cwd=self.dir)  # fmt: skip

    def _signed_cert(self, key: Path, cert: Path, subject: str, extensions: str) -> None:
        self._ec_key(key)
        csr = cert.with_suffix(".csr")
        _openssl("req", "-new", "-key", key.name, "-out", csr.name, "-subj", subject,
                 "-config", "openssl.cnf", cwd=self.dir)  # fmt: skip
        _openssl(
            "x509", "-req", "-in", csr.name, "-CA", self.ca_cert.name, "-CAkey", self.ca_key.name,
            "-CAcreateserial", "-out", cert.name, "-days", "7",
            "-extfile", "openssl.cnf", "-extensions", extensions, cwd=self.dir,
        )  # fmt: skip


def _b64(path: Path) -> str:
    return base64.b64encode(path.read_bytes()).decode()


def write_kubeconfig(
    path: Path, server: str, ca_cert: Path, user: dict[str, str], namespace: str | None = None
) -> Path:
    """Write a single-context kubeconfig; `user` is its `users[0].user` map."""
    context = {"cluster": "test", "user": "test-user"}
    if namespace:
        context["namespace"] = namespace
    cluster = {"server": server, "certificate-authority-data": _b64(ca_cert)}
    config = {
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [{"name": "test", "cluster": cluster}],
        "users": [{"name": "test-user", "user": user}],
        "contexts": [{"name": "test", "context": context}],
        "current-context": "test",
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    path.chmod(0o600)
    return path


def _die_with_parent() -> None:
    """Child-side: get SIGTERM if the test process dies without cleaning up (Linux).

    The signal follows the *thread* that started the child, so start the env
    from a long-lived thread (pytest's main thread is).
    """
    try:
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except OSError:
        pass


class ManagedProcess:
    """A child process with its output in a log file; stopped by PID."""

    def __init__(self, name: str, argv: Sequence[str], log_path: Path) -> None:
        self.name = name
        self.log_path = log_path
        self._log: IO[bytes] = log_path.open("wb")
        try:
            self.proc = subprocess.Popen(
                list(argv),
                stdin=subprocess.DEVNULL,
                stdout=self._log,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # a terminal's Ctrl-C must not kill it mid-test
                preexec_fn=_die_with_parent,
            )
        except BaseException:
            self._log.close()
            raise

    def alive(self) -> bool:
        return self.proc.poll() is None

    def log_tail(self, lines: int = LOG_TAIL_LINES) -> str:
        if not self._log.closed:
            self._log.flush()
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError as exc:
            return f"(cannot read {self.log_path}: {exc})"
        return "\n".join(text.splitlines()[-lines:])

    def stop(self, timeout: float = 10.0) -> None:
        """SIGTERM, wait, then SIGKILL; always reaps the child and closes the log."""
        try:
            if self.alive():
                self.proc.terminate()
                try:
                    self.proc.wait(timeout)
                except subprocess.TimeoutExpired:
                    self.proc.kill()
                    self.proc.wait(timeout)
        finally:
            self._log.close()


def wait_until(
    check: Callable[[], bool], timeout: float, what: str, process: ManagedProcess
) -> None:
    """Poll `check` until true; fail fast if `process` exits, with its log tail."""
    deadline = time.monotonic() + timeout
    last_error = ""
    while True:
        if not process.alive():
            raise KubeEnvError(
                f"{process.name} exited with code {process.proc.returncode} while waiting "
                f"for {what}; last log lines ({process.log_path}):\n{process.log_tail()}"
            )
        try:
            if check():
                return
        except (OSError, urllib.error.URLError, ssl.SSLError) as exc:
            last_error = f" (last error: {exc})"
        if time.monotonic() > deadline:
            raise KubeEnvError(
                f"timed out after {timeout:.0f}s waiting for {what}{last_error}; "
                f"last {process.name} log lines ({process.log_path}):\n{process.log_tail()}"
            )
        time.sleep(0.2)


def _http_ok(url: str, context: ssl.SSLContext | None = None) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=5, context=context) as response:
            return bool(response.status == 200)
    except urllib.error.HTTPError as exc:  # e.g. 500 from /readyz while starting
        exc.close()
        return False


# --------------------------------------------------------------------------
# The environment
# --------------------------------------------------------------------------


class KubeTestEnv:
    """etcd + kube-apiserver (RBAC on) in a temporary directory; a context manager.

    Attributes once started: `server` (https URL), `kubeconfig` (admin, in
    the system:masters group), `tmpdir`, `bin_dir`. Logs are in
    `tmpdir/etcd.log` and `tmpdir/kube-apiserver.log` until exit.
    """

    def __init__(
        self,
        bin_dir: Path | None = None,
        start_timeout: float = 90.0,
        extra_apiserver_args: Sequence[str] = (),
    ) -> None:
        self.bin_dir = bin_dir or binaries_dir()
        self.start_timeout = start_timeout
        self.extra_apiserver_args = list(extra_apiserver_args)
        self.tmpdir: Path | None = None
        self.server = ""
        self._kubeconfig: Path | None = None
        self._pki: TestPKI | None = None
        self._etcd: ManagedProcess | None = None
        self._etcd_url: str | None = None
        self._etcd_peer: str | None = None
        self._restarts = 0
        self._apiserver: ManagedProcess | None = None

    # -- lifecycle ---------------------------------------------------------

    def __enter__(self) -> KubeTestEnv:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def start(self) -> None:
        if self.tmpdir is not None:
            raise KubeEnvError("KubeTestEnv already started")
        self.tmpdir = Path(tempfile.mkdtemp(prefix="aifactory-kube-"))
        try:
            self._pki = TestPKI(self.tmpdir / "pki").create()
            etcd_url = self._start_etcd()
            self._start_apiserver(etcd_url)
            self._kubeconfig = write_kubeconfig(
                self.tmpdir / "admin.kubeconfig",
                self.server,
                self._pki.ca_cert,
                {
                    "client-certificate-data": _b64(self._pki.admin_cert),
                    "client-key-data": _b64(self._pki.admin_key),
                },
            )
        except BaseException:
            self.stop()
            raise

    @property
    def apiserver_pid(self) -> int:
        """The kube-apiserver's PID (for benchmarks that read its CPU time)."""
        if self._apiserver is None or self._apiserver.proc is None:
            raise KubeEnvError("the API server is not running")
        return self._apiserver.proc.pid

    def stop(self) -> None:
        """Stop kube-apiserver, then etcd (by PID), then delete the tempdir."""
        for attr in ("_apiserver", "_etcd"):
            process: ManagedProcess | None = getattr(self, attr)
            if process is not None:
                process.stop()
                setattr(self, attr, None)
        if self.tmpdir is not None:
            shutil.rmtree(self.tmpdir, ignore_errors=True)
            self.tmpdir = None
        self._kubeconfig = None

    def restart_apiserver(self) -> None:
        """Stop kube-apiserver (SIGTERM, as an upgrade does) and start it again on the same
        port and etcd; its clients must reconnect and re-list."""
        assert self._apiserver is not None and self._etcd_url is not None
        self._apiserver.stop()
        self._restarts += 1
        self._start_apiserver(self._etcd_url, port=int(self.server.rsplit(":", 1)[1]))

    def restart_etcd(self) -> None:
        """Stop etcd and start it again on the same data and addresses; the API server
        answers errors meanwhile, and recovers by itself."""
        assert self._etcd is not None and self._etcd_url is not None
        self._etcd.stop()
        self._restarts += 1
        self._start_etcd(self._etcd_url, self._etcd_peer)

    def _log(self, name: str) -> Path:
        assert self.tmpdir is not None
        return self.tmpdir / (f"{name}.log" if not self._restarts else
                              f"{name}.{self._restarts}.log")

    def _start_etcd(self, client_url: str | None = None, peer_url: str | None = None) -> str:
        assert self.tmpdir is not None
        client_url = client_url or f"http://127.0.0.1:{free_port()}"
        peer_url = peer_url or f"http://127.0.0.1:{free_port()}"
        self._etcd_url, self._etcd_peer = client_url, peer_url
        argv = [
            str(self.bin_dir / "etcd"),
            "--name=test",
            f"--data-dir={self.tmpdir / 'etcd-data'}",
            f"--listen-client-urls={client_url}",
            f"--advertise-client-urls={client_url}",
            f"--listen-peer-urls={peer_url}",
            f"--initial-advertise-peer-urls={peer_url}",
            f"--initial-cluster=test={peer_url}",
            "--log-level=warn",
        ]
        if self._etcd_supports("--unsafe-no-fsync"):
            argv.append("--unsafe-no-fsync")  # data is thrown away; fsync only slows tests
        self._etcd = ManagedProcess("etcd", argv, self._log("etcd"))
        wait_until(
            lambda: _http_ok(f"{client_url}/health"), self.start_timeout, "etcd /health", self._etcd
        )
        return client_url

    def _etcd_supports(self, flag: str) -> bool:
        result = subprocess.run(
            [str(self.bin_dir / "etcd"), "--help"],
            capture_output=True, text=True, timeout=30, check=False,
        )  # fmt: skip
        return flag in result.stdout + result.stderr

    def _start_apiserver(self, etcd_url: str, port: int | None = None) -> None:
        assert self.tmpdir is not None and self._pki is not None
        pki, port = self._pki, port or free_port()
        self.server = f"https://127.0.0.1:{port}"
        argv = [
            str(self.bin_dir / "kube-apiserver"),
            f"--etcd-servers={etcd_url}",
            "--bind-address=127.0.0.1",
            "--advertise-address=127.0.0.1",
            f"--secure-port={port}",
            f"--tls-cert-file={pki.serving_cert}",
            f"--tls-private-key-file={pki.serving_key}",
            f"--client-ca-file={pki.ca_cert}",
            "--authorization-mode=RBAC",
            f"--service-account-issuer={SERVICE_ACCOUNT_ISSUER}",
            f"--service-account-key-file={pki.sa_pub}",
            f"--service-account-signing-key-file={pki.sa_key}",
            "--service-cluster-ip-range=10.0.0.0/24",
            "--allow-privileged=true",
            # Needs the (absent) ServiceAccount controller; see module docstring.
            "--disable-admission-plugins=ServiceAccount",
            # 127.0.0.1 may not be published as the `kubernetes` Service endpoint.
            "--endpoint-reconciler-type=none",
            *self.extra_apiserver_args,
        ]
        self._apiserver = ManagedProcess("kube-apiserver", argv, self._log("kube-apiserver"))
        context = ssl.create_default_context(cafile=str(pki.ca_cert))
        context.load_cert_chain(str(pki.admin_cert), str(pki.admin_key))
        deadline = time.monotonic() + self.start_timeout
        for path in ("/readyz", "/api/v1/namespaces/default"):
            wait_until(
                functools.partial(_http_ok, self.server + path, context),
                max(deadline - time.monotonic(), 1.0),
                f"kube-apiserver {path}",
                self._apiserver,
            )

    # -- using it ----------------------------------------------------------

    @property
    def kubeconfig(self) -> Path:
        """Admin kubeconfig (group system:masters, so not subject to RBAC)."""
        if self._kubeconfig is None:
            raise KubeEnvError("KubeTestEnv is not running")
        return self._kubeconfig

    @property
    def kubectl_path(self) -> Path:
        return self.bin_dir / "kubectl"

    def kubectl(
        self,
        *args: str,
        input: str | None = None,
        check: bool = True,
        kubeconfig: Path | None = None,
        timeout: float = 60.0,
    ) -> subprocess.CompletedProcess[str]:
        """Run kubectl (as admin unless `kubeconfig` is given); text in and out.

        With check=True a non-zero exit raises KubectlError showing stderr.
        """
        config = kubeconfig or self.kubeconfig
        assert self.tmpdir is not None
        env = {**os.environ, "KUBECACHEDIR": str(self.tmpdir / "kubectl-cache")}
        env.pop("KUBECONFIG", None)
        argv = [str(self.kubectl_path), f"--kubeconfig={config}", *args]
        result = subprocess.run(
            argv, input=input, capture_output=True, text=True, env=env, timeout=timeout,
            check=False,
        )  # fmt: skip
        if check and result.returncode != 0:
            raise KubectlError(result.returncode, argv, result.stdout, result.stderr)
        return result

    def apply(self, manifest: str | dict[str, Any] | list[dict[str, Any]]) -> None:
        """`kubectl apply` a YAML string, one object, or a list of objects."""
        if not isinstance(manifest, str):
            docs = manifest if isinstance(manifest, list) else [manifest]
            manifest = yaml.safe_dump_all(docs)
        self.kubectl("apply", "-f", "-", input=manifest)

    def serviceaccount_kubeconfig(
        self, namespace: str, name: str, path: Path | str, duration: str = "1h"
    ) -> Path:
        """Write a kubeconfig at `path` that authenticates as ServiceAccount
        `namespace/name` (which must exist) with a TokenRequest token, so code
        can be tested under its own RBAC instead of as admin.
        """
        assert self._pki is not None
        token = self.kubectl(
            "create", "token", name, f"--namespace={namespace}", f"--duration={duration}"
        ).stdout.strip()
        if not token:
            raise KubeEnvError(f"kubectl create token {namespace}/{name} returned no token")
        # The context namespace is the account's own, as in-cluster config would have it.
        return write_kubeconfig(
            Path(path), self.server, self._pki.ca_cert, {"token": token}, namespace
        )

    def log_tail(self, lines: int = LOG_TAIL_LINES) -> str:
        """The last lines of the kube-apiserver log (for failure messages)."""
        return self._apiserver.log_tail(lines) if self._apiserver else "(not running)"
