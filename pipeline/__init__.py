"""The pipeline's package, in layers that follow the data; each imports only the layers below it
(tests/test_layers.py walks the import graph):

    core           cli, manifest, output_folder, layout, distributed, runtime, prefetch, fault_injection, tokenization
    sentences      text sources, splitter, the sentence dataset and its builder
    capture        the activation shards and the capture stage
    preprocessing  statistics, the shuffled .npy arrays and the stage that writes them
    sae            the SAE (model, foreign formats), its training, the training run, spliced evaluation
    top_sentences  the top-activating sentences: sources, collection, tables
    interpret      Claude batches, offline explainers, the sentence embedder, meanings
    steering       splice, sessions, vectors, output scores, judge, evaluation, results
    report         the report page and the feature browser

`llama_3/` (the model) sits below all of them and imports none. The top-level scripts orchestrate these.
"""
