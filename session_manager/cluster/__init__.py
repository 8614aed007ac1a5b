"""Several manager processes on one Redis: session leases, adoption of orphans, the bus."""
