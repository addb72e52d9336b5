"""The dashboard's views: each module exports ROUTES (see dashboard.web)."""
from __future__ import annotations

from hubcore.dashboard.views import audit, live, me, overview, requests, tokens, usage

VIEWS = (overview, usage, me, audit, live, requests, tokens)
