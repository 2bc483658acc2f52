"""Layer 0, used by every stage: the command line (cli), manifests and atomic files, the output-folder lifecycle,
the run-folder layout, process groups, threads and devices, prefetching, fault injection, tokenization rules.
"""
