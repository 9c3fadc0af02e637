"""Scheduling (numpy only): length-distribution maths, the cost model, and the planners."""

from lsdist_jax.schedule import dist
from lsdist_jax.schedule.cost import CostModel, with_engine_shapes
from lsdist_jax.schedule.planners import PLANNERS, expected_cost, make_plan, plan_recovery
from lsdist_jax.schedule.types import Batch, Options, Plan, Requests

__all__ = ["PLANNERS", "Batch", "CostModel", "Options", "Plan", "Requests", "dist",
           "expected_cost", "make_plan", "plan_recovery", "with_engine_shapes"]
