"""The container's HEALTHCHECK: GET the gateway's /health (stdlib only, no curl in the image).

`MODELYARD_HEALTH_URL` names it (default http://127.0.0.1:8000/health). Over https the
certificate is not verified: it is issued for the public name, not for 127.0.0.1, and this
check only asks whether the process answers.
"""

import os
import ssl
import sys
import urllib.request

URL = os.environ.get("MODELYARD_HEALTH_URL", "http://127.0.0.1:8000/health")

context = ssl._create_unverified_context() if URL.startswith("https:") else None
try:
    with urllib.request.urlopen(URL, timeout=4, context=context) as response:
        sys.exit(0 if response.status == 200 else 1)
except Exception as error:  # any failure means unhealthy; say why in `docker inspect`
    print(f"unhealthy: {URL}: {error}")
    sys.exit(1)
