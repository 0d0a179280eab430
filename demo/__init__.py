"""The demo: the whole library on scikit-learn's handwritten digits (`make demo`, `vlm demo`).

It sits on top of the core, training and retrieval, beside the commands (DESIGN.md), so the core never
imports it:

- `demo.run`: the five stages and the `vlm demo` command,
- `demo.report`: the self-contained HTML report it writes,
- `demo.sample_data`: the digits written as class folders and caption tables (the tests and the
  benchmarks use them too).

Nothing is imported here, so `demo.sample_data` and `demo.report` load without training, retrieval,
accelerate or faiss.
"""
