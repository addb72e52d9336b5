"""hubcore: a self-hosted gateway between AI coding clients and vendor APIs.

The package is built in layers; a module imports only from its own layer or
from those below it (tests/test_layers.py checks every import):

    cli/, app.py, runtime.py,       top: commands, wiring, process set-up,
    supervisor.py                   the processes of several workers
    gateway/   ops/   dashboard/    the request path; the ops socket; the web dashboard
                                    (strangers to each other)
    shared/                         state shared between instances through Redis
                                    (the gateway's, with a [shared] table)
    governance/   accounting/       who may do what; what it cost
    routing/   http/                sans-IO key and upstream choice; HTTP/1.1
    errors, config, store           foundations (with _meter_errors)

Within a row the packages are strangers: governance imports no accounting,
http no routing.
"""

__version__ = "0.1.0"
