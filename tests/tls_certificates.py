"""Certificates for the Kafka TLS tests, from a throwaway CA (trustme). This module holds no tests."""
from __future__ import annotations

from pathlib import Path

import trustme


def certificate_files(folder: Path) -> dict[str, str]:
    """Paths of PEM files: `ca`, a client certificate (`cert`) and its `key`, and `server`, the key
    and certificate of a broker at 127.0.0.1 or localhost."""
    ca = trustme.CA()
    client = ca.issue_cert("alerting-app-worker")
    server = ca.issue_cert("127.0.0.1", "localhost")
    paths = {"ca": folder / "ca.pem", "cert": folder / "client.pem", "key": folder / "client.key",
             "server": folder / "server.pem"}
    ca.cert_pem.write_to_path(paths["ca"])
    client.cert_chain_pems[0].write_to_path(paths["cert"])
    client.private_key_pem.write_to_path(paths["key"])
    server.private_key_and_cert_chain_pem.write_to_path(paths["server"])
    return {name: str(path) for name, path in paths.items()}
