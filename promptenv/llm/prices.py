"""The price table: what a token costs per backend and model.

Defaults ship as ``promptenv/llm/prices.toml``; users override them with a
TOML or JSON file of the same shape named by ``PMLM_PRICES`` or
``ClientConfig.prices_path``::

    [openai]
    "gpt-4o-mini" = { input = 0.15, output = 0.60 }   # USD per million tokens

Example::

    >>> table = PriceTable.load()
    >>> table.cost("openai", "gpt-4o-mini", input_tokens=1000, output_tokens=500)
    0.00045
"""

from __future__ import annotations

import json
import os
import tomllib
from dataclasses import dataclass
from pathlib import Path

from promptenv.llm.errors import BackendConfigError

DEFAULT_PRICES_PATH = Path(__file__).with_name("prices.toml")
PRICES_ENV = "PMLM_PRICES"


@dataclass(frozen=True)
class ModelPrice:
    """Price of one model, per million input and output tokens."""

    input_per_mtok: float
    output_per_mtok: float

    def cost(self, input_tokens: int, output_tokens: int) -> float:
        return (input_tokens * self.input_per_mtok + output_tokens * self.output_per_mtok) / 1e6


class PriceTable:
    """Prices per backend and model; the local backend is always free."""

    def __init__(self, prices: dict[str, dict[str, ModelPrice]], source: Path | None = None):
        self._prices = prices
        self.source = source

    @classmethod
    def load(cls, path: Path | str | None = None) -> PriceTable:
        """Read ``path``, else ``$PMLM_PRICES``, else the shipped defaults.

        Raises ``BackendConfigError`` naming the file when it is missing or malformed.
        """
        chosen = Path(path or os.environ.get(PRICES_ENV) or DEFAULT_PRICES_PATH)
        try:
            raw_text = chosen.read_bytes()
        except OSError as exc:
            raise BackendConfigError(
                f"cannot read the price table {chosen}: {exc.strerror} "
                f"(set {PRICES_ENV} to a TOML or JSON price file, or unset it for the defaults)"
            ) from exc
        try:
            raw = (
                json.loads(raw_text)
                if chosen.suffix == ".json"
                else tomllib.loads(raw_text.decode())
            )
            prices = {
                str(backend): {
                    str(model): ModelPrice(float(entry["input"]), float(entry["output"]))
                    for model, entry in models.items()
                }
                for backend, models in raw.items()
            }
        except (ValueError, KeyError, TypeError, AttributeError, tomllib.TOMLDecodeError) as exc:
            raise BackendConfigError(
                f"the price table {chosen} is malformed ({exc!r}); each entry must look like "
                '"MODEL" = { input = USD_PER_MILLION, output = USD_PER_MILLION } under [openai] '
                "or [anthropic]"
            ) from exc
        return cls(prices, source=chosen)

    def price(self, backend: str, model: str) -> ModelPrice | None:
        """The price of ``model`` on ``backend``: the longest key that prefixes the name, or None."""
        if backend == "local":
            return ModelPrice(0.0, 0.0)
        models = self._prices.get(backend, {})
        matches = [key for key in models if model == key or model.startswith(key)]
        return models[max(matches, key=len)] if matches else None

    def cost(self, backend: str, model: str, *, input_tokens: int, output_tokens: int) -> float:
        """Money for one call; 0 when the model has no price."""
        price = self.price(backend, model)
        return price.cost(input_tokens, output_tokens) if price else 0.0
