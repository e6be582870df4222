"""`python benchmarks/compare.py` = `python -m llava.bench.compare` (see README.md here)."""

from llava.bench.compare import main

if __name__ == "__main__":
    main()
