"""The web dashboard: its own HTTP/1.1 listener beside the proxy (never on
the proxy's port), server-rendered pages readable without JavaScript.

server.py serves it (h11 on asyncio streams, bounded heads and bodies,
timeouts, security headers on every answer); sessions.py keeps sign-ins in
memory; mine.py reads a developer's own figures off the event loop; pages.py
renders them as escaped HTML with an SVG chart.
"""
