"""From a public model name to the ordered deployments that may serve it."""

from __future__ import annotations

from dataclasses import dataclass

from tokenworks.config import Config, Deployment, Model
from tokenworks.dispatch.dispatcher import Dispatcher
from tokenworks.metering.tokens import encoding_for


@dataclass(frozen=True, slots=True)
class Route:
    """A public model with its deployments in configured order."""

    model: Model
    deployments: tuple[Deployment, ...]
    encoding: str


class Router:
    def __init__(self, config: Config, health: Dispatcher) -> None:
        self.health = health
        self.routes: dict[str, Route] = {
            m.name: Route(
                model=m,
                deployments=tuple(m.deployments),
                encoding=m.tokenizer or encoding_for(m.deployments[0].model),
            )
            for m in config.models
        }

    def get(self, name: str) -> Route | None:
        return self.routes.get(name)

    def candidates(self, route: Route, max_attempts: int) -> list[Deployment]:
        """Deployments whose breaker is not open first, each group in configured order; at
        most max_attempts."""
        healthy = [d for d in route.deployments if self.health.available(d)]
        cooling = [d for d in route.deployments if not self.health.available(d)]
        return (healthy + cooling)[:max_attempts]
