"""The metadata node: namespace state machine, placement, chunk-server registry and the service.
"""
