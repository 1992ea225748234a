"""The `serve` flags that lift what limits one client and one address, for benchmarks.

A load generator opens every connection from one machine: to the server it is one client
behind one address, so the per-client and per-address limits (docs/SERVER.md) would measure
those limits, not the server. The benchmark scripts start our server with these flags
(`import lifted_limits`; a script's own directory is on Python's path): counts to a million,
rates and bursts to four billion, and the bytes one client may make the server hold to the
whole of `--max-queued-bytes`. The totals a run needs (`--max-connections`,
`--max-subscriptions`) are each script's to set; `--max-calls` is here because one client
makes all the calls. `scripts/test-prometheus` keeps its own, smaller, values.
"""

COUNT = "1000000"
RATE = "4000000000"
# The default --max-queued-bytes (64 MiB): at the default 4 MiB, 1 000 subscriptions of one
# client hold about 85 ms of a fan-out's backlog, and the generator on the same cores
# stalls longer than that now and then.
QUEUED_BYTES = "67108864"

ONE_CLIENT = [
    ("--max-subscriptions-per-client", COUNT),
    ("--max-connections-per-client", COUNT),
    ("--connection-rate", COUNT),
    ("--connection-burst", COUNT),
    ("--max-calls-per-client", COUNT),
    ("--max-calls", COUNT),
    ("--client-queued-bytes", QUEUED_BYTES),
    ("--request-rate", RATE),
    ("--request-burst", RATE),
    ("--publish-rate", RATE),
    ("--publish-burst", RATE),
    ("--publish-bytes-rate", RATE),
    ("--publish-bytes-burst", RATE),
    ("--address-connections", COUNT),
    ("--address-subscriptions", COUNT),
    ("--address-calls", COUNT),
    ("--address-connection-rate", COUNT),
    ("--address-connection-burst", COUNT),
    ("--address-publish-rate", RATE),
    ("--address-publish-burst", RATE),
    ("--address-publish-bytes-rate", RATE),
    ("--address-publish-bytes-burst", RATE),
]


def flags(pairs=None):
    """`pairs` (default: ONE_CLIENT) as a flat argument list."""
    return [item for pair in (ONE_CLIENT if pairs is None else pairs) for item in pair]
