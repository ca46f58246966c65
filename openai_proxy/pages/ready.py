"""`/ready`: the load balancer's health check. Public and without details: 200 while the server takes
new work, 503 from the moment it is told to stop (SIGTERM) until it exits, so a balancer moves
traffic away while in-flight requests and streams finish (`openai_proxy.worker` tells how the server drains).
"""

from __future__ import annotations

from flask import Blueprint, Response

from openai_proxy import jsonio
from openai_proxy.state import state

bp = Blueprint("ready", __name__)

READY = jsonio.dumps({"status": "ready"})
DRAINING = jsonio.dumps({"status": "draining"})


@bp.get("/ready")
def ready() -> Response:
    body, status = (DRAINING, 503) if state().draining() else (READY, 200)
    # No cache between a balancer and the server may keep answering "ready".
    return Response(body, status, mimetype="application/json", headers={"Cache-Control": "no-store"})
