"""The request path: one Exchange per request, from its head to its usage row, and the hub's probes."""
