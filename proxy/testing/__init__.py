"""Test doubles that ship with the package: the fake OpenAI-compatible upstream.

Not used by the proxy itself; `llm-sidecar fake-upstream` runs it so users
and the bench can try the proxy without spending tokens.
"""
