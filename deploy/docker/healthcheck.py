#!/usr/bin/env python3
"""Container health check: exit 0 when /health answers 200 on one of HEALTHCHECK_PORTS.

The image runs the frontend (HTTP port 8000) or a worker/router (system port, DYN_SYSTEM_PORT,
9090 in the image), so it tries each configured port in turn. Standard library only.
"""

import os
import sys
import urllib.error
import urllib.request


def main() -> int:
    ports = os.environ.get("HEALTHCHECK_PORTS", "8000 9090").split()
    host = os.environ.get("HEALTHCHECK_HOST", "127.0.0.1")
    for port in ports:
        try:
            with urllib.request.urlopen(f"http://{host}:{port}/health", timeout=3) as resp:
                if resp.status == 200:
                    return 0
        except (urllib.error.URLError, OSError, ValueError):
            continue
    print(f"no /health answered on ports {ports}", file=sys.stderr)
    return 1


if __name__ == "__main__":
    sys.exit(main())
