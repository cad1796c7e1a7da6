"""The process entry points (service makers for twistd, the `dogfs` console script): the
only modules that touch the global reactor.
"""
