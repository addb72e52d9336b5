"""Sans-IO choice of key and upstream: the key ring and its failure rules."""
