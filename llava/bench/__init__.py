"""Speed and memory benchmarks of the dropping methods (`python -m llava.bench.prefill_decode`, `... .compare`)."""
