"""State shared between hub instances through Redis: rate windows,
concurrency slots and budget spend of tokens, users and projects; vendor key
states; session affinity. Used only with a [shared] table (several instances,
or [server] workers > 1); see redis_state for the design."""
