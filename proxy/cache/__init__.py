"""The response cache: record format, backends and the fast lane."""
