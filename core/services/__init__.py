"""Behaviour shared by every surface: identities, catalog, billing, context, generations."""

from __future__ import annotations

from dataclasses import dataclass

from ..config import Config
from ..search import WebSearch
from .accounts import Accounts
from .billing import Billing
from .catalog import Catalog
from .completions import Completions
from .conversations import Conversations
from .generations import Generations


@dataclass(frozen=True)
class Services:
    """Everything a surface may use. Surfaces reach the store and providers only through these."""

    config: Config
    catalog: Catalog
    accounts: Accounts
    billing: Billing
    completions: Completions
    generations: Generations
    conversations: Conversations
    web_search: WebSearch | None = None
    """The configured web search plugin, if any."""
