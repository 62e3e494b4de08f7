"""TLS of the Dask back end: the temporary credentials of a cluster ``train`` starts (``cluster=``),
and the user's certificates for a scheduler they run (``scheduler=tls://...``).

A started cluster. ``Credentials`` makes a new RSA key and a self-signed certificate
(``distributed.security.Security.temporary``); the certificate is at once the CA and the certificate
of the scheduler, of every worker and of the driver's client. Every connection is mutual TLS with
``require_encryption``: a process without the key (plain ``tcp://``, ``tls://`` without a
certificate, or with one from another CA) is dropped during the handshake, before the scheduler reads
a message, so it cannot run code there (``run_on_scheduler``, ``submit``). Batch jobs get the key as
files: ``cert.pem`` and ``key.pem``, mode 0600 in a new 0700 folder ``.datamodels-dask-tls-*`` of a
directory the driver and the nodes share; dask-jobqueue passes their paths to each worker
(``--tls-ca-file``, ``--tls-cert``, ``--tls-key`` in the job script). ``remove`` deletes the folder
when the cluster closes; a driver killed with kill -9 leaves it, holding the key of a scheduler that
no longer runs.

A running scheduler. ``client_security`` reads the user's certificates from Dask's own configuration
(``distributed.comm.tls.ca-file``, ``distributed.comm.tls.client.cert``,
``distributed.comm.tls.client.key``; a YAML file in ``~/.config/dask/`` or the environment variables
``DASK_DISTRIBUTED__COMM__TLS__CA_FILE``, ``..._TLS__CLIENT__CERT``, ``..._TLS__CLIENT__KEY``), the
keys that ``dask scheduler`` and ``dask worker`` read too.
"""

from __future__ import annotations

import os
import shutil
import ssl
import tempfile
from pathlib import Path
from typing import Any

from datamodels_ml.errors import UserError

CONFIG_KEYS = {"ca_file": "distributed.comm.tls.ca-file", "cert": "distributed.comm.tls.client.cert",
               "key": "distributed.comm.tls.client.key"}


def _env_name(key: str) -> str:
    return "DASK_" + key.upper().replace(".", "__").replace("-", "_")


class Credentials:
    """A temporary key and certificate for one cluster, written to a private folder of ``parent``."""

    def __init__(self, parent: str | Path):
        from distributed.security import Security

        try:
            temporary = Security.temporary()
        except ImportError as exc:  # pragma: no cover - cryptography is a dependency of the package
            raise UserError(f"cluster= needs the package cryptography for its TLS credentials: {exc}") from None
        try:
            self.folder = Path(tempfile.mkdtemp(prefix=".datamodels-dask-tls-", dir=parent))
        except OSError as exc:
            raise UserError(f"cannot write the cluster's TLS credentials in {parent}: {exc.strerror or exc}") from None
        try:
            cert = self._write("cert.pem", temporary.tls_ca_file)  # self-signed: its own CA
            key = self._write("key.pem", temporary.tls_worker_key)
        except OSError as exc:
            self.remove()
            raise UserError(f"cannot write the cluster's TLS credentials in {parent}: {exc.strerror or exc}") from None
        roles = {f"tls_{role}_{part}": path for role in ("scheduler", "worker", "client")
                 for part, path in (("cert", cert), ("key", key))}
        self.security = Security(require_encryption=True, tls_ca_file=cert, **roles)

    def _write(self, name: str, text: str) -> str:
        path = self.folder / name
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0), 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(text)
        return str(path)

    def remove(self) -> None:
        shutil.rmtree(self.folder, ignore_errors=True)


def client_security(address: str) -> Any:
    """The ``Security`` of the driver's client for ``scheduler=ADDRESS``: the user's certificates from
    Dask's configuration for ``tls://``; None (Dask's default) for any other protocol."""
    if not address.startswith("tls://"):
        return None
    from distributed.security import Security

    security = Security(require_encryption=True)  # the configuration's files
    given = {"ca_file": security.tls_ca_file, "cert": security.tls_client_cert, "key": security.tls_client_key}
    missing = [CONFIG_KEYS[k] for k in ("ca_file", "cert") if not given[k]]
    if missing:
        raise UserError(f"scheduler={address} needs your TLS certificates: set {' and '.join(missing)} in the Dask "
                        f"config (or {', '.join(_env_name(k) for k in missing)}; a key file apart from the "
                        f"certificate: {CONFIG_KEYS['key']})")
    for part, value in given.items():
        if value and "\n" not in value and not os.path.isfile(value):
            raise UserError(f"scheduler={address}: {value} ({CONFIG_KEYS[part]}) is not a file")
    try:
        security.get_connection_args("client")  # loads the files: a bad one is named here, not mid-train
    except (OSError, ValueError) as exc:  # ssl.SSLError is an OSError
        what = exc.reason if isinstance(exc, ssl.SSLError) and exc.reason else exc
        raise UserError(f"scheduler={address}: cannot use the TLS certificates of the Dask config "
                        f"({', '.join(str(v) for v in given.values() if v)}): {what}") from None
    return security
