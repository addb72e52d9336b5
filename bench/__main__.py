"""`python -m bench`: the latency-tax benchmark (see bench/latency_tax.py)."""
from bench.latency_tax import main

raise SystemExit(main())
