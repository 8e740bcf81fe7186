"""Container health probe: exit 0 when the gateway's /readyz answers 200, 1 otherwise.

Plain standard library (the images carry no curl). It asks the port the server listens on
(`RWKV_GATEWAY_PORT`, default 8000) over loopback, and prints one short line Docker keeps in the
container's health log.
"""

from __future__ import annotations

import os
import sys
import urllib.error
import urllib.request


def main() -> int:
    port = os.environ.get("RWKV_GATEWAY_PORT", "8000")
    url = f"http://127.0.0.1:{port}/readyz"
    try:
        with urllib.request.urlopen(url, timeout=float(os.environ.get("HEALTHCHECK_TIMEOUT_S", "4"))) as resp:
            status = resp.status
    except urllib.error.HTTPError as exc:  # 503 while loading or draining
        status = exc.code
    except (OSError, ValueError) as exc:
        sys.stdout.write(f"unhealthy: {url}: {exc}\n")
        return 1
    sys.stdout.write(f"{'ready' if status == 200 else 'not ready'}: {url} answered {status}\n")
    return 0 if status == 200 else 1


if __name__ == "__main__":
    sys.exit(main())
