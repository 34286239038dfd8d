"""chatgate core: the one import a plugin author needs.

Everything a provider, store, surface or web-search plugin uses is importable from
here and listed in ``__all__``::

    from core import ChatRequest, ContentDelta, Finish, Provider, Usage, hookimpl

Modules below ``core`` are chatgate's own; their other names may change without
notice. ``core.testing`` holds the conformance suites and the fake upstream.
"""

__version__ = "0.1.0"

from .asgi import (
    SSE_HEADERS,
    Answer,
    BodyTooLarge,
    ClientGone,
    documented_route,
    encode_headers,
    json_answer,
    read_body,
    request_headers,
    send_answer,
    start_stream,
)
from .bodies import decode_body
from .cluster import MAX_SIGNAL_BYTES, ClusterStore, Receiver, StandingWatcher
from .config import ModelConfig
from .credentials import Redactor, bearer_matches, url_credentials, without_credentials
from .errors import (
    PROVIDER_ERRORS,
    AuthenticationFailed,
    BadRequest,
    BalanceTooLarge,
    ChatgateError,
    ConfigError,
    Conflict,
    ContextTooLong,
    InsufficientBalance,
    InvalidBody,
    InvalidEmail,
    LeaseReleased,
    NotAllowed,
    NotFound,
    OutOfStanding,
    Problem,
    ProviderError,
    RateLimited,
    RateLimitExceeded,
    StoreError,
    Superseded,
    Timeout,
    Unauthenticated,
    Unavailable,
    UnknownModel,
    UnknownProvider,
    UpstreamBalanceExhausted,
)
from .hookspecs import hookimpl
from .limits import COUNTED_KINDS, DAY_MS, IN_FLIGHT_MS, OPEN_KINDS, WINDOW_MS, refuse_past
from .locks import KeyedLock
from .model_list import model_list, model_object
from .money import MAX_BALANCE, MICRO, format_amount, parse_amount
from .pages import web_page
from .plugin import NoOptions, Plugin
from .provider import EmbeddingsUnsupported, Provider, complete
from .reasoning import reasoning_fields, upstream_plugin
from .records import (
    ApiKey,
    Conversation,
    ConversationPatch,
    LedgerDraft,
    LedgerEntry,
    LedgerKind,
    LedgerSettlement,
    Message,
    MessageDraft,
    MessagePatch,
    MessageRole,
    MessageStatus,
    RateLimits,
    RateUse,
    UsageDay,
    User,
    utcnow,
)
from .reply import Reply
from .search import WebResult, WebSearch
from .services import Services
from .services.accounts import EMAIL, Caller, KeyLimits, email_allowed, normalize_email
from .services.billing import Payer, Quota
from .services.catalog import Route
from .services.completions import Completion
from .services.conversations import Transcript
from .services.embeddings import Embedder
from .services.generations import Generation, Outcome
from .store import COPIED_COLUMNS, CopyableStore, LeaseStore, Store, StoreTotals
from .streaming import PACE, ReplyStream
from .surface import Surface
from .tokens import estimate_prompt_tokens, estimate_request_tokens, estimate_tokens, is_cjk
from .types import (
    ChatMessage,
    ChatRequest,
    ContentDelta,
    EmbeddingRequest,
    Embeddings,
    Finish,
    FinishReason,
    ProviderEvent,
    ReasoningDelta,
    ToolCall,
    ToolCallDelta,
    Usage,
)

__all__ = [
    "COPIED_COLUMNS",
    "COUNTED_KINDS",
    "DAY_MS",
    "EMAIL",
    "IN_FLIGHT_MS",
    "MAX_BALANCE",
    "MAX_SIGNAL_BYTES",
    "MICRO",
    "OPEN_KINDS",
    "PACE",
    "PROVIDER_ERRORS",
    "SSE_HEADERS",
    "WINDOW_MS",
    "Answer",
    "ApiKey",
    "AuthenticationFailed",
    "BadRequest",
    "BalanceTooLarge",
    "BodyTooLarge",
    "Caller",
    "ChatMessage",
    "ChatRequest",
    "ChatgateError",
    "ClientGone",
    "ClusterStore",
    "Completion",
    "ConfigError",
    "Conflict",
    "ContentDelta",
    "ContextTooLong",
    "Conversation",
    "ConversationPatch",
    "CopyableStore",
    "Embedder",
    "EmbeddingRequest",
    "Embeddings",
    "EmbeddingsUnsupported",
    "Finish",
    "FinishReason",
    "Generation",
    "InsufficientBalance",
    "InvalidBody",
    "InvalidEmail",
    "KeyLimits",
    "KeyedLock",
    "LeaseReleased",
    "LeaseStore",
    "LedgerDraft",
    "LedgerEntry",
    "LedgerKind",
    "LedgerSettlement",
    "Message",
    "MessageDraft",
    "MessagePatch",
    "MessageRole",
    "MessageStatus",
    "ModelConfig",
    "NoOptions",
    "NotAllowed",
    "NotFound",
    "OutOfStanding",
    "Outcome",
    "Payer",
    "Plugin",
    "Problem",
    "Provider",
    "ProviderError",
    "ProviderEvent",
    "Quota",
    "RateLimitExceeded",
    "RateLimited",
    "RateLimits",
    "RateUse",
    "ReasoningDelta",
    "Receiver",
    "Redactor",
    "Reply",
    "ReplyStream",
    "Route",
    "Services",
    "StandingWatcher",
    "Store",
    "StoreError",
    "StoreTotals",
    "Superseded",
    "Surface",
    "Timeout",
    "ToolCall",
    "ToolCallDelta",
    "Transcript",
    "Unauthenticated",
    "Unavailable",
    "UnknownModel",
    "UnknownProvider",
    "UpstreamBalanceExhausted",
    "Usage",
    "UsageDay",
    "User",
    "WebResult",
    "WebSearch",
    "__version__",
    "bearer_matches",
    "complete",
    "decode_body",
    "documented_route",
    "email_allowed",
    "encode_headers",
    "estimate_prompt_tokens",
    "estimate_request_tokens",
    "estimate_tokens",
    "format_amount",
    "hookimpl",
    "is_cjk",
    "json_answer",
    "model_list",
    "model_object",
    "normalize_email",
    "parse_amount",
    "read_body",
    "reasoning_fields",
    "refuse_past",
    "request_headers",
    "send_answer",
    "start_stream",
    "upstream_plugin",
    "url_credentials",
    "utcnow",
    "web_page",
    "without_credentials",
]
