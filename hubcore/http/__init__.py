"""HTTP/1.1 only, no vendor knowledge: the client-side server, the upstream client, head handling, deadlines."""
