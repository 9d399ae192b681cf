"""The web console: server-rendered pages for researchers, operators and auditors.

Why a package of its own: the console is a second front end on the coordinator's services,
not a new API. It authenticates with the same API keys (exchanged once for a session cookie),
authorizes with the same `allow(...)` calls and the same visibility rules of the services, and
verifies the audit log in the browser (static/verify.js) independently of the server.

The coordinator app registers it with two values: `console_router()` among its route
handlers and `template_config()` as its template config.
"""

from __future__ import annotations

from exchange.console.app import console_router, template_config

__all__ = ["console_router", "template_config"]
