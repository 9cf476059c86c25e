"""`mmembed bench`: the pipeline's throughput against the code a user would otherwise write (`main.run`).

In one run, for each modality, on a generated raw-media Parquet dataset:

1. the pipeline end to end (Parquet in, store out: `jobs.run.run_job`), fp32 and bf16;
2. the reference loop a user would write, fp32, timed from the bytes in memory to embeddings
   (model loading and Parquet reading left out, which favours it): transformers
   `CLIPImageProcessorPil` + `CLIPModel.get_image_features`, `WhisperFeatureExtractor` +
   `WhisperModel` encoder (30 s windows, mean over positions), sentence-transformers `encode`;
3. our encoder's bare `embed` on pre-made inputs (the machine's ceiling), fp32 and bf16;

then a sweep of encoder actors x batch size x threads, retrieval latency over synthetic stores,
the incremental check on the largest, peak memory of an image job and of one 10x larger, and the
fixed cost of a 10-item job (those two in a subprocess `mmembed embed`, with a fresh Ray).

Models: `minilm-l6` and `whisper-tiny.en` are the real packaged ones; no CLIP weights can be
downloaded, so images use a CLIP with ViT-B/32 dimensions and random weights, built with
transformers and converted into the model home once. The Whisper baseline is transformers'
encoder loaded with the same tiny.en weights, mapped back from our store.

This package's __init__ imports nothing: `python -m jobs.bench.gpu` runs where neither Ray nor DuckDB is installed.
"""
