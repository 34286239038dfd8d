"""The series and models clients pick from with ``seriesId`` and ``modelId``."""

from __future__ import annotations

from core import ConfigError, Problem, Route, Services

from .errors import Invalid
from .options import CatalogModel, Options
from .wire import CatalogEntry, SeriesEntry, required


class SeriesCatalog:
    """``[surfaces.topic_chat]``'s series, checked against the configuration.

    Promises: built only when every entry names a configured model and provider
    and no id is used twice (:class:`~core.ConfigError` naming each problem
    otherwise), so a ``seriesId`` and ``modelId`` that are listed always route.
    """

    def __init__(self, options: Options, services: Services) -> None:
        problems = _problems(options, services)
        if problems:
            raise ConfigError(problems)
        self.services = services
        self.models: dict[int, dict[int, CatalogModel]] = {
            series.id: {entry.id: entry for entry in series.models} for series in options.series
        }
        config = services.config.models
        self.listing = [
            SeriesEntry(
                series.id,
                series.name,
                [
                    CatalogEntry(
                        id=model.id,
                        name=model.name or model.model,
                        model=model.model,
                        description=config[model.model].description,
                        context_tokens=config[model.model].context_tokens,
                    )
                    for model in series.models
                ],
            )
            for series in options.series
        ]
        """What ``GET /chat/series`` answers (the configuration does not change while serving)."""

    def __contains__(self, series_id: int) -> bool:
        return series_id in self.models

    def route(self, series_id: int | None, model_id: int | None) -> Route:
        """The route of a catalog entry; :class:`Invalid` naming a missing or unknown series or model."""
        series_id = required(series_id, "seriesId")
        model_id = required(model_id, "modelId")
        models = self.models.get(series_id)
        if models is None:
            known = ", ".join(str(s) for s in self.models) or "none"
            raise Invalid(f"field 'seriesId': there is no series {series_id} (known: {known})")
        entry = models.get(model_id)
        if entry is None:
            known = ", ".join(str(m) for m in models)
            raise Invalid(f"field 'modelId': series {series_id} has no model {model_id} (known: {known})")
        return self.services.catalog.route(entry.model, entry.provider)


def _problems(options: Options, services: Services) -> list[Problem]:
    """What is wrong with the catalog: ids used twice, models or providers not configured."""
    config = services.config
    providers = services.catalog.providers
    problems: list[Problem] = []

    def problem(key: str, expected: str, found: str) -> None:
        problems.append(Problem(str(config.path), f"surfaces.topic_chat.{key}", expected, found))

    seen_series: set[int] = set()
    for i, series in enumerate(options.series):
        if series.id in seen_series:
            problem(f"series.{i}.id", "a series id used once", str(series.id))
        seen_series.add(series.id)
        seen_models: set[int] = set()
        for j, entry in enumerate(series.models):
            if entry.id in seen_models:
                problem(f"series.{i}.models.{j}.id", "a model id used once in its series", str(entry.id))
            seen_models.add(entry.id)
            if entry.model not in config.models:
                known = ", ".join(sorted(config.models)) or "none configured"
                problem(f"series.{i}.models.{j}.model", f"a model of [models] ({known})", repr(entry.model))
            elif config.models[entry.model].kind != "chat":
                expected = 'a chat model (its [models] table sets kind = "chat")'
                problem(f"series.{i}.models.{j}.model", expected, f"{entry.model!r}, an embedding model")
            if entry.provider is not None and entry.provider not in providers:
                known = ", ".join(sorted(providers))
                problem(
                    f"series.{i}.models.{j}.provider", f"a provider instance ({known})", repr(entry.provider)
                )
    return problems
