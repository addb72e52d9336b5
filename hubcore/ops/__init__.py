"""Operating the hub: the ops socket and its client, metrics, the access log, systemd notification."""
