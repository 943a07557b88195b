"""The request path's stages, one module each: leader, follower, upstream.

Each stage's slot is taken and released inside its own module; no request
ever holds two at once (DESIGN invariant 1).
"""
