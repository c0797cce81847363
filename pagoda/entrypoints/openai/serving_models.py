"""`GET /v1/models`: one model card per served name.

Every `--served-model-name` is a valid `model` in requests and gets its own card; all of them are
the same engine, so they share `root` (the model the engine loaded) and `max_model_len`.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

from pagoda.entrypoints.openai.protocol import ModelCard, ModelList


class OpenAIServingModels:
    """Lists the served model names of one engine."""

    def __init__(self, engine: Any, served_model_names: Sequence[str]) -> None:
        if not served_model_names:
            raise ValueError("served_model_names must name at least one model")
        self.engine = engine
        self.served_model_names = list(served_model_names)
        # A card's `created` is when the server started serving it, stable across calls.
        self.created = int(time.time())

    async def show_available_models(self) -> ModelList:
        model_config = self.engine.model_config
        cards = [
            ModelCard(
                id=name,
                created=self.created,
                owned_by="pagoda",
                root=str(model_config.model),
                max_model_len=model_config.max_model_len,
            )
            for name in self.served_model_names
        ]
        return ModelList(data=cards)
