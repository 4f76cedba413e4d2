"""What changes in a running pool, and its one writer.

A running daemon changes five things of its pool: the model list `auto` expands to (a
SIGHUP's `models`, the catalogue's discovered free list), the governor's policy (limits,
breaker, budgets), the ranking of `auto` models, the ladder and how agents are started
(`[agents]`; the last three on a SIGHUP). `Live` is
the only code that writes them once the pool is built, and it is called on the event
loop thread only, the thread the workers read them on: a worker sees the old value or
the new one between two of its steps, never a half-made one. The model list is changed
in place, so whoever holds the pool's list sees the new one.
"""

from __future__ import annotations

from collections.abc import Sequence

from ohd.core import selection
from ohd.core.routing import Policy
from ohd.ladder.ladder import Ladder
from ohd.work.agentproc import AgentConfig
from ohd.work.worker import Pool


class Live:
    """The writer of the pool's model list, policy, ranking and ladder (call on the loop thread)."""

    def __init__(self, pool: Pool) -> None:
        self.pool = pool

    def use_models(self, models: Sequence[str]) -> None:
        self.pool.models[:] = models

    def use_policy(self, policy: Policy) -> None:
        self.pool.governor.policy = policy

    def use_rank(self, rank: selection.Rank | None) -> None:
        self.pool.rank = rank

    def use_ladder(self, ladder: Ladder) -> None:
        self.pool.ladder = ladder

    def use_agents(self, config: AgentConfig) -> None:
        """`[agents]` for the agent runs that start from now on (a running agent keeps its own)."""
        if self.pool.agents is not None:
            self.pool.agents.config = config
