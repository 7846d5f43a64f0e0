"""Container health check: exit 0 when GET /health/ready answers 200, else 1.

Standard library only (the slim base image has no curl). Talks to 127.0.0.1 on $SATML_PORT,
bypassing any HTTP proxy from the environment.
"""

import os
import sys
import urllib.request

port = os.environ.get("SATML_PORT", "8000")
url = f"http://127.0.0.1:{port}/health/ready"
opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
try:
    with opener.open(url, timeout=float(os.environ.get("SATML_HEALTHCHECK_TIMEOUT", "4"))) as resp:
        ok = resp.status == 200
except Exception as exc:  # connection refused, 503 while loading, timeout
    print(f"not ready: {url}: {exc}", file=sys.stderr)
    sys.exit(1)
sys.exit(0 if ok else 1)
