"""Keeps every Ray process of a test cluster on 127.0.0.1 (this folder goes first on the nodes' PYTHONPATH).

Ray replaces a loopback address with the machine's interface address wherever it meets one
(`services.resolve_ip_for_localhost`: in `ray start --node-ip-address 127.0.0.1`, in the dashboard agent joining the
GCS, in every worker), so that other machines could reach the node; a test cluster would then advertise addresses
beyond loopback, and a process that resolved 127.0.0.1 would look for the GCS where nothing listens. On one machine
loopback is the right address: with RLHF_RAY_LOOPBACK=1, each Python process keeps the address it was given.
"""

import os

if os.environ.get("RLHF_RAY_LOOPBACK") == "1":
    try:
        from ray._private import services
    except ImportError:  # a Python without Ray: nothing to keep
        pass
    else:

        def _as_given(host: str) -> str:
            if not host:
                raise ValueError(f"Malformed host: {host}")
            return host

        services.resolve_ip_for_localhost = _as_given
