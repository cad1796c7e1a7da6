"""HTTP side of a metadata node: dashboard, WebSocket feed, /metrics and /healthz.
"""
