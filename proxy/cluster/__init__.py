"""Cross-replica coalescing: sidecars sharing one Redis share live streams.

One replica owns each flight (a lease with a fencing token, `lease`), runs
the upstream call and records what its stream's readers are told into a
Redis Stream (`log`); every other replica reads that record once per key
into a local stream its own callers follow (`mirror`). `flight` decides
which role a replica takes on a local miss; `link` holds the Redis client,
the breaker and the counters. Off unless the policy's
`cluster.coalesce_across_replicas` is true.
"""
