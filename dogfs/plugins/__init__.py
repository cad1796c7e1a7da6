"""Service makers for twistd: the only modules that touch the global reactor.
"""
