"""End-to-end tests: a real hub (in a thread or a subprocess) and a fake vendor over real sockets."""
