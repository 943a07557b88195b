"""The names the proxy gives what it keeps in Redis for one request key.

Redis Cluster hashes only the part of a name between the first `{` and the
next `}` (the hash tag) when there is one, so every name built here for a
key lands in that key's slot, on one master: a cache entry, a claim and its
event stream can be read and written together (one Lua script, one
pipeline) on a cluster as on a single Redis. On a single Redis the braces
are just characters.

Pure: no I/O, no redis import. The prefix is checked by the policy (no
braces, or the tag would be the prefix's and every key would share a slot);
the request key is a hex digest, never empty, never a brace.
"""

from __future__ import annotations


def redis_name(prefix: str, key: str, *parts: str) -> str:
    """`prefix{key}` followed by `:part` for each part, all in `key`'s slot.

    redis_name("llm-sidecar:", k)                   -> "llm-sidecar:{k}"
    redis_name("llm-sidecar:", k, "claim")          -> "llm-sidecar:{k}:claim"
    redis_name("llm-sidecar:", k, "events", token)  -> "llm-sidecar:{k}:events:TOKEN"
    """
    name = f"{prefix}{{{key}}}"
    return name + "".join(f":{part}" for part in parts) if parts else name
