"""The application layer shared by the generate job, the benchmark and the simulator: the request
type and its builders, the strategy registry, predict -> plan -> run, and the runner.
"""
