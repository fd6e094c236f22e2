"""The generation runtime: paged KV pool, block tables, scheduling, the generate loop."""
