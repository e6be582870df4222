"""`python benchmarks/prefill_decode.py` = `python -m llava.bench.prefill_decode` (see README.md here)."""

from llava.bench.prefill_decode import main

if __name__ == "__main__":
    main()
