"""Contracts shared by the stage scripts: run paths, manifests and atomic files, the sentence format."""
