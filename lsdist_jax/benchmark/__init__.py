"""The throughput benchmark: every strategy on the same requests (`run.py`), its resume state
(`state.py`), worker processes over GPUs (`workers.py`), the report (`report.py`), the
engine-free simulation of the strategies (`simulate.py`), cost-model profiling (`profile.py`) and
the engine's decode benchmark against HF transformers (`engine.py`).

Submodules are imported where they are used (`from lsdist_jax.benchmark.run import
run_benchmark`), so the engine-free ones load without JAX.
"""
