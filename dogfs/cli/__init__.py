"""The dogfs command line.
"""
