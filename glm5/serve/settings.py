"""Server settings (``glm5 serve`` flags map onto these fields)."""

from __future__ import annotations

from dataclasses import dataclass, field

# GLM-5 list prices, USD per million tokens (chat-format-and-serving.md §1.4)
PRICE_INPUT = 1.0
PRICE_OUTPUT = 3.2
PRICE_CACHED_INPUT = 0.2


@dataclass
class ServeSettings:
    served_model_names: list[str] = field(default_factory=lambda: ["glm-5"])
    api_key: str | None = None
    price_input_per_million: float = PRICE_INPUT
    price_output_per_million: float = PRICE_OUTPUT
    price_cached_input_per_million: float = PRICE_CACHED_INPUT
    max_request_bytes: int = 8 << 20  # larger bodies get 413
    max_pending_requests: int = 256  # generation requests in the server at once; more get 429
    retry_after_s: int = 1
    default_temperature: float = 1.0  # GLM-5 generation_config.json
    default_top_p: float = 0.95
    max_default_tokens: int | None = None  # cap on max_tokens when the client sends none (None: the context)
    enable_webchat: bool = True
    max_stored_responses: int = 1024  # /v1/responses kept for previous_response_id and GET (LRU; 0: none)

    def __post_init__(self):
        if isinstance(self.served_model_names, str):
            self.served_model_names = [self.served_model_names]
        if not self.served_model_names:
            raise ValueError("at least one served model name is needed")
        if self.max_pending_requests < 1:
            raise ValueError("max_pending_requests must be >= 1")
        for name in ("price_input_per_million", "price_output_per_million", "price_cached_input_per_million"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0")

    @property
    def model_name(self) -> str:
        return self.served_model_names[0]

    def cost(self, prompt_tokens: int, cached_tokens: int, completion_tokens: int) -> dict:
        cached = min(cached_tokens, prompt_tokens)
        inp = (prompt_tokens - cached) * self.price_input_per_million / 1e6
        cin = cached * self.price_cached_input_per_million / 1e6
        out = completion_tokens * self.price_output_per_million / 1e6
        return {
            "total": inp + cin + out,
            "details": {
                "currency": "USD",
                "input_cost": inp,
                "cached_input_cost": cin,
                "output_cost": out,
                "input_price_per_million": self.price_input_per_million,
                "cached_input_price_per_million": self.price_cached_input_per_million,
                "output_price_per_million": self.price_output_per_million,
            },
        }
