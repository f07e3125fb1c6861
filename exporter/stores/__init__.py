"""The secrets stores: scanning generations, the cache that keeps scrapes cheap, the walk, inotify.

This __init__ imports nothing: a helper process loads stores/walk.py and stores/inotify.py by path from a bare
interpreter, with this folder as its package.
"""
